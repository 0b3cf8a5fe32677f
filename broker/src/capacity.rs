//! Capacity enforcement (L1, L3).
//!
//! Connections and subscriptions share one instance-wide budget: every node
//! tells the others its usage once a second (`Frame::Load`), and a node
//! admits a new connection or subscription while its own count plus the
//! others' last reported counts stay below the limit. Nodes admitting at the
//! same moment can overshoot by what they admit within one second; the
//! alarm still sees it.
//!
//! TPS is split: each node lets through an equal share of the declared TPS
//! (sessions are spread over the nodes by the ring, so load is too). A token
//! bucket, refilled ten times a second, is charged with the weight of every
//! message received and sent; while it is empty, publishers wait before
//! their next message is read.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use serde::{Deserialize, Serialize};

use crate::config::{CapacityConfig, CapacityMode};

/// Errors while registering the metrics.
#[derive(Debug, thiserror::Error)]
pub enum CapacityError {
    #[error("capacity metrics: {0}")]
    Prometheus(#[from] prometheus::Error),
}

pub type Result<T> = std::result::Result<T, CapacityError>;

/// What a node reports to the others once a second.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Load {
    pub connections: u64,
    pub subscriptions: u64,
    /// Weighted messages per second received (pub) and sent (sub).
    pub pub_tps: u64,
    pub sub_tps: u64,
    /// Persistent sessions the node owns with too few copies (D2).
    pub under_replicated: u64,
}

/// A limited resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    Connections,
    Subscriptions,
    Tps,
}

impl Resource {
    fn label(self) -> &'static str {
        match self {
            Resource::Connections => "connections",
            Resource::Subscriptions => "subscriptions",
            Resource::Tps => "tps",
        }
    }
}

/// How often the TPS bucket is refilled.
pub const REFILL: Duration = Duration::from_millis(100);

/// The capacity state of one node.
#[derive(Debug)]
pub struct Capacity {
    config: CapacityConfig,
    peers: Mutex<HashMap<Arc<str>, Load>>,
    /// Weighted messages this node may still move (may go below zero).
    bucket: AtomicI64,
    exceeded: IntCounterVec,
}

impl Capacity {
    pub fn new(config: &CapacityConfig, registry: &Registry) -> Result<Self> {
        let exceeded = IntCounterVec::new(
            Opts::new(
                "capacity_exceeded_total",
                "Connections or subscriptions beyond the declared capacity (refused, or let through in alarm_only mode) and publishes throttled",
            ),
            &["resource", "outcome"],
        )?;
        registry.register(Box::new(exceeded.clone()))?;
        let limits = IntGaugeVec::new(
            Opts::new(
                "capacity_limit",
                "Declared capacity of the whole instance (0: none)",
            ),
            &["resource"],
        )?;
        registry.register(Box::new(limits.clone()))?;
        for (r, v) in [
            ("connections", config.connections),
            ("subscriptions", config.subscriptions),
            ("tps", config.tps),
            ("topics", config.topics),
        ] {
            limits
                .with_label_values(&[r])
                .set(i64::try_from(v).unwrap_or(i64::MAX));
        }
        Ok(Self {
            config: config.clone(),
            peers: Mutex::new(HashMap::new()),
            bucket: AtomicI64::new(0),
            exceeded,
        })
    }

    pub fn config(&self) -> &CapacityConfig {
        &self.config
    }

    /// A peer's load report.
    pub fn peer_load(&self, node: &Arc<str>, load: Load) {
        if let Ok(mut p) = self.peers.lock() {
            p.insert(node.clone(), load);
        }
    }

    /// Forgets peers that are no longer members.
    pub fn retain_peers(&self, members: &[Arc<str>]) {
        if let Ok(mut p) = self.peers.lock() {
            p.retain(|n, _| members.contains(n));
        }
    }

    /// The last loads the peers reported.
    pub fn peer_loads(&self) -> Vec<(Arc<str>, Load)> {
        self.peers
            .lock()
            .map(|p| p.iter().map(|(n, l)| (n.clone(), *l)).collect())
            .unwrap_or_default()
    }

    fn others(&self, f: impl Fn(&Load) -> u64) -> u64 {
        self.peers
            .lock()
            .map(|p| p.values().map(f).sum())
            .unwrap_or(0)
    }

