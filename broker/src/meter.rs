//! Metering (L2, O3, O6): weighted message rates, counts per parent topic /
//! subtopic / QoS, and the per-minute history that the resource report and
//! the Group ID online history read.
//!
//! The hot path adds to an atomic and to one of sixteen shard maps keyed by
//! `parent/subtopic`; once a second `tick` folds the shards into the minute
//! being filled, and every minute that minute joins the history. Only the
//! ticker and API queries touch the history.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::config::TraceConfig;
use crate::message::QoS;
use crate::util::FastMap;

/// L2: what one message counts for in TPS.
pub fn weight(qos: QoS) -> u64 {
    match qos {
        QoS::AtMostOnce => 1,
        QoS::AtLeastOnce => 2,
        QoS::ExactlyOnce => 10,
    }
}

const SHARDS: usize = 16;
const MINUTE_MS: u64 = 60_000;

/// Subtopic under which keys beyond `trace.report_keys` are counted.
pub const OTHER: &str = "(other)";

/// Messages produced (received from publishers) and consumed (sent to
/// subscribers), by QoS.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub produced: [u64; 3],
    pub consumed: [u64; 3],
}

impl Counts {
    fn add(&mut self, other: &Counts) {
        for q in 0..3 {
            self.produced[q] += other.produced[q];
            self.consumed[q] += other.consumed[q];
        }
    }
}

/// Counts of one minute.
#[derive(Debug, Default, Clone)]
struct Minute {
    start_ms: u64,
    topics: HashMap<Box<str>, Counts>,
    pub_weighted: u64,
    sub_weighted: u64,
}

/// What the resource report needs from one node for a time range.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// `parent/subtopic` (or `parent` alone) to its counts.
    pub topics: HashMap<String, Counts>,
    pub pub_weighted: u64,
    pub sub_weighted: u64,
}

/// Online connections by Group ID at one time.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupSample {
    pub ts: u64,
    pub groups: HashMap<String, u64>,
}

#[derive(Debug, Default)]
struct History {
    last_in: u64,
    last_out: u64,
    /// Weighted messages in and out of the last seconds, newest last.
    window: VecDeque<(u64, u64)>,
    filling: Minute,
    minutes: VecDeque<Minute>,
    groups: VecDeque<GroupSample>,
}

/// The meter of one node.
#[derive(Debug)]
pub struct Meter {
    weighted_in: AtomicU64,
    weighted_out: AtomicU64,
    shards: [Mutex<FastMap<Box<str>, Counts>>; SHARDS],
    keys_per_shard: usize,
    history: Mutex<History>,
    window_len: usize,
    retention_ms: u64,
    group_retention_ms: u64,
    max_groups: usize,
    peak_connections: AtomicU64,
    journal: Option<Arc<dyn MeterJournal>>,
}

/// One finished minute of metering.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MinuteRecord {
    pub start: u64,
    pub topics: HashMap<String, Counts>,
    pub pub_weighted: u64,
    pub sub_weighted: u64,
}

/// Where finished minutes and Group ID samples are kept beyond memory (the
/// journal implements it), so that a restarted node still reports them.
/// Recording never waits.
pub trait MeterJournal: Send + Sync + std::fmt::Debug {
    fn minute(&self, minute: MinuteRecord);
    fn groups(&self, sample: GroupSample);
}

/// `parent/subtopic` of a topic: its first two levels.
fn key_of(topic: &str) -> &str {
    match topic.match_indices(crate::topic::SEPARATOR).nth(1) {
        Some((i, _)) => &topic[..i],
        None => topic,
    }
}

fn shard_of(key: &str) -> usize {
    let h = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    usize::try_from(h % SHARDS as u64).unwrap_or(0)
}

impl Meter {
    pub fn new(
        trace: &TraceConfig,
        tps_window_secs: u64,
        journal: Option<Arc<dyn MeterJournal>>,
    ) -> Self {
        Self {
            weighted_in: AtomicU64::new(0),
            weighted_out: AtomicU64::new(0),
            shards: std::array::from_fn(|_| Mutex::new(FastMap::default())),
            keys_per_shard: trace.report_keys.div_ceil(SHARDS).max(1),
            history: Mutex::new(History::default()),
            window_len: usize::try_from(tps_window_secs).unwrap_or(1).max(1),
            retention_ms: trace.retention_secs.saturating_mul(1000),
            group_retention_ms: trace.group_history_secs.saturating_mul(1000),
            max_groups: trace.groups,
            peak_connections: AtomicU64::new(0),
            journal,
        }
    }

