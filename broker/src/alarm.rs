//! Alarms (L4): thresholds on the instance's connections, subscriptions,
//! topics and TPS, and on its persistent sessions left with fewer copies
//! than the replication factor asks (D2), with hysteresis and a hold time so that a value hovering
//! at a threshold does not flap.
//!
//! One node evaluates the instance's totals: the ring member with the
//! smallest name (every node, alone). A node that stops being the evaluator
//! closes its firing alarms; the new evaluator opens its own if the value is
//! still beyond the threshold. The API merges every node's records.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use prometheus::{IntGaugeVec, Opts, Registry};
use serde::{Deserialize, Serialize};

use crate::config::{AlarmRule, AlarmsConfig, CapacityConfig};

/// Errors while registering the metrics.
#[derive(Debug, thiserror::Error)]
pub enum AlarmError {
    #[error("alarm metrics: {0}")]
    Prometheus(#[from] prometheus::Error),
}

pub type Result<T> = std::result::Result<T, AlarmError>;

/// A metric alarms watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    Connections,
    Subscriptions,
    Topics,
    Tps,
    /// Persistent sessions with fewer copies than the replication factor
    /// asks: a value, not a share of a capacity.
    UnderReplicatedSessions,
}

impl Metric {
    pub const ALL: [Metric; 5] = [
        Metric::Connections,
        Metric::Subscriptions,
        Metric::Topics,
        Metric::Tps,
        Metric::UnderReplicatedSessions,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Metric::Connections => "connections",
            Metric::Subscriptions => "subscriptions",
            Metric::Topics => "topics",
            Metric::Tps => "tps",
            Metric::UnderReplicatedSessions => "under_replicated_sessions",
        }
    }
}

/// Where an alarm stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlarmState {
    Firing,
    /// Still beyond the threshold, acknowledged ("ignore").
    Acknowledged,
    Resolved,
}

/// Where alarm records are kept beyond memory (the journal implements it),
/// so that a restarted node still lists them. Recording never waits.
pub trait AlarmJournal: Send + Sync + std::fmt::Debug {
    fn alarm(&self, record: AlarmRecord);
}

/// One alarm, from when it fired to when it resolved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AlarmRecord {
    pub id: String,
    pub metric: Metric,
    /// The latest value while firing; the last value seen when resolved.
    pub value: u64,
    pub peak: u64,
    pub threshold: u64,
    pub state: AlarmState,
    pub acknowledged: bool,
    /// Milliseconds since the Unix epoch.
    pub start: u64,
    pub end: Option<u64>,
    pub duration_secs: u64,
    /// The node that evaluated it.
    pub node: String,
}

/// A change worth a log line (and, through the operator, a Kubernetes Event).
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Fired(AlarmRecord),
    Resolved(AlarmRecord),
}

#[derive(Debug, Default)]
struct Watch {
    beyond_since: Option<u64>,
    back_since: Option<u64>,
    /// Index in `records` of the firing alarm, counted from `first`.
    firing: Option<u64>,
}

#[derive(Debug, Default)]
struct Inner {
    watches: HashMap<Metric, Watch>,
    records: VecDeque<AlarmRecord>,
    /// Sequence number of `records[0]`.
    first: u64,
    next: u64,
}

/// Alarm records kept, at most (oldest resolved ones go first).
const KEEP: usize = 1000;

/// The alarms of one node.
#[derive(Debug)]
pub struct Alarms {
    config: AlarmsConfig,
    capacity: CapacityConfig,
    node: String,
    inner: Mutex<Inner>,
    firing: IntGaugeVec,
    journal: Option<Arc<dyn AlarmJournal>>,
}

