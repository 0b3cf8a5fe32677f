//! Typed broker configuration.
//!
//! Every key is optional: an empty file (or no file at all) gives the embedded
//! defaults, which run one node with MQTT/TCP on 1883, MQTT over WebSocket on
//! 8083 and the admin HTTP port on 8080. Unknown keys are rejected so that a
//! typo never silently falls back to a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Errors while reading or checking the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("invalid config file {path}: {error}")]
    Parse {
        path: PathBuf,
        error: serde_yaml::Error,
    },
    #[error("invalid config: {0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, ConfigError>;

/// The whole broker configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Network listeners.
    pub listeners: ListenerConfig,
    /// Session, queue and protocol limits.
    pub limits: LimitsConfig,
    /// Client ID rules.
    pub client_id: ClientIdConfig,
    /// Credentials and how refusals look.
    pub auth: AuthConfig,
    /// The Kafka cluster this instance binds (K1). `null`: no message is
    /// stored and the broker routes between MQTT clients only.
    pub kafka: Option<KafkaConfig>,
    /// This node's name: its name on the cluster ring, the Kafka consumer
    /// group suffix and the prefix of channel IDs in device events. `null`:
    /// the host name (the pod name on Kubernetes).
    pub node_id: Option<String>,
    /// The other nodes of this instance (C1–C5). `null`: this node runs alone.
    pub cluster: Option<ClusterConfig>,
    /// Number of worker threads serving connections; 0 means one per CPU core.
    pub workers: usize,
    /// Pin each worker thread to a CPU core of its own (a machine the broker
    /// has to itself). Off by default: the cores are picked among all the
    /// process may use, so on a Kubernetes node that limits pods by CPU
    /// quota rather than a cpuset, every pod would pin its workers to the
    /// same first cores; unpinned, the kernel moves a worker whose core is
    /// busy.
    pub pin_workers: bool,
    /// Seconds that a graceful shutdown waits for connections to close.
    pub shutdown_timeout_secs: u64,
    /// What the operations API reports about the instance as a whole (O1).
    pub instance: InstanceConfig,
    /// Declared capacity (L1) and its enforcement (L3).
    pub capacity: CapacityConfig,
    /// Alarm thresholds (L4).
    pub alarms: AlarmsConfig,
    /// Device and message traces (O4, O5) and metering history (O3, O6).
    pub trace: TraceConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listeners: ListenerConfig::default(),
            limits: LimitsConfig::default(),
            client_id: ClientIdConfig::default(),
            auth: AuthConfig::default(),
            kafka: None,
            node_id: None,
            cluster: None,
            workers: 0,
            pin_workers: false,
            shutdown_timeout_secs: 10,
            instance: InstanceConfig::default(),
            capacity: CapacityConfig::default(),
            alarms: AlarmsConfig::default(),
            trace: TraceConfig::default(),
        }
    }
}

/// The instance as its users see it; the operator fills this in.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct InstanceConfig {
    /// The instance's name (the `MqttInstance` resource's name).
    pub name: String,
    /// Addresses devices and applications use, by kind (`tcp`, `tls`, `ws`,
    /// `wss`, `tcp_ipv6`, …), as the operator publishes them; reported by
    /// the operations API as they are.
    pub endpoints: std::collections::BTreeMap<String, String>,
}

impl Default for InstanceConfig {
    fn default() -> Self {
        Self {
            name: "ringmq".to_owned(),
            endpoints: std::collections::BTreeMap::new(),
        }
    }
}

/// Declared capacity of the whole instance (L1); 0 means no limit. Counts are
/// instance-wide: nodes tell each other their usage every second, and each
/// node admits a new connection or subscription only while the instance's
/// total is below the limit.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CapacityConfig {
    /// Client connections at the same time.
    pub connections: u64,
    /// Weighted messages per second, sent plus received (L2: QoS 0 counts 1,
    /// QoS 1 counts 2, QoS 2 counts 10). Each node allows an equal share.
    pub tps: u64,
    /// Subscriptions (one client's filter is one subscription).
    pub subscriptions: u64,
    /// Distinct subscribed topic filters; only the topics alarm uses it.
    pub topics: u64,
    /// `enforce`: refuse and throttle beyond the limits; `alarm_only`: let
    /// everything through, count what would have been refused, and alarm.
    pub mode: CapacityMode,
}

/// See `CapacityConfig::mode`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CapacityMode {
    #[default]
    Enforce,
    AlarmOnly,
}

