//! Server-side apply of the objects `resources` builds.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};

use super::{Error, MANAGER, Result};
use crate::resources::Object;

async fn ssa<K>(api: &Api<K>, name: &str, obj: &K) -> Result<()>
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch(
        name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await?;
    Ok(())
}

/// Server-side applies one object.
pub(super) async fn apply_object(client: &kube::Client, ns: &str, object: Object) -> Result<()> {
    fn name<K: kube::Resource>(o: &K) -> String {
        o.meta().name.clone().unwrap_or_default()
    }
    match object {
        Object::ConfigMap(o) => {
            ssa(
                &Api::<ConfigMap>::namespaced(client.clone(), ns),
                &name(&o),
                &o,
            )
            .await
        }
        Object::Secret(o) => {
            ssa(
                &Api::<Secret>::namespaced(client.clone(), ns),
                &name(&o),
                &o,
            )
            .await
        }
        Object::Service(o) => {
            ssa(
                &Api::<Service>::namespaced(client.clone(), ns),
                &name(&o),
                &o,
            )
            .await
        }
        Object::StatefulSet(o) => {
            ssa(
                &Api::<StatefulSet>::namespaced(client.clone(), ns),
                &name(&o),
                &o,
            )
            .await
        }
        Object::PodDisruptionBudget(o) => {
            ssa(
                &Api::<PodDisruptionBudget>::namespaced(client.clone(), ns),
                &name(&o),
                &o,
            )
            .await
        }
        Object::Monitoring {
            kind,
            plural,
            value,
        } => {
            let gvk = GroupVersionKind::gvk("monitoring.coreos.com", "v1", kind);
            let ar = ApiResource::from_gvk_with_plural(&gvk, plural);
            let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
            let object: DynamicObject =
                serde_json::from_value(value).map_err(|e| Error::Object(e.to_string()))?;
            ssa(&api, &name(&object), &object).await
        }
    }
}