    fn admit(&self, resource: Resource, limit: u64, total: u64) -> bool {
        if limit == 0 || total < limit {
            return true;
        }
        let outcome = match self.config.mode {
            CapacityMode::Enforce => "refused",
            CapacityMode::AlarmOnly => "allowed",
        };
        self.exceeded
            .with_label_values(&[resource.label(), outcome])
            .inc();
        self.config.mode == CapacityMode::AlarmOnly
    }

    /// Whether one more connection fits; `local` is this node's count.
    pub fn admit_connection(&self, local: u64) -> bool {
        let total = local + self.others(|l| l.connections);
        self.admit(Resource::Connections, self.config.connections, total)
    }

    /// Whether one more subscription fits; `local` is this node's count.
    pub fn admit_subscription(&self, local: u64) -> bool {
        let total = local + self.others(|l| l.subscriptions);
        self.admit(Resource::Subscriptions, self.config.subscriptions, total)
    }

    fn throttles(&self) -> bool {
        self.config.tps > 0 && self.config.mode == CapacityMode::Enforce
    }

    /// Charges the TPS bucket with weighted messages moved.
    pub fn charge(&self, weighted: u64) {
        if self.throttles() {
            let w = i64::try_from(weighted).unwrap_or(i64::MAX);
            self.bucket.fetch_sub(w, Ordering::Relaxed);
        }
    }

    /// Refills the bucket for one `REFILL` period with this node's share of
    /// the TPS; at most one second's worth is saved up.
    pub fn refill(&self, nodes: usize) {
        if !self.throttles() {
            return;
        }
        let share = self.config.tps / u64::try_from(nodes.max(1)).unwrap_or(1);
        let per_second = i64::try_from(share.max(1)).unwrap_or(i64::MAX);
        let per_tick = (per_second / 10).max(1);
        let _ = self
            .bucket
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some(b.saturating_add(per_tick).min(per_second))
            });
    }

    /// Whether the node is over its TPS share: the next message must wait
    /// in [`throttle`](Self::throttle).
    pub fn over_share(&self) -> bool {
        self.throttles() && self.bucket.load(Ordering::Relaxed) < 0
    }

    /// Waits while the node is over its TPS share.
    pub async fn throttle(&self) {
        if !self.over_share() {
            return;
        }
        self.exceeded
            .with_label_values(&[Resource::Tps.label(), "throttled"])
            .inc();
        while self.bucket.load(Ordering::Relaxed) < 0 {
            ntex::time::sleep(REFILL).await;
        }
    }

    /// Counts TPS beyond the declared capacity in alarm-only mode.
    pub fn note_tps(&self, tps: u64) {
        if self.config.tps > 0 && tps > self.config.tps && !self.throttles() {
            self.exceeded
                .with_label_values(&[Resource::Tps.label(), "allowed"])
                .inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capacity(mode: CapacityMode) -> Capacity {
        let config = CapacityConfig {
            connections: 10,
            subscriptions: 5,
            tps: 100,
            topics: 0,
            mode,
        };
        Capacity::new(&config, &Registry::new()).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn the_budget_counts_the_peers() {
        let c = capacity(CapacityMode::Enforce);
        assert!(c.admit_connection(9));
        c.peer_load(
            &Arc::from("b"),
            Load {
                connections: 4,
                ..Load::default()
            },
        );
        assert!(!c.admit_connection(6));
        assert!(c.admit_connection(5));
        c.retain_peers(&[]);
        assert!(c.admit_connection(6));
        assert!(!c.admit_subscription(5));
    }

    #[test]
    fn alarm_only_lets_everything_through_and_counts_it() {
        let c = capacity(CapacityMode::AlarmOnly);
        assert!(c.admit_connection(100));
        assert_eq!(
            c.exceeded
                .with_label_values(&["connections", "allowed"])
                .get(),
            1
        );
        c.charge(1_000_000);
        assert_eq!(c.bucket.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn the_bucket_refills_to_one_second_of_the_share() {
        let c = capacity(CapacityMode::Enforce);
        for _ in 0..100 {
            c.refill(2);
        }
        assert_eq!(c.bucket.load(Ordering::Relaxed), 50);
        c.charge(60);
        assert_eq!(c.bucket.load(Ordering::Relaxed), -10);
        c.refill(2);
        assert_eq!(c.bucket.load(Ordering::Relaxed), -5);
    }
}