/// Alarm rules (L4): one per metric.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AlarmsConfig {
    pub connections: AlarmRule,
    pub subscriptions: AlarmRule,
    pub topics: AlarmRule,
    pub tps: AlarmRule,
    /// A firing alarm resolves only once the value is below its threshold
    /// by this many percent of the threshold, so that a value hovering at
    /// the threshold does not flap.
    pub hysteresis_percent: u32,
    /// Seconds a value must stay beyond the threshold (or back below the
    /// resolve level) before the alarm fires (or resolves).
    pub hold_secs: u64,
    /// TPS is averaged over this many seconds before it is compared.
    pub tps_window_secs: u64,
}

impl Default for AlarmsConfig {
    fn default() -> Self {
        Self {
            connections: AlarmRule::default(),
            subscriptions: AlarmRule::default(),
            topics: AlarmRule::default(),
            tps: AlarmRule::default(),
            hysteresis_percent: 10,
            hold_secs: 30,
            tps_window_secs: 10,
        }
    }
}

/// One alarm rule.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AlarmRule {
    /// The alarm switch.
    pub enabled: bool,
    /// Threshold in percent of the declared capacity.
    pub percent: u32,
    /// Absolute threshold; when set it replaces `percent`, and it is the
    /// only way to alarm on a metric without a declared capacity.
    pub value: Option<u64>,
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

/// What the node remembers for the operations API. Everything is held in
/// memory, bounded by count and by age; a restarted node starts empty.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TraceConfig {
    /// Device trace events (connect, subscribed, …) kept, at most.
    pub device_events: usize,
    /// Message trace events kept, at most; 0 turns message tracing off.
    pub message_events: usize,
    /// Age after which trace events and metering history are dropped,
    /// seconds; at least one day, the longest trace query.
    pub retention_secs: u64,
    /// Group ID online counts are kept for this long, seconds (the query
    /// window is two days).
    pub group_history_secs: u64,
    /// Parent topic / subtopic pairs metered per minute, at most; the rest
    /// are counted under the subtopic `(other)`.
    pub report_keys: usize,
    /// Group IDs whose online count history is kept, at most.
    pub groups: usize,
    /// Seconds between two samples of the Group ID online counts.
    pub group_sample_secs: u64,
    /// Directory where traces, metering history and alarm records are also
    /// written (JSON lines, one file per kind and hour), so that a restarted
    /// node still answers for the retention window. `null`: memory only.
    pub dir: Option<PathBuf>,
    /// Most bytes the files in `dir` take; the oldest go first.
    pub disk_bytes: u64,
}

impl Default for TraceConfig {
    fn default() -> Self {
        Self {
            device_events: 200_000,
            message_events: 500_000,
            retention_secs: 25 * 3600,
            group_history_secs: 49 * 3600,
            report_keys: 10_000,
            groups: 1_000,
            group_sample_secs: 60,
            dir: None,
            disk_bytes: 1 << 30,
        }
    }
}

/// Addresses the broker listens on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ListenerConfig {
    /// MQTT over TCP. `null` disables it.
    pub tcp: Option<SocketAddr>,
    /// MQTT over WebSocket (path `/mqtt`, subprotocol `mqtt`). `null` disables it.
    pub ws: Option<SocketAddr>,
    /// MQTT over TLS; started only when `tls` is configured.
    pub tls: Option<SocketAddr>,
    /// MQTT over secure WebSocket; started only when `tls` is configured.
    pub wss: Option<SocketAddr>,
    /// Admin HTTP: `/metrics`, `/healthz`, `/readyz`. `null` disables it.
    pub admin: Option<SocketAddr>,
    /// Certificate and key for the TLS and secure WebSocket listeners.
    pub tls_files: Option<TlsFiles>,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        let any = |port| Some(SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, 0], port)));
        Self {
            tcp: any(1883),
            ws: any(8083),
            tls: any(8883),
            wss: any(8084),
            admin: any(8080),
            tls_files: None,
        }
    }
}

