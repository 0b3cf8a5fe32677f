//! The downlink consumer (K4): reads the downlink topic (`mq2mqtt`) on its own
//! thread and routes every record to the MQTT sessions of this node.
//!
//! Each node consumes with its own consumer group, so every node sees every
//! record and delivers it to the sessions it holds; a subscriber is held by
//! exactly one node, so it gets the record once. A record's offset is stored
//! after the record is in the sessions' queues and committed every second:
//! a node that restarts resumes after the last committed record (a record
//! read in the last second before a crash may be delivered again).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ntex::util::{ByteString, Bytes};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::{BorrowedMessage, Headers, Message as _};
use rdkafka::{ClientContext, Offset};

use super::metrics::KafkaMetrics;
use super::{Kafka, Result, record};
use crate::broker::Broker;

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
    while !stop.load(Ordering::Acquire) {
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Err(e)) => {
                metrics.client_errors.inc();
                tracing::warn!(error = %e, "downlink consumer");
            }
            Some(Ok(m)) => {
                deliver(broker, &m, metrics);
                if let Err(e) = consumer.store_offset_from_message(&m) {
                    tracing::warn!(error = %e, "downlink offset not stored");
                }
            }
        }
        if lag_at.elapsed() >= LAG_EVERY {
            lag_at = Instant::now();
            metrics.consumer_lag.set(lag(consumer));
        }
    }
}

/// Routes one record; a record that cannot be delivered is counted, logged
/// and skipped, so that one bad record never stops the downlink.
fn deliver(broker: &Broker, m: &BorrowedMessage<'_>, metrics: &KafkaMetrics) {
    let headers = m
        .headers()
        .map(|h| h.iter().map(|h| (h.key, h.value)).collect::<Vec<_>>())
        .unwrap_or_default();
    let down = match record::downlink(headers) {
        Ok(d) => d,
        Err(e) => {
            metrics.downlink.with_label_values(&["invalid"]).inc();
            tracing::warn!(partition = m.partition(), offset = m.offset(), error = %e, "downlink record skipped");
            return;
        }
    };
    if down.topic.starts_with('$') || broker.check_topic(&down.topic).is_err() {
        metrics.downlink.with_label_values(&["invalid"]).inc();
        tracing::warn!(partition = m.partition(), offset = m.offset(), topic = %down.topic, "downlink record skipped: invalid mqttTopic");
        return;
    }
    let payload = Bytes::copy_from_slice(m.payload().unwrap_or_default());
    let msg = Arc::new(broker.message(
        ByteString::from(down.topic),
        payload,
        down.qos,
        false,
        Arc::from(""),
    ));
    let (reached, over) = broker.publish_downlink(&msg, down.clean_session);
    let result = if reached > 0 {
        "delivered"
    } else {
        "no_subscriber"
    };
    metrics.downlink.with_label_values(&[result]).inc();
    // Backpressure: a subscriber's full queue holds the consumer, as it holds
    // an MQTT publisher, up to the same limit.
    let deadline = Instant::now() + Duration::from_millis(broker.config.limits.queue_full_wait_ms);
    for session in over {
        while !broker.has_room(&session) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
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
