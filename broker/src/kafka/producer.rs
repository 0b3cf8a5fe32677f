//! The producer side: librdkafka's producer behind one bounded buffer.
//!
//! Every record handed to librdkafka holds a slot of `kafka.buffer_records`
//! until its delivery report arrives. A record that needs a slot while none
//! is free either fails at once (best effort: dropped; MQTT 5: refused) or
//! joins the `waiting` queue (MQTT 3.1.1). Waiting records are handed to
//! librdkafka strictly in the order they were submitted, and no new record
//! skips the queue while it is not empty: a client's keyed records keep their
//! send order through an outage.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use rdkafka::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext, ThreadedProducer};
use tokio::sync::{Notify, oneshot};

use super::metrics::KafkaMetrics;
use crate::storage::StorageError;

/// The outcome of a record, sent to whoever waits for it.
pub type Outcome = std::result::Result<(), String>;

/// One record to write.
pub struct Record {
    pub topic: Arc<str>,
    pub key: Option<Arc<str>>,
    pub value: Vec<u8>,
    pub headers: OwnedHeaders,
    pub ts_ms: u64,
    pub done: Option<oneshot::Sender<Outcome>>,
}

/// What to do with a record when no buffer slot is free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    Drop,
    Refuse,
    Queue,
}

/// What `Out::submit` did with a record.
#[derive(Debug, PartialEq, Eq)]
pub enum Submitted {
    /// In librdkafka's hands.
    Sent,
    /// Waiting for a slot, under this id.
    Queued(u64),
    Dropped,
    Refused,
}

/// The producer, its buffer accounting and the waiting queue.
pub struct Out {
    producer: ThreadedProducer<Context>,
    pub(super) shared: Arc<Shared>,
    waiting: Mutex<VecDeque<(u64, Record)>>,
    /// `waiting.len()`, readable without the lock on the fast path.
    waiting_len: AtomicUsize,
    next_id: AtomicU64,
}

impl std::fmt::Debug for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Out")
            .field("shared", &self.shared)
            .field("waiting", &self.waiting_len)
            .finish()
    }
}

/// What the delivery callback shares with the publish path.
#[derive(Debug)]
pub struct Shared {
    /// Records in librdkafka's hands, waiting for Kafka.
    in_use: AtomicUsize,
    limit: usize,
    /// Signalled when a slot frees, for the waiting publishers to drain the queue.
    pub room: Notify,
    pub metrics: KafkaMetrics,
}

impl Shared {
    pub fn new(limit: usize, metrics: KafkaMetrics) -> Self {
        Self {
            in_use: AtomicUsize::new(0),
            limit,
            room: Notify::new(),
            metrics,
        }
    }

    fn try_slot(&self) -> bool {
        let taken = self
            .in_use
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.limit).then_some(n + 1)
            })
            .is_ok();
        self.show_fill();
        taken
    }

    fn release(&self) {
        self.in_use.fetch_sub(1, Ordering::SeqCst);
        self.show_fill();
        self.room.notify_waiters();
    }

    /// Records waiting for Kafka.
    pub fn in_use(&self) -> usize {
        self.in_use.load(Ordering::SeqCst)
    }

    fn show_fill(&self) {
        self.metrics
            .buffer
            .set(i64::try_from(self.in_use()).unwrap_or(i64::MAX));
    }
}

/// Carried by each record through librdkafka to the delivery callback.
pub struct Pending {
    topic: Arc<str>,
    started: Instant,
    done: Option<oneshot::Sender<Outcome>>,
}

/// librdkafka callbacks: delivery reports, errors and logs.
#[derive(Debug)]
pub struct Context {
    pub shared: Arc<Shared>,
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

pub fn log_librdkafka(level: RDKafkaLogLevel, fac: &str, message: &str) {
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

impl Out {
    pub fn new(producer: ThreadedProducer<Context>, shared: Arc<Shared>) -> Self {
        Self {
            producer,
            shared,
            waiting: Mutex::new(VecDeque::new()),
            waiting_len: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
        }
    }

    pub fn producer(&self) -> &ThreadedProducer<Context> {
        &self.producer
    }

    /// Hands a record to librdkafka, or decides what happens to it when the
    /// buffer is full. Records of one caller thread are submitted in call
    /// order, so one connection's records keep their order.
    pub fn submit(&self, record: Record, when_full: WhenFull) -> Submitted {
        if self.waiting_len.load(Ordering::SeqCst) == 0 && self.shared.try_slot() {
            self.produce(record);
            return Submitted::Sent;
        }
        match when_full {
            WhenFull::Drop => {
                self.count(&record.topic, "dropped");
                Submitted::Dropped
            }
            WhenFull::Refuse => {
                self.count(&record.topic, "refused");
                Submitted::Refused
            }
            WhenFull::Queue => {
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                let mut q = self.lock();
                q.push_back((id, record));
                self.waiting_len.fetch_add(1, Ordering::SeqCst);
                // A slot freed since the check above must not be missed.
                self.drain_locked(&mut q);
                Submitted::Queued(id)
            }
        }
    }

    /// Hands waiting records to librdkafka, oldest first, while slots are free.
    pub fn drain(&self) {
        if self.waiting_len.load(Ordering::SeqCst) > 0 {
            let mut q = self.lock();
            self.drain_locked(&mut q);
        }
    }

    /// Takes a record out of the queue if it is still waiting (its publisher
    /// is gone; the message was never acknowledged).
    pub fn withdraw(&self, id: u64) {
        if self.waiting_len.load(Ordering::SeqCst) == 0 {
            return;
        }
        let mut q = self.lock();
        if let Some(pos) = q.iter().position(|(i, _)| *i == id) {
            q.remove(pos);
            self.waiting_len.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<(u64, Record)>> {
        // A panic while holding the lock leaves a consistent queue.
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn drain_locked(&self, q: &mut VecDeque<(u64, Record)>) {
        while !q.is_empty() && self.shared.try_slot() {
            if let Some((_, record)) = q.pop_front() {
                self.produce(record);
            }
            self.waiting_len.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn count(&self, topic: &str, result: &str) {
        self.shared
            .metrics
            .records
            .with_label_values(&[topic, result])
            .inc();
    }

    /// Hands one record, which holds a slot, to librdkafka.
    fn produce(&self, r: Record) {
        let pending = Box::new(Pending {
            topic: r.topic.clone(),
            started: Instant::now(),
            done: r.done,
        });
        let mut record = BaseRecord::with_opaque_to(&r.topic, pending)
            .payload(&r.value)
            .headers(r.headers)
            .timestamp(i64::try_from(r.ts_ms).unwrap_or(i64::MAX));
        if let Some(k) = &r.key {
            record = record.key(&**k);
        }
        if let Err((e, record)) = self.producer.send(record) {
            self.count(&r.topic, "failed");
            tracing::warn!(topic = %r.topic, error = %e, "kafka record not queued");
            let error = match e {
                KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => {
                    StorageError::BufferFull
                }
                other => StorageError::Unavailable(other.to_string()),
            };
            if let Some(done) = record.delivery_opaque.done {
                let _ = done.send(Err(error.to_string()));
            }
            self.shared.release();
        }
    }
}