/// PEM files of the server certificate chain and its private key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Limits of the product specification (B4, B5, B6, B12).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest MQTT packet accepted, in bytes.
    pub max_packet_size: u32,
    /// Longest topic name or filter, in characters.
    pub max_topic_length: usize,
    /// Longest Client ID, in characters.
    pub max_client_id_length: usize,
    /// Subscriptions per client; 0 means unlimited.
    pub max_subscriptions_per_client: usize,
    /// Seconds a persistent session outlives its connection; also the cap of an
    /// MQTT 5 session expiry interval.
    pub session_expiry_secs: u32,
    /// Offline messages kept per persistent session; the oldest is dropped first.
    pub offline_queue_len: usize,
    /// Seconds an offline message is kept.
    pub offline_message_ttl_secs: u64,
    /// Offline messages pushed in one batch after CONNECT.
    pub offline_batch: usize,
    /// Seconds between two offline batches.
    pub offline_batch_interval_secs: u64,
    /// `$SYS/getOfflineMsg` pulls allowed per client per second.
    pub offline_pulls_per_sec: u32,
    /// Messages waiting for an online client. Beyond it QoS 0 messages are
    /// dropped (counted); QoS 1/2 ones are still queued (up to twice the
    /// limit, or the limit plus `receive_maximum`), and their publishers'
    /// acknowledgements wait until the queue is down to half the limit, so
    /// publishers slow down to the subscriber's pace.
    pub max_queued_messages: usize,
    /// Longest time a PUBLISH acknowledgement waits for room in a subscriber
    /// queue, milliseconds.
    pub queue_full_wait_ms: u64,
    /// QoS 1/2 messages in flight towards one client (capped by its receive maximum).
    pub max_inflight: u16,
    /// QoS 1/2 messages a client may have in flight towards the broker (MQTT 5
    /// receive maximum).
    pub receive_maximum: u16,
    /// Topic aliases per direction with an MQTT 5 client (those it may use, and
    /// at most those the broker uses towards it).
    pub topic_alias_maximum: u16,
    /// Keep-alive (seconds) enforced for clients that ask for none; 0 keeps such
    /// connections open until the peer goes away.
    pub default_keep_alive_secs: u16,
    /// Largest keep-alive (seconds) granted; a client asking for more gets this
    /// value as the MQTT 5 Server Keep Alive (3.1.1 clients are closed after 1.5
    /// times it). 0 grants whatever the client asks.
    pub max_keep_alive_secs: u16,
    /// Seconds a client has to send CONNECT after the TCP handshake (and
    /// again for the rest of it once its first bytes arrived).
    pub connect_timeout_secs: u16,
    /// File descriptors MQTT connections leave free under the open-file
    /// limit (at most a quarter of it), for the admin port, cluster links,
    /// Kafka and the journal; past the rest, new MQTT connections are closed
    /// at once (counted as `fd_limit`).
    pub reserved_file_descriptors: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_packet_size: 128 * 1024,
            max_topic_length: 64,
            max_client_id_length: 128,
            max_subscriptions_per_client: 30,
            session_expiry_secs: 2 * 3600,
            offline_queue_len: 10,
            offline_message_ttl_secs: 3 * 24 * 3600,
            offline_batch: 30,
            offline_batch_interval_secs: 5,
            offline_pulls_per_sec: 5,
            max_queued_messages: 1000,
            queue_full_wait_ms: 10_000,
            max_inflight: 32,
            receive_maximum: 64,
            topic_alias_maximum: 32,
            default_keep_alive_secs: 0,
            max_keep_alive_secs: 0,
            connect_timeout_secs: 10,
            reserved_file_descriptors: 256,
        }
    }
}

/// Client ID and name rules (B8, B12).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClientIdConfig {
    /// Refuse Client IDs that are not `GroupID@@@DeviceID`.
    pub require_group_id: bool,
    /// Apply the seeds' character rule (`[0-9A-Za-z-_]`, `/` in topics) to topics
    /// and Device IDs.
    pub strict_names: bool,
}

/// Authentication settings (A1–A6). Secrets themselves live in files that
/// Kubernetes mounts from Secrets, never in this configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// YAML file with users (password hashes and grants), AccessKey/SecretKey
    /// pairs, declared Group IDs and anonymous access; reloaded when it
    /// changes. Without it every client may connect and use every topic.
    pub credentials_file: Option<PathBuf>,
    /// How an MQTT 3.1.1 SUBSCRIBE to a topic the client may not read is
    /// refused: `close` the connection (the seeds' behaviour) or answer with
    /// the SUBACK failure code 0x80.
    pub v3_subscribe_refusal: V3SubscribeRefusal,
    /// File holding the bearer token that the admin HTTP API requires.
    /// `/healthz` and `/readyz` never need it; `/metrics` only when
    /// `protect_metrics` is set. Without it the operations API and
    /// `/cluster/drain` answer requests from loopback only.
    pub admin_token_file: Option<PathBuf>,
    /// File holding a read-only token: GET requests of the operations API
    /// and a protected `/metrics`, for dashboards; no change.
    pub admin_read_token_file: Option<PathBuf>,
    /// Require the admin token for `/metrics` too.
    pub protect_metrics: bool,
    /// File holding the key that signs tokens (token mode, A3); the same key
    /// on every node lets any node verify any token. Without it the token
    /// service is off.
    pub token_signing_key_file: Option<PathBuf>,
    /// Shortest lifetime of a token the service issues, seconds (the seeds:
    /// 60; lower only for tests).
    pub token_min_lifetime_secs: u64,
    /// How CONNECT credentials are checked: the password pool, failure
    /// limits, the cache of successful checks.
    pub login: LoginConfig,
}

