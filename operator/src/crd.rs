//! The `MqttInstance` custom resource (P1, P2): what a platform team declares
//! and what the operator reports back.
//!
//! Parent topics, Group IDs and users are declared inside the instance, not
//! as resources of their own: one object is the whole instance, it is
//! validated and rolled out as one, and its broker configuration changes in
//! one step. (Kafka operators split topics and users into resources because
//! other teams own them; here the platform team owns the instance.)

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// An MQTT message queue instance: a broker cluster sized to a declared
/// capacity, with its Kafka topics.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "ringmq.io",
    version = "v1alpha1",
    kind = "MqttInstance",
    namespaced,
    status = "MqttInstanceStatus",
    shortname = "mqi",
    // Object names derive from the instance name (`<name>-nodes`,
    // `<name>-<ordinal>`, revision labels), so it must leave them room and
    // not collide with another instance's headless Service.
    validation = Rule::new("self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$') && size(self.metadata.name) <= 52").message("the name must be a DNS label (lower case letters, digits, '-') of at most 52 characters"),
    validation = Rule::new("!self.metadata.name.endsWith('-nodes')").message("a name ending in -nodes would collide with another instance's headless Service"),
    category = "ringmq",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".status.replicas"}"#,
    printcolumn = r#"{"name":"Connections","type":"integer","jsonPath":".status.totals.connections"}"#,
    printcolumn = r#"{"name":"Peak","type":"string","jsonPath":".status.peakUtilization","description":"Highest utilisation of the declared capacity"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.requireGroupIds) || !self.requireGroupIds || (has(self.groupIds) && size(self.groupIds) > 0)").message("requireGroupIds needs at least one declared Group ID"))]
#[x_kube(validation = Rule::new("!has(self.users) || self.users.all(u, self.users.exists_one(v, v.username == u.username))").message("user names must be unique"))]
pub struct MqttInstanceSpec {
    /// Declared capacity of the whole instance (L1).
    pub capacity: Capacity,
    /// Product edition, shown in the status and used as a label.
    #[serde(default)]
    pub edition: Edition,
    /// `Enforce`: refuse and throttle beyond the capacity; `AlarmOnly`: let
    /// everything through and alarm (L3).
    #[serde(default)]
    pub enforcement: Enforcement,
    /// Alarm thresholds (L4); each defaults to 70 % of its capacity.
    #[serde(default)]
    pub alarms: Alarms,
    /// Device listeners (B2).
    #[serde(default)]
    pub listeners: Listeners,
    /// The Kafka cluster the instance binds (K1) and its parent topics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaBinding>,
    /// Session and offline message limits (B4, B5).
    #[serde(default)]
    pub session: SessionLimits,
    /// Declared Group IDs (B8, A5): `GID_` and 3–28 letters, digits or
    /// underscores.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 1000),
        inner(regex(pattern = r"^GID_[A-Za-z0-9_]{3,28}$"))
    )]
    pub group_ids: Vec<String>,
    /// Refuse Client IDs whose Group ID is not declared (A5).
    #[serde(default)]
    pub require_group_ids: bool,
    /// Users with passwords from Secrets and their topic grants (A1).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000))]
    pub users: Vec<User>,
    /// Broker pods; unset, the capacity decides (see the per-pod capacity
    /// profile in the README). `kubectl scale` sets it; a HorizontalPodAutoscaler
    /// needs it set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub replicas: Option<i32>,
    /// Broker image; unset, the operator's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Overrides of the broker pods.
    #[serde(default)]
    pub pod: PodOverrides,
    /// Each broker pod's data volume: its store of persistent sessions,
    /// queued and retained messages, and the trace/metering journal.
    #[serde(default)]
    pub storage: Storage,
}

/// A PersistentVolumeClaim per broker pod (`volumeClaimTemplates`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Storage {
    /// Size of each pod's volume, a Kubernetes quantity (`10Gi`); unset,
    /// derived from the capacity (see `profile::storage_size`). A larger
    /// size later grows the existing volumes (their StorageClass must allow
    /// volume expansion); a volume never shrinks (an event says so).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"))]
    pub size: Option<String>,
    /// StorageClass of the volumes; unset, the cluster's default class.
    /// Fixed once the instance exists (an event says so when it changes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// Keep the volumes when the instance is deleted (`Retain`), or delete
    /// them with it (`Delete`, the default). Volumes of pods removed by a
    /// scale-down are always deleted: a pod hands its sessions to the rest
    /// of the ring before it goes, so its store is empty.
    #[serde(default)]
    pub when_deleted: VolumePolicy,
}

