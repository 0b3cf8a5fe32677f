//! The Kubernetes objects an instance owns, built from its spec (P3). Pure
//! functions: the reconciler applies what they return, the golden tests
//! compare it, and the objects are validated against the Kubernetes schemas.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{
    StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec,
};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, HTTPGetAction,
    PersistentVolumeClaim, PersistentVolumeClaimSpec, PodSecurityContext, PodSpec, PodTemplateSpec,
    Probe, Secret, SecretVolumeSource, SecurityContext, Service, ServicePort, ServiceSpec, Volume,
    VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::brokerconfig::{paths, ports};
use crate::crd::{MqttInstanceSpec, ServiceType, VolumePolicy};
use crate::credentials::Rendered;
use crate::names::Names;

/// The broker image when the spec names none.
pub const DEFAULT_IMAGE: &str = "ghcr.io/ringmq/ringmq-broker:0.1.0";

/// Annotation carrying the hash of the configuration and credentials: pods
/// roll when it changes.
pub const CONFIG_HASH: &str = "ringmq.io/config-hash";

/// Annotation on the credentials Secret: the fingerprint of what its file
/// was rendered from.
pub const CREDENTIALS_INPUT: &str = "ringmq.io/credentials-input";

/// Label of the headless Service, which the ServiceMonitor selects.
pub const NODES_LABEL: (&str, &str) = ("ringmq.io/service", "nodes");

/// What the builders need besides the spec.
#[derive(Debug, Clone)]
pub struct Context<'a> {
    pub names: &'a Names,
    pub owner: OwnerReference,
    pub replicas: i32,
    pub image: &'a str,
    /// SHA-256 of the broker configuration and the credentials file.
    pub config_hash: String,
}

fn meta(ctx: &Context<'_>, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(ctx.names.namespace.clone()),
        labels: Some(ctx.names.labels()),
        owner_references: Some(vec![ctx.owner.clone()]),
        ..ObjectMeta::default()
    }
}