impl Alarms {
    pub fn new(
        config: &AlarmsConfig,
        capacity: &CapacityConfig,
        node: &str,
        registry: &Registry,
        journal: Option<Arc<dyn AlarmJournal>>,
    ) -> Result<Self> {
        let firing = IntGaugeVec::new(
            Opts::new(
                "alarm_firing",
                "1 while an alarm on the instance's metric fires (on the evaluating node)",
            ),
            &["metric"],
        )?;
        registry.register(Box::new(firing.clone()))?;
        let thresholds = IntGaugeVec::new(
            Opts::new(
                "alarm_threshold",
                "Threshold of the instance's alarm on a metric (absent: switched off or no capacity)",
            ),
            &["metric"],
        )?;
        registry.register(Box::new(thresholds.clone()))?;
        let alarms = Self {
            config: config.clone(),
            capacity: capacity.clone(),
            node: node.to_owned(),
            inner: Mutex::new(Inner::default()),
            firing,
            journal,
        };
        for m in Metric::ALL {
            if let Some(t) = alarms.threshold(m) {
                thresholds
                    .with_label_values(&[m.label()])
                    .set(i64::try_from(t).unwrap_or(i64::MAX));
            }
        }
        Ok(alarms)
    }

    fn rule(&self, m: Metric) -> &AlarmRule {
        match m {
            Metric::Connections => &self.config.connections,
            Metric::Subscriptions => &self.config.subscriptions,
            Metric::Topics => &self.config.topics,
            Metric::Tps => &self.config.tps,
            Metric::UnderReplicatedSessions => &self.config.under_replicated_sessions,
        }
    }

    fn capacity_of(&self, m: Metric) -> u64 {
        match m {
            Metric::Connections => self.capacity.connections,
            Metric::Subscriptions => self.capacity.subscriptions,
            Metric::Topics => self.capacity.topics,
            Metric::Tps => self.capacity.tps,
            Metric::UnderReplicatedSessions => 0,
        }
    }

    /// The threshold of a metric's alarm; `None` when it is switched off or
    /// has neither a value nor a capacity to take a percentage of.
    pub fn threshold(&self, m: Metric) -> Option<u64> {
        let rule = self.rule(m);
        if !rule.enabled {
            return None;
        }
        if let Some(v) = rule.value {
            return Some(v);
        }
        match self.capacity_of(m) {
            0 => None,
            cap => Some((cap * u64::from(rule.percent)).div_ceil(100).max(1)),
        }
    }

    /// Puts back the records the journal held. An alarm that was firing
    /// when the node stopped ends at `now`: this node evaluates afresh and
    /// opens a new one if the value is still beyond the threshold.
    pub fn restore(&self, records: Vec<AlarmRecord>, now: u64) {
        let mut inner = self.lock();
        for mut r in records {
            if r.end.is_none() {
                r.state = AlarmState::Resolved;
                r.end = Some(now);
                r.duration_secs = now.saturating_sub(r.start) / 1000;
                self.journal(&r);
            }
            let seq = r.id.rsplit('-').next().and_then(|n| n.parse::<u64>().ok());
            if r.node == self.node
                && let Some(seq) = seq
            {
                inner.next = inner.next.max(seq + 1);
            }
            inner.records.push_back(r);
        }
        // Sequence numbers index `records` from `first`: the next one goes
        // right after the restored records.
        let n = inner.records.len() as u64;
        inner.next = inner.next.max(n);
        inner.first = inner.next - n;
        while inner.records.len() > KEEP {
            inner.records.pop_front();
            inner.first += 1;
        }
    }

