//! The broker configuration (`broker.yaml`) an instance's pods run with.
//!
//! It does not depend on the replica count: every pod is given pod 0 as its
//! seed peer and learns the others from it, so scaling never changes the
//! ConfigMap and never rolls the pods.

use serde_json::{Value, json};

use crate::crd::{Enforcement, KafkaProtocol, MqttInstanceSpec};
use crate::names::Names;

/// Where the pods mount what the configuration refers to.
pub mod paths {
    pub const CONFIG_DIR: &str = "/etc/ringmq/config";
    pub const CONFIG: &str = "/etc/ringmq/config/broker.yaml";
    pub const CREDENTIALS_DIR: &str = "/etc/ringmq/credentials";
    pub const CREDENTIALS: &str = "/etc/ringmq/credentials/credentials.yaml";
    pub const CLUSTER_DIR: &str = "/etc/ringmq/cluster";
    pub const CLUSTER_SECRET: &str = "/etc/ringmq/cluster/secret";
    pub const ADMIN_DIR: &str = "/etc/ringmq/admin";
    pub const ADMIN_TOKEN: &str = "/etc/ringmq/admin/token";
    pub const TLS_DIR: &str = "/etc/ringmq/tls";
    pub const KAFKA_DIR: &str = "/etc/ringmq/kafka";
    /// The pod's data volume (a PersistentVolumeClaim).
    pub const DATA_DIR: &str = "/var/lib/ringmq";
    /// The store of persistent sessions, queued and retained messages.
    pub const STORE_DIR: &str = "/var/lib/ringmq/store";
    /// The trace, metering and alarm journal, on the same volume.
    pub const TRACE_DIR: &str = "/var/lib/ringmq/journal";
}

/// Container ports of the broker.
pub mod ports {
    pub const MQTT: i32 = 1883;
    pub const MQTTS: i32 = 8883;
    pub const WS: i32 = 8083;
    pub const WSS: i32 = 8084;
    pub const ADMIN: i32 = 8080;
    pub const CLUSTER: i32 = 7946;
}

/// What the configuration needs besides the spec.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    /// The Kafka user name from the credentials Secret (not a secret; the
    /// password stays in the Secret and is mounted as a file).
    pub kafka_username: Option<String>,
    /// The credentials Secret has a `ca.crt`.
    pub kafka_ca: bool,
    /// Users or Group IDs are declared: the brokers get a credentials file.
    pub credentials: bool,
}

fn rule(r: &crate::crd::AlarmRule) -> Value {
    json!({ "enabled": r.enabled, "percent": r.percent, "value": r.value })
}

/// The broker configuration of an instance, as YAML.
pub fn render(spec: &MqttInstanceSpec, names: &Names, inputs: &Inputs) -> String {
    let any = |port: i32| json!(format!("[::]:{port}"));
    let tls = spec.listeners.tls_secret.is_some();
    let ws = spec.listeners.websocket;
    let mut listeners = json!({
        "tcp": any(ports::MQTT),
        "ws": if ws { any(ports::WS) } else { Value::Null },
        "tls": any(ports::MQTTS),
        "wss": if ws { any(ports::WSS) } else { Value::Null },
        "admin": any(ports::ADMIN),
    });
    if tls {
        listeners["tls_files"] = json!({
            "cert": format!("{}/tls.crt", paths::TLS_DIR),
            "key": format!("{}/tls.key", paths::TLS_DIR),
        });
    }
    let s = &spec.session;
    // The ServiceMonitor scrapes /metrics without a token: the pod network
    // is the instance's own; the API stays behind the token.
    let mut auth = json!({ "admin_token_file": paths::ADMIN_TOKEN, "protect_metrics": false });
    if inputs.credentials {
        auth["credentials_file"] = json!(paths::CREDENTIALS);
    }
    let c = &spec.capacity;
    let mut config = json!({
        "listeners": listeners,
        "limits": {
            "session_expiry_secs": s.expiry_secs,
            "offline_queue_len": s.offline_queue_len,
            "offline_message_ttl_secs": s.offline_ttl_secs,
        },
        "client_id": { "require_group_id": spec.require_group_ids },
        "auth": auth,
        "cluster": {
            "listen": any(ports::CLUSTER),
            "peers": [format!("{}:{}", names.pod_host(0), ports::CLUSTER)],
            "advertise_domain": names.headless_domain(),
            "secret_file": paths::CLUSTER_SECRET,
            "replication_factor": crate::profile::replication_factor(spec),
        },
        "instance": {
            "name": names.instance,
            "endpoints": names.endpoints(spec),
        },
        "capacity": {
            "connections": c.connections,
            "tps": c.tps,
            "subscriptions": c.subscriptions,
            "mode": match spec.enforcement {
                Enforcement::Enforce => "enforce",
                Enforcement::AlarmOnly => "alarm_only",
            },
        },
        "alarms": {
            "connections": rule(&spec.alarms.connections),
            "subscriptions": rule(&spec.alarms.subscriptions),
            "topics": rule(&spec.alarms.topics),
            "tps": rule(&spec.alarms.tps),
        },
        "trace": { "dir": paths::TRACE_DIR },
        "persistence": { "dir": paths::STORE_DIR },
        "shutdown_timeout_secs": 30,
    });
    if let Some(k) = &spec.kafka {
        let mut security = json!({
            "protocol": match k.security_protocol {
                KafkaProtocol::Plaintext => "plaintext",
                KafkaProtocol::Ssl => "ssl",
                KafkaProtocol::SaslPlaintext => "sasl_plaintext",
                KafkaProtocol::SaslSsl => "sasl_ssl",
            },
        });
        if let Some(m) = &k.sasl_mechanism {
            security["sasl_mechanism"] = json!(m);
        }
        if k.credentials_secret.is_some() {
            if let Some(u) = &inputs.kafka_username {
                security["username"] = json!(u);
                security["password_file"] = json!(format!("{}/password", paths::KAFKA_DIR));
            }
            if inputs.kafka_ca {
                security["ca_file"] = json!(format!("{}/ca.crt", paths::KAFKA_DIR));
            }
        }
        config["kafka"] = json!({
            "bootstrap_servers": k.bootstrap_servers,
            "security": security,
            "parent_topics": k.parent_topics.iter().map(|t| json!({
                "name": t.name,
                "kind": if t.ordered { "ordered" } else { "normal" },
            })).collect::<Vec<_>>(),
            // The operator owns the topics (K6): creates, grows, deletes.
            "create_topics": false,
            "partitions": k.partitions,
            "replication_factor": k.replication_factor,
        });
    }
    serde_yaml::to_string(&config).unwrap_or_default()
}