/// Hex SHA-256 of the parts, in order.
pub fn hash(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

pub fn config_map(ctx: &Context<'_>, broker_yaml: String) -> ConfigMap {
    ConfigMap {
        metadata: meta(ctx, ctx.names.config_map()),
        data: Some([("broker.yaml".to_owned(), broker_yaml)].into()),
        ..ConfigMap::default()
    }
}

fn port(name: &str, port: i32, target: i32) -> ServicePort {
    ServicePort {
        name: Some(name.to_owned()),
        port,
        target_port: Some(IntOrString::Int(target)),
        protocol: Some("TCP".to_owned()),
        ..ServicePort::default()
    }
}

/// The Service devices connect to: the seed ports mapped to the container
/// ports (B2).
pub fn device_service(ctx: &Context<'_>, spec: &MqttInstanceSpec) -> Service {
    let mut ports = vec![port("mqtt", 1883, ports::MQTT)];
    let tls = spec.listeners.tls_secret.is_some();
    if tls {
        ports.push(port("mqtts", 8883, ports::MQTTS));
    }
    if spec.listeners.websocket {
        ports.push(port("ws", 80, ports::WS));
        if tls {
            ports.push(port("wss", 443, ports::WSS));
        }
    }
    let kind = match spec.listeners.service_type {
        ServiceType::ClusterIP => "ClusterIP",
        ServiceType::NodePort => "NodePort",
        ServiceType::LoadBalancer => "LoadBalancer",
    };
    Service {
        metadata: meta(ctx, ctx.names.main()),
        spec: Some(ServiceSpec {
            type_: Some(kind.to_owned()),
            selector: Some(ctx.names.selector()),
            ports: Some(ports),
            ip_family_policy: spec
                .listeners
                .dual_stack
                .then(|| "PreferDualStack".to_owned()),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The headless Service: pod DNS names for the cluster links, and the
/// admin port the operator reads each pod's state from. Not-ready pods are
/// published too: a joining node must reach the others before it is ready.
pub fn headless_service(ctx: &Context<'_>) -> Service {
    let mut metadata = meta(ctx, ctx.names.headless());
    if let Some(l) = metadata.labels.as_mut() {
        l.insert(NODES_LABEL.0.to_owned(), NODES_LABEL.1.to_owned());
    }
    Service {
        metadata,
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_owned()),
            selector: Some(ctx.names.selector()),
            publish_not_ready_addresses: Some(true),
            ports: Some(vec![
                port("cluster", ports::CLUSTER, ports::CLUSTER),
                port("admin", ports::ADMIN, ports::ADMIN),
            ]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn secret_volume(name: &str, secret: String) -> Volume {
    Volume {
        name: name.to_owned(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret),
            default_mode: Some(0o440),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    }
}

fn mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: name.to_owned(),
        mount_path: path.to_owned(),
        read_only: Some(true),
        ..VolumeMount::default()
    }
}

fn container_port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_owned()),
        container_port: port,
        protocol: Some("TCP".to_owned()),
        ..ContainerPort::default()
    }
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String("admin".to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Probe::default()
    }
}

/// The broker StatefulSet. The pods restart when `config_hash` changes;
/// SIGTERM makes a broker hand its sessions to the rest of the ring first,
/// within the grace period.
pub fn stateful_set(ctx: &Context<'_>, spec: &MqttInstanceSpec, credentials: bool) -> StatefulSet {
    let mut volumes = vec![
        Volume {
            name: "config".to_owned(),
            config_map: Some(ConfigMapVolumeSource {
                name: ctx.names.config_map(),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        secret_volume("cluster", ctx.names.cluster_secret()),
        secret_volume("admin", ctx.names.admin_secret()),
    ];
    let mut mounts = vec![
        mount("config", paths::CONFIG_DIR),
        mount("cluster", paths::CLUSTER_DIR),
        mount("admin", paths::ADMIN_DIR),
        VolumeMount {
            read_only: Some(false),
            ..mount("data", paths::DATA_DIR)
        },
    ];
    if credentials {
        volumes.push(secret_volume("credentials", ctx.names.credentials_secret()));
        mounts.push(mount("credentials", paths::CREDENTIALS_DIR));
    }
    if let Some(tls) = &spec.listeners.tls_secret {
        volumes.push(secret_volume("tls", tls.clone()));
        mounts.push(mount("tls", paths::TLS_DIR));
    }
    if let Some(secret) = spec
        .kafka
        .as_ref()
        .and_then(|k| k.credentials_secret.clone())
    {
        volumes.push(secret_volume("kafka", secret));
        mounts.push(mount("kafka", paths::KAFKA_DIR));
    }
    let mut ports = vec![
        container_port("mqtt", ports::MQTT),
        container_port("mqtts", ports::MQTTS),
        container_port("admin", ports::ADMIN),
        container_port("cluster", ports::CLUSTER),
    ];
    if spec.listeners.websocket {
        ports.push(container_port("ws", ports::WS));
        ports.push(container_port("wss", ports::WSS));
    }
    let mut annotations: BTreeMap<String, String> = spec.pod.annotations.clone();
    annotations.insert(CONFIG_HASH.to_owned(), ctx.config_hash.clone());
    annotations.insert("prometheus.io/scrape".to_owned(), "true".to_owned());
    annotations.insert("prometheus.io/port".to_owned(), ports::ADMIN.to_string());
    let mut pod_labels = ctx.names.labels();
    pod_labels.insert(
        "ringmq.io/edition".to_owned(),
        format!("{:?}", spec.edition).to_lowercase(),
    );
    StatefulSet {
        metadata: meta(ctx, ctx.names.main()),
        spec: StatefulSetSpec {
            replicas: Some(ctx.replicas),
            service_name: Some(ctx.names.headless()),
            // Pods start and stop together: sessions move by the ring, not
            // by pod order; scale-down order is the operator's drain.
            pod_management_policy: Some("Parallel".to_owned()),
            selector: LabelSelector {
                match_labels: Some(ctx.names.selector()),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![Container {
                        name: "broker".to_owned(),
                        image: Some(ctx.image.to_owned()),
                        args: Some(vec!["--config".to_owned(), paths::CONFIG.to_owned()]),
                        ports: Some(ports),
                        readiness_probe: Some(http_probe("/readyz", 2, 3)),
                        liveness_probe: Some(http_probe("/healthz", 10, 6)),
                        resources: Some(crate::profile::resources(spec)),
                        volume_mounts: Some(mounts),
                        security_context: Some(SecurityContext {
                            allow_privilege_escalation: Some(false),
                            read_only_root_filesystem: Some(true),
                            run_as_non_root: Some(true),
                            capabilities: Some(k8s_openapi::api::core::v1::Capabilities {
                                drop: Some(vec!["ALL".to_owned()]),
                                ..Default::default()
                            }),
                            ..SecurityContext::default()
                        }),
                        ..Container::default()
                    }],
                    volumes: Some(volumes),
                    termination_grace_period_seconds: Some(60),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(65532),
                        fs_group: Some(65532),
                        ..PodSecurityContext::default()
                    }),
                    affinity: spec.pod.affinity.clone(),
                    tolerations: (!spec.pod.tolerations.is_empty())
                        .then(|| spec.pod.tolerations.clone()),
                    node_selector: (!spec.pod.node_selector.is_empty())
                        .then(|| spec.pod.node_selector.clone()),
                    ..PodSpec::default()
                }),
            },
            volume_claim_templates: Some(vec![data_claim(spec)]),
            persistent_volume_claim_retention_policy: Some(
                StatefulSetPersistentVolumeClaimRetentionPolicy {
                    when_deleted: Some(
                        match spec.storage.when_deleted {
                            VolumePolicy::Delete => "Delete",
                            VolumePolicy::Retain => "Retain",
                        }
                        .to_owned(),
                    ),
                    when_scaled: Some("Delete".to_owned()),
                },
            ),
            ..StatefulSetSpec::default()
        },
        ..StatefulSet::default()
    }
}

/// Each pod's data volume: the store and the journal survive the pod
/// (restart, rescheduling, rolling upgrade); the pod's `fsGroup` owns it.
fn data_claim(spec: &MqttInstanceSpec) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some("data".to_owned()),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".to_owned()]),
            storage_class_name: spec.storage.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_owned(),
                    crate::profile::storage_size(spec),
                )])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    }
}

