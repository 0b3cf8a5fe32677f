//! The reconciler (P3, P4): one pass brings an instance's objects, Kafka
//! topics and status in line with its spec.
//!
//! A pass (`apply`): read the Secrets the spec names (`inputs`); make sure
//! the generated Secrets exist; render the broker configuration and
//! credentials; take the scale step (`scale`: a scale-down drains the
//! highest pod through the brokers' drain call and lowers the replica count
//! only once that pod holds no session, one pod at a time); apply the
//! ConfigMap, Secrets, Services, StatefulSet and PodDisruptionBudget (and
//! the Prometheus Operator objects where that API exists) by server-side
//! apply (`objects`), the StatefulSet keeping the volume claim templates it
//! was created with while a larger data size is asked of each pod's claim
//! (`storage`); create or grow the Kafka topics (`kafka`); read the
//! brokers' operations API and write the status (`status`). Deleting an
//! instance whose delete policy says so removes its Kafka topics first
//! (`cleanup`, behind a finalizer). Every pass runs in a span named after
//! the instance and is counted by `metrics::ReconcileMetrics`.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::brokers::Brokers;
use crate::crd::{DeletePolicy, MqttInstance};
use crate::names::Names;
use crate::topics::Topics;

mod apply;
mod inputs;
mod kafka;
mod objects;
mod scale;
mod status;
mod storage;

pub use status::set_condition;

