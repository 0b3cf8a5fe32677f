//! Metrics of the Kafka flows, registered in the node's registry.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

#[derive(Debug, Clone)]
pub struct KafkaMetrics {
    /// Records by topic and result: `ok`, `failed` (Kafka refused it or the
    /// delivery timeout passed), `dropped` (best effort, buffer full),
    /// `refused` (MQTT 5 publish refused, buffer full).
    pub records: IntCounterVec,
    /// Time from handing a record to librdkafka to Kafka's acknowledgement.
    pub produce_seconds: Histogram,
    /// Records waiting for Kafka, and the most that may wait.
    pub buffer: IntGauge,
    pub buffer_limit: IntGauge,
    /// Downlink records by result: `delivered`, `no_subscriber`, `invalid`.
    pub downlink: IntCounterVec,
    /// Records of the downlink topic not yet read by this node.
    pub consumer_lag: IntGauge,
    /// Errors librdkafka reported (brokers down, authentication, …).
    pub client_errors: IntCounter,
}

impl KafkaMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let records = IntCounterVec::new(
            Opts::new(
                "kafka_records_total",
                "Records written to Kafka, by topic and result",
            ),
            &["topic", "result"],
        )?;
        let produce_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "kafka_produce_seconds",
                "Time until Kafka acknowledged a record",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
            ]),
        )?;
        let buffer = IntGauge::new("kafka_buffer_records", "Records waiting for Kafka")?;
        let buffer_limit = IntGauge::new(
            "kafka_buffer_limit_records",
            "Records that may wait for Kafka (kafka.buffer_records)",
        )?;
        let downlink = IntCounterVec::new(
            Opts::new(
                "kafka_downlink_records_total",
                "Records read from the downlink topic, by result",
            ),
            &["result"],
        )?;
        let consumer_lag = IntGauge::new(
            "kafka_downlink_consumer_lag",
            "Downlink records written to Kafka and not yet read by this node",
        )?;
        let client_errors = IntCounter::new(
            "kafka_client_errors_total",
            "Errors reported by the Kafka client library",
        )?;
        registry.register(Box::new(records.clone()))?;
        registry.register(Box::new(produce_seconds.clone()))?;
        registry.register(Box::new(buffer.clone()))?;
        registry.register(Box::new(buffer_limit.clone()))?;
        registry.register(Box::new(downlink.clone()))?;
        registry.register(Box::new(consumer_lag.clone()))?;
        registry.register(Box::new(client_errors.clone()))?;
        Ok(Self {
            records,
            produce_seconds,
            buffer,
            buffer_limit,
            downlink,
            consumer_lag,
            client_errors,
        })
    }
}