/// What happens to the volumes when the instance is deleted.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum VolumePolicy {
    #[default]
    Delete,
    Retain,
}

/// Declared capacity: any value within the seed tiers' range.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Capacity {
    /// Connections at the same time (seed tiers 100 … 2 000 000).
    #[schemars(range(min = 100, max = 2_000_000))]
    pub connections: i64,
    /// Weighted messages per second, sent + received (100 … 500 000).
    #[schemars(range(min = 100, max = 500_000))]
    pub tps: i64,
    /// Subscriptions (1 000 … 5 000 000).
    #[schemars(range(min = 1000, max = 5_000_000))]
    pub subscriptions: i64,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Edition {
    #[default]
    Basic,
    Standard,
    Professional,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Enforcement {
    #[default]
    Enforce,
    AlarmOnly,
}

/// One alarm rule.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AlarmRule {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Percent of the capacity.
    #[serde(default = "seventy")]
    #[schemars(range(min = 1, max = 100))]
    pub percent: u32,
    /// Absolute threshold; replaces `percent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub value: Option<i64>,
}

fn yes() -> bool {
    true
}

fn seventy() -> u32 {
    70
}

impl Default for AlarmRule {
    fn default() -> Self {
        Self {
            enabled: true,
            percent: 70,
            value: None,
        }
    }
}

/// Alarm rules per metric.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Alarms {
    #[serde(default)]
    pub connections: AlarmRule,
    #[serde(default)]
    pub subscriptions: AlarmRule,
    #[serde(default)]
    pub topics: AlarmRule,
    #[serde(default)]
    pub tps: AlarmRule,
}

/// Device listeners.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Listeners {
    /// MQTT over WebSocket on port 80 (and over secure WebSocket on 443 with TLS).
    #[serde(default = "yes")]
    pub websocket: bool,
    /// Secret of type `kubernetes.io/tls` for MQTT/TLS on 8883 and WSS on 443.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_secret: Option<String>,
    /// Service type of the device Service.
    #[serde(default)]
    pub service_type: ServiceType,
    /// Serve IPv6 as well as IPv4 (dual-stack Service).
    #[serde(default)]
    pub dual_stack: bool,
}

impl Default for Listeners {
    fn default() -> Self {
        Self {
            websocket: true,
            tls_secret: None,
            service_type: ServiceType::ClusterIP,
            dual_stack: false,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

/// The Kafka cluster and the topics the instance writes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.parentTopics.all(t, self.parentTopics.exists_one(u, u.name == t.name))").message("parent topic names must be unique"))]
#[x_kube(validation = Rule::new("!has(self.securityProtocol) || !(self.securityProtocol in ['SaslPlaintext', 'SaslSsl']) || (has(self.credentialsSecret) && has(self.saslMechanism))").message("SASL needs credentialsSecret and saslMechanism"))]
pub struct KafkaBinding {
    /// `host:port[,host:port…]`.
    #[schemars(length(min = 1))]
    pub bootstrap_servers: String,
    /// Security protocol.
    #[serde(default)]
    pub security_protocol: KafkaProtocol,
    /// SASL mechanism (`SCRAM-SHA-512`, `PLAIN`, …) for the SASL protocols.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl_mechanism: Option<String>,
    /// Secret with `username`, `password` and optionally `ca.crt` (A6: no
    /// secret in this resource).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
    /// Parent topics (K6): the first MQTT topic level = the Kafka topic.
    #[serde(default)]
    #[schemars(length(max = 500))]
    pub parent_topics: Vec<ParentTopic>,
    /// Partitions of each topic the operator creates.
    #[serde(default = "three")]
    #[schemars(range(min = 1, max = 1000))]
    pub partitions: i32,
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 10))]
    pub replication_factor: i32,
    /// What deleting the instance does to its Kafka topics (P4).
    #[serde(default)]
    pub delete_policy: DeletePolicy,
}

fn three() -> i32 {
    3
}