/// Errors of one reconcile pass; the controller retries after a while.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("the instance has no namespace")]
    NoNamespace,
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("kafka: {0}")]
    Kafka(#[from] crate::topics::TopicError),
    #[error("credentials: {0}")]
    Credentials(#[from] crate::credentials::CredentialsError),
    #[error("object: {0}")]
    Object(String),
}

impl Error {
    /// The `error` label of the failure metric: a bounded set of values.
    pub fn label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::NoNamespace => "no_namespace",
            Error::Finalizer(_) => "finalizer",
            Error::Kafka(_) => "kafka",
            Error::Credentials(_) => "credentials",
            Error::Object(_) => "object",
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// The field manager of everything the operator applies.
pub const MANAGER: &str = "ringmq-operator";
/// Held while the instance's Kafka topics must be deleted with it.
pub const FINALIZER: &str = "ringmq.io/kafka-topics";
/// Kafka topics every instance has besides its parent topics.
pub const SYSTEM_TOPICS: [&str; 3] = ["mq2mqtt", "mqtt-device-connect", "mqtt-device-disconnect"];

/// What the reconciler works with.
pub struct Context {
    pub client: kube::Client,
    pub recorder: Recorder,
    pub brokers: Arc<dyn Brokers>,
    pub topics: Arc<dyn Topics>,
    /// The broker image for instances that name none.
    pub image: String,
    /// The Prometheus Operator's API exists (ServiceMonitor, PrometheusRule).
    pub monitoring: bool,
    /// How long between passes of a settled instance.
    pub resync: Duration,
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

fn rfc3339_ms(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(|ms| k8s_openapi::jiff::Timestamp::from_millisecond(ms).ok())
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// One reconcile pass, in a span that names the instance.
#[tracing::instrument(skip_all, fields(instance = %obj.name_any(), namespace = obj.namespace().unwrap_or_default()))]
pub async fn reconcile(obj: Arc<MqttInstance>, ctx: Arc<Context>) -> Result<Action> {
    let ns = obj.namespace().ok_or(Error::NoNamespace)?;
    let api: Api<MqttInstance> = Api::namespaced(ctx.client.clone(), &ns);
    let deletes_topics = obj
        .spec
        .kafka
        .as_ref()
        .is_some_and(|k| k.delete_policy == DeletePolicy::Delete);
    let has_finalizer = obj.finalizers().iter().any(|f| f == FINALIZER);
    let deleting = obj.metadata.deletion_timestamp.is_some();
    if deleting && !has_finalizer {
        // Garbage collection removes the owned objects; applying them now
        // would create again what it deletes.
        return Ok(Action::await_change());
    }
    if deleting && deletes_topics && !keeps_topics(&obj) {
        // The brokers stop first: one still running could write to a topic
        // being deleted and so create it again.
        let names = Names::new(&obj.name_any(), &ns);
        if !brokers_stopped(&ctx.client, &ns, &names).await? {
            return Ok(Action::requeue(Duration::from_secs(5)));
        }
    }
    if deletes_topics || has_finalizer {
        if !deletes_topics && !deleting {
            // The policy went back to Retain: nothing outside Kubernetes is
            // cleaned up any more, so nothing holds the deletion.
            remove_finalizer(&api, &obj).await?;
            return apply::apply(obj, ctx).await;
        }
        let ctx2 = ctx.clone();
        return kube::runtime::finalizer(&api, FINALIZER, obj, move |event| {
            let ctx = ctx2.clone();
            async move {
                match event {
                    kube::runtime::finalizer::Event::Apply(o) => apply::apply(o, ctx).await,
                    kube::runtime::finalizer::Event::Cleanup(o) => cleanup(o, ctx).await,
                }
            }
        })
        .await
        .map_err(|e| Error::Finalizer(Box::new(e)));
    }
    apply::apply(obj, ctx).await
}

async fn remove_finalizer(api: &Api<MqttInstance>, obj: &MqttInstance) -> Result<()> {
    let kept: Vec<&String> = obj
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .collect();
    let patch =
        json!({ "metadata": { "finalizers": kept, "resourceVersion": obj.resource_version() } });
    api.patch(
        &obj.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

/// Lets an instance whose Kafka topics cannot be deleted (Kafka gone for
/// good) be deleted without them: `ringmq.io/keep-kafka-topics: "true"`.
pub const KEEP_TOPICS: &str = "ringmq.io/keep-kafka-topics";

fn keeps_topics(obj: &MqttInstance) -> bool {
    obj.annotations()
        .get(KEEP_TOPICS)
        .is_some_and(|v| v == "true")
}

/// Scales the instance's StatefulSet to zero; true once none of its pods
/// is left.
async fn brokers_stopped(client: &kube::Client, ns: &str, names: &Names) -> Result<bool> {
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    let none = Patch::Merge(json!({ "spec": { "replicas": 0 } }));
    match sts
        .patch(&names.main(), &PatchParams::default(), &none)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let left = pods
        .list(&ListParams::default().labels(&names.selector_string()))
        .await?;
    Ok(left.items.is_empty())
}

/// The controller's answer to a failed pass: try again in a while.
pub fn error_policy(obj: Arc<MqttInstance>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(instance = %obj.name_any(), %error, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(15))
}

/// The instance is being deleted: its Kafka parent topics go with it (the
/// finalizer is only there when the delete policy says so).
async fn cleanup(obj: Arc<MqttInstance>, ctx: Arc<Context>) -> Result<Action> {
    let Some(k) = obj
        .spec
        .kafka
        .as_ref()
        .filter(|k| k.delete_policy == DeletePolicy::Delete)
    else {
        return Ok(Action::await_change());
    };
    let names: Vec<String> = k.parent_topics.iter().map(|t| t.name.clone()).collect();
    if keeps_topics(&obj) {
        event(
            &ctx,
            &obj,
            EventType::Warning,
            "KafkaTopicsKept",
            format!("{KEEP_TOPICS}: not deleted: {}", names.join(", ")),
        )
        .await;
        return Ok(Action::await_change());
    }
    let ns = obj.namespace().ok_or(Error::NoNamespace)?;
    let deleted = match inputs::kafka_target(&ctx, &ns, k).await {
        Ok(target) => ctx
            .topics
            .delete(target, names.clone())
            .await
            .map_err(Error::from),
        Err(e) => Err(e),
    };
    if let Err(e) = deleted {
        event(
            &ctx,
            &obj,
            EventType::Warning,
            "KafkaCleanupFailed",
            format!(
                "{e}; the instance stays until its topics are deleted (annotate it {KEEP_TOPICS}=true to delete it without them)"
            ),
        )
        .await;
        return Err(e);
    }
    event(
        &ctx,
        &obj,
        EventType::Normal,
        "KafkaTopicsDeleted",
        format!("deleted {}", names.join(", ")),
    )
    .await;
    Ok(Action::await_change())
}

/// Publishes a Kubernetes Event about the instance; a failure is logged only.
pub(crate) async fn event(
    ctx: &Context,
    obj: &MqttInstance,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let e = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note),
        action: "Reconcile".to_owned(),
        secondary: None,
    };
    if let Err(err) = ctx.recorder.publish(&e, &obj.object_ref(&())).await {
        tracing::warn!(error = %err, reason, "event not published");
    }
}
