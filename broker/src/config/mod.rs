//! Typed broker configuration: one file per section of the YAML, the
//! documented defaults in `default.yaml`.
//!
//! Every key is optional: an empty file (or no file at all) gives the embedded
//! defaults, which run one node with MQTT/TCP on 1883, MQTT over WebSocket on
//! 8083 and the admin HTTP port on 8080. Unknown keys are rejected so that a
//! typo never silently falls back to a default.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod alarms;
mod auth;
mod capacity;
mod client_id;
mod cluster;
mod instance;
mod kafka;
mod limits;
mod listeners;
mod persistence;
mod trace;

pub use alarms::{AlarmRule, AlarmsConfig};
pub use auth::{AuthConfig, LoginConfig, V3SubscribeRefusal};
pub use capacity::{CapacityConfig, CapacityMode};
pub use client_id::ClientIdConfig;
pub use cluster::ClusterConfig;
pub use instance::InstanceConfig;
pub use kafka::{
    Compression, KafkaConfig, KafkaProtocol, KafkaSecurity, ParentTopic, TopicKind,
    is_kafka_topic_name,
};
pub use limits::LimitsConfig;
pub use listeners::{ListenerConfig, TlsFiles};
pub use persistence::{Fsync, PersistenceConfig};
pub use trace::TraceConfig;

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
    /// Every problem found, one per entry.
    #[error("invalid config: {}", .0.join("; "))]
    Invalid(Vec<String>),
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
    /// The durable store of sessions, queued and retained messages.
    pub persistence: PersistenceConfig,
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
            persistence: PersistenceConfig::default(),
        }
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

    /// Checks every section; all problems are reported at once.
    fn validate(&self) -> Result<()> {
        let mut problems = Problems::default();
        self.limits.check(&mut problems);
        self.auth.check(&mut problems);
        self.trace.check(&mut problems);
        self.persistence.check(&mut problems);
        self.alarms.check(&mut problems);
        if let Some(k) = &self.kafka {
            k.check(&mut problems);
        }
        if let Some(c) = &self.cluster {
            c.check(&mut problems);
        }
        if let Some(id) = &self.node_id {
            problems.unless(
                !id.is_empty() && id.bytes().all(|b| b.is_ascii_graphic()),
                "node_id must be printable ASCII without spaces",
            );
        }
        problems.into_result()
    }
}

/// What is wrong with a configuration, collected section by section.
#[derive(Debug, Default)]
pub struct Problems(Vec<String>);

impl Problems {
    /// Notes `problem` unless `ok`.
    pub fn unless(&mut self, ok: bool, problem: impl Into<String>) {
        if !ok {
            self.0.push(problem.into());
        }
    }

    fn into_result(self) -> Result<()> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(self.0))
        }
    }
}

/// The documented default configuration (`default.yaml`). A unit test checks
/// that it parses to exactly `Config::default()`, so the two cannot drift
/// apart.
const DEFAULT_CONFIG_YAML: &str = include_str!("default.yaml");

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

    #[test]
    fn every_problem_is_reported_at_once() {
        let yaml = "limits:\n  offline_batch: 0\n  max_inflight: 0\nalarms:\n  tps_window_secs: 0\nkafka:\n  bootstrap_servers: \"\"\n  buffer_records: 0\ncluster:\n  heartbeat_ms: 0\nnode_id: \"a b\"\n";
        let Err(ConfigError::Invalid(problems)) = Config::from_yaml(yaml) else {
            panic!("accepted: {yaml}");
        };
        for key in [
            "limits.offline_batch",
            "limits.max_inflight",
            "alarms.tps_window_secs",
            "kafka.bootstrap_servers",
            "kafka.buffer_records",
            "cluster.failure_timeout_ms",
            "node_id",
        ] {
            assert!(
                problems.iter().any(|p| p.contains(key)),
                "{key} missing in {problems:?}"
            );
        }
        assert_eq!(problems.len(), 7, "{problems:?}");
    }
}
