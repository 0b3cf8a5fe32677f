//! What a subscriber saw: per-publisher sequence tracking (loss, duplicates,
//! reordering) and latency percentiles.

use std::collections::HashMap;

use crate::payload::Stamp;

/// Per-publisher state of one subscriber.
#[derive(Debug, Default, Clone)]
struct Track {
    /// Next sequence number expected.
    next: u64,
    /// Sequence numbers seen beyond `next`, still to be accounted.
    seen: std::collections::BTreeSet<u64>,
    /// Highest sequence number seen.
    max: Option<u64>,
}

/// Everything one subscriber counted.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    tracks: HashMap<u64, Track>,
    pub received: u64,
    pub duplicates: u64,
    pub reordered: u64,
    pub bytes: u64,
    /// When the last message arrived (ns since the run's clock started).
    pub last_ns: u64,
    latencies_ns: Vec<u64>,
}

/// Latency samples kept per subscriber; beyond this every n-th is kept.
const MAX_SAMPLES: usize = 200_000;

impl Tally {
    /// Counts one message received at `now_ns`.
    pub fn record(&mut self, stamp: Stamp, len: usize, now_ns: u64) {
        self.received += 1;
        self.bytes += len as u64;
        self.last_ns = self.last_ns.max(now_ns);
        if self.latencies_ns.len() < MAX_SAMPLES || self.received.is_multiple_of(16) {
            if self.latencies_ns.len() >= MAX_SAMPLES {
                self.latencies_ns
                    .swap_remove((self.received as usize) % MAX_SAMPLES);
            }
            self.latencies_ns.push(now_ns.saturating_sub(stamp.sent_ns));
        }
        let t = self.tracks.entry(stamp.publisher).or_default();
        if stamp.seq < t.next || t.seen.contains(&stamp.seq) {
            self.duplicates += 1;
            return;
        }
        if t.max.is_some_and(|m| stamp.seq < m) {
            self.reordered += 1;
        }
        t.max = Some(t.max.map_or(stamp.seq, |m| m.max(stamp.seq)));
        if stamp.seq == t.next {
            t.next += 1;
            while t.seen.remove(&t.next) {
                t.next += 1;
            }
        } else {
            t.seen.insert(stamp.seq);
        }
    }

    /// Messages of `publisher` this subscriber got, without duplicates.
    pub fn unique_from(&self, publisher: u64) -> u64 {
        self.tracks
            .get(&publisher)
            .map_or(0, |t| t.next + t.seen.len() as u64)
    }

    /// Merges another subscriber's tally (for totals).
    pub fn merge(&mut self, other: Tally) {
        self.received += other.received;
        self.duplicates += other.duplicates;
        self.reordered += other.reordered;
        self.bytes += other.bytes;
        self.last_ns = self.last_ns.max(other.last_ns);
        self.latencies_ns.extend(other.latencies_ns);
    }

    /// Latency percentile in microseconds (`q` in 0..=1).
    pub fn percentile_us(&mut self, q: f64) -> f64 {
        if self.latencies_ns.is_empty() {
            return 0.0;
        }
        self.latencies_ns.sort_unstable();
        let idx = ((self.latencies_ns.len() - 1) as f64 * q).round() as usize;
        self.latencies_ns[idx.min(self.latencies_ns.len() - 1)] as f64 / 1000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(publisher: u64, seq: u64) -> Stamp {
        Stamp {
            publisher,
            seq,
            sent_ns: 0,
        }
    }

    #[test]
    fn the_last_arrival_is_kept_across_subscribers() {
        let mut a = Tally::default();
        a.record(s(1, 0), 10, 5_000);
        a.record(s(1, 1), 10, 3_000);
        let mut b = Tally::default();
        b.record(s(2, 0), 10, 9_000);
        a.merge(b);
        assert_eq!(a.last_ns, 9_000);
        assert_eq!(a.received, 3);
    }

    #[test]
    fn detects_duplicates_reordering_and_loss() {
        let mut t = Tally::default();
        for seq in [0, 1, 3, 2, 2, 5] {
            t.record(s(1, seq), 10, 1000);
        }
        assert_eq!(t.received, 6);
        assert_eq!(t.duplicates, 1, "2 twice");
        assert_eq!(t.reordered, 1, "2 arrived after 3");
        assert_eq!(t.unique_from(1), 5, "4 is missing");
        assert_eq!(t.percentile_us(0.5), 1.0);
    }
}
