//! Kafka storage and data flows (K1–K7), on rdkafka (librdkafka).
//!
//! - Uplink: a message whose parent topic is declared becomes one record in
//!   the Kafka topic of that name (`record::uplink`). QoS 1/2 publishes wait
//!   for the record's acknowledgement (`acks=all`, idempotent producer).
//! - Device events: connect/disconnect records, keyed by Client ID.
//! - Downlink: a consumer thread reads the downlink topic (`mq2mqtt`) and
//!   routes each record to MQTT subscribers (`downlink`).
//!
//! Every record in librdkafka's queue holds a slot of one bounded buffer
//! (`buffer_records`). When Kafka is away the buffer fills: best-effort
//! records (QoS 0, wills, events) are dropped and counted, MQTT 5 QoS 1/2
//! publishes are refused with 0x97, MQTT 3.1.1 ones wait for a slot. Records
//! in the buffer are retried until Kafka takes them, and the idempotent
//! producer writes each of them once.

mod downlink;
pub mod inspect;
mod metrics;
mod producer;
pub mod record;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::Producer;
use tokio::sync::oneshot;

use crate::config::{Compression, KafkaConfig, KafkaProtocol, TopicKind};
use crate::message::Message;
use crate::storage::{DeviceEvent, Durability, OnFull, Storage, StorageError, StoreFuture};
use crate::topic;

pub use downlink::Downlink;
use metrics::KafkaMetrics;
use producer::{Context, Out, Record, Shared, Submitted, WhenFull};

/// Errors while setting up the Kafka clients.
#[derive(Debug, thiserror::Error)]
pub enum KafkaSetupError {
    #[error("kafka client: {0}")]
    Client(#[from] KafkaError),
    #[error("cannot read kafka.security.password_file {path}: {error}")]
    Password {
        path: std::path::PathBuf,
        error: std::io::Error,
    },
    #[error("kafka metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

pub type Result<T> = std::result::Result<T, KafkaSetupError>;

/// The Kafka side of one broker node.
#[derive(Debug)]
pub struct Kafka {
    config: KafkaConfig,
    node: Arc<str>,
    out: Arc<Out>,
    /// Declared parent topics: Kafka topic name and kind.
    parents: HashMap<String, (Arc<str>, TopicKind)>,
    connect_topic: Option<Arc<str>>,
    disconnect_topic: Option<Arc<str>>,
}

/// Settings every client of the node shares: servers and security.
fn base_config(cfg: &KafkaConfig, node: &str) -> Result<ClientConfig> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.bootstrap_servers)
        .set("client.id", format!("ringmq-{node}"))
        .set_log_level(RDKafkaLogLevel::Warning);
    let s = &cfg.security;
    let protocol = match s.protocol {
        KafkaProtocol::Plaintext => "plaintext",
        KafkaProtocol::Ssl => "ssl",
        KafkaProtocol::SaslPlaintext => "sasl_plaintext",
        KafkaProtocol::SaslSsl => "sasl_ssl",
    };
    c.set("security.protocol", protocol);
    if let Some(m) = &s.sasl_mechanism {
        c.set("sasl.mechanism", m);
    }
    if let Some(u) = &s.username {
        c.set("sasl.username", u);
    }
    if let Some(path) = &s.password_file {
        let password =
            std::fs::read_to_string(path).map_err(|error| KafkaSetupError::Password {
                path: path.clone(),
                error,
            })?;
        c.set("sasl.password", password.trim_end_matches(['\r', '\n']));
    }
    let files = [
        ("ssl.ca.location", &s.ca_file),
        ("ssl.certificate.location", &s.cert_file),
        ("ssl.key.location", &s.key_file),
    ];
    for (key, path) in files {
        if let Some(p) = path {
            c.set(key, p.to_string_lossy());
        }
    }
    Ok(c)
}

fn with_properties(mut c: ClientConfig, cfg: &KafkaConfig) -> ClientConfig {
    for (k, v) in &cfg.properties {
        c.set(k, v);
    }
    c
}

