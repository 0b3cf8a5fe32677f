//! `capacity`: the declared capacity of the instance (L1, L3).

use serde::{Deserialize, Serialize};

/// Declared capacity of the whole instance (L1); 0 means no limit. Counts are
/// instance-wide: nodes tell each other their usage every second, and each
/// node admits a new connection or subscription only while the instance's
/// total is below the limit.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CapacityConfig {
    /// Client connections at the same time.
    pub connections: u64,
    /// Weighted messages per second, sent plus received (L2: QoS 0 counts 1,
    /// QoS 1 counts 2, QoS 2 counts 10). Each node allows an equal share.
    pub tps: u64,
    /// Subscriptions (one client's filter is one subscription).
    pub subscriptions: u64,
    /// Distinct subscribed topic filters; only the topics alarm uses it.
    pub topics: u64,
    /// `enforce`: refuse and throttle beyond the limits; `alarm_only`: let
    /// everything through, count what would have been refused, and alarm.
    pub mode: CapacityMode,
}

/// See `CapacityConfig::mode`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CapacityMode {
    #[default]
    Enforce,
    AlarmOnly,
}
