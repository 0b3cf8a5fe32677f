//! The subscription routing table: which sessions want a topic.
//!
//! A trie of topic levels, split into shards by the first level of the filter
//! so that publishes to different parent topics never contend on one lock.
//! Filters starting with a wildcard live in one extra shard that every publish
//! reads. Publishes take read locks only; subscribe and unsubscribe take the
//! write lock of one shard.
//!
//! A route names a session by Client ID, not a connection: the session store
//! decides whether it is online or offline. Routes to other nodes of a
//! cluster are held under *node markers* (`node_route`), names that no
//! Client ID can take, so that one table answers "who wants this topic"
//! for the whole cluster.

use std::hash::BuildHasher;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use crate::message::QoS;
use crate::topic::{Filter, SEPARATOR};
use crate::util::FastMap;

/// Sessions are named by their Client ID.
pub type ClientId = Arc<str>;

const SHARDS: usize = 16;

/// What a subscription asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubOptions {
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub id: Option<NonZeroU32>,
}

impl SubOptions {
    /// Plain options at `qos`: what MQTT 3.1.1 can ask for.
    pub fn at(qos: QoS) -> Self {
        Self {
            qos,
            no_local: false,
            retain_as_published: false,
            id: None,
        }
    }
}

/// One delivery the table asks for.
#[derive(Debug, Clone)]
pub struct Route {
    pub client: ClientId,
    pub opts: SubOptions,
    /// Chosen from this shared-subscription group (`$share/<group>/<filter>`).
    pub group: Option<Arc<str>>,
}

/// U+0000 cannot appear in an MQTT Client ID (MQTT 5 1.5.4), so a node
/// marker never collides with a session.
const NODE_PREFIX: char = '\u{0}';

/// The router name of another cluster node.
pub fn node_route(node: &str) -> ClientId {
    Arc::from(format!("{NODE_PREFIX}{node}"))
}

/// The node a route name stands for, if it is a node marker.
pub fn route_node(client: &str) -> Option<&str> {
    client.strip_prefix(NODE_PREFIX)
}

/// Which routes a lookup wants.
#[derive(Clone, Copy)]
pub enum Scope<'a> {
    /// A publish received here: every route, node markers included.
    All,
    /// A message another node forwarded: this node's sessions only, and of
    /// the shared groups only those the sender chose this node for.
    Local { groups: &'a [String] },
    /// A message every node receives by itself (Kafka downlink): this node's
    /// sessions, and the shared groups this node is designated for, whose
    /// member may be on any node.
    Designated { owns: &'a dyn Fn(&str) -> bool },
}

#[derive(Debug, Default)]
struct Node {
    children: FastMap<Box<str>, Node>,
    subs: FastMap<ClientId, SubOptions>,
    groups: FastMap<Box<str>, Group>,
}

#[derive(Debug, Default)]
struct Group {
    /// `$share/<group>/<filter>`.
    name: Arc<str>,
    members: Vec<(ClientId, SubOptions)>,
    next: AtomicUsize,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.subs.is_empty() && self.groups.is_empty()
    }

    /// `levels`: the topic levels below this node, as an iterator rather
    /// than a collected list (no allocation per routed message).
    fn collect(&self, mut levels: Levels<'_>, q: &Query<'_>, out: &mut Vec<Route>) {
        let Some(level) = levels.next() else {
            self.emit(q, out);
            // "a/#" also matches "a".
            if let Some(hash) = self.children.get("#") {
                hash.emit(q, out);
            }
            return;
        };
        if let Some(hash) = self.children.get("#") {
            hash.emit(q, out);
        }
        if let Some(plus) = self.children.get("+") {
            plus.collect(levels.clone(), q, out);
        }
        if let Some(child) = self.children.get(level) {
            child.collect(levels, q, out);
        }
    }

    fn emit(&self, q: &Query<'_>, out: &mut Vec<Route>) {
        let local_subs = !matches!(q.scope, Scope::All);
        let local_only = matches!(q.scope, Scope::Local { .. });
        out.extend(
            self.subs
                .iter()
                .filter(|(client, _)| !local_subs || route_node(client).is_none())
                .map(|(client, opts)| Route {
                    client: client.clone(),
                    opts: *opts,
                    group: None,
                }),
        );
        for group in self.groups.values() {
            let wanted = match q.scope {
                Scope::All => true,
                Scope::Local { groups } => groups.iter().any(|g| **g == *group.name),
                Scope::Designated { owns } => owns(&group.name),
            };
            if !wanted {
                continue;
            }
            if let Some((client, opts)) = group.pick(q.is_online, local_only) {
                out.push(Route {
                    client: client.clone(),
                    opts: *opts,
                    group: Some(group.name.clone()),
                });
            }
        }
    }
}

