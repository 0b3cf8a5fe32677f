//! The downlink consumer (K4): reads the downlink topic (`mq2mqtt`) on its own
//! thread and routes every record to the MQTT sessions of this node.
//!
//! Each node consumes with its own consumer group, so every node sees every
//! record and delivers it to the sessions it holds; a subscriber is held by
//! exactly one node, so it gets the record once. A record's offset is stored
//! after the record is in the sessions' queues and, for persistent sessions,
//! in the node's store (the consumer goes on meanwhile, at most `WINDOW`
//! records ahead), and committed every second: a node that restarts resumes
//! after the last committed record (a record read in the last second before
//! a crash may be delivered again). A record the store refused (disk full)
//! is read again from Kafka once the store writes again, so a crash never
//! loses a record whose offset was committed.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ntex::util::{ByteString, Bytes};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::{BorrowedMessage, Headers, Message as _};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::metrics::KafkaMetrics;
use super::{Kafka, Result, record};
use crate::broker::Broker;
use crate::durable::Pending;

/// The running consumer thread.
#[derive(Debug)]
pub struct Downlink {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

struct ConsumerCtx {
    metrics: KafkaMetrics,
}

impl ClientContext for ConsumerCtx {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        super::producer::log_librdkafka(level, fac, message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        self.metrics.client_errors.inc();
        tracing::warn!(%error, reason, "kafka consumer error");
    }
}

impl ConsumerContext for ConsumerCtx {
    fn post_rebalance(&self, _c: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                tracing::info!(partitions = tpl.count(), "downlink consumer assigned")
            }
            Rebalance::Revoke(tpl) => {
                tracing::info!(partitions = tpl.count(), "downlink consumer revoked")
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "downlink consumer rebalance failed"),
        }
    }
}

/// How often the consumer lag gauge is refreshed.
const LAG_EVERY: Duration = Duration::from_secs(5);

/// Records delivered and not yet on disk, at most: past it the consumer
/// waits for the store.
const WINDOW: usize = 4096;

/// Partitions to read again from an offset (a record there the store
/// refused), once the store writes again.
type Rewinds = HashMap<(String, i32), i64>;

/// A delivered record whose offset waits for the store.
struct Unsettled {
    topic: String,
    partition: i32,
    offset: i64,
    pending: Pending,
}

