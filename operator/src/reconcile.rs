//! The reconciler (P3, P4): one pass brings an instance's objects, Kafka
//! topics and status in line with its spec.
//!
//! A pass: read the Secrets the spec names; make sure the generated Secrets
//! exist; render the broker configuration and credentials; apply the
//! ConfigMap, Secrets, Services, StatefulSet and PodDisruptionBudget (and
//! the Prometheus Operator objects where that API exists) by server-side
//! apply; create or grow the Kafka topics; read the brokers' operations API
//! and write the status. A scale-down drains the highest pod through the
//! brokers' drain call and lowers the replica count only once that pod holds
//! no session, one pod at a time.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use argon2::password_hash::rand_core::{OsRng, RngCore};
use base64::Engine;
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams,
};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use crate::brokerconfig::{self, Inputs};
use crate::brokers::Brokers;
use crate::crd::{
    AlarmStatus, DeletePolicy, Draining, MqttInstance, MqttInstanceStatus, NodeStatus, Totals,
};
use crate::names::Names;
use crate::resources::{self, Context as Build, Object};
use crate::topics::{Outcome, Target, Topics, Wanted};
use crate::{credentials, profile};

/// Errors of one reconcile pass; the controller retries after a while.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("the instance has no namespace")]
    NoNamespace,
    #[error("finalizer: {0}")]
    Finalizer(String),
    #[error("kafka: {0}")]
    Kafka(#[from] crate::topics::TopicError),
    #[error("credentials: {0}")]
    Credentials(#[from] crate::credentials::CredentialsError),
    #[error("object: {0}")]
    Object(String),
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

/// A reason the instance cannot be rolled out as specified, shown in the
/// status rather than retried blindly.
#[derive(Debug)]
struct Blocked {
    reason: &'static str,
    message: String,
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

/// One reconcile pass.
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
            return apply(obj, ctx).await;
        }
        let ctx2 = ctx.clone();
        return kube::runtime::finalizer(&api, FINALIZER, obj, move |event| {
            let ctx = ctx2.clone();
            async move {
                match event {
                    kube::runtime::finalizer::Event::Apply(o) => apply(o, ctx).await,
                    kube::runtime::finalizer::Event::Cleanup(o) => cleanup(o, ctx).await,
                }
            }
        })
        .await
        .map_err(|e| Error::Finalizer(e.to_string()));
    }
    apply(obj, ctx).await
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
    let deleted = match kafka_target(&ctx, &ns, k).await {
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

async fn event(ctx: &Context, obj: &MqttInstance, type_: EventType, reason: &str, note: String) {
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

/// A key of a Secret, as text.
async fn secret_key(
    secrets: &Api<Secret>,
    name: &str,
    key: &str,
) -> std::result::Result<Option<String>, kube::Error> {
    let Some(s) = secrets.get_opt(name).await? else {
        return Ok(None);
    };
    Ok(s.data.and_then(|d| d.get(key).cloned()).map(|b| {
        String::from_utf8_lossy(&b.0)
            .trim_end_matches(['\r', '\n'])
            .to_owned()
    }))
}

/// The Kafka connection of a binding, with its credentials Secret read.
async fn kafka_target(ctx: &Context, ns: &str, k: &crate::crd::KafkaBinding) -> Result<Target> {
    let mut t = Target::new(k);
    if let Some(secret) = &k.credentials_secret {
        let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
        t.username = secret_key(&secrets, secret, "username").await?;
        t.password = secret_key(&secrets, secret, "password").await?;
        t.ca_pem = secret_key(&secrets, secret, "ca.crt").await?;
    }
    Ok(t)
}

/// A Secret the operator generates once (a random value) and never changes.
async fn generated_secret(
    secrets: &Api<Secret>,
    build: &Build<'_>,
    name: String,
    key: &str,
) -> Result<String> {
    if let Some(v) = secret_key(secrets, &name, key).await? {
        return Ok(v);
    }
    let mut bytes = [0u8; 32];
    OsRng.fill_bytes(&mut bytes);
    let value = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(build.names.namespace.clone()),
            labels: Some(build.names.labels()),
            owner_references: Some(vec![build.owner.clone()]),
            ..ObjectMeta::default()
        },
        data: Some([(key.to_owned(), ByteString(value.clone().into_bytes()))].into()),
        ..Secret::default()
    };
    secrets.create(&PostParams::default(), &secret).await?;
    Ok(value)
}

/// The credentials file: the one on the Secret when it was rendered from
/// the same inputs, else rendered again off the async runtime.
async fn render_credentials(
    secrets: &Api<Secret>,
    names: &Names,
    spec: &crate::crd::MqttInstanceSpec,
    uid: String,
    passwords: BTreeMap<String, String>,
) -> Result<credentials::Rendered> {
    let fingerprint = credentials::fingerprint(spec, &uid, &passwords);
    let existing = secrets.get_opt(&names.credentials_secret()).await?;
    let cached = existing
        .filter(|s| s.annotations().get(resources::CREDENTIALS_INPUT) == Some(&fingerprint))
        .and_then(|s| s.data?.remove("credentials.yaml"))
        .and_then(|b| String::from_utf8(b.0).ok());
    let yaml = match cached {
        Some(yaml) => yaml,
        None => {
            let spec = spec.clone();
            tokio::task::spawn_blocking(move || credentials::render(&spec, &uid, &passwords))
                .await
                .map_err(|e| Error::Object(format!("credentials task: {e}")))??
        }
    };
    Ok(credentials::Rendered { yaml, fingerprint })
}

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
async fn apply_object(client: &kube::Client, ns: &str, object: Object) -> Result<()> {
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

async fn apply(obj: Arc<MqttInstance>, ctx: Arc<Context>) -> Result<Action> {
    let ns = obj.namespace().ok_or(Error::NoNamespace)?;
    let names = Names::new(&obj.name_any(), &ns);
    let spec = &obj.spec;
    let client = &ctx.client;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let owner = obj
        .controller_owner_ref(&())
        .ok_or_else(|| Error::Object("the instance has no name or UID".into()))?;
    let uid = obj.uid().unwrap_or_default();
    let old_status = obj.status.clone().unwrap_or_default();

    // Inputs from the Secrets the spec names.
    let mut passwords = BTreeMap::new();
    let mut blocked = None;
    for u in &spec.users {
        match secret_key(&secrets, &u.password_secret.name, &u.password_secret.key).await? {
            Some(p) => {
                passwords.insert(u.username.clone(), p);
            }
            None => {
                blocked = Some(Blocked {
                    reason: "SecretMissing",
                    message: format!(
                        "user {}: Secret {} has no key {}",
                        u.username, u.password_secret.name, u.password_secret.key
                    ),
                });
            }
        }
    }
    let mut inputs = Inputs {
        credentials: credentials::needed(spec),
        ..Inputs::default()
    };
    let kafka_target = match &spec.kafka {
        Some(k) => {
            let t = kafka_target(&ctx, &ns, k).await?;
            inputs.kafka_username = t.username.clone();
            inputs.kafka_ca = t.ca_pem.is_some();
            if k.credentials_secret.is_some() && t.password.is_none() {
                blocked = Some(Blocked {
                    reason: "SecretMissing",
                    message: format!(
                        "Kafka credentials Secret {} has no password",
                        k.credentials_secret.as_deref().unwrap_or_default()
                    ),
                });
            }
            Some(t)
        }
        None => None,
    };
    if let Some(b) = blocked {
        event(&ctx, &obj, EventType::Warning, b.reason, b.message.clone()).await;
        let mut status = old_status.clone();
        set_condition(
            &mut status.conditions,
            "Degraded",
            true,
            b.reason,
            &b.message,
        );
        set_condition(&mut status.conditions, "Ready", false, b.reason, &b.message);
        status.observed_generation = obj.metadata.generation;
        write_status(&ctx, &obj, &old_status, status).await?;
        return Ok(Action::requeue(Duration::from_secs(30)));
    }

    let broker_yaml = brokerconfig::render(spec, &names, &inputs);
    let credentials = if inputs.credentials {
        Some(render_credentials(&secrets, &names, spec, uid, passwords).await?)
    } else {
        None
    };
    let sts_api: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let existing = sts_api.get_opt(&names.main()).await?;
    let current = existing.as_ref().and_then(|s| s.spec.replicas);
    let desired = profile::replicas(spec);
    let image = spec.image.clone().unwrap_or_else(|| ctx.image.clone());
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
    let admin_token = generated_secret(&secrets, &build, names.admin_secret(), "token").await?;
    generated_secret(&secrets, &build, names.cluster_secret(), "secret").await?;

    // Scale-down: one pod at a time, each drained first (P4, C4).
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let rolling = existing
        .as_ref()
        .and_then(|s| s.status.as_ref())
        .is_some_and(|s| s.current_revision != s.update_revision);
    let mut draining = None;
    let mut waiting = None;
    if let Some(cur) = current
        && cur > desired
    {
        let victim = cur - 1;
        let pod = names.pod(victim);
        let since = old_status
            .draining
            .as_ref()
            .filter(|d| d.pod == pod)
            .map(|d| d.since.clone());
        build.replicas = cur;
        if since.is_none() && rolling {
            // A rollout restarts pods from the highest ordinal down: the
            // pod drained next could come back un-drained mid-way.
            waiting = Some("waiting for the rollout to finish before draining".to_owned());
        } else {
            // Asked again on every pass: a lost call, or a pod restarted
            // since, would leave the pod serving its sessions.
            if let Err(e) = ctx.brokers.drain(&names, victim, &admin_token).await {
                tracing::warn!(pod, error = %e, "drain call failed; trying again next pass");
            }
            if since.is_none() {
                event(
                    &ctx,
                    &obj,
                    EventType::Normal,
                    "Draining",
                    format!("{pod}: handing its sessions to the other pods"),
                )
                .await;
            }
            let left = sessions_of(&ctx, &names, victim, &admin_token).await;
            let gone = broker_gone(&pods, &pod).await?;
            let timed_out = since
                .as_deref()
                .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
                .is_some_and(|t| {
                    k8s_openapi::jiff::Timestamp::now()
                        .duration_since(t)
                        .as_secs()
                        >= DRAIN_TIMEOUT.as_secs() as i64
                });
            if left == Some(0) || gone || timed_out {
                if left != Some(0) && !gone {
                    event(
                        &ctx,
                        &obj,
                        EventType::Warning,
                        "DrainTimedOut",
                        format!(
                            "{pod} still held {} sessions after {} s; removed anyway (its clients reconnect to the other pods)",
                            left.map_or_else(|| "an unknown number of".to_owned(), |n| n.to_string()),
                            DRAIN_TIMEOUT.as_secs()
                        ),
                    )
                    .await;
                }
                build.replicas = victim;
                event(
                    &ctx,
                    &obj,
                    EventType::Normal,
                    "ScaledDown",
                    format!("{pod} drained; replicas {cur} -> {victim}"),
                )
                .await;
            } else {
                draining = Some(Draining {
                    pod,
                    sessions: left.unwrap_or(-1),
                    since: since.unwrap_or_else(|| now().0.to_string()),
                });
            }
        }
    } else if let Some(d) = &old_status.draining {
        // The scale-down was called off: the pod has left the ring and
        // would stay off it; a restart brings it back as a member.
        match pods.delete(&d.pod, &DeleteParams::default()).await {
            Ok(_) => {
                event(
                    &ctx,
                    &obj,
                    EventType::Normal,
                    "DrainAbandoned",
                    format!("{}: scale-down called off; restarted to rejoin", d.pod),
                )
                .await;
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }

    // The objects.
    let objects = resources::objects(&build, spec, broker_yaml, credentials, ctx.monitoring);
    for object in objects {
        apply_object(client, &ns, object).await?;
    }

    // Kafka topics.
    let mut status = MqttInstanceStatus {
        conditions: old_status.conditions.clone(),
        ..MqttInstanceStatus::default()
    };
    if let (Some(k), Some(target)) = (&spec.kafka, kafka_target) {
        let mut wanted: Vec<Wanted> = k
            .parent_topics
            .iter()
            .map(|t| Wanted {
                name: t.name.clone(),
                partitions: t.partitions.unwrap_or(k.partitions),
                replication: k.replication_factor,
            })
            .collect();
        wanted.extend(SYSTEM_TOPICS.iter().map(|n| Wanted {
            name: (*n).to_owned(),
            partitions: k.partitions,
            replication: k.replication_factor,
        }));
        match ctx.topics.ensure(target, wanted).await {
            Ok(outcomes) => {
                set_condition(
                    &mut status.conditions,
                    "KafkaReady",
                    true,
                    "TopicsReady",
                    "every topic exists with its partitions",
                );
                let mut shrink = Vec::new();
                for (topic, outcome) in outcomes {
                    match outcome {
                        Outcome::Created => {
                            event(&ctx, &obj, EventType::Normal, "KafkaTopicCreated", topic).await
                        }
                        Outcome::Grown { from, to } => {
                            event(
                                &ctx,
                                &obj,
                                EventType::Normal,
                                "KafkaTopicGrown",
                                format!("{topic}: {from} -> {to} partitions"),
                            )
                            .await;
                        }
                        Outcome::CannotShrink { have, want } => {
                            shrink.push(format!(
                                "{topic} has {have} partitions, the spec asks for {want}"
                            ));
                        }
                        Outcome::Unchanged => {}
                    }
                }
                if shrink.is_empty() {
                    remove_condition(&mut status.conditions, "NotSupported");
                } else {
                    let msg = format!("Kafka cannot remove partitions: {}", shrink.join("; "));
                    set_condition(
                        &mut status.conditions,
                        "NotSupported",
                        true,
                        "PartitionDecrease",
                        &msg,
                    );
                }
            }
            Err(e) => {
                set_condition(
                    &mut status.conditions,
                    "KafkaReady",
                    false,
                    "KafkaUnavailable",
                    &e.to_string(),
                );
            }
        }
    } else {
        remove_condition(&mut status.conditions, "KafkaReady");
    }

    // Status from the StatefulSet and the brokers.
    let sts = sts_api.get_opt(&names.main()).await?;
    if let Some(sts) = &sts
        && let Some(pod) = unstick(client, &ns, &names, sts).await?
    {
        event(
            &ctx,
            &obj,
            EventType::Normal,
            "RestartedStuckPod",
            format!(
                "{pod} never became ready on the previous revision; recreated from the current spec"
            ),
        )
        .await;
    }
    let ready = sts
        .as_ref()
        .and_then(|s| s.status.as_ref())
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    let updated = sts
        .as_ref()
        .and_then(|s| s.status.as_ref())
        .is_some_and(|s| {
            s.updated_replicas.unwrap_or(0) >= build.replicas
                && s.current_revision == s.update_revision
        });
    // The pods that exist, as the scale subresource reports them.
    status.replicas = sts
        .as_ref()
        .and_then(|s| s.status.as_ref())
        .map_or(0, |s| s.replicas);
    status.ready_replicas = ready;
    status.selector = names.selector_string();
    status.endpoints = names.endpoints(spec);
    status.draining = draining.clone();
    status.observed_generation = obj.metadata.generation;
    let observed = observe(&ctx, &names, build.replicas, &admin_token).await;
    let degraded = match &observed {
        Some(o) => {
            status.totals = Some(o.totals.clone());
            status.nodes = o.nodes.clone();
            status.alarms = o.alarms.clone();
            status.peak_utilization = o.peak.clone();
            None
        }
        None if ready > 0 => Some("no broker pod answered the operations API"),
        None => None,
    };
    let settled =
        ready == build.replicas && updated && draining.is_none() && build.replicas == desired;
    if settled {
        set_condition(
            &mut status.conditions,
            "Ready",
            true,
            "AllPodsReady",
            &format!("{ready} of {} broker pods ready", build.replicas),
        );
        set_condition(
            &mut status.conditions,
            "Progressing",
            false,
            "Settled",
            "the instance matches its spec",
        );
    } else {
        let why = match (&draining, &waiting) {
            (Some(d), _) => format!("draining {} ({} sessions left)", d.pod, d.sessions),
            (None, Some(w)) => w.clone(),
            (None, None) => format!("{ready} of {} broker pods ready", build.replicas),
        };
        set_condition(
            &mut status.conditions,
            "Ready",
            ready > 0 && ready == build.replicas,
            "PodsNotReady",
            &why,
        );
        set_condition(
            &mut status.conditions,
            "Progressing",
            true,
            if draining.is_some() {
                "Draining"
            } else {
                "RollingOut"
            },
            &why,
        );
    }
    match degraded {
        Some(m) => set_condition(
            &mut status.conditions,
            "Degraded",
            true,
            "BrokersUnreachable",
            m,
        ),
        None => set_condition(
            &mut status.conditions,
            "Degraded",
            false,
            "Healthy",
            "the brokers answer",
        ),
    }
    let firing: Vec<&AlarmStatus> = status
        .alarms
        .iter()
        .filter(|a| a.state != "resolved")
        .collect();
    if firing.is_empty() {
        set_condition(
            &mut status.conditions,
            "CapacityWarning",
            false,
            "BelowThresholds",
            "no alarm is firing",
        );
    } else {
        let m = firing
            .iter()
            .map(|a| format!("{} {} >= {}", a.metric, a.value, a.threshold))
            .collect::<Vec<_>>()
            .join(", ");
        set_condition(
            &mut status.conditions,
            "CapacityWarning",
            true,
            "AlarmFiring",
            &m,
        );
    }
    alarm_events(&ctx, &obj, &old_status.alarms, &status.alarms).await;
    write_status(&ctx, &obj, &old_status, status).await?;
    Ok(if draining.is_some() || !settled {
        Action::requeue(Duration::from_secs(5))
    } else {
        Action::requeue(ctx.resync)
    })
}

/// How long a pod of an older revision may stay unready before the
/// operator recreates it.
const STUCK_AFTER: Duration = Duration::from_secs(60);

/// A rollout stuck on a broken revision: Kubernetes does not replace a pod
/// that never became ready, even after the spec is fixed ("forced
/// rollback"). Pods of an older revision than the StatefulSet's current one
/// that have not been ready for a minute are deleted, one per pass, so that
/// the StatefulSet recreates them from the current template. Returns the
/// deleted pod's name.
async fn unstick(
    client: &kube::Client,
    ns: &str,
    names: &Names,
    sts: &StatefulSet,
) -> Result<Option<String>> {
    let Some(update) = sts.status.as_ref().and_then(|s| s.update_revision.clone()) else {
        return Ok(None);
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let list = pods
        .list(&ListParams::default().labels(&names.selector_string()))
        .await?;
    let now = k8s_openapi::jiff::Timestamp::now();
    for pod in list {
        let revision = pod.labels().get("controller-revision-hash").cloned();
        // Unready for a minute by the Ready condition's own clock: a pod
        // of a healthy revision is briefly unready whenever a member
        // joins, and must not be taken for a stuck one.
        let unready_long = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
            .is_some_and(|c| {
                c.status != "True"
                    && c.last_transition_time.as_ref().is_some_and(|t| {
                        now.duration_since(t.0).as_secs() >= STUCK_AFTER.as_secs() as i64
                    })
            });
        if revision.is_some_and(|r| r != update) && unready_long {
            // One pod a pass: the StatefulSet recreates it before the next.
            let name = pod.name_any();
            pods.delete(&name, &DeleteParams::default()).await?;
            return Ok(Some(name));
        }
    }
    Ok(None)
}

/// How long a drain may take before the pod is removed anyway.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(600);

/// Whether the pod is gone or its broker is not running (so it holds no
/// session any more).
async fn broker_gone(pods: &Api<Pod>, name: &str) -> Result<bool> {
    let Some(pod) = pods.get_opt(name).await? else {
        return Ok(true);
    };
    let running = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .is_some_and(|c| {
            c.iter().any(|c| {
                c.name == "broker" && c.state.as_ref().is_some_and(|s| s.running.is_some())
            })
        });
    Ok(!running)
}

/// Sessions pod `ordinal` still holds, from its own operations API; `None`
/// when it does not answer (gone already).
async fn sessions_of(ctx: &Context, names: &Names, ordinal: i32, token: &str) -> Option<i64> {
    let v = ctx
        .brokers
        .get(names, ordinal, "instance", token)
        .await
        .ok()?;
    let pod = names.pod(ordinal);
    v["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["name"] == pod.as_str())
        .and_then(|n| n["sessions"].as_i64())
}

/// What the brokers report about the whole instance.
struct Observed {
    totals: Totals,
    nodes: Vec<NodeStatus>,
    alarms: Vec<AlarmStatus>,
    peak: Option<String>,
}

/// Recent resolved alarms kept in the status.
const RECENT_ALARMS: usize = 10;

/// Asks the pods in turn until one answers for the instance.
async fn observe(ctx: &Context, names: &Names, replicas: i32, token: &str) -> Option<Observed> {
    for ordinal in 0..replicas.max(1) {
        let Ok(inst) = ctx.brokers.get(names, ordinal, "instance", token).await else {
            continue;
        };
        let alarms = ctx
            .brokers
            .get(names, ordinal, "alarms", token)
            .await
            .unwrap_or(Value::Null);
        let i = |v: &Value| v.as_i64().unwrap_or(0);
        let t = &inst["totals"];
        let totals = Totals {
            connections: i(&t["connections"]),
            subscriptions: i(&t["subscriptions"]),
            topics: i(&t["topics"]),
            pub_tps: t["pubTps"].as_f64().unwrap_or(0.0),
            sub_tps: t["subTps"].as_f64().unwrap_or(0.0),
        };
        let nodes = inst["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|n| NodeStatus {
                name: n["name"].as_str().unwrap_or_default().to_owned(),
                state: n["state"].as_str().unwrap_or_default().to_owned(),
                connections: i(&n["connections"]),
                max_connections: i(&n["maxConnections"]),
                subscriptions: i(&n["subscriptions"]),
                subscribers: i(&n["subscribers"]),
            })
            .collect();
        let peak = inst["utilization"].as_object().and_then(|u| {
            u.iter()
                .filter_map(|(k, v)| v.as_f64().map(|p| (k, p)))
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .map(|(k, p)| format!("{p:.0}% {k}"))
        });
        let mut active = Vec::new();
        let mut resolved = Vec::new();
        for a in alarms["alarms"].as_array().into_iter().flatten() {
            let s = AlarmStatus {
                id: a["id"].as_str().unwrap_or_default().to_owned(),
                metric: a["metric"].as_str().unwrap_or_default().to_owned(),
                value: i(&a["value"]),
                threshold: i(&a["threshold"]),
                state: a["state"].as_str().unwrap_or_default().to_owned(),
                start: rfc3339_ms(a["start"].as_u64().unwrap_or(0)),
                end: a["end"].as_u64().map(rfc3339_ms),
            };
            if s.state == "resolved" {
                resolved.push(s);
            } else {
                active.push(s);
            }
        }
        resolved.truncate(RECENT_ALARMS);
        active.extend(resolved);
        return Some(Observed {
            totals,
            nodes,
            alarms: active,
            peak,
        });
    }
    None
}

/// Kubernetes Events for alarms that fired or resolved since the last pass
/// (L4, O9).
async fn alarm_events(
    ctx: &Context,
    obj: &MqttInstance,
    before: &[AlarmStatus],
    now: &[AlarmStatus],
) {
    for a in now {
        let was = before.iter().find(|b| b.id == a.id);
        let firing = a.state != "resolved";
        let was_firing = was.is_some_and(|b| b.state != "resolved");
        if firing && !was_firing {
            event(
                ctx,
                obj,
                EventType::Warning,
                "AlarmFiring",
                format!("{} at {} (threshold {})", a.metric, a.value, a.threshold),
            )
            .await;
        } else if !firing && was_firing {
            event(
                ctx,
                obj,
                EventType::Normal,
                "AlarmResolved",
                format!(
                    "{} back to {} (threshold {})",
                    a.metric, a.value, a.threshold
                ),
            )
            .await;
        }
    }
}

/// Sets a condition, keeping its transition time when its status stays.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
) {
    let status = if status { "True" } else { "False" }.to_owned();
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            if c.status != status {
                c.last_transition_time = now();
            }
            c.status = status;
            c.reason = reason.to_owned();
            c.message = message.to_owned();
        }
        None => conditions.push(Condition {
            type_: type_.to_owned(),
            status,
            reason: reason.to_owned(),
            message: message.to_owned(),
            last_transition_time: now(),
            observed_generation: None,
        }),
    }
}

fn remove_condition(conditions: &mut Vec<Condition>, type_: &str) {
    conditions.retain(|c| c.type_ != type_);
}

/// Patches the status only when it changed (P3).
async fn write_status(
    ctx: &Context,
    obj: &MqttInstance,
    old: &MqttInstanceStatus,
    new: MqttInstanceStatus,
) -> Result<()> {
    if *old == new {
        return Ok(());
    }
    let ns = obj.namespace().ok_or(Error::NoNamespace)?;
    let api: Api<MqttInstance> = Api::namespaced(ctx.client.clone(), &ns);
    let patch = json!({
        "apiVersion": MqttInstance::api_version(&()),
        "kind": MqttInstance::kind(&()),
        "status": new,
    });
    api.patch_status(
        &obj.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}