/// Password checks of CONNECT (A1). argon2 runs on threads of its own, never
/// on a connection worker.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LoginConfig {
    /// Threads verifying passwords; 0 means one per CPU core.
    pub verify_threads: usize,
    /// CONNECTs waiting for a password check at most; past it a CONNECT is
    /// refused at once as "server busy" (MQTT 5 0x89, 3.1.1 return code 3).
    pub verify_queue: usize,
    /// Failed logins of one user name within `failure_window_secs` after which
    /// its CONNECTs are refused without a check (MQTT 5 0x9F, 3.1.1 return
    /// code 5) until the window ends, except a user name and password that
    /// passed a check within `cache_secs`; 0 turns it off. Lenient by
    /// default: a fleet often shares one user name, and the limit is a lever
    /// to lock all of it out.
    pub failures_per_user: u32,
    /// The same for one client IP address (IPv6: its /64).
    pub failures_per_ip: u32,
    /// Length of the failure window, seconds.
    pub failure_window_secs: u64,
    /// Seconds a successful password check is remembered, so that a client
    /// reconnecting with the same user name and password skips argon2; 0
    /// turns it off. Emptied whenever the credentials file changes.
    pub cache_secs: u64,
}

impl Default for LoginConfig {
    fn default() -> Self {
        Self {
            verify_threads: 0,
            verify_queue: 256,
            failures_per_user: 50,
            failures_per_ip: 100,
            failure_window_secs: 60,
            cache_secs: 300,
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            credentials_file: None,
            v3_subscribe_refusal: V3SubscribeRefusal::Close,
            admin_token_file: None,
            admin_read_token_file: None,
            protect_metrics: false,
            token_signing_key_file: None,
            token_min_lifetime_secs: 60,
            login: LoginConfig::default(),
        }
    }
}

/// See `AuthConfig::v3_subscribe_refusal`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum V3SubscribeRefusal {
    #[default]
    Close,
    Suback,
}

/// Cluster membership and links (C1–C5).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// The cluster port: links between nodes, and client connections that
    /// another node forwards to their session's owner.
    pub listen: SocketAddr,
    /// The other nodes' cluster addresses, `host:port` (on Kubernetes the
    /// pods' names under the StatefulSet's headless Service). Names are
    /// resolved again on every connection attempt; this node's own address
    /// may be listed (it is recognised and skipped).
    pub peers: Vec<String>,
    /// Where the other nodes reach this node's cluster port (`host:port`);
    /// `null`: the listen address, or `<node_id>:<port>` when it listens on
    /// every interface.
    pub advertise: Option<String>,
    /// With `advertise` unset, advertise `<node_id>.<advertise_domain>:<port>`
    /// (on Kubernetes: the pod's name under the headless Service, e.g.
    /// `ringmq-nodes.mqtt.svc`), so one configuration serves every pod.
    pub advertise_domain: Option<String>,
    /// File holding the secret every node of the instance shares; a node
    /// that cannot prove it knows the secret is not let in.
    pub secret_file: PathBuf,
    /// Heartbeat interval on every link, milliseconds.
    pub heartbeat_ms: u64,
    /// A node not heard from for this long is taken off the ring, milliseconds.
    pub failure_timeout_ms: u64,
    /// Frames waiting for one peer, at most; beyond it forwarded QoS 0
    /// messages are dropped (counted) and QoS 1/2 publishes wait.
    pub link_queue: usize,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, 0], 7946)),
            peers: Vec::new(),
            advertise: None,
            advertise_domain: None,
            secret_file: PathBuf::from("/etc/ringmq/cluster/secret"),
            heartbeat_ms: 500,
            failure_timeout_ms: 3000,
            link_queue: 10_000,
        }
    }
}