impl Downlink {
    /// Starts the consumer. It subscribes once `topics_ready` is set (the
    /// downlink topic exists) and runs until `stop` is called.
    pub fn start(
        kafka: &Kafka,
        broker: Arc<Broker>,
        topics_ready: Arc<AtomicBool>,
    ) -> Result<Self> {
        let metrics = kafka.out.shared.metrics.clone();
        let consumer: BaseConsumer<ConsumerCtx> =
            kafka.consumer_config()?.create_with_context(ConsumerCtx {
                metrics: metrics.clone(),
            })?;
        let topic = kafka.config.downlink_topic.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("ringmq-downlink".into())
            .spawn(move || {
                while !topics_ready.load(Ordering::Acquire) {
                    if stopping.load(Ordering::Acquire) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                if let Err(e) = consumer.subscribe(&[&topic]) {
                    tracing::error!(%topic, error = %e, "downlink consumer not subscribed");
                    return;
                }
                run(&consumer, &broker, &metrics, &stopping);
                if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                    tracing::debug!(error = %e, "downlink offsets not committed at stop");
                }
            })
            .map_err(|e| {
                super::KafkaSetupError::Client(rdkafka::error::KafkaError::Subscription(
                    e.to_string(),
                ))
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the consumer and commits what it delivered.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(
    consumer: &BaseConsumer<ConsumerCtx>,
    broker: &Broker,
    metrics: &KafkaMetrics,
    stop: &AtomicBool,
) {
    let mut lag_at = Instant::now();
    let mut unsettled = VecDeque::new();
    let mut rewinds = Rewinds::new();
    while !stop.load(Ordering::Acquire) {
        // Short polls while offsets wait for the store, so they are stored soon.
        let wait = if unsettled.is_empty() { 200 } else { 2 };
        match consumer.poll(Duration::from_millis(wait)) {
            None => {}
            Some(Err(e)) => {
                metrics.client_errors.inc();
                tracing::warn!(error = %e, "downlink consumer");
            }
            // Read again from the refused record once the store writes;
            // what comes meanwhile comes again then.
            Some(Ok(m))
                if !rewinds.is_empty()
                    && rewinds.contains_key(&(m.topic().to_owned(), m.partition())) => {}
            Some(Ok(m)) => {
                let pending = deliver(broker, &m, metrics);
                unsettled.push_back(Unsettled {
                    topic: m.topic().to_owned(),
                    partition: m.partition(),
                    offset: m.offset(),
                    pending,
                });
            }
        }
        settle(consumer, &mut unsettled, &mut rewinds, metrics);
        while unsettled.len() >= WINDOW && !stop.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(1));
            settle(consumer, &mut unsettled, &mut rewinds, metrics);
        }
        // The store tries the disk again every second by itself.
        if !rewinds.is_empty() && broker.store_writes() {
            rewind(consumer, &mut rewinds);
        }
        if lag_at.elapsed() >= LAG_EVERY {
            lag_at = Instant::now();
            metrics.consumer_lag.set(lag(consumer));
        }
    }
    // Stopping: what is on its way to the disk still gets its offset stored
    // (the store writes until after the consumer stops).
    let deadline = Instant::now() + Duration::from_secs(2);
    while !unsettled.is_empty() && Instant::now() < deadline {
        settle(consumer, &mut unsettled, &mut rewinds, metrics);
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Sends each partition with a refused record back to it.
fn rewind(consumer: &BaseConsumer<ConsumerCtx>, rewinds: &mut Rewinds) {
    for ((topic, partition), offset) in rewinds.drain() {
        if let Err(e) = consumer.seek(
            &topic,
            partition,
            Offset::Offset(offset),
            Duration::from_secs(5),
        ) {
            tracing::warn!(partition, error = %e, "downlink consumer could not go back");
        }
    }
}

/// Stores the offsets of the oldest records the store is through with, in
/// order. A record the store refused is read again once the store writes
/// again (`rewinds`): its partition goes back to it (the records after it
/// come again too, at least once); the other partitions go on meanwhile.
fn settle(
    consumer: &BaseConsumer<ConsumerCtx>,
    unsettled: &mut VecDeque<Unsettled>,
    rewinds: &mut Rewinds,
    metrics: &KafkaMetrics,
) {
    while let Some(front) = unsettled.front() {
        let Some(result) = front.pending.settled() else {
            return;
        };
        let Some(u) = unsettled.pop_front() else {
            return;
        };
        match result {
            Ok(()) => {
                if let Err(e) = consumer.store_offset(&u.topic, u.partition, u.offset) {
                    tracing::warn!(error = %e, "downlink offset not stored");
                }
            }
            Err(e) => {
                metrics
                    .downlink
                    .with_label_values(&["store_unavailable"])
                    .inc();
                tracing::warn!(partition = u.partition, offset = u.offset, error = %e, "downlink record not on disk: read again once the store writes");
                unsettled.retain(|o| o.topic != u.topic || o.partition != u.partition);
                // Committed at once, not at the next auto-commit: a crash
                // meanwhile resumes at this record (a partition with no
                // commit yet would otherwise resume at its end). Everything
                // before it in the partition is on disk (settled in order).
                let mut at = TopicPartitionList::new();
                let committed = at
                    .add_partition_offset(&u.topic, u.partition, Offset::Offset(u.offset))
                    .and_then(|()| consumer.store_offsets(&at))
                    .and_then(|()| consumer.commit(&at, CommitMode::Sync));
                if let Err(e) = committed {
                    tracing::warn!(partition = u.partition, error = %e, "downlink offset not committed");
                }
                rewinds.insert((u.topic, u.partition), u.offset);
            }
        }
    }
}

/// Routes one record; a record that cannot be delivered is counted, logged
/// and skipped, so that one bad record never stops the downlink. Returns
/// what the store has still to write of it.
fn deliver(broker: &Broker, m: &BorrowedMessage<'_>, metrics: &KafkaMetrics) -> Pending {
    let headers = m
        .headers()
        .map(|h| h.iter().map(|h| (h.key, h.value)).collect::<Vec<_>>())
        .unwrap_or_default();
    let down = match record::downlink(headers) {
        Ok(d) => d,
        Err(e) => {
            metrics.downlink.with_label_values(&["invalid"]).inc();
            tracing::warn!(partition = m.partition(), offset = m.offset(), error = %e, "downlink record skipped");
            return Pending::default();
        }
    };
    if down.topic.starts_with('$') || broker.check_topic(&down.topic).is_err() {
        metrics.downlink.with_label_values(&["invalid"]).inc();
        tracing::warn!(partition = m.partition(), offset = m.offset(), topic = %down.topic, "downlink record skipped: invalid mqttTopic");
        return Pending::default();
    }
    let payload = Bytes::copy_from_slice(m.payload().unwrap_or_default());
    let msg = Arc::new(broker.message(
        ByteString::from(down.topic),
        payload,
        down.qos,
        false,
        Arc::from(""),
    ));
    let (reached, over, pending) = broker.publish_downlink(&msg, down.clean_session);
    let result = if reached > 0 {
        "delivered"
    } else {
        "no_subscriber"
    };
    metrics.downlink.with_label_values(&[result]).inc();
    // Backpressure: a subscriber's full queue holds the consumer, as it holds
    // an MQTT publisher, up to the same limit.
    let deadline =
        Instant::now() + Duration::from_millis(broker.config().limits.queue_full_wait_ms);
    for session in over {
        while !broker.has_room(&session) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    pending
}

/// Records written to the assigned partitions and not yet read.
fn lag(consumer: &BaseConsumer<ConsumerCtx>) -> i64 {
    let Ok(positions) = consumer.position() else {
        return 0;
    };
    positions
        .elements()
        .iter()
        .filter_map(|e| {
            let Offset::Offset(pos) = e.offset() else {
                return None;
            };
            let (_, high) = consumer
                .fetch_watermarks(e.topic(), e.partition(), Duration::from_millis(500))
                .ok()?;
            Some((high - pos).max(0))
        })
        .sum()
}
