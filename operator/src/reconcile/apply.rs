//! One pass over an instance that is not being deleted, as a sequence of
//! steps: inputs, rendering, the scale step, the objects, the data volumes,
//! the Kafka topics, the status.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};

use super::{Context, Error, Result, inputs, kafka, objects, scale, status, storage};
use crate::crd::{MqttInstance, MqttInstanceStatus};
use crate::names::Names;
use crate::resources::{self, Context as Build};
use crate::{brokerconfig, profile};

pub(super) async fn apply(obj: Arc<MqttInstance>, ctx: Arc<Context>) -> Result<Action> {
    let ns = obj.namespace().ok_or(Error::NoNamespace)?;
    let names = Names::new(&obj.name_any(), &ns);
    let spec = &obj.spec;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let old_status = obj.status.clone().unwrap_or_default();

    let gathered = match inputs::gather(&ctx, spec, &ns, &secrets).await? {
        Ok(g) => g,
        Err(blocked) => {
            status::report_blocked(&ctx, &obj, &old_status, blocked).await?;
            return Ok(Action::requeue(Duration::from_secs(30)));
        }
    };

    let broker_yaml = brokerconfig::render(spec, &names, &gathered.broker);
    let credentials = if gathered.broker.credentials {
        let uid = obj.uid().unwrap_or_default();
        Some(inputs::render_credentials(&secrets, &names, spec, uid, gathered.passwords).await?)
    } else {
        None
    };
    let owner = obj
        .controller_owner_ref(&())
        .ok_or_else(|| Error::Object("the instance has no name or UID".into()))?;
    let image = spec.image.clone().unwrap_or_else(|| ctx.image.clone());
    let desired = profile::replicas(spec);
    let mut build = Build {
        names: &names,
        owner,
        replicas: desired,
        image: &image,
        config_hash: resources::hash(&[
            &broker_yaml,
            credentials.as_ref().map_or("", |c| c.yaml.as_str()),
        ]),
    };
    let admin_token =
        inputs::generated_secret(&secrets, &build, names.admin_secret(), "token").await?;
    inputs::generated_secret(&secrets, &build, names.cluster_secret(), "secret").await?;

    let existing = Api::<StatefulSet>::namespaced(ctx.client.clone(), &ns)
        .get_opt(&names.main())
        .await?;
    let scaling = scale::step(
        &ctx,
        &obj,
        &names,
        existing.as_ref(),
        desired,
        &old_status,
        &admin_token,
    )
    .await?;
    build.replicas = scaling.replicas;

    let mut objects = resources::objects(&build, spec, broker_yaml, credentials, ctx.monitoring);
    storage::keep_claim_templates(&mut objects, existing.as_ref());
    for object in objects {
        objects::apply_object(&ctx.client, &ns, object).await?;
    }
    if existing.is_some() {
        storage::resize(
            &ctx,
            &obj,
            &ns,
            &names.main(),
            build.replicas,
            &profile::storage_size(spec),
            spec.storage.storage_class_name.as_deref(),
        )
        .await?;
    }

    let mut new_status = MqttInstanceStatus {
        conditions: old_status.conditions.clone(),
        ..MqttInstanceStatus::default()
    };
    kafka::ensure_topics(&ctx, &obj, gathered.kafka, &mut new_status).await;
    let settled = status::observe_into(
        &ctx,
        &obj,
        &names,
        &scaling,
        desired,
        &admin_token,
        &mut new_status,
    )
    .await?;
    status::alarm_events(&ctx, &obj, &old_status.alarms, &new_status.alarms).await;
    status::write_status(&ctx, &obj, &old_status, new_status).await?;
    Ok(if settled {
        Action::requeue(ctx.resync)
    } else {
        Action::requeue(Duration::from_secs(5))
    })
}
