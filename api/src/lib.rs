//! The operations API (`/api/v1/…` on a node's admin port): every request
//! body and every answer as a type, in the JSON shape
//! `broker/src/ops/openapi.json` documents.
//!
//! The broker's `ops::http` builds these answers and `ringmqctl` reads them,
//! so a field renamed, removed or retyped on one side fails to compile on the
//! other. Values that name one of a fixed set (a trace action, an alarm
//! state) are strings here: the set belongs to the broker, and a reader only
//! shows them.
//!
//! Every answer that asks the whole instance carries `missingNodes`: ring
//! members that did not answer, so that a partial answer is never mistaken
//! for a whole one.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

/// The body of every refusal (4xx, 5xx).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

/// `GET /instance` (O1): capacity, usage and the per-node table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Instance {
    pub name: String,
    pub capacity: Capacity,
    /// Connection endpoints by name (`tcp`, `ws`, …, `kafka` when bound).
    pub endpoints: BTreeMap<String, String>,
    pub totals: Totals,
    pub utilization: Utilization,
    /// Alarm threshold per metric (`connections`, `subscriptions`,
    /// `topics`, `tps`); `null` where the alarm is off.
    pub alarm_thresholds: BTreeMap<String, Option<u64>>,
    /// Alarms firing or acknowledged and not yet resolved.
    pub active_alarms: usize,
    /// Persistent sessions with fewer copies than the replication factor
    /// asks, summed over the nodes that answered (D2).
    pub under_replicated_sessions: u64,
    pub nodes: Vec<NodeInfo>,
    pub missing_nodes: Vec<String>,
}

/// The declared capacity of the instance (0: no limit).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Capacity {
    pub connections: u64,
    pub tps: u64,
    pub subscriptions: u64,
    pub topics: u64,
    /// `enforce` or `alarm_only`.
    pub mode: String,
}

/// What the instance holds and carries now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Totals {
    pub connections: u64,
    pub subscriptions: u64,
    pub topics: u64,
    pub pub_tps: f64,
    pub sub_tps: f64,
    pub tps: f64,
}

/// Totals as a percentage of the capacity (one decimal); `null` where the
/// capacity sets no limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Utilization {
    pub connections: Option<f64>,
    pub subscriptions: Option<f64>,
    pub topics: Option<f64>,
    pub tps: Option<f64>,
}

/// One row of the per-node table (O1); also what a node answers about
/// itself when another node asks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    pub name: String,
    /// `running`, `joining` (waiting for its sessions), `leaving`, `stopping`.
    pub state: String,
    pub connections: u64,
    /// The most connections this node held since it started.
    pub max_connections: u64,
    pub subscriptions: u64,
    /// Sessions with at least one subscription.
    pub subscribers: u64,
    pub sessions: u64,
    /// Distinct subscribed filters this node routes (its own and the
    /// other nodes').
    pub topics: u64,
    pub pub_tps: f64,
    pub sub_tps: f64,
    /// Persistent sessions this node owns with fewer copies than the
    /// replication factor asks (D2).
    #[serde(default)]
    pub under_replicated_sessions: u64,
    /// Copies of other nodes' persistent sessions kept here (D2).
    #[serde(default)]
    pub replica_sessions: u64,
    /// This node evaluates the instance's alarms.
    pub alarm_evaluator: bool,
}

/// One subscription of a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Subscription {
    pub filter: String,
    pub qos: u8,
}

/// A client's session as the node holding it reports it (O2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientDetail {
    pub client_id: String,
    pub node: String,
    pub online: bool,
    pub ip: Option<String>,
    pub protocol: Option<String>,
    pub channel_id: Option<String>,
    pub connected_at: Option<u64>,
    pub disconnected_at: Option<u64>,
    pub clean_session: bool,
    pub user: Option<String>,
    pub subscription_count: usize,
    pub subscriptions: Vec<Subscription>,
    pub messages_sent: u64,
    pub messages_received: u64,
    pub offline_messages: usize,
}

/// `GET /clients/{clientId}` (O2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Client {
    #[serde(flatten)]
    pub detail: ClientDetail,
    pub missing_nodes: Vec<String>,
}

/// `POST /clients/{clientId}/kick` (O2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Kicked {
    pub client_id: String,
    pub kicked: bool,
}

/// The body of `POST /clients/{clientId}/unsubscribe`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnsubscribeRequest {
    pub filter: String,
}

/// `POST /clients/{clientId}/unsubscribe` (O2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Unsubscribed {
    pub client_id: String,
    pub filter: String,
    pub unsubscribed: bool,
}

/// The body of `POST /online/clients`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OnlineRequest {
    pub client_ids: Vec<String>,
}

/// `POST /online/clients` (O2): whether each Client ID is online.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Online {
    pub online: BTreeMap<String, bool>,
    pub missing_nodes: Vec<String>,
}

/// `GET /online/topic` (O3): subscribers online now for a topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TopicOnline {
    pub topic: String,
    pub online: u64,
    pub missing_nodes: Vec<String>,
}