/// The Kafka cluster of the instance and what is written to it (K1–K7).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port…]`.
    pub bootstrap_servers: String,
    /// How the broker authenticates to Kafka.
    pub security: KafkaSecurity,
    /// Parent topics whose messages are stored, each in the Kafka topic of
    /// the same name.
    pub parent_topics: Vec<ParentTopic>,
    /// Topic that backend applications write device-bound messages to.
    pub downlink_topic: String,
    /// Topic of device connect events; `null` turns them off.
    pub connect_topic: Option<String>,
    /// Topic of device disconnect events; `null` turns them off.
    pub disconnect_topic: Option<String>,
    /// Consumer group of this node's downlink consumer; `null`:
    /// `ringmq-<node_id>`. Every node needs its own group (see ARCHITECTURE.md).
    pub consumer_group: Option<String>,
    /// Create missing topics at start with `partitions` and
    /// `replication_factor`; the operator turns this off when it manages them.
    pub create_topics: bool,
    /// Partitions of topics the broker creates (K6).
    pub partitions: i32,
    /// Replication factor of topics the broker creates.
    pub replication_factor: i32,
    /// Records waiting for Kafka's acknowledgement, at most. Beyond it QoS 0
    /// messages and device events are dropped (and counted), MQTT 5 QoS 1/2
    /// publishes are refused with reason 0x97 and MQTT 3.1.1 ones wait (K7).
    pub buffer_records: usize,
    /// Producer batching delay, milliseconds.
    pub linger_ms: u32,
    /// Producer compression.
    pub compression: Compression,
    /// Seconds a record may wait for Kafka before it fails; 0 retries until
    /// Kafka is back, which is what keeps acknowledged messages (K3, K7).
    pub delivery_timeout_secs: u32,
    /// Further librdkafka properties for the producer and the consumer
    /// (for example `socket.keepalive.enable`); they override the above.
    pub properties: std::collections::BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            bootstrap_servers: "localhost:9092".into(),
            security: KafkaSecurity::default(),
            parent_topics: Vec::new(),
            downlink_topic: "mq2mqtt".into(),
            connect_topic: Some("mqtt-device-connect".into()),
            disconnect_topic: Some("mqtt-device-disconnect".into()),
            consumer_group: None,
            create_topics: true,
            partitions: 3,
            replication_factor: 1,
            buffer_records: 10_000,
            linger_ms: 5,
            compression: Compression::None,
            delivery_timeout_secs: 0,
            properties: std::collections::BTreeMap::new(),
        }
    }
}

/// A declared parent topic (K6).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ParentTopic {
    /// First level of the MQTT topic, and the Kafka topic's name.
    pub name: String,
    /// `normal`, or `ordered`: records keyed by Client ID, so that each
    /// client's messages stay in send order within one partition.
    #[serde(default)]
    pub kind: TopicKind,
}

/// See `ParentTopic::kind`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TopicKind {
    #[default]
    Normal,
    Ordered,
}

/// See `KafkaConfig::compression`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    #[default]
    None,
    Gzip,
    Snappy,
    Lz4,
}

/// Kafka client authentication; secrets are read from mounted files.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaSecurity {
    /// `plaintext`, `ssl`, `sasl_plaintext` or `sasl_ssl`.
    pub protocol: KafkaProtocol,
    /// SASL mechanism: `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`.
    pub sasl_mechanism: Option<String>,
    /// SASL user name.
    pub username: Option<String>,
    /// File holding the SASL password.
    pub password_file: Option<PathBuf>,
    /// CA bundle that signs the Kafka brokers' certificates.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key, for mutual TLS.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// See `KafkaSecurity::protocol`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum KafkaProtocol {
    #[default]
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

/// Kafka's topic name rule: 1–249 of `[a-zA-Z0-9._-]`.
pub fn is_kafka_topic_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl KafkaConfig {
    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.bootstrap_servers.trim().is_empty() {
            return bad("kafka.bootstrap_servers must not be empty".into());
        }
        let mut seen = std::collections::HashSet::new();
        for t in &self.parent_topics {
            if !is_kafka_topic_name(&t.name) {
                return bad(format!(
                    "kafka.parent_topics: {:?} is not a Kafka topic name (1-249 of a-z A-Z 0-9 . _ -)",
                    t.name
                ));
            }
            if !seen.insert(t.name.as_str()) {
                return bad(format!(
                    "kafka.parent_topics: {:?} is declared twice",
                    t.name
                ));
            }
        }
        let system = [
            Some(&self.downlink_topic),
            self.connect_topic.as_ref(),
            self.disconnect_topic.as_ref(),
        ];
        for name in system.into_iter().flatten() {
            if !is_kafka_topic_name(name) {
                return bad(format!("kafka: {name:?} is not a Kafka topic name"));
            }
            if seen.contains(name.as_str()) {
                return bad(format!(
                    "kafka: {name:?} is a system topic and cannot be a parent topic"
                ));
            }
        }
        if self.partitions < 1 || self.replication_factor < 1 {
            return bad("kafka.partitions and kafka.replication_factor must be at least 1".into());
        }
        if self.buffer_records == 0 || self.buffer_records > 10_000_000 {
            return bad("kafka.buffer_records must be between 1 and 10000000".into());
        }
        let sasl = matches!(
            self.security.protocol,
            KafkaProtocol::SaslPlaintext | KafkaProtocol::SaslSsl
        );
        if sasl && (self.security.username.is_none() || self.security.password_file.is_none()) {
            return bad("kafka.security: SASL needs username and password_file".into());
        }
        Ok(())
    }
}