impl Kafka {
    /// Creates the producer. Nothing here needs Kafka to be reachable: the
    /// broker starts and routes MQTT traffic while Kafka is away (K7).
    pub fn new(
        cfg: &KafkaConfig,
        node: &str,
        registry: &prometheus::Registry,
    ) -> Result<Arc<Self>> {
        let metrics = KafkaMetrics::new(registry)?;
        metrics.buffer_limit.set(gauge(cfg.buffer_records));
        let shared = Arc::new(Shared::new(cfg.buffer_records, metrics));
        let mut pc = base_config(cfg, node)?;
        pc.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", cfg.linger_ms.to_string())
            .set(
                "message.timeout.ms",
                (u64::from(cfg.delivery_timeout_secs) * 1000).to_string(),
            )
            // Our buffer bounds the queue; librdkafka's own limit is a backstop.
            .set(
                "queue.buffering.max.messages",
                (cfg.buffer_records + 1000).to_string(),
            )
            // The Java client's key hashing, so keyed records land where a
            // Java producer would put them.
            .set("partitioner", "murmur2_random")
            .set(
                "compression.type",
                match cfg.compression {
                    Compression::None => "none",
                    Compression::Gzip => "gzip",
                    Compression::Snappy => "snappy",
                    Compression::Lz4 => "lz4",
                },
            );
        let pc = with_properties(pc, cfg);
        let producer = pc.create_with_context(Context {
            shared: shared.clone(),
        })?;
        let parents = cfg
            .parent_topics
            .iter()
            .map(|t| (t.name.clone(), (Arc::from(t.name.as_str()), t.kind)))
            .collect();
        Ok(Arc::new(Self {
            config: cfg.clone(),
            node: Arc::from(node),
            out: Arc::new(Out::new(producer, shared)),
            parents,
            connect_topic: cfg.connect_topic.as_deref().map(Arc::from),
            disconnect_topic: cfg.disconnect_topic.as_deref().map(Arc::from),
        }))
    }

    /// Creates the declared and system topics that do not exist yet (K6).
    /// Retries until Kafka answers; existing topics are left as they are.
    pub async fn ensure_topics(&self) {
        let cfg = &self.config;
        let names: Vec<&str> = cfg
            .parent_topics
            .iter()
            .map(|t| t.name.as_str())
            .chain(std::iter::once(cfg.downlink_topic.as_str()))
            .chain(cfg.connect_topic.as_deref())
            .chain(cfg.disconnect_topic.as_deref())
            .collect();
        let admin: AdminClient<DefaultClientContext> = match base_config(cfg, &self.node)
            .and_then(|c| Ok(with_properties(c, cfg).create()?))
        {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(error = %e, "kafka admin client not created; topics must exist already");
                return;
            }
        };
        let topics: Vec<NewTopic<'_>> = names
            .iter()
            .map(|n| {
                NewTopic::new(
                    n,
                    cfg.partitions,
                    TopicReplication::Fixed(cfg.replication_factor),
                )
            })
            .collect();
        let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
        loop {
            match admin.create_topics(&topics, &opts).await {
                Ok(results) => {
                    let mut retry = false;
                    for r in results {
                        match r {
                            Ok(name) => tracing::info!(topic = name, "kafka topic created"),
                            Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => {
                                tracing::debug!(topic = name, "kafka topic exists")
                            }
                            Err((name, code)) => {
                                retry = true;
                                tracing::warn!(topic = name, error = %code, "kafka topic not created");
                            }
                        }
                    }
                    if !retry {
                        return;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "kafka topics not checked; retrying"),
            }
            ntex::time::sleep(Duration::from_secs(5)).await;
        }
    }

    /// Whether the broker creates missing topics (`kafka.create_topics`).
    pub fn creates_topics(&self) -> bool {
        self.config.create_topics
    }

    /// The downlink consumer's settings.
    fn consumer_config(&self) -> Result<ClientConfig> {
        let cfg = &self.config;
        let group = cfg
            .consumer_group
            .clone()
            .unwrap_or_else(|| format!("ringmq-{}", self.node));
        let mut c = base_config(cfg, &self.node)?;
        c.set("group.id", group)
            // Static membership: a node restarted after a crash takes its
            // partitions back at once, instead of waiting for the killed
            // consumer's session to time out (45 s) with its commands.
            .set(
                "group.instance.id",
                format!("ringmq-{}-downlink", self.node),
            )
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            // Offsets are stored only once a record is in the sessions' queues.
            .set("enable.auto.offset.store", "false")
            // A node that joins starts with the commands sent from then on.
            .set("auto.offset.reset", "latest")
            .set("topic.metadata.refresh.interval.ms", "10000");
        Ok(with_properties(c, cfg))
    }