/// `GET /online/groups` (O3): online connections by Group ID.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Groups {
    pub now: HashMap<String, u64>,
    pub from: u64,
    pub to: u64,
    /// Samples in time order, summed over the nodes.
    pub history: Vec<GroupSample>,
    pub missing_nodes: Vec<String>,
}

/// Online connections by Group ID at one time.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GroupSample {
    pub ts: u64,
    pub groups: HashMap<String, u64>,
}

/// `GET /trace/device` (O4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceTrace {
    pub client_id: String,
    pub from: u64,
    pub to: u64,
    pub events: Vec<DeviceEvent>,
    pub missing_nodes: Vec<String>,
}

/// One device trace event, with the node that recorded it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceEvent {
    pub ts: u64,
    pub client_id: String,
    pub channel_id: String,
    /// `connect`, `subscribed`, `resumed`, `disconnect`, `close`,
    /// `discarded`, `takeovered`, `publish`.
    pub action: String,
    /// `accepted`, `not authorized`, `clientId conflict`, … (the seeds'
    /// reasons and a few more).
    pub reason: String,
    /// The filter of a subscription, the topic of a refused publish.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    pub node: String,
}

/// `GET /trace/message` (O5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageTrace {
    pub from: u64,
    pub to: u64,
    pub events: Vec<MessageEvent>,
    pub missing_nodes: Vec<String>,
}

/// One message trace event, with the node that recorded it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageEvent {
    pub ts: u64,
    /// 16 hex digits.
    pub message_id: String,
    /// The publisher for `published`, the receiver for `pushed`.
    pub client_id: String,
    /// `published`, `pushed`, `from_kafka`, `offline_pushed`.
    pub action: String,
    pub topic: String,
    pub qos: u8,
    pub node: String,
}

/// `GET /report` (O6): messages per parent topic, subtopic and QoS.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub from: u64,
    pub to: u64,
    pub rows: Vec<ReportRow>,
    pub totals: ReportTotals,
    pub missing_nodes: Vec<String>,
}

/// One parent topic / subtopic / QoS of a report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReportRow {
    pub parent_topic: String,
    pub subtopic: String,
    pub qos: u8,
    pub produced: u64,
    pub consumed: u64,
    pub produced_tps: f64,
    pub consumed_tps: f64,
}

/// A report's sums; the weighted TPS counts messages as the capacity does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReportTotals {
    pub produced: u64,
    pub consumed: u64,
    pub produced_tps: f64,
    pub consumed_tps: f64,
    pub weighted_pub_tps: f64,
    pub weighted_sub_tps: f64,
}

/// `GET /topics/{parentTopic}` (O7): a parent topic as Kafka holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopicState {
    pub topic: String,
    /// The consumer group asked about, if any.
    pub group: Option<String>,
    pub brokers: Vec<KafkaBroker>,
    pub partitions: Vec<PartitionState>,
    pub messages: i64,
    /// The group's backlog over all partitions.
    pub backlog: Option<i64>,
}

/// A Kafka broker of the bound cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KafkaBroker {
    pub id: i32,
    pub host: String,
    pub port: i32,
}

/// One partition of a parent topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartitionState {
    pub partition: i32,
    pub leader: i32,
    /// The earliest offset still held.
    pub low: i64,
    /// The next offset to be written.
    pub high: i64,
    pub messages: i64,
    /// The group's committed offset.
    pub committed: Option<i64>,
    pub backlog: Option<i64>,
}

/// `GET /alarms` (L4): alarm records, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Alarms {
    pub alarms: Vec<Alarm>,
    pub missing_nodes: Vec<String>,
}

/// One alarm, from when it fired to when it resolved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Alarm {
    pub id: String,
    /// `connections`, `subscriptions`, `topics` or `tps`.
    pub metric: String,
    /// The latest value while firing; the last value seen when resolved.
    pub value: u64,
    pub peak: u64,
    pub threshold: u64,
    /// `firing`, `acknowledged` (still beyond the threshold) or `resolved`.
    pub state: String,
    pub acknowledged: bool,
    pub start: u64,
    pub end: Option<u64>,
    pub duration_secs: u64,
    /// The node that evaluated it.
    pub node: String,
}

/// `POST /alarms/{id}/ack` (L4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Acknowledged {
    pub id: String,
    pub acknowledged: bool,
}

/// How `SendRequest::payload` is written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PayloadEncoding {
    #[default]
    Utf8,
    Base64,
}

/// The body of `POST /messages` (O8): a test message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SendRequest {
    pub topic: String,
    pub payload: String,
    #[serde(default)]
    pub payload_encoding: PayloadEncoding,
    #[serde(default)]
    pub qos: u8,
    #[serde(default)]
    pub retain: bool,
}

/// `POST /messages` (O8).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Sent {
    /// 16 hex digits; the message trace finds it by this.
    pub message_id: String,
    pub topic: String,
    /// Sessions the message was routed to.
    pub reached: usize,
}
