//! The consistent-hash ring: which node owns each Client ID's session.
//!
//! Each node puts `vnodes` points on a 64-bit circle; a key belongs to the
//! node of the first point at or after the key's hash. The hash is FNV-1a
//! with a splitmix64 finaliser, fixed here rather than taken from `std`, so
//! that every node of a cluster (whatever its build) computes the same owner.
//!
//! Properties (tested below): with 128 points per node no node owns more than
//! 1.3 times its fair share of keys (for clusters up to 16 nodes); when a
//! node joins, only keys that move to it change owner; when a node leaves,
//! only its own keys do.

use std::sync::Arc;

/// Points per node: enough for the balance bound above, few enough that a
/// ring of 64 nodes is 8 192 entries (a binary search of 13 steps).
pub const VNODES: usize = 128;

/// A ring over a set of node names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ring {
    /// Sorted by point; ties broken by node name so that every node builds
    /// the same ring.
    points: Vec<(u64, Arc<str>)>,
    nodes: Vec<Arc<str>>,
}

impl Ring {
    /// Builds the ring of `nodes` (duplicates count once).
    pub fn new<I, S>(nodes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Self::with_vnodes(nodes, VNODES)
    }

    pub fn with_vnodes<I, S>(nodes: I, vnodes: usize) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut names: Vec<Arc<str>> = nodes.into_iter().map(|n| Arc::from(n.as_ref())).collect();
        names.sort();
        names.dedup();
        let mut points = Vec::with_capacity(names.len() * vnodes);
        for name in &names {
            for i in 0..vnodes {
                points.push((hash(format!("{name}#{i}").as_bytes()), name.clone()));
            }
        }
        points.sort();
        Self {
            points,
            nodes: names,
        }
    }

    /// The nodes of the ring, sorted.
    pub fn nodes(&self) -> &[Arc<str>] {
        &self.nodes
    }

    /// The node that owns `key`; `None` for an empty ring.
    pub fn owner(&self, key: &str) -> Option<&Arc<str>> {
        if self.points.is_empty() {
            return None;
        }
        let h = hash(key.as_bytes());
        let i = self.points.partition_point(|(p, _)| *p < h);
        let (_, node) = &self.points[i % self.points.len()];
        Some(node)
    }

    /// The first `n` distinct nodes clockwise from `key`: the owner, then the
    /// nodes that would own it if the ones before left.
    pub fn successors(&self, key: &str, n: usize) -> Vec<&Arc<str>> {
        let mut out: Vec<&Arc<str>> = Vec::with_capacity(n);
        if self.points.is_empty() {
            return out;
        }
        let h = hash(key.as_bytes());
        let start = self.points.partition_point(|(p, _)| *p < h);
        for k in 0..self.points.len() {
            if out.len() >= n.min(self.nodes.len()) {
                break;
            }
            let (_, node) = &self.points[(start + k) % self.points.len()];
            if !out.contains(&node) {
                out.push(node);
            }
        }
        out
    }
}

/// FNV-1a 64 with a splitmix64 finaliser (FNV alone clusters short keys).
pub fn hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("ringmq-{i}")).collect()
    }

    fn keys(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("GID_test@@@device-{i}")).collect()
    }

    #[test]
    fn the_hash_is_fixed() {
        // Nodes of different builds must agree: a changed hash is a protocol
        // change. (Values computed independently, in Python.)
        assert_eq!(hash(b""), 0xf52a_15e9_a9b5_e89b);
        assert_eq!(hash(b"GID_test@@@device-1"), 0x617b_70a9_0ada_b8f3);
    }

    #[test]
    fn empty_ring_owns_nothing() {
        assert_eq!(Ring::new(Vec::<String>::new()).owner("x"), None);
    }

    #[test]
    fn balance_stays_within_the_stated_bound() {
        let keys = keys(50_000);
        for n in 2..=16 {
            let ring = Ring::new(names(n));
            let mut count: HashMap<&str, usize> = HashMap::new();
            for k in &keys {
                if let Some(o) = ring.owner(k) {
                    *count.entry(o).or_default() += 1;
                }
            }
            let fair = keys.len() as f64 / n as f64;
            let max = count.values().copied().max().unwrap_or(0) as f64;
            assert_eq!(count.len(), n, "every node owns keys");
            assert!(max <= 1.3 * fair, "{n} nodes: max {max} vs fair {fair}");
        }
    }

    #[test]
    fn successors_start_with_the_owner_and_are_distinct() {
        let ring = Ring::new(names(4));
        for k in keys(200) {
            let s = ring.successors(&k, 3);
            assert_eq!(s.len(), 3);
            assert_eq!(Some(s[0]), ring.owner(&k));
            assert!(s[0] != s[1] && s[1] != s[2] && s[0] != s[2]);
        }
        assert_eq!(ring.successors("k", 10).len(), 4);
    }

    proptest! {
        /// Joining moves only the keys the new node takes.
        #[test]
        fn a_join_moves_only_keys_to_the_new_node(n in 1usize..8, key_seed in 0u64..1000) {
            let before = Ring::new(names(n));
            let after = Ring::new(names(n + 1));
            let new = format!("ringmq-{n}");
            for i in 0..500 {
                let k = format!("c-{key_seed}-{i}");
                let (a, b) = (before.owner(&k), after.owner(&k));
                prop_assert!(a == b || b.map(|b| &**b) == Some(new.as_str()));
            }
        }

        /// Leaving moves only the keys the departed node owned.
        #[test]
        fn a_leave_moves_only_the_departed_nodes_keys(n in 2usize..8, gone in 0usize..8, key_seed in 0u64..1000) {
            let gone = gone % n;
            let all = names(n);
            let before = Ring::new(&all);
            let after = Ring::new(all.iter().enumerate().filter(|(i, _)| *i != gone).map(|(_, s)| s));
            for i in 0..500 {
                let k = format!("c-{key_seed}-{i}");
                let (a, b) = (before.owner(&k), after.owner(&k));
                let was_gone = a.map(|a| &**a) == Some(all[gone].as_str());
                prop_assert!(a == b || was_gone);
                // A key of the departed node goes to its next successor.
                if was_gone {
                    prop_assert_eq!(b, before.successors(&k, 2).get(1).copied());
                }
            }
        }

        /// Every node computes the same ring whatever order it learns members in.
        #[test]
        fn member_order_does_not_matter(mut v in proptest::collection::vec(0usize..20, 1..10)) {
            let a = Ring::new(v.iter().map(|i| format!("n{i}")));
            v.reverse();
            let b = Ring::new(v.iter().map(|i| format!("n{i}")));
            prop_assert_eq!(a, b);
        }
    }
}
