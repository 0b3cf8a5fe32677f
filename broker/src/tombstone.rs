//! Persistent sessions that ended on this node (D2). An older copy of one —
//! read back from the store of a node that comes back with its old volume,
//! or a replica's copy sent on to the owner — must not bring it back: a
//! client that started clean, or whose session expired, would find old
//! subscriptions and messages again. A tombstone says which state ended
//! (its epoch: a copy of that epoch or older is of it) and until when a
//! copy may still surface (the ended session's expiry interval, after which
//! a copy expires by itself). It lives where the Client ID's session lives,
//! and moves to the Client ID's next owner when the ring changes.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::util::FastMap;

/// Tombstones kept at most; beyond, the one that expires first goes (a
/// copy of it could then come back, as before tombstones existed).
const MAX: usize = 100_000;

#[derive(Debug, Clone, Copy)]
struct Ended {
    epoch: u64,
    until: Instant,
}

/// The tombstones of one node, by Client ID.
#[derive(Debug, Default)]
pub struct Tombstones {
    ended: Mutex<FastMap<Arc<str>, Ended>>,
}

impl Tombstones {
    /// The map holds no invariant a panic could break.
    fn ended(&self) -> std::sync::MutexGuard<'_, FastMap<Arc<str>, Ended>> {
        self.ended.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `client`'s persistent session of `epoch` ended; a copy may surface
    /// for `ttl`. A later end of the same Client ID keeps the higher epoch.
    pub fn record(&self, client: &Arc<str>, epoch: u64, ttl: Duration) {
        let now = Instant::now();
        let until = now + ttl;
        let mut ended = self.ended();
        if ended.len() >= MAX && !ended.contains_key(client) {
            ended.retain(|_, e| e.until > now);
            if ended.len() >= MAX
                && let Some(first) = ended
                    .iter()
                    .min_by_key(|(_, e)| e.until)
                    .map(|(c, _)| c.clone())
            {
                ended.remove(&first);
            }
        }
        let e = ended
            .entry(client.clone())
            .or_insert(Ended { epoch, until });
        e.epoch = e.epoch.max(epoch);
        e.until = e.until.max(until);
    }

    /// The epoch a new state of `client`'s session starts at: past every
    /// state that ended here, so that no tombstone covers it.
    pub fn epoch_after(&self, client: &str) -> u64 {
        let now = Instant::now();
        self.ended()
            .get(client)
            .filter(|e| e.until > now)
            .map_or(0, |e| e.epoch + 1)
    }

    /// Whether a state of `client`'s session of `epoch` is one that ended
    /// here (or older).
    pub fn covers(&self, client: &str, epoch: u64) -> bool {
        let now = Instant::now();
        self.ended()
            .get(client)
            .is_some_and(|e| e.until > now && epoch <= e.epoch)
    }

    /// Takes out the tombstones of Client IDs this node does not own
    /// (`owned` false), each with its epoch and what is left of its time,
    /// for their owners; drops the expired ones.
    pub fn take_unowned(&self, owned: impl Fn(&str) -> bool) -> Vec<(Arc<str>, u64, Duration)> {
        let now = Instant::now();
        let mut out = Vec::new();
        self.ended().retain(|client, e| {
            if e.until <= now {
                return false;
            }
            if owned(client) {
                return true;
            }
            out.push((client.clone(), e.epoch, e.until - now));
            false
        });
        out
    }

    /// Drops the expired tombstones; returns how many are left.
    pub fn prune(&self) -> usize {
        let now = Instant::now();
        let mut ended = self.ended();
        ended.retain(|_, e| e.until > now);
        ended.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tombstone_covers_its_epoch_and_older_until_it_expires() {
        let t = Tombstones::default();
        let c: Arc<str> = Arc::from("c");
        t.record(&c, 3, Duration::from_secs(60));
        assert!(t.covers("c", 3));
        assert!(t.covers("c", 1));
        assert!(!t.covers("c", 4), "a newer state is not the one that ended");
        assert!(!t.covers("d", 0));
        t.record(&c, 2, Duration::from_secs(60));
        assert!(t.covers("c", 3), "the higher epoch stays");
        t.record(&Arc::from("gone"), 9, Duration::ZERO);
        assert!(!t.covers("gone", 1), "expired");
        assert_eq!(t.prune(), 1);
    }

    #[test]
    fn tombstones_of_client_ids_owned_elsewhere_are_handed_out_once() {
        let t = Tombstones::default();
        t.record(&Arc::from("mine"), 1, Duration::from_secs(60));
        t.record(&Arc::from("theirs"), 5, Duration::from_secs(60));
        let out = t.take_unowned(|c| c == "mine");
        assert_eq!(out.len(), 1);
        assert_eq!((&*out[0].0, out[0].1), ("theirs", 5));
        assert!(out[0].2 <= Duration::from_secs(60));
        assert!(t.take_unowned(|c| c == "mine").is_empty());
        assert!(t.covers("mine", 1));
        assert!(!t.covers("theirs", 5), "it went to the owner");
    }
}