impl Config {
    /// Reads a YAML file; an empty file gives the defaults.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        Self::from_yaml(&text).map_err(|e| match e {
            ConfigError::Parse { error, .. } => ConfigError::Parse {
                path: path.to_owned(),
                error,
            },
            other => other,
        })
    }

    /// Parses YAML text and checks the values.
    pub fn from_yaml(text: &str) -> Result<Self> {
        let config: Config = if text.trim().is_empty() {
            Config::default()
        } else {
            serde_yaml::from_str(text).map_err(|error| ConfigError::Parse {
                path: PathBuf::from("<text>"),
                error,
            })?
        };
        config.validate()?;
        Ok(config)
    }

    /// This node's name: `node_id`, or the host name.
    pub fn node_name(&self) -> String {
        if let Some(id) = &self.node_id {
            return id.clone();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "ringmq".to_owned())
    }

    /// The defaults as documented YAML, for `--print-default-config`.
    pub fn default_yaml() -> String {
        DEFAULT_CONFIG_YAML.to_owned()
    }

    fn validate(&self) -> Result<()> {
        let l = &self.limits;
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if l.max_packet_size < 64 || l.max_packet_size > 268_435_455 {
            return bad("limits.max_packet_size must be between 64 and 268435455");
        }
        if l.max_topic_length == 0 || l.max_topic_length > 65_535 {
            return bad("limits.max_topic_length must be between 1 and 65535");
        }
        if l.max_client_id_length == 0 || l.max_client_id_length > 65_535 {
            return bad("limits.max_client_id_length must be between 1 and 65535");
        }
        if l.connect_timeout_secs == 0 {
            return bad("limits.connect_timeout_secs must be at least 1");
        }
        if l.offline_batch == 0 {
            return bad("limits.offline_batch must be at least 1");
        }
        if l.max_inflight == 0 || l.receive_maximum == 0 {
            return bad("limits.max_inflight and limits.receive_maximum must be at least 1");
        }
        if l.max_queued_messages == 0 {
            return bad("limits.max_queued_messages must be at least 1");
        }
        if self.auth.login.verify_queue == 0 || self.auth.login.failure_window_secs == 0 {
            return bad(
                "auth.login.verify_queue and auth.login.failure_window_secs must be at least 1",
            );
        }
        if l.offline_pulls_per_sec == 0 {
            return bad("limits.offline_pulls_per_sec must be at least 1");
        }
        if let Some(id) = &self.node_id
            && (id.is_empty() || !id.bytes().all(|b| b.is_ascii_graphic()))
        {
            return bad("node_id must be printable ASCII without spaces");
        }
        if let Some(k) = &self.kafka {
            k.validate()?;
        }
        let t = &self.trace;
        if t.retention_secs < 24 * 3600 || t.group_history_secs < 48 * 3600 {
            return bad(
                "trace.retention_secs must be at least 86400 and trace.group_history_secs at least 172800: the API's query windows are one and two days",
            );
        }
        if t.group_sample_secs == 0 {
            return bad("trace.group_sample_secs must be at least 1");
        }
        let a = &self.alarms;
        if a.tps_window_secs == 0 || a.tps_window_secs > 300 || a.hysteresis_percent >= 100 {
            return bad(
                "alarms.tps_window_secs must be between 1 and 300 and alarms.hysteresis_percent below 100",
            );
        }
        if let Some(c) = &self.cluster {
            if c.heartbeat_ms == 0 || c.failure_timeout_ms < 2 * c.heartbeat_ms {
                return bad(
                    "cluster.failure_timeout_ms must be at least twice cluster.heartbeat_ms (> 0)",
                );
            }
            if c.link_queue == 0 {
                return bad("cluster.link_queue must be at least 1");
            }
        }
        Ok(())
    }
}

/// The documented default configuration. A unit test checks that it parses to
/// exactly `Config::default()`, so the two cannot drift apart.
const DEFAULT_CONFIG_YAML: &str = r#"# ringmq broker configuration. Every key is optional; these are the defaults.
listeners:
  # MQTT over TCP (null disables it)
  tcp: "[::]:1883"
  # MQTT over WebSocket, path /mqtt, subprotocol "mqtt" (null disables it)
  ws: "[::]:8083"
  # MQTT over TLS and secure WebSocket: started only when tls_files is set
  tls: "[::]:8883"
  wss: "[::]:8084"
  # admin HTTP: /metrics, /healthz, /readyz (null disables it)
  admin: "[::]:8080"
  # tls_files:
  #   cert: /etc/ringmq/tls/tls.crt
  #   key: /etc/ringmq/tls/tls.key
  tls_files: null