fn one() -> i32 {
    1
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum KafkaProtocol {
    #[default]
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum DeletePolicy {
    /// Topics and their records stay.
    #[default]
    Retain,
    /// The parent topics are deleted with the instance.
    Delete,
}

/// One parent topic.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ParentTopic {
    /// Kafka topic name, also the first MQTT topic level.
    #[schemars(length(min = 1, max = 249), regex(pattern = r"^[A-Za-z0-9._-]+$"))]
    pub name: String,
    /// Records of one client stay in order (keyed by Client ID, B11).
    #[serde(default)]
    pub ordered: bool,
    /// Partitions of this topic; unset, `kafka.partitions`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub partitions: Option<i32>,
}

/// A user and its grants.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct User {
    #[schemars(length(min = 1, max = 128))]
    pub username: String,
    /// The Secret key holding the password; the operator hashes it (argon2id)
    /// into the brokers' credentials.
    pub password_secret: SecretKeyRef,
    #[serde(default)]
    pub grants: Vec<Grant>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct SecretKeyRef {
    pub name: String,
    pub key: String,
}

/// A topic grant (`+`/`#` wildcards; `#` is every topic).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
pub struct Grant {
    #[schemars(length(min = 1, max = 65535))]
    pub filter: String,
    pub action: GrantAction,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum GrantAction {
    Pub,
    Sub,
    Pubsub,
}

/// Session and offline limits.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionLimits {
    /// Lifetime of a persistent session after disconnect.
    #[serde(default = "two_hours")]
    #[schemars(range(min = 0, max = 604_800))]
    pub expiry_secs: u32,
    /// Offline messages kept per session.
    #[serde(default = "ten")]
    #[schemars(range(min = 0, max = 10_000))]
    pub offline_queue_len: u32,
    /// Age of an offline message.
    #[serde(default = "three_days")]
    #[schemars(range(min = 60, max = 2_592_000))]
    pub offline_ttl_secs: u64,
    /// Pods that keep each persistent session, its owner's included (1–3):
    /// with 2 or 3 a pod lost without warning loses no session and no
    /// acknowledged message. Unset: 3 for the Professional edition, 2
    /// otherwise (an instance of fewer pods keeps what it can).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3))]
    pub replication_factor: Option<u8>,
}

fn two_hours() -> u32 {
    7200
}

fn ten() -> u32 {
    10
}

fn three_days() -> u64 {
    259_200
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self {
            expiry_secs: two_hours(),
            offline_queue_len: ten(),
            offline_ttl_secs: three_days(),
            replication_factor: None,
        }
    }
}

/// Overrides of the broker pods.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodOverrides {
    /// Unset: the per-pod capacity profile's requests and limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// What the operator reports.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MqttInstanceStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing`, `Degraded`, `KafkaReady`, `CapacityWarning`,
    /// `Replicated`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Broker pods the StatefulSet runs.
    #[serde(default)]
    pub replicas: i32,
    #[serde(default)]
    pub ready_replicas: i32,
    /// Label selector of the broker pods (scale subresource).
    #[serde(default)]
    pub selector: String,
    /// Where devices and applications connect.
    #[serde(default)]
    pub endpoints: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub totals: Option<Totals>,
    /// Highest utilisation of the capacity, e.g. `72% connections`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_utilization: Option<String>,
    #[serde(default)]
    pub nodes: Vec<NodeStatus>,
    /// Alarms firing now and those resolved recently.
    #[serde(default)]
    pub alarms: Vec<AlarmStatus>,
    /// A scale-down in progress: the pod being drained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draining: Option<Draining>,
    /// Persistent sessions with fewer copies than the replication factor
    /// asks (a pod was lost and the survivors have not copied them again
    /// yet, or the instance runs fewer pods than the factor).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub under_replicated_sessions: Option<i64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Totals {
    pub connections: i64,
    pub subscriptions: i64,
    pub topics: i64,
    pub pub_tps: f64,
    pub sub_tps: f64,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    pub name: String,
    pub state: String,
    pub connections: i64,
    pub max_connections: i64,
    pub subscriptions: i64,
    pub subscribers: i64,
    /// Persistent sessions the pod owns with fewer copies than the
    /// replication factor asks.
    #[serde(default)]
    pub under_replicated_sessions: i64,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AlarmStatus {
    pub id: String,
    pub metric: String,
    pub value: i64,
    pub threshold: i64,
    /// `firing`, `acknowledged` or `resolved`.
    pub state: String,
    /// RFC 3339.
    pub start: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Draining {
    pub pod: String,
    /// Sessions the pod still holds; -1 while it does not answer.
    pub sessions: i64,
    /// RFC 3339.
    pub since: String,
}