impl std::fmt::Debug for Scope<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::All => f.write_str("All"),
            Scope::Local { groups } => f.debug_struct("Local").field("groups", groups).finish(),
            Scope::Designated { .. } => f.write_str("Designated"),
        }
    }
}

/// The levels of a topic, in order.
type Levels<'a> = std::str::Split<'a, [char; 1]>;

/// One lookup's parameters.
struct Query<'a> {
    is_online: &'a dyn Fn(&ClientId) -> bool,
    scope: Scope<'a>,
}

impl Group {
    /// Round robin over the members (this node's only, if `local_only`),
    /// skipping offline ones while any is online.
    fn pick(
        &self,
        is_online: &dyn Fn(&ClientId) -> bool,
        local_only: bool,
    ) -> Option<&(ClientId, SubOptions)> {
        let n = self.members.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let allowed = |c: &ClientId| !local_only || route_node(c).is_none();
        (0..n)
            .map(|i| &self.members[(start + i) % n])
            .find(|(c, _)| allowed(c) && is_online(c))
            .or_else(|| {
                (0..n)
                    .map(|i| &self.members[(start + i) % n])
                    .find(|(c, _)| allowed(c))
            })
    }
}

/// The routing table of this node.
#[derive(Debug)]
pub struct Router {
    shards: Vec<RwLock<Node>>,
    wild: RwLock<Node>,
    /// Distinct filters with at least one subscriber, local or on another
    /// node: the instance's topic count.
    filters: std::sync::atomic::AtomicUsize,
    hasher: foldhash::fast::RandomState,
}

impl Default for Router {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
            wild: RwLock::default(),
            filters: std::sync::atomic::AtomicUsize::new(0),
            hasher: foldhash::fast::RandomState::default(),
        }
    }
}

impl Router {
    fn shard_of(&self, first_level: &str) -> usize {
        // The modulo keeps the value below SHARDS, so the cast cannot truncate.
        (self.hasher.hash_one(first_level) % SHARDS as u64) as usize
    }

    fn shard_for_filter(&self, filter: &str) -> &RwLock<Node> {
        let first = filter.split('/').next().unwrap_or(filter);
        if first == "+" || first == "#" {
            &self.wild
        } else {
            &self.shards[self.shard_of(first)]
        }
    }