    /// Puts back the history the journal held (oldest first).
    pub fn restore(&self, minutes: Vec<MinuteRecord>, groups: Vec<GroupSample>) {
        let mut h = self.history();
        for m in minutes {
            h.minutes.push_back(Minute {
                start_ms: m.start,
                topics: m.topics.into_iter().map(|(k, c)| (k.into(), c)).collect(),
                pub_weighted: m.pub_weighted,
                sub_weighted: m.sub_weighted,
            });
        }
        h.groups.extend(groups);
    }

    fn count(&self, topic: &str, f: impl FnOnce(&mut Counts)) {
        let key = key_of(topic);
        let mut shard = self.shards[shard_of(key)]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(c) = shard.get_mut(key) {
            f(c);
            return;
        }
        let key: Box<str> = if shard.len() < self.keys_per_shard {
            key.into()
        } else {
            format!("{}/{OTHER}", crate::topic::parent_topic(topic)).into()
        };
        f(shard.entry(key).or_default());
    }

    /// A message received from a publisher (or a downlink record).
    pub fn produced(&self, topic: &str, qos: QoS) {
        self.weighted_in.fetch_add(weight(qos), Ordering::Relaxed);
        self.count(topic, |c| c.produced[qos as usize] += 1);
    }

    /// `n` messages of one topic sent to subscribers.
    pub fn consumed(&self, topic: &str, qos: QoS, n: u64) {
        self.weighted_out
            .fetch_add(weight(qos) * n, Ordering::Relaxed);
        self.count(topic, |c| c.consumed[qos as usize] += n);
    }

    /// Remembers the highest number of connections this node held.
    pub fn connections_now(&self, n: u64) {
        self.peak_connections.fetch_max(n, Ordering::Relaxed);
    }

    pub fn peak_connections(&self) -> u64 {
        self.peak_connections.load(Ordering::Relaxed)
    }

    /// Weighted messages received and sent since the node started.
    pub fn weighted_totals(&self) -> (u64, u64) {
        (
            self.weighted_in.load(Ordering::Relaxed),
            self.weighted_out.load(Ordering::Relaxed),
        )
    }

    fn history(&self) -> std::sync::MutexGuard<'_, History> {
        self.history.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Once a second: the last second's rates, the shards folded into the
    /// current minute, finished minutes into the history. Returns the last
    /// second's counts by parent topic.
    pub fn tick(&self, now_ms: u64) -> HashMap<String, Counts> {
        let (total_in, total_out) = self.weighted_totals();
        let mut h = self.history();
        let second = (total_in - h.last_in, total_out - h.last_out);
        h.last_in = total_in;
        h.last_out = total_out;
        h.window.push_back(second);
        while h.window.len() > self.window_len {
            h.window.pop_front();
        }
        let minute_start = now_ms - now_ms % MINUTE_MS;
        if h.filling.start_ms != minute_start {
            let done = std::mem::take(&mut h.filling);
            if done.start_ms != 0 {
                if let Some(j) = &self.journal {
                    j.minute(MinuteRecord {
                        start: done.start_ms,
                        topics: done
                            .topics
                            .iter()
                            .map(|(k, c)| (k.to_string(), *c))
                            .collect(),
                        pub_weighted: done.pub_weighted,
                        sub_weighted: done.sub_weighted,
                    });
                }
                h.minutes.push_back(done);
            }
            h.filling.start_ms = minute_start;
        }
        h.filling.pub_weighted += second.0;
        h.filling.sub_weighted += second.1;
        let mut by_parent: HashMap<String, Counts> = HashMap::new();
        for shard in &self.shards {
            let drained = std::mem::take(&mut *shard.lock().unwrap_or_else(|e| e.into_inner()));
            for (key, counts) in drained {
                let parent = crate::topic::parent_topic(&key);
                match by_parent.get_mut(parent) {
                    Some(c) => c.add(&counts),
                    None => {
                        by_parent.insert(parent.to_owned(), counts);
                    }
                }
                h.filling.topics.entry(key).or_default().add(&counts);
            }
        }
        let oldest = now_ms.saturating_sub(self.retention_ms);
        while h.minutes.front().is_some_and(|m| m.start_ms < oldest) {
            h.minutes.pop_front();
        }
        by_parent
    }

    /// Weighted messages per second received and sent, averaged over the
    /// TPS window.
    pub fn tps(&self) -> (f64, f64) {
        let h = self.history();
        let n = h.window.len().max(1) as f64;
        let (i, o) = h
            .window
            .iter()
            .fold((0, 0), |(i, o), (a, b)| (i + a, o + b));
        (i as f64 / n, o as f64 / n)
    }