limits:
  # largest MQTT packet accepted, bytes
  max_packet_size: 131072
  # longest topic name or filter, characters
  max_topic_length: 64
  # longest Client ID, characters
  max_client_id_length: 128
  # subscriptions per client, 0 = unlimited
  max_subscriptions_per_client: 30
  # lifetime of a persistent session after disconnect (caps MQTT 5 expiry), seconds
  session_expiry_secs: 7200
  # offline messages kept per session (oldest dropped first) and their maximum age
  offline_queue_len: 10
  offline_message_ttl_secs: 259200
  # automatic offline push: batch size and interval
  offline_batch: 30
  offline_batch_interval_secs: 5
  # $SYS/getOfflineMsg pulls per client per second
  offline_pulls_per_sec: 5
  # messages waiting for one online client; beyond it QoS 0 is dropped, QoS 1/2
  # is queued up to twice the limit and its PUBACK waits (up to queue_full_wait_ms)
  max_queued_messages: 1000
  queue_full_wait_ms: 10000
  # QoS 1/2 messages in flight towards one client
  max_inflight: 32
  # QoS 1/2 messages in flight from one client (MQTT 5 receive maximum)
  receive_maximum: 64
  # MQTT 5 topic aliases per direction
  topic_alias_maximum: 32
  # keep-alive imposed on clients that ask for none, seconds (0 = none)
  default_keep_alive_secs: 0
  # largest keep-alive granted, seconds (0 = whatever the client asks)
  max_keep_alive_secs: 0
  # time to send CONNECT after the TCP handshake, seconds
  connect_timeout_secs: 10
  # descriptors kept free for the admin port, links, Kafka (at most 1/4 of ulimit -n)
  reserved_file_descriptors: 256
client_id:
  # refuse Client IDs that are not GroupID@@@DeviceID
  require_group_id: false
  # the seeds' character rule for topics and Device IDs
  strict_names: false
auth:
  # users, access keys, Group IDs, anonymous access (mounted from a Secret;
  # reloaded on change). null: anyone may connect and use every topic.
  credentials_file: null
  # MQTT 3.1.1 SUBSCRIBE refused by the grants: close (seeds) or suback (0x80)
  v3_subscribe_refusal: close
  # bearer token file for the admin HTTP API (null: the API and /cluster/drain
  # answer loopback only; probes and /metrics answer everyone)
  admin_token_file: null
  # read-only token file: GET requests and a protected /metrics (dashboards)
  admin_read_token_file: null
  # also require the token for /metrics
  protect_metrics: false
  # key that signs tokens of the token service (null: token mode off)
  token_signing_key_file: null
  # shortest token lifetime issued, seconds
  token_min_lifetime_secs: 60
  # CONNECT password checks (argon2), on threads of their own
  login:
    verify_threads: 0               # 0 = one per CPU core
    verify_queue: 256               # waiting checks; beyond, "server busy"
    failures_per_user: 50           # failed logins per user name per window (0 = off)
    failures_per_ip: 100            # the same per client IP (IPv6: /64)
    failure_window_secs: 60
    cache_secs: 300                 # successful checks remembered (0 = off)