    /// Adds or replaces a subscription; returns true if it is new.
    pub fn subscribe(&self, client: &ClientId, filter: &Filter<'_>, opts: SubOptions) -> bool {
        let shard = self.shard_for_filter(filter.filter);
        let mut root = shard.write().unwrap_or_else(|e| e.into_inner());
        let mut node = &mut *root;
        for level in filter.filter.split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        if node.subs.is_empty() && node.groups.is_empty() {
            self.filters
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        match filter.share_group {
            None => node.subs.insert(client.clone(), opts).is_none(),
            Some(group) => {
                let g = node.groups.entry(group.into()).or_insert_with(|| Group {
                    name: Arc::from(format!("$share/{group}/{}", filter.filter)),
                    ..Group::default()
                });
                match g.members.iter_mut().find(|(c, _)| c == client) {
                    Some(member) => {
                        member.1 = opts;
                        false
                    }
                    None => {
                        g.members.push((client.clone(), opts));
                        true
                    }
                }
            }
        }
    }

    /// Removes a subscription; returns true if it existed.
    pub fn unsubscribe(&self, client: &ClientId, filter: &Filter<'_>) -> bool {
        let shard = self.shard_for_filter(filter.filter);
        let mut root = shard.write().unwrap_or_else(|e| e.into_inner());
        let levels: Vec<&str> = filter.filter.split('/').collect();
        let mut emptied = false;
        let removed = remove(&mut root, &levels, filter.share_group, client, &mut emptied);
        if emptied {
            self.filters
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
        removed
    }

    /// Distinct filters with a subscriber (see `filters`).
    pub fn distinct_filters(&self) -> usize {
        self.filters.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Appends the routes for a topic to `out`; one member per shared group.
    pub fn route(
        &self,
        topic: &str,
        is_online: &dyn Fn(&ClientId) -> bool,
        scope: Scope<'_>,
        out: &mut Vec<Route>,
    ) {
        let q = Query { is_online, scope };
        let mut levels = topic.split(SEPARATOR);
        let first = levels.next().unwrap_or("");
        {
            let shard = self.shards[self.shard_of(first)]
                .read()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(child) = shard.children.get(first) {
                child.collect(levels, &q, out);
            }
        }
        // Wildcards at the first level do not match `$` topics (MQTT-4.7.2-1).
        if !topic.starts_with('$') {
            let wild = self.wild.read().unwrap_or_else(|e| e.into_inner());
            wild.collect(topic.split(SEPARATOR), &q, out);
        }
    }
}

/// Removes a subscription; `emptied` tells whether the filter lost its last
/// subscriber.
fn remove(
    node: &mut Node,
    levels: &[&str],
    group: Option<&str>,
    client: &ClientId,
    emptied: &mut bool,
) -> bool {
    let Some((level, rest)) = levels.split_first() else {
        let removed = match group {
            None => node.subs.remove(client).is_some(),
            Some(g) => {
                let Some(grp) = node.groups.get_mut(g) else {
                    return false;
                };
                let before = grp.members.len();
                grp.members.retain(|(c, _)| c != client);
                let removed = grp.members.len() != before;
                if grp.members.is_empty() {
                    node.groups.remove(g);
                }
                removed
            }
        };
        *emptied = removed && node.subs.is_empty() && node.groups.is_empty();
        return removed;
    };
    let Some(child) = node.children.get_mut(*level) else {
        return false;
    };
    let removed = remove(child, rest, group, client, emptied);
    if child.is_empty() {
        node.children.remove(*level);
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::parse_filter;

    fn opts(qos: QoS) -> SubOptions {
        SubOptions::at(qos)
    }

    fn clients(r: &Router, topic: &str) -> Vec<String> {
        let mut out = Vec::new();
        r.route(topic, &|_| true, Scope::All, &mut out);
        let mut v: Vec<String> = out.iter().map(|r| r.client.to_string()).collect();
        v.sort();
        v
    }

    #[test]
    fn routes_follow_wildcards() {
        let r = Router::default();
        let sub = |c: &str, f: &str| {
            let f = parse_filter(f, 64, false).unwrap_or_else(|e| panic!("{e}"));
            r.subscribe(&Arc::from(c), &f, opts(QoS::AtLeastOnce))
        };
        assert!(sub("a", "t/+/x"));
        assert!(sub("b", "t/#"));
        assert!(sub("c", "#"));
        assert!(sub("d", "+/y/x"));
        assert!(sub("e", "$SYS/#"));
        assert!(!sub("a", "t/+/x"));
        assert_eq!(clients(&r, "t/y/x"), ["a", "b", "c", "d"]);
        assert_eq!(clients(&r, "t"), ["b", "c"]);
        assert_eq!(clients(&r, "$SYS/a"), ["e"]);
        assert_eq!(clients(&r, "u"), ["c"]);
        let f = parse_filter("t/#", 64, false).unwrap_or_else(|e| panic!("{e}"));
        assert!(r.unsubscribe(&Arc::from("b"), &f));
        assert!(!r.unsubscribe(&Arc::from("b"), &f));
        assert_eq!(clients(&r, "t/y/x"), ["a", "c", "d"]);
    }

    #[test]
    fn shared_group_delivers_to_one_online_member() {
        let r = Router::default();
        let f = parse_filter("$share/g/s/+", 64, false).unwrap_or_else(|e| panic!("{e}"));
        for c in ["m1", "m2", "m3"] {
            r.subscribe(&Arc::from(c), &f, opts(QoS::AtMostOnce));
        }
        let mut seen = Vec::new();
        for _ in 0..6 {
            let mut out = Vec::new();
            r.route("s/1", &|c| &**c != "m2", Scope::All, &mut out);
            assert_eq!(out.len(), 1);
            seen.push(out[0].client.to_string());
        }
        assert!(seen.contains(&"m1".to_string()));
        assert!(seen.contains(&"m3".to_string()));
        assert!(!seen.contains(&"m2".to_string()));
    }

    #[test]
    fn local_scope_skips_other_nodes_and_unchosen_groups() {
        let r = Router::default();
        let sub = |c: &ClientId, f: &str| {
            let f = parse_filter(f, 64, false).unwrap_or_else(|e| panic!("{e}"));
            r.subscribe(c, &f, opts(QoS::AtLeastOnce));
        };
        let n2 = node_route("n2");
        sub(&Arc::from("local"), "a/+");
        sub(&n2, "a/+");
        sub(&Arc::from("m1"), "$share/g/a/#");
        sub(&n2, "$share/g/a/#");
        sub(&Arc::from("h1"), "$share/h/a/#");
        let mut all = Vec::new();
        for _ in 0..4 {
            r.route("a/b", &|_| true, Scope::All, &mut all);
        }
        // Everywhere: the group g alternates between m1 and node n2.
        assert!(all.iter().any(|r| r.client == n2 && r.group.is_some()));
        assert!(all.iter().any(|r| &*r.client == "m1"));
        let chosen = ["$share/g/a/#".to_string()];
        for _ in 0..4 {
            let mut local = Vec::new();
            r.route(
                "a/b",
                &|_| true,
                Scope::Local { groups: &chosen },
                &mut local,
            );
            let mut names: Vec<String> = local.iter().map(|r| r.client.to_string()).collect();
            names.sort();
            assert_eq!(names, ["local", "m1"]);
        }
        assert_eq!(route_node(&n2), Some("n2"));
        assert_eq!(route_node("n2"), None);
    }
}