/// At most one broker pod down at a time by voluntary disruptions.
pub fn pod_disruption_budget(ctx: &Context<'_>) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta(ctx, ctx.names.main()),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(ctx.names.selector()),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

fn meta_json(ctx: &Context<'_>, name: String) -> Value {
    serde_json::to_value(meta(ctx, name)).unwrap_or(Value::Null)
}

/// Prometheus Operator ServiceMonitor for the brokers' `/metrics`.
pub fn service_monitor(ctx: &Context<'_>) -> Value {
    json!({
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": meta_json(ctx, ctx.names.main()),
        "spec": {
            "selector": { "matchLabels": {
                "app.kubernetes.io/instance": ctx.names.instance,
                NODES_LABEL.0: NODES_LABEL.1,
            } },
            "endpoints": [{ "port": "admin", "path": "/metrics", "interval": "30s" }],
        },
    })
}

/// Prometheus Operator rules: the instance beyond its alarm thresholds
/// (L4), summed over the pods of the instance.
pub fn prometheus_rule(ctx: &Context<'_>, spec: &MqttInstanceSpec) -> Value {
    let sel = format!(
        "namespace=\"{}\",service=\"{}\"",
        ctx.names.namespace,
        ctx.names.headless()
    );
    let c = &spec.capacity;
    let a = &spec.alarms;
    let mut rules = Vec::new();
    for (metric, series, capacity, rule) in [
        (
            "Connections",
            "ringmq_connections",
            c.connections,
            &a.connections,
        ),
        (
            "Subscriptions",
            "ringmq_subscriptions",
            c.subscriptions,
            &a.subscriptions,
        ),
        ("Tps", "ringmq_tps", c.tps, &a.tps),
    ] {
        if !rule.enabled {
            continue;
        }
        let threshold = rule.value.unwrap_or(crate::profile::ceil_div(
            capacity * i64::from(rule.percent),
            100,
        ));
        rules.push(json!({
            "alert": format!("RingmqInstance{metric}High"),
            "expr": format!("sum(max_over_time({series}{{{sel}}}[1m])) >= {threshold}"),
            "for": "1m",
            "labels": { "severity": "warning", "ringmq_instance": ctx.names.instance },
            "annotations": {
                "summary": format!("ringmq instance {} is at {}% of its {} capacity", ctx.names.instance, rule.percent, metric.to_lowercase()),
                "description": format!("{} >= {threshold} (capacity {capacity}): raise spec.capacity or reduce the load.", metric.to_lowercase()),
            },
        }));
    }
    json!({
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": meta_json(ctx, ctx.names.main()),
        "spec": { "groups": [{ "name": format!("ringmq-{}", ctx.names.instance), "rules": rules }] },
    })
}

/// The hashed credentials for the brokers.
pub fn credentials_secret(ctx: &Context<'_>, credentials: Rendered) -> Secret {
    let mut metadata = meta(ctx, ctx.names.credentials_secret());
    metadata.annotations = Some([(CREDENTIALS_INPUT.to_owned(), credentials.fingerprint)].into());
    Secret {
        metadata,
        // `data`, not `stringData`: an applied `stringData` is never equal to
        // the stored object, so every apply would write a new version.
        data: Some(
            [(
                "credentials.yaml".to_owned(),
                ByteString(credentials.yaml.into_bytes()),
            )]
            .into(),
        ),
        ..Secret::default()
    }
}

/// One object the operator applies. A pass builds a handful of them, once:
/// boxing the large variants would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Object {
    ConfigMap(ConfigMap),
    Secret(Secret),
    Service(Service),
    StatefulSet(StatefulSet),
    PodDisruptionBudget(PodDisruptionBudget),
    /// A Prometheus Operator object (`monitoring.coreos.com/v1`).
    Monitoring {
        kind: &'static str,
        plural: &'static str,
        value: Value,
    },
}

