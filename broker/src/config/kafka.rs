//! `kafka`: the Kafka cluster the instance binds (K1–K7).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::Problems;

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
    pub(super) fn check(&self, p: &mut Problems) {
        p.unless(
            !self.bootstrap_servers.trim().is_empty(),
            "kafka.bootstrap_servers must not be empty",
        );
        let mut seen = std::collections::HashSet::new();
        for t in &self.parent_topics {
            p.unless(
                is_kafka_topic_name(&t.name),
                format!(
                    "kafka.parent_topics: {:?} is not a Kafka topic name (1-249 of a-z A-Z 0-9 . _ -)",
                    t.name
                ),
            );
            p.unless(
                seen.insert(t.name.as_str()),
                format!("kafka.parent_topics: {:?} is declared twice", t.name),
            );
        }
        let system = [
            Some(&self.downlink_topic),
            self.connect_topic.as_ref(),
            self.disconnect_topic.as_ref(),
        ];
        for name in system.into_iter().flatten() {
            p.unless(
                is_kafka_topic_name(name),
                format!("kafka: {name:?} is not a Kafka topic name"),
            );
            p.unless(
                !seen.contains(name.as_str()),
                format!("kafka: {name:?} is a system topic and cannot be a parent topic"),
            );
        }
        p.unless(
            self.partitions >= 1 && self.replication_factor >= 1,
            "kafka.partitions and kafka.replication_factor must be at least 1",
        );
        p.unless(
            (1..=10_000_000).contains(&self.buffer_records),
            "kafka.buffer_records must be between 1 and 10000000",
        );
        let sasl = matches!(
            self.security.protocol,
            KafkaProtocol::SaslPlaintext | KafkaProtocol::SaslSsl
        );
        p.unless(
            !sasl || (self.security.username.is_some() && self.security.password_file.is_some()),
            "kafka.security: SASL needs username and password_file",
        );
    }
}
