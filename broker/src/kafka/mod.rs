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
mod metrics;
pub mod record;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use tokio::sync::{Notify, oneshot};

use crate::config::{Compression, KafkaConfig, KafkaProtocol, TopicKind};
use crate::message::Message;
use crate::storage::{DeviceEvent, Durability, OnFull, Storage, StorageError, StoreFuture};
use crate::topic;

pub use downlink::Downlink;
use metrics::KafkaMetrics;

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

/// What the producer's delivery callback shares with the publish path.
#[derive(Debug)]
struct Shared {
    /// Records in librdkafka's queue, waiting for Kafka.
    pending: AtomicUsize,
    limit: usize,
    /// Signalled when a record leaves the buffer.
    room: Notify,
    metrics: KafkaMetrics,
}

impl Shared {
    fn try_reserve(&self) -> bool {
        self.pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.limit).then_some(n + 1)
            })
            .is_ok()
    }

    async fn reserve(&self, on_full: OnFull) -> std::result::Result<(), StorageError> {
        loop {
            let notified = self.room.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if self.try_reserve() {
                self.metrics.buffer.inc();
                return Ok(());
            }
            if on_full == OnFull::Refuse {
                return Err(StorageError::BufferFull);
            }
            notified.await;
        }
    }

    fn release(&self) {
        self.pending.fetch_sub(1, Ordering::AcqRel);
        self.metrics.buffer.dec();
        self.room.notify_waiters();
    }
}

/// Carried by each record through librdkafka to the delivery callback.
struct Pending {
    topic: Arc<str>,
    started: Instant,
    done: Option<oneshot::Sender<std::result::Result<(), String>>>,
}

/// librdkafka callbacks: delivery reports, errors and logs.
#[derive(Debug)]
struct Context {
    shared: Arc<Shared>,
}

impl ClientContext for Context {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_librdkafka(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.shared.metrics.client_errors.inc();
        tracing::warn!(%error, reason, "kafka client error");
    }
}

impl ProducerContext for Context {
    type DeliveryOpaque = Box<Pending>;

    fn delivery(&self, result: &DeliveryResult<'_>, pending: Box<Pending>) {
        let m = &self.shared.metrics;
        m.produce_seconds
            .observe(pending.started.elapsed().as_secs_f64());
        let outcome = match result {
            Ok(_) => {
                m.records.with_label_values(&[&pending.topic, "ok"]).inc();
                Ok(())
            }
            Err((e, _)) => {
                m.records
                    .with_label_values(&[&pending.topic, "failed"])
                    .inc();
                tracing::warn!(topic = %pending.topic, error = %e, "kafka record not stored");
                Err(e.to_string())
            }
        };
        self.shared.release();
        if let Some(done) = pending.done {
            // The publisher may be gone (connection closed); nothing to tell.
            let _ = done.send(outcome);
        }
    }
}

fn log_librdkafka(level: RDKafkaLogLevel, fac: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => tracing::error!(fac, "librdkafka: {message}"),
        RDKafkaLogLevel::Warning => tracing::warn!(fac, "librdkafka: {message}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(fac, "librdkafka: {message}")
        }
        RDKafkaLogLevel::Debug => tracing::debug!(fac, "librdkafka: {message}"),
    }
}

/// The producer and its buffer accounting.
struct Out {
    producer: ThreadedProducer<Context>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Out").field("shared", &self.shared).finish()
    }
}

impl Out {
    /// Hands one record to librdkafka; the caller holds a buffer slot.
    fn send(
        &self,
        topic: &Arc<str>,
        key: Option<&str>,
        value: &[u8],
        headers: OwnedHeaders,
        ts_ms: u64,
        done: Option<oneshot::Sender<std::result::Result<(), String>>>,
    ) -> std::result::Result<(), StorageError> {
        let pending = Box::new(Pending {
            topic: topic.clone(),
            started: Instant::now(),
            done,
        });
        let mut record = BaseRecord::with_opaque_to(topic, pending)
            .payload(value)
            .headers(headers)
            .timestamp(i64::try_from(ts_ms).unwrap_or(i64::MAX));
        if let Some(k) = key {
            record = record.key(k);
        }
        match self.producer.send(record) {
            Ok(()) => Ok(()),
            Err((e, _)) => {
                self.shared.release();
                self.shared
                    .metrics
                    .records
                    .with_label_values(&[topic, "failed"])
                    .inc();
                match e {
                    KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => {
                        Err(StorageError::BufferFull)
                    }
                    other => Err(StorageError::Unavailable(other.to_string())),
                }
            }
        }
    }

    /// A record nobody waits for: written when a buffer slot is free,
    /// otherwise dropped and counted.
    fn send_best_effort(
        &self,
        topic: &Arc<str>,
        key: Option<&str>,
        value: &[u8],
        headers: OwnedHeaders,
        ts_ms: u64,
    ) {
        if !self.shared.try_reserve() {
            self.shared
                .metrics
                .records
                .with_label_values(&[topic, "dropped"])
                .inc();
            return;
        }
        self.shared.metrics.buffer.inc();
        if let Err(e) = self.send(topic, key, value, headers, ts_ms, None) {
            tracing::debug!(%topic, error = %e, "best-effort kafka record dropped");
        }
    }
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
        let shared = Arc::new(Shared {
            pending: AtomicUsize::new(0),
            limit: cfg.buffer_records,
            room: Notify::new(),
            metrics,
        });
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
            out: Arc::new(Out { producer, shared }),
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
        let left = self.out.shared.pending.load(Ordering::Acquire);
        if left == 0 {
            return;
        }
        tracing::info!(records = left, "flushing kafka records");
        if let Err(e) = self.out.producer.flush(timeout) {
            let left = self.out.shared.pending.load(Ordering::Acquire);
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
        let key = (ordered || *kind == TopicKind::Ordered).then_some(&*msg.publisher);
        let value = record::uplink(&msg, &self.node);
        let headers = OwnedHeaders::new_with_capacity(2)
            .insert(Header {
                key: "mqttTopic",
                value: Some(msg.topic.as_str()),
            })
            .insert(Header {
                key: "clientId",
                value: Some(&*msg.publisher),
            });
        match durability {
            Durability::BestEffort => {
                self.out
                    .send_best_effort(topic, key, &value, headers, msg.ts_ms);
                Box::pin(async { Ok(()) })
            }
            Durability::Acknowledged(on_full) => {
                let (tx, rx) = oneshot::channel();
                let topic = topic.clone();
                let key = key.map(str::to_owned);
                let out = self.out.clone();
                Box::pin(async move {
                    if let Err(e) = out.shared.reserve(on_full).await {
                        out.shared
                            .metrics
                            .records
                            .with_label_values(&[&topic, "refused"])
                            .inc();
                        return Err(e);
                    }
                    out.send(&topic, key.as_deref(), &value, headers, msg.ts_ms, Some(tx))?;
                    match rx.await {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(e)) => Err(StorageError::Unavailable(e)),
                        Err(_) => Err(StorageError::Unavailable("producer closed".into())),
                    }
                })
            }
        }
    }

    fn device_event(&self, event: DeviceEvent) {
        let topic = match event.kind {
            crate::storage::EventKind::Connect => &self.connect_topic,
            _ => &self.disconnect_topic,
        };
        let Some(topic) = topic else {
            return;
        };
        let value = record::event(&event);
        self.out.send_best_effort(
            topic,
            Some(&event.client_id),
            &value,
            OwnedHeaders::new(),
            event.ts_ms,
        );
    }
}

fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
