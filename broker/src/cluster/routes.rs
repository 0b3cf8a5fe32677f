//! What each peer announced its sessions subscribe to (the routes of its
//! node marker), and for how long it is kept.
//!
//! A peer's filters belong to the inbound link they came on: each link
//! starts with the full list, then adds and removes. Once that link closed
//! (or fell silent) and this node has no link to the peer either, the
//! filters wait (`parting`) until every member said it settled a ring
//! without the peer — the nodes that took its sessions over announced their
//! own filters before saying so — or a bound passed. Meanwhile a QoS 1/2
//! publish that reaches them is refused (there is no link) rather than
//! acknowledged with nobody to take it. A full list on a newer link (the
//! peer restarted) makes them current again, whatever the older links of
//! the same name do later: dropping them when the old process's link went
//! down, after the new process had announced its own, lost hundreds of
//! acknowledged messages in the chaos test.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::wire::Frame;

/// Lock a map that holds no invariant a panic could break.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Debug, Default)]
pub(super) struct PeerRoutes {
    /// Filters each peer announced.
    filters: Mutex<HashMap<Arc<str>, HashSet<String>>>,
    /// Per peer, the inbound link its filters came on, and whether that
    /// link is still open.
    from: Mutex<HashMap<Arc<str>, (u64, bool)>>,
    /// Peers whose filters wait to go, with since when.
    parting: Mutex<HashMap<Arc<str>, Instant>>,
    /// Whether some peer's filters are kept without a link to it.
    unlinked: AtomicBool,
    /// Numbers the inbound links.
    links: AtomicU64,
}

impl PeerRoutes {
    /// A new inbound link: its number.
    pub(super) fn link_opened(&self) -> u64 {
        self.links.fetch_add(1, Ordering::Relaxed)
    }

    /// Records what `node` announced on inbound link `link`; returns the
    /// filters to add to and remove from its marker's routes.
    pub(super) fn announced(
        &self,
        node: &Arc<str>,
        link: u64,
        frame: &Frame,
    ) -> (Vec<String>, Vec<String>) {
        if let Frame::Routes { .. } = frame {
            // A process of that name is there, on this link: what it
            // announces is current, and no longer waits to go.
            lock(&self.from).insert(node.clone(), (link, true));
            lock(&self.parting).remove(node);
        }
        let mut all = lock(&self.filters);
        let known = all.entry(node.clone()).or_default();
        match frame {
            Frame::Routes { filters } => {
                let new: HashSet<String> = filters.iter().cloned().collect();
                let add = new.difference(known).cloned().collect();
                let del = known.difference(&new).cloned().collect();
                *known = new;
                (add, del)
            }
            Frame::RouteAdd { filter } if known.insert(filter.clone()) => {
                (vec![filter.clone()], Vec::new())
            }
            Frame::RouteDel { filter } if known.remove(filter) => {
                (Vec::new(), vec![filter.clone()])
            }
            _ => (Vec::new(), Vec::new()),
        }
    }

    /// Inbound link `link` from `node` closed: true if `node`'s filters
    /// came on it (they are a process's that is gone).
    pub(super) fn link_closed(&self, node: &str, link: u64) -> bool {
        match lock(&self.from).get_mut(node) {
            Some(f) if f.0 == link => {
                f.1 = false;
                true
            }
            _ => false,
        }
    }

    /// `node` left, or the link its filters came on closed: with no link
    /// to it (`linked` false) and no open link its filters came on, they
    /// wait to go.
    pub(super) fn part(&self, node: &str, linked: bool) {
        let live = lock(&self.from).get(node).is_some_and(|f| f.1);
        if !live && !linked {
            lock(&self.parting)
                .entry(Arc::from(node))
                .or_insert_with(Instant::now);
        }
    }

    /// Peers whose filters go now: not `linked`, and every one of
    /// `members` settled a ring without them (`settled`: the members each
    /// one last settled), or `bound` passed. A linked peer is back and
    /// keeps its filters.
    pub(super) fn parted(
        &self,
        linked: &HashSet<Arc<str>>,
        members: &[Arc<str>],
        settled: &HashMap<Arc<str>, HashSet<String>>,
        bound: Duration,
    ) -> Vec<Arc<str>> {
        let mut gone = Vec::new();
        lock(&self.parting).retain(|node, since| {
            if linked.contains(node) {
                return false;
            }
            let taken_over = members
                .iter()
                .all(|m| settled.get(m).is_some_and(|s| !s.contains(&**node)));
            if taken_over || since.elapsed() >= bound {
                gone.push(node.clone());
                return false;
            }
            true
        });
        gone
    }

    /// Forgets what a departed peer announced; returns its filters.
    pub(super) fn forget(&self, node: &str) -> Vec<String> {
        lock(&self.filters)
            .remove(node)
            .map(|s| s.into_iter().collect())
            .unwrap_or_default()
    }

    /// Recomputes whether some peer's filters have no link (`linked`).
    pub(super) fn recount(&self, linked: impl Fn(&str) -> bool) {
        let unlinked = lock(&self.filters)
            .iter()
            .any(|(node, f)| !f.is_empty() && !linked(node));
        self.unlinked.store(unlinked, Ordering::Release);
    }

    /// Whether some peer's filters have no link now.
    pub(super) fn unlinked(&self) -> bool {
        self.unlinked.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(filters: &[&str]) -> Frame {
        Frame::Routes {
            filters: filters.iter().map(|f| (*f).to_owned()).collect(),
        }
    }

    #[test]
    fn a_restarted_peers_filters_outlive_its_old_links() {
        let r = PeerRoutes::default();
        let n1: Arc<str> = Arc::from("n1");
        let old = r.link_opened();
        assert_eq!(r.announced(&n1, old, &routes(&["a/#"])).0, ["a/#"]);
        // The new process announces on its link before the old one's
        // links are seen to close.
        let new = r.link_opened();
        assert_eq!(r.announced(&n1, new, &routes(&["a/#"])), (vec![], vec![]));
        assert!(!r.link_closed("n1", old), "not the link they came on");
        r.part("n1", false);
        let members = [Arc::from("n0")];
        let settled = HashMap::from([(Arc::from("n0"), HashSet::from(["n0".to_owned()]))]);
        let none = HashSet::new();
        assert!(
            r.parted(&none, &members, &settled, Duration::ZERO)
                .is_empty()
        );
        // Then the new process goes too: its filters wait until the
        // members settled a ring without it.
        assert!(r.link_closed("n1", new));
        r.part("n1", false);
        let before = HashMap::from([(
            Arc::from("n0"),
            HashSet::from(["n0".to_owned(), "n1".to_owned()]),
        )]);
        let long = Duration::from_secs(60);
        assert!(r.parted(&none, &members, &before, long).is_empty());
        assert_eq!(r.parted(&none, &members, &settled, long), [n1]);
        assert_eq!(r.forget("n1"), ["a/#"]);
    }

    #[test]
    fn filters_kept_without_a_link_are_counted() {
        let r = PeerRoutes::default();
        let n1: Arc<str> = Arc::from("n1");
        let link = r.link_opened();
        r.announced(&n1, link, &routes(&["a/#"]));
        r.recount(|_| true);
        assert!(!r.unlinked());
        r.recount(|n| n != "n1");
        assert!(r.unlinked());
        r.forget("n1");
        r.recount(|n| n != "n1");
        assert!(!r.unlinked());
    }
}