impl Object {
    /// The object as the API sees it (apiVersion and kind included).
    pub fn to_value(&self) -> Value {
        fn typed<K: k8s_openapi::Resource + serde::Serialize>(o: &K) -> Value {
            let mut v = serde_json::to_value(o).unwrap_or(Value::Null);
            v["apiVersion"] = json!(K::API_VERSION);
            v["kind"] = json!(K::KIND);
            v
        }
        match self {
            Object::ConfigMap(o) => typed(o),
            Object::Secret(o) => typed(o),
            Object::Service(o) => typed(o),
            Object::StatefulSet(o) => typed(o),
            Object::PodDisruptionBudget(o) => typed(o),
            Object::Monitoring { value, .. } => value.clone(),
        }
    }
}

/// Everything an instance owns, in the order it is applied.
pub fn objects(
    ctx: &Context<'_>,
    spec: &MqttInstanceSpec,
    broker_yaml: String,
    credentials: Option<Rendered>,
    monitoring: bool,
) -> Vec<Object> {
    let has_credentials = credentials.is_some();
    let mut out = vec![Object::ConfigMap(config_map(ctx, broker_yaml))];
    if let Some(c) = credentials {
        out.push(Object::Secret(credentials_secret(ctx, c)));
    }
    out.push(Object::Service(headless_service(ctx)));
    out.push(Object::Service(device_service(ctx, spec)));
    out.push(Object::StatefulSet(stateful_set(
        ctx,
        spec,
        has_credentials,
    )));
    out.push(Object::PodDisruptionBudget(pod_disruption_budget(ctx)));
    if monitoring {
        out.push(Object::Monitoring {
            kind: "ServiceMonitor",
            plural: "servicemonitors",
            value: service_monitor(ctx),
        });
        out.push(Object::Monitoring {
            kind: "PrometheusRule",
            plural: "prometheusrules",
            value: prometheus_rule(ctx, spec),
        });
    }
    out
}