# The Kafka cluster the instance binds (null: nothing is stored). Example:
# kafka:
#   bootstrap_servers: "kafka-0.kafka:9092,kafka-1.kafka:9092"
#   security:
#     protocol: sasl_ssl            # plaintext | ssl | sasl_plaintext | sasl_ssl
#     sasl_mechanism: SCRAM-SHA-512
#     username: ringmq
#     password_file: /etc/ringmq/kafka/password
#     ca_file: /etc/ringmq/kafka/ca.crt
#   parent_topics:                  # first MQTT topic level = Kafka topic
#     - { name: sensors, kind: normal }
#     - { name: orders, kind: ordered }   # keyed by Client ID
#   downlink_topic: mq2mqtt
#   connect_topic: mqtt-device-connect
#   disconnect_topic: mqtt-device-disconnect
#   consumer_group: null            # null: ringmq-<node_id>
#   create_topics: true
#   partitions: 3
#   replication_factor: 1
#   buffer_records: 10000           # records awaiting Kafka, at most
#   linger_ms: 5
#   compression: none               # none | gzip | snappy | lz4
#   delivery_timeout_secs: 0        # 0: retry until Kafka is back
#   properties: {}                  # extra librdkafka settings
kafka: null
# this node's name (null: the host name)
node_id: null
# The other nodes of the instance (null: this node runs alone). Example:
# cluster:
#   listen: "[::]:7946"             # links between nodes, forwarded clients
#   peers: ["ringmq-0.ringmq-nodes:7946", "ringmq-1.ringmq-nodes:7946"]
#   advertise: null                 # how others reach this node (null: listen
#                                   # address, or <node_id>:<port> on [::])
#   advertise_domain: null          # <node_id>.<domain>:<port> when advertise is null
#   secret_file: /etc/ringmq/cluster/secret
#   heartbeat_ms: 500
#   failure_timeout_ms: 3000        # a silent node leaves the ring after this
#   link_queue: 10000               # frames waiting for one peer
cluster: null
# connection worker threads, 0 = one per CPU core
workers: 0
# pin each worker to a core of its own (only on a machine of its own)
pin_workers: false
# graceful shutdown: seconds to wait for connections to close
shutdown_timeout_secs: 10
# how the operations API names the instance and where users reach it
instance:
  name: ringmq
  endpoints: {}                     # e.g. { tcp: "mqtt.example.com:1883" }
# declared capacity of the whole instance, 0 = no limit
capacity:
  connections: 0
  # weighted messages per second, sent + received (QoS 0 x1, QoS 1 x2, QoS 2 x10)
  tps: 0
  subscriptions: 0
  topics: 0                         # distinct subscribed filters (alarm only)
  mode: enforce                     # enforce | alarm_only
# alarm rules: threshold = percent of capacity, or an absolute value
alarms:
  connections: { enabled: true, percent: 70, value: null }
  subscriptions: { enabled: true, percent: 70, value: null }
  topics: { enabled: true, percent: 70, value: null }
  tps: { enabled: true, percent: 70, value: null }
  hysteresis_percent: 10            # resolve below threshold minus 10 %
  hold_secs: 30                     # beyond / back below for this long
  tps_window_secs: 10               # TPS averaged over this window
# what the operations API remembers (in memory, bounded)
trace:
  device_events: 200000
  message_events: 500000            # 0 turns message tracing off
  retention_secs: 90000
  group_history_secs: 176400
  report_keys: 10000
  groups: 1000
  group_sample_secs: 60
  dir: null                         # also on disk here (survives restarts)
  disk_bytes: 1073741824            # at most this much in dir
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_defaults_are_the_defaults() {
        let parsed = Config::from_yaml(DEFAULT_CONFIG_YAML).map_err(|e| e.to_string());
        assert_eq!(parsed, Ok(Config::default()));
    }

    #[test]
    fn empty_text_gives_defaults() {
        assert_eq!(Config::from_yaml("").ok(), Some(Config::default()));
    }

    #[test]
    fn unknown_key_is_rejected_with_its_name() {
        let err = Config::from_yaml("limits:\n  max_topic_lenght: 10\n")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("max_topic_lenght"), "{err}");
    }

    #[test]
    fn kafka_section_parses_with_defaults_for_missing_keys() {
        let yaml = "kafka:\n  bootstrap_servers: k:9092\n  parent_topics:\n    - name: sensors\n    - { name: orders, kind: ordered }\n";
        let c = Config::from_yaml(yaml).map_err(|e| e.to_string());
        let k = c.ok().and_then(|c| c.kafka);
        let k = k.as_ref();
        assert_eq!(k.map(|k| k.parent_topics.len()), Some(2));
        assert_eq!(k.map(|k| k.parent_topics[1].kind), Some(TopicKind::Ordered));
        assert_eq!(k.map(|k| k.downlink_topic.as_str()), Some("mq2mqtt"));
        assert_eq!(k.map(|k| k.partitions), Some(3));
    }

    #[test]
    fn kafka_topic_names_are_checked() {
        for bad in [
            "kafka:\n  parent_topics: [{ name: \"a/b\" }]\n",
            "kafka:\n  parent_topics: [{ name: a }, { name: a }]\n",
            "kafka:\n  parent_topics: [{ name: mq2mqtt }]\n",
            "kafka:\n  parent_topics: [{ name: a, kind: sorted }]\n",
            "kafka:\n  security: { protocol: sasl_ssl }\n",
            "kafka:\n  buffer_records: 0\n",
        ] {
            assert!(Config::from_yaml(bad).is_err(), "accepted: {bad}");
        }
    }

    #[test]
    fn bad_value_is_rejected() {
        assert!(Config::from_yaml("limits:\n  offline_batch: 0\n").is_err());
    }
}