    /// Counts of the minutes that overlap `[from_ms, to_ms]`.
    pub fn report(&self, from_ms: u64, to_ms: u64) -> Report {
        let h = self.history();
        let mut r = Report::default();
        let overlaps = |m: &&Minute| m.start_ms + MINUTE_MS > from_ms && m.start_ms <= to_ms;
        for m in h.minutes.iter().chain([&h.filling]).filter(overlaps) {
            r.pub_weighted += m.pub_weighted;
            r.sub_weighted += m.sub_weighted;
            for (k, c) in &m.topics {
                r.topics.entry(k.to_string()).or_default().add(c);
            }
        }
        r
    }

    /// Once a minute: online connections by Group ID.
    pub fn record_groups(&self, now_ms: u64, mut groups: HashMap<String, u64>) {
        if groups.len() > self.max_groups {
            let mut by_count: Vec<_> = groups.into_iter().collect();
            by_count.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            by_count.truncate(self.max_groups);
            groups = by_count.into_iter().collect();
        }
        let sample = GroupSample { ts: now_ms, groups };
        if let Some(j) = &self.journal {
            j.groups(sample.clone());
        }
        let mut h = self.history();
        h.groups.push_back(sample);
        let oldest = now_ms.saturating_sub(self.group_retention_ms);
        while h.groups.front().is_some_and(|g| g.ts < oldest) {
            h.groups.pop_front();
        }
    }

    /// Group ID samples taken in `[from_ms, to_ms]`.
    pub fn groups(&self, from_ms: u64, to_ms: u64) -> Vec<GroupSample> {
        self.history()
            .groups
            .iter()
            .filter(|g| g.ts >= from_ms && g.ts <= to_ms)
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meter() -> Meter {
        Meter::new(&TraceConfig::default(), 2, None)
    }

    #[test]
    fn counts_by_parent_and_subtopic_with_qos_weights() {
        let m = meter();
        m.produced("a/b/c", QoS::AtLeastOnce);
        m.produced("a/b/d", QoS::ExactlyOnce);
        m.consumed("a/b/c", QoS::AtMostOnce, 3);
        m.produced("a", QoS::AtMostOnce);
        m.tick(120_000);
        let r = m.report(0, 200_000);
        assert_eq!(r.pub_weighted, 2 + 10 + 1);
        assert_eq!(r.sub_weighted, 3);
        let ab = r.topics["a/b"];
        assert_eq!(ab.produced, [0, 1, 1]);
        assert_eq!(ab.consumed, [3, 0, 0]);
        assert_eq!(r.topics["a"].produced, [1, 0, 0]);
    }

    #[test]
    fn tps_is_the_window_average_and_minutes_roll_into_history() {
        let m = meter();
        m.tick(60_000);
        for _ in 0..10 {
            m.produced("t", QoS::AtLeastOnce);
        }
        m.tick(61_000);
        m.tick(62_000);
        assert_eq!(m.tps(), (10.0, 0.0));
        m.produced("t", QoS::AtMostOnce);
        m.tick(121_000);
        assert_eq!(m.report(60_000, 60_500).pub_weighted, 20);
        assert_eq!(m.report(120_000, 121_000).pub_weighted, 1);
    }

    #[test]
    fn restored_minutes_answer_the_report() {
        let m = meter();
        let mut topics = HashMap::new();
        topics.insert(
            "a/b".to_owned(),
            Counts {
                produced: [1, 2, 3],
                consumed: [0, 0, 4],
            },
        );
        m.restore(
            vec![MinuteRecord {
                start: 60_000,
                topics,
                pub_weighted: 35,
                sub_weighted: 40,
            }],
            vec![GroupSample {
                ts: 60_000,
                groups: HashMap::from([("GID_x".to_owned(), 3)]),
            }],
        );
        let r = m.report(60_000, 61_000);
        assert_eq!(r.pub_weighted, 35);
        assert_eq!(r.topics["a/b"].consumed, [0, 0, 4]);
        assert_eq!(m.groups(0, 100_000)[0].groups["GID_x"], 3);
    }

    #[test]
    fn keys_beyond_the_limit_fall_into_other() {
        let m = Meter::new(
            &TraceConfig {
                report_keys: 1,
                ..TraceConfig::default()
            },
            1,
            None,
        );
        for i in 0..100 {
            m.produced(&format!("p/{i}"), QoS::AtMostOnce);
        }
        m.tick(60_000);
        let r = m.report(0, 120_000);
        assert!(r.topics.len() <= SHARDS + 1, "{:?}", r.topics.keys());
        let total: u64 = r.topics.values().map(|c| c.produced[0]).sum();
        assert_eq!(total, 100);
        assert!(r.topics.contains_key("p/(other)"));
    }
}