    /// Writes what is still buffered, waiting at most `timeout`.
    pub fn flush(&self, timeout: Duration) {
        let left = self.out.shared.in_use();
        if left == 0 {
            return;
        }
        tracing::info!(records = left, "flushing kafka records");
        if let Err(e) = self.out.producer().flush(timeout) {
            let left = self.out.shared.in_use();
            tracing::warn!(error = %e, records = left, "kafka records not flushed before shutdown");
        }
    }
}

impl Storage for Kafka {
    fn stores(&self, parent_topic: &str) -> bool {
        self.parents.contains_key(parent_topic)
    }

    fn store(&self, msg: Arc<Message>, ordered: bool, durability: Durability) -> StoreFuture {
        let Some((topic, kind)) = self.parents.get(topic::parent_topic(&msg.topic)) else {
            return Box::pin(async { Ok(()) });
        };
        let key = (ordered || *kind == TopicKind::Ordered).then(|| msg.publisher.clone());
        let headers = OwnedHeaders::new_with_capacity(2)
            .insert(Header {
                key: "mqttTopic",
                value: Some(msg.topic.as_str()),
            })
            .insert(Header {
                key: "clientId",
                value: Some(&*msg.publisher),
            });
        let mut record = Record {
            topic: topic.clone(),
            key,
            value: record::uplink(&msg),
            headers,
            ts_ms: msg.ts_ms,
            done: None,
        };
        let when_full = match durability {
            Durability::BestEffort => {
                self.out.submit(record, WhenFull::Drop);
                return Box::pin(async { Ok(()) });
            }
            Durability::Acknowledged(OnFull::Refuse) => WhenFull::Refuse,
            Durability::Acknowledged(OnFull::Wait) => WhenFull::Queue,
        };
        let (tx, rx) = oneshot::channel();
        record.done = Some(tx);
        // Submitted now, in the caller's order, not when the future first runs.
        let queued = match self.out.submit(record, when_full) {
            Submitted::Sent => None,
            Submitted::Queued(id) => Some(id),
            Submitted::Refused | Submitted::Dropped => {
                return Box::pin(async { Err(StorageError::BufferFull) });
            }
        };
        let out = self.out.clone();
        Box::pin(async move {
            let outcome = match queued {
                None => rx.await,
                Some(id) => {
                    let _withdraw = Withdraw { out: &out, id };
                    wait_in_queue(&out, rx).await
                }
            };
            match outcome {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(StorageError::Unavailable(e)),
                Err(_) => Err(StorageError::Unavailable("kafka producer closed".into())),
            }
        })
    }

    fn device_event(&self, event: DeviceEvent) {
        let topic = match event.kind {
            crate::storage::EventKind::Connect => &self.connect_topic,
            _ => &self.disconnect_topic,
        };
        let Some(topic) = topic else {
            return;
        };
        let record = Record {
            topic: topic.clone(),
            key: Some(event.client_id.clone()),
            value: record::event(&event),
            headers: OwnedHeaders::new(),
            ts_ms: event.ts_ms,
            done: None,
        };
        self.out.submit(record, WhenFull::Drop);
    }
}

/// Waits for a queued record's outcome; whenever a buffer slot frees, hands
/// the queue's head records to librdkafka (any waiting publisher may do it
/// for all of them).
async fn wait_in_queue(
    out: &Out,
    mut rx: oneshot::Receiver<producer::Outcome>,
) -> std::result::Result<producer::Outcome, oneshot::error::RecvError> {
    loop {
        let room = out.shared.room.notified();
        let mut room = std::pin::pin!(room);
        room.as_mut().enable();
        out.drain();
        if let ntex::util::Either::Left(outcome) = ntex::util::select(&mut rx, room).await {
            return outcome;
        }
    }
}

/// Takes a record out of the waiting queue when its publisher goes away
/// before it was handed to librdkafka: it was never acknowledged, and the
/// client sends it again.
struct Withdraw<'a> {
    out: &'a Out,
    id: u64,
}

impl Drop for Withdraw<'_> {
    fn drop(&mut self) {
        self.out.withdraw(self.id);
    }
}

fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
