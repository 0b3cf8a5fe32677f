//! `alarms`: alarm thresholds (L4).

use serde::{Deserialize, Serialize};

use super::Problems;

/// Alarm rules (L4): one per metric.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AlarmsConfig {
    pub connections: AlarmRule,
    pub subscriptions: AlarmRule,
    pub topics: AlarmRule,
    pub tps: AlarmRule,
    /// Persistent sessions left with fewer copies than
    /// `cluster.replication_factor` asks, for longer than `hold_secs` (a
    /// node was lost and the survivors could not copy them again, or the
    /// cluster has fewer nodes than the factor). No capacity: `value`, 1
    /// by default.
    pub under_replicated_sessions: AlarmRule,
    /// A firing alarm resolves only once the value is below its threshold
    /// by this many percent of the threshold, so that a value hovering at
    /// the threshold does not flap.
    pub hysteresis_percent: u32,
    /// Seconds a value must stay beyond the threshold (or back below the
    /// resolve level) before the alarm fires (or resolves).
    pub hold_secs: u64,
    /// TPS is averaged over this many seconds before it is compared.
    pub tps_window_secs: u64,
}

impl Default for AlarmsConfig {
    fn default() -> Self {
        Self {
            connections: AlarmRule::default(),
            subscriptions: AlarmRule::default(),
            topics: AlarmRule::default(),
            tps: AlarmRule::default(),
            under_replicated_sessions: AlarmRule {
                value: Some(1),
                ..AlarmRule::default()
            },
            hysteresis_percent: 10,
            hold_secs: 30,
            tps_window_secs: 10,
        }
    }
}

/// One alarm rule.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AlarmRule {
    /// The alarm switch.
    pub enabled: bool,
    /// Threshold in percent of the declared capacity.
    pub percent: u32,
    /// Absolute threshold; when set it replaces `percent`, and it is the
    /// only way to alarm on a metric without a declared capacity.
    pub value: Option<u64>,
}

impl Default for AlarmRule {
    fn default() -> Self {
        Self {
            enabled: true,
            percent: 70,
            value: None,
        }
    }
}

impl AlarmsConfig {
    pub(super) fn check(&self, p: &mut Problems) {
        p.unless(
            (1..=300).contains(&self.tps_window_secs) && self.hysteresis_percent < 100,
            "alarms.tps_window_secs must be between 1 and 300 and alarms.hysteresis_percent below 100",
        );
    }
}