    fn journal(&self, r: &AlarmRecord) {
        if let Some(j) = &self.journal {
            j.alarm(r.clone());
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Compares the instance's current values with the thresholds.
    pub fn evaluate(&self, now: u64, values: &[(Metric, u64)]) -> Vec<Change> {
        let hold = self.config.hold_secs.saturating_mul(1000);
        let mut changes = Vec::new();
        let mut inner = self.lock();
        for &(metric, value) in values {
            let Some(threshold) = self.threshold(metric) else {
                if let Some(c) = close(&mut inner, metric, now) {
                    self.journal(&c);
                    changes.push(Change::Resolved(c));
                }
                continue;
            };
            let resolve_below =
                threshold - threshold * u64::from(self.config.hysteresis_percent) / 100;
            let firing = inner.watches.get(&metric).and_then(|w| w.firing);
            match firing {
                None => {
                    let w = inner.watches.entry(metric).or_default();
                    if value < threshold {
                        w.beyond_since = None;
                        continue;
                    }
                    let since = *w.beyond_since.get_or_insert(now);
                    if now - since < hold {
                        continue;
                    }
                    let seq = inner.next;
                    inner.next += 1;
                    let record = AlarmRecord {
                        id: format!("{}-{seq}", self.node),
                        metric,
                        value,
                        peak: value,
                        threshold,
                        state: AlarmState::Firing,
                        acknowledged: false,
                        start: now,
                        end: None,
                        duration_secs: 0,
                        node: self.node.clone(),
                    };
                    inner.records.push_back(record.clone());
                    let w = inner.watches.entry(metric).or_default();
                    w.firing = Some(seq);
                    w.beyond_since = None;
                    w.back_since = None;
                    trim(&mut inner);
                    self.firing.with_label_values(&[metric.label()]).set(1);
                    self.journal(&record);
                    changes.push(Change::Fired(record));
                }
                Some(seq) => {
                    if let Some(r) = record_mut(&mut inner, seq) {
                        r.value = value;
                        r.peak = r.peak.max(value);
                        r.duration_secs = (now - r.start) / 1000;
                    }
                    let w = inner.watches.entry(metric).or_default();
                    if value >= resolve_below {
                        w.back_since = None;
                        continue;
                    }
                    let since = *w.back_since.get_or_insert(now);
                    if now - since < hold {
                        continue;
                    }
                    if let Some(c) = close(&mut inner, metric, now) {
                        self.firing.with_label_values(&[metric.label()]).set(0);
                        self.journal(&c);
                        changes.push(Change::Resolved(c));
                    }
                }
            }
        }
        changes
    }

    /// This node stopped evaluating: its firing alarms end now.
    pub fn stand_down(&self, now: u64) -> Vec<Change> {
        let mut inner = self.lock();
        let mut changes = Vec::new();
        for m in Metric::ALL {
            if let Some(c) = close(&mut inner, m, now) {
                self.firing.with_label_values(&[m.label()]).set(0);
                self.journal(&c);
                changes.push(Change::Resolved(c));
            }
            inner.watches.remove(&m);
        }
        changes
    }

    /// Acknowledges ("ignores") a firing alarm; false if it is not here.
    pub fn acknowledge(&self, id: &str) -> bool {
        let mut inner = self.lock();
        match inner.records.iter_mut().find(|r| r.id == id) {
            Some(r) => {
                r.acknowledged = true;
                if r.state == AlarmState::Firing {
                    r.state = AlarmState::Acknowledged;
                }
                let r = r.clone();
                drop(inner);
                self.journal(&r);
                true
            }
            None => false,
        }
    }

    /// Every record, newest first, with the duration of open ones up to `now`.
    pub fn records(&self, now: u64) -> Vec<AlarmRecord> {
        let inner = self.lock();
        inner
            .records
            .iter()
            .rev()
            .map(|r| {
                let mut r = r.clone();
                if r.end.is_none() {
                    r.duration_secs = now.saturating_sub(r.start) / 1000;
                }
                r
            })
            .collect()
    }
}

fn record_mut(inner: &mut Inner, seq: u64) -> Option<&mut AlarmRecord> {
    let i = usize::try_from(seq.checked_sub(inner.first)?).ok()?;
    inner.records.get_mut(i)
}

fn close(inner: &mut Inner, metric: Metric, now: u64) -> Option<AlarmRecord> {
    let seq = inner.watches.get_mut(&metric)?.firing.take()?;
    let r = record_mut(inner, seq)?;
    r.state = AlarmState::Resolved;
    r.end = Some(now);
    r.duration_secs = (now - r.start) / 1000;
    Some(r.clone())
}

fn trim(inner: &mut Inner) {
    while inner.records.len() > KEEP {
        let open = inner.watches.values().filter_map(|w| w.firing).min();
        if open.is_some_and(|s| s == inner.first) {
            break;
        }
        inner.records.pop_front();
        inner.first += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alarms(hold_secs: u64) -> Alarms {
        let config = AlarmsConfig {
            hold_secs,
            ..AlarmsConfig::default()
        };
        let capacity = CapacityConfig {
            connections: 100,
            ..CapacityConfig::default()
        };
        Alarms::new(&config, &capacity, "n0", &Registry::new(), None)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn fires_at_seventy_percent_and_resolves_below_the_hysteresis() {
        let a = alarms(0);
        assert_eq!(a.threshold(Metric::Connections), Some(70));
        assert_eq!(a.threshold(Metric::Tps), None);
        assert!(a.evaluate(1000, &[(Metric::Connections, 69)]).is_empty());
        let c = a.evaluate(2000, &[(Metric::Connections, 70)]);
        assert!(matches!(&c[..], [Change::Fired(r)] if r.threshold == 70 && r.value == 70));
        // Between the resolve level (63) and the threshold: still firing.
        assert!(a.evaluate(3000, &[(Metric::Connections, 65)]).is_empty());
        assert!(a.evaluate(4000, &[(Metric::Connections, 71)]).is_empty());
        let c = a.evaluate(62_000, &[(Metric::Connections, 62)]);
        assert!(
            matches!(&c[..], [Change::Resolved(r)] if r.end == Some(62_000) && r.duration_secs == 60 && r.peak == 71)
        );
        let records = a.records(70_000);
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].state, AlarmState::Resolved);
    }

    #[test]
    fn hold_time_ignores_spikes_and_acknowledge_marks_the_record() {
        let a = alarms(10);
        assert!(a.evaluate(0, &[(Metric::Connections, 90)]).is_empty());
        assert!(a.evaluate(5_000, &[(Metric::Connections, 10)]).is_empty());
        assert!(a.evaluate(6_000, &[(Metric::Connections, 90)]).is_empty());
        assert_eq!(a.evaluate(16_000, &[(Metric::Connections, 90)]).len(), 1);
        let id = a.records(16_000)[0].id.clone();
        assert!(a.acknowledge(&id));
        assert!(!a.acknowledge("nope"));
        assert_eq!(a.records(17_000)[0].state, AlarmState::Acknowledged);
        assert_eq!(a.records(17_000)[0].duration_secs, 1);
        assert_eq!(a.stand_down(20_000).len(), 1);
        assert_eq!(a.records(21_000)[0].state, AlarmState::Resolved);
    }

    #[test]
    fn any_under_replicated_session_held_past_the_hold_time_alarms() {
        let a = alarms(30);
        let under = Metric::UnderReplicatedSessions;
        assert_eq!(a.threshold(under), Some(1), "no capacity: a value of 1");
        // A ring change: copied again within the hold time, no alarm.
        assert!(a.evaluate(0, &[(under, 4)]).is_empty());
        assert!(a.evaluate(10_000, &[(under, 0)]).is_empty());
        assert!(a.evaluate(20_000, &[(under, 1)]).is_empty());
        let c = a.evaluate(50_000, &[(under, 1)]);
        assert!(matches!(&c[..], [Change::Fired(r)] if r.metric == under && r.threshold == 1));
        // Back to none (held as long): resolved.
        assert!(a.evaluate(60_000, &[(under, 0)]).is_empty());
        let c = a.evaluate(90_000, &[(under, 0)]);
        assert!(matches!(&c[..], [Change::Resolved(r)] if r.metric == under));
    }
}
