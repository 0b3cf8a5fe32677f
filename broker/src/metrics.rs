//! Prometheus metrics of one broker node.
//!
//! The registry is owned by the broker (no global default registry), so tests
//! can run several brokers in one process.

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

use crate::message::QoS;

/// Errors while building the registry.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics registry: {0}")]
    Prometheus(#[from] prometheus::Error),
}

pub type Result<T> = std::result::Result<T, MetricsError>;

/// The message and payload-byte counters of one QoS and direction,
/// resolved once: looking a label up hashes it, and these count every
/// message.
#[derive(Debug, Clone)]
struct Flow {
    messages: IntCounter,
    bytes: IntCounter,
}

/// Every metric the broker exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    pub connections: IntGauge,
    pub connections_total: IntCounter,
    pub sessions: IntGauge,
    pub subscriptions: IntGauge,
    pub retained: IntGauge,
    /// Received and sent, by QoS (index `QoS as usize`).
    received: [Flow; 3],
    sent: [Flow; 3],
    pub messages_dropped: IntCounterVec,
    pub offline_queued: IntCounter,
    pub offline_dropped: IntCounter,
    pub rejected: IntCounterVec,
    pub takeovers: IntCounter,
    pub cluster_nodes: IntGauge,
    pub sessions_moved: IntCounter,
    /// Replicated sessions (D2): the copies kept for other nodes, sessions
    /// taken over from them, sessions with fewer replicas than the factor,
    /// acknowledgements given without a replica's.
    pub replica_sessions: IntGauge,
    pub replica_messages: IntGauge,
    pub sessions_failed_over: IntCounter,
    /// The copies of clean sessions' connections kept here (each holds
    /// the connection's will), and the wills of a lost node's clients
    /// published here from them.
    pub replica_wills: IntGauge,
    pub wills_failed_over: IntCounter,
    /// Sessions handed to this node without their messages, which the
    /// copy it kept had.
    pub sessions_moved_in_from_copy: IntCounter,
    /// Copies of a session older than its state here (or than a state that
    /// ended), dropped on arrival or when the tombstone came.
    pub session_copies_dropped: IntCounter,
    pub sessions_under_replicated: IntGauge,
    pub replication_released: IntCounter,
    /// Replica changes queued for the replicas and not yet confirmed.
    pub replication_lag: IntGauge,
    /// From the last word of a lost owner to its sessions served here.
    pub failover_seconds: Histogram,
    /// Weighted messages per second (L2), averaged over the TPS window.
    pub tps: GaugeVec,
    pub messages_weighted: IntCounterVec,
    pub connections_peak: IntGauge,
    pub topics: IntGauge,
    pub topic_messages: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Result<Self> {
        let registry = Registry::new_custom(Some("ringmq".into()), None)?;
        let gauge = |name: &str, help: &str| -> Result<IntGauge> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let counter = |name: &str, help: &str| -> Result<IntCounter> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let vec = |name: &str, help: &str, label: &str| -> Result<IntCounterVec> {
            let c = IntCounterVec::new(Opts::new(name, help), &[label])?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let flows = |messages: &IntCounterVec, bytes: &IntCounterVec| {
            [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce].map(|q| Flow {
                messages: messages.with_label_values(&[q.label()]),
                bytes: bytes.with_label_values(&[q.label()]),
            })
        };
        let m = Self {
            connections: gauge("connections", "Open MQTT connections")?,
            connections_total: counter("connections_total", "MQTT connections accepted")?,
            sessions: gauge("sessions", "Sessions held, online or offline")?,
            subscriptions: gauge("subscriptions", "Subscriptions in the routing table")?,
            retained: gauge("retained_messages", "Retained messages held")?,
            received: flows(
                &vec(
                    "messages_received_total",
                    "PUBLISH received from clients",
                    "qos",
                )?,
                &vec(
                    "bytes_received_total",
                    "Payload bytes received from clients",
                    "qos",
                )?,
            ),
            sent: flows(
                &vec("messages_sent_total", "PUBLISH sent to clients", "qos")?,
                &vec("bytes_sent_total", "Payload bytes sent to clients", "qos")?,
            ),
            messages_dropped: vec(
                "messages_dropped_total",
                "Messages not delivered to a session, by reason",
                "reason",
            )?,
            offline_queued: counter("offline_messages_queued_total", "Offline messages stored")?,
            offline_dropped: counter(
                "offline_messages_dropped_total",
                "Offline messages dropped (queue full, oldest first, or expired)",
            )?,
            rejected: vec(
                "packets_rejected_total",
                "Packets or connections refused, by reason",
                "reason",
            )?,
            takeovers: counter(
                "clientid_takeovers_total",
                "Connections closed because the Client ID connected again",
            )?,
            cluster_nodes: gauge(
                "cluster_nodes",
                "Nodes on this node's ring, itself included",
            )?,
            sessions_moved: counter(
                "sessions_moved_total",
                "Persistent sessions handed to their new owner after a ring change",
            )?,
            replica_sessions: gauge(
                "replica_sessions",
                "Copies of other nodes' persistent sessions this node keeps",
            )?,
            replica_messages: gauge(
                "replica_messages",
                "Queued messages in the copies this node keeps for other nodes",
            )?,
            sessions_failed_over: counter(
                "sessions_failed_over_total",
                "Sessions of a node lost without warning, served here from their replica",
            )?,
            replica_wills: gauge(
                "replica_wills",
                "Wills of other nodes' clean-session clients this node keeps, for the loss of their node",
            )?,
            wills_failed_over: counter(
                "wills_failed_over_total",
                "Wills of clean-session clients of a node lost without warning, published here from their copy",
            )?,
            sessions_moved_in_from_copy: counter(
                "sessions_moved_in_from_copy_total",
                "Sessions handed to this node without their queued messages, taken from the replica it kept (a planned leave of their owner)",
            )?,
            session_copies_dropped: counter(
                "session_copies_dropped_total",
                "Copies of a session older than its state here or than a state that ended (a returning node's store, a late replica copy), dropped",
            )?,
            sessions_under_replicated: gauge(
                "sessions_under_replicated",
                "Persistent sessions owned here with fewer replicas than cluster.replication_factor asks",
            )?,
            replication_released: counter(
                "replication_released_total",
                "Changes acknowledged to a client without a replica's confirmation: the replica left the ring first",
            )?,
            replication_lag: gauge(
                "replication_lag_changes",
                "Changes of the sessions owned here sent to their replicas and not yet confirmed by them",
            )?,
            failover_seconds: {
                let h = Histogram::with_opts(
                    HistogramOpts::new(
                        "failover_seconds",
                        "From the last heartbeat or frame of an owner lost without warning to its sessions served here from their replicas, once per lost owner",
                    )
                    .buckets(vec![0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0]),
                )?;
                registry.register(Box::new(h.clone()))?;
                h
            },
            tps: {
                let g = GaugeVec::new(
                    Opts::new(
                        "tps",
                        "Weighted messages per second (QoS 0 x1, QoS 1 x2, QoS 2 x10), received (pub) or sent (sub), averaged over alarms.tps_window_secs",
                    ),
                    &["direction"],
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            messages_weighted: vec(
                "messages_weighted_total",
                "Weighted messages (QoS 0 x1, QoS 1 x2, QoS 2 x10) received (pub) or sent (sub)",
                "direction",
            )?,
            connections_peak: gauge(
                "connections_peak",
                "Most connections this node held since it started",
            )?,
            topics: gauge(
                "topics",
                "Distinct subscribed topic filters this node routes (its own and the other nodes')",
            )?,
            topic_messages: {
                let c = IntCounterVec::new(
                    Opts::new(
                        "topic_messages_total",
                        "Messages by parent topic (the first 100 seen, declared Kafka parent topics always; the rest as _other), direction (produced, consumed) and QoS",
                    ),
                    &["parent_topic", "direction", "qos"],
                )?;
                registry.register(Box::new(c.clone()))?;
                c
            },
            registry,
        };
        Ok(m)
    }

    pub fn received(&self, qos: QoS, bytes: usize) {
        let f = &self.received[qos as usize];
        f.messages.inc();
        f.bytes.inc_by(bytes as u64);
    }

    /// `n` messages of one QoS with `bytes` of payload sent.
    pub fn sent_many(&self, qos: QoS, n: u64, bytes: u64) {
        let f = &self.sent[qos as usize];
        f.messages.inc_by(n);
        f.bytes.inc_by(bytes);
    }

    pub fn reject(&self, reason: &str) {
        self.rejected.with_label_values(&[reason]).inc();
    }

    pub fn drop_message(&self, reason: &str) {
        self.messages_dropped.with_label_values(&[reason]).inc();
    }

    /// The registry, for modules that add their own metrics.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .is_err()
        {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}
