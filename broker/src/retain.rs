//! Retained messages: the last retained message of every topic.
//!
//! A new subscription receives every retained message its filter matches
//! (MQTT-3.3.1-9), however many there are. They are not copied into the
//! subscriber's queue at once, where its limit would drop all but the first
//! thousand: a `Replay` is a cursor over the topics in order, and the
//! subscriber's pump takes a page at a time as the client's window and
//! credit allow. A replay costs a few dozen bytes whatever it covers, and
//! it shows only messages retained before the subscription: later ones
//! reach the subscriber as ordinary publishes.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, RwLock};

use ntex::util::ByteString;

use crate::durable::{NoStore, Pending, Store};
use crate::message::Message;
use crate::topic;

/// A topic as a key in topic order.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Key(ByteString);

impl Ord for Key {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.as_ref().cmp(other.0.as_ref())
    }
}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl std::borrow::Borrow<str> for Key {
    fn borrow(&self) -> &str {
        self.0.as_ref()
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// Each message with the sequence number of the change that stored it.
    messages: BTreeMap<Key, (u64, Arc<Message>)>,
    /// Number of the last change.
    seq: u64,
}

/// Retained messages of this node, by topic.
#[derive(Debug)]
pub struct RetainStore {
    inner: RwLock<Inner>,
    /// Each change is written to the store under the write lock, so the
    /// disk sees a topic's changes in the order memory did.
    persist: Arc<dyn Store>,
}

/// Where a subscription's replay of retained messages stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    filter: String,
    /// Topics start with this (the filter's levels before its first wildcard).
    prefix: String,
    /// Only messages stored up to this change are replayed.
    upto: u64,
    /// The last topic looked at.
    after: Option<String>,
}

/// Topics a page looks at, at most, while it holds the read lock: a filter
/// that matches few of many topics returns short pages rather than holding
/// the store (and the subscriber's session) for a whole scan.
pub const PAGE_SCAN: usize = 4096;

impl Replay {
    /// The subscription's filter.
    pub fn filter(&self) -> &str {
        &self.filter
    }

    /// The last topic paged (the replay goes on after it).
    pub fn after(&self) -> Option<&str> {
        self.after.as_deref()
    }
}

/// What a page of a replay found.
#[derive(Debug, Default)]
pub struct Page {
    pub messages: Vec<Arc<Message>>,
    /// Nothing more to replay.
    pub done: bool,
}

impl RetainStore {
    /// Stores a retained message; an empty payload clears the topic. Returns
    /// the number of retained messages held afterwards.
    pub fn set(&self, msg: &Arc<Message>, pending: Option<&mut Pending>) -> usize {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        self.persist.retain(msg, pending);
        inner.apply(msg)
    }

    /// A copy from another node: stored unless this node holds a newer
    /// message for the topic (the last publish wins, by its time).
    pub fn set_if_newer(&self, msg: &Arc<Message>) -> usize {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        if inner
            .messages
            .get(msg.topic.as_ref() as &str)
            .is_some_and(|(_, m)| m.ts_ms > msg.ts_ms)
        {
            return inner.messages.len();
        }
        self.persist.retain(msg, None);
        inner.apply(msg)
    }

    /// Retained messages kept in memory only.
    pub fn in_memory() -> Self {
        Self::new(Arc::new(NoStore))
    }

    /// Retained messages kept through `persist`.
    pub fn new(persist: Arc<dyn Store>) -> Self {
        Self {
            inner: RwLock::default(),
            persist,
        }
    }

    /// A message read back from the store (not written again). One that
    /// arrived meanwhile (a store opened late, a peer's copy) is newer and stays.
    pub fn restore(&self, msg: &Arc<Message>) -> usize {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        if inner
            .messages
            .get(msg.topic.as_ref() as &str)
            .is_some_and(|(_, m)| m.ts_ms >= msg.ts_ms)
        {
            return inner.messages.len();
        }
        inner.apply(msg)
    }

    /// Starts a replay of the retained messages matching a (non-shared)
    /// filter, as they are now.
    pub fn replay(&self, filter: &str) -> Replay {
        let upto = self.inner.read().unwrap_or_else(|e| e.into_inner()).seq;
        let prefix = filter
            .split('/')
            .take_while(|l| *l != "+" && *l != "#")
            .collect::<Vec<_>>()
            .join("/");
        Replay {
            filter: filter.to_owned(),
            prefix,
            upto,
            after: None,
        }
    }

    /// A replay read back from the store: it goes on after topic `after`,
    /// through the retained messages as they are now.
    pub fn resume(&self, filter: &str, after: Option<String>) -> Replay {
        Replay {
            after,
            ..self.replay(filter)
        }
    }

    /// The next at most `max` messages of a replay, in topic order.
    pub fn page(&self, replay: &mut Replay, max: usize) -> Page {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let from = match &replay.after {
            Some(t) => Bound::Excluded(t.as_str()),
            None => Bound::Included(replay.prefix.as_str()),
        };
        let mut page = Page::default();
        let mut scanned = 0;
        let mut last = None;
        let mut range = inner
            .messages
            .range::<str, _>((from, Bound::Unbounded))
            .take_while(|(k, _)| k.0.starts_with(replay.prefix.as_str()));
        loop {
            if page.messages.len() >= max || scanned >= PAGE_SCAN {
                break;
            }
            let Some((k, (seq, m))) = range.next() else {
                page.done = true;
                break;
            };
            scanned += 1;
            last = Some(k);
            if *seq <= replay.upto && topic::matches(&replay.filter, &k.0) {
                page.messages.push(m.clone());
            }
        }
        if let Some(k) = last {
            replay.after = Some(k.0.to_string());
        }
        page
    }

    /// Retained messages whose topic matches a (non-shared) filter.
    pub fn matching(&self, filter: &str) -> Vec<Arc<Message>> {
        let mut replay = self.replay(filter);
        let mut all = Vec::new();
        loop {
            let page = self.page(&mut replay, usize::MAX);
            all.extend(page.messages);
            if page.done {
                return all;
            }
        }
    }

    pub fn len(&self) -> usize {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .messages
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Inner {
    fn apply(&mut self, msg: &Arc<Message>) -> usize {
        self.seq += 1;
        if msg.payload.is_empty() {
            self.messages.remove(msg.topic.as_ref() as &str);
        } else {
            self.messages
                .insert(Key(msg.topic.clone()), (self.seq, msg.clone()));
        }
        self.messages.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::QoS;

    fn msg(topic: &str, payload: &str) -> Arc<Message> {
        Arc::new(Message::new(
            crate::message::MessageId(1),
            ByteString::from(topic),
            ntex::util::Bytes::from(payload.to_owned()),
            QoS::AtLeastOnce,
            true,
            Arc::from("pub"),
        ))
    }

    fn topics(page: &Page) -> Vec<String> {
        page.messages.iter().map(|m| m.topic.to_string()).collect()
    }

    #[test]
    fn a_replay_pages_through_every_match_in_topic_order() {
        let s = RetainStore::in_memory();
        for i in 0..10_000 {
            s.set(&msg(&format!("rq/{i:05}"), "x"), None);
        }
        s.set(&msg("rq", "parent"), None);
        s.set(&msg("rqx/1", "not under rq/"), None);
        s.set(&msg("other/1", "x"), None);
        let mut r = s.replay("rq/#");
        let mut seen = Vec::new();
        loop {
            let page = s.page(&mut r, 64);
            assert!(page.messages.len() <= 64);
            seen.extend(topics(&page));
            if page.done {
                break;
            }
        }
        assert_eq!(seen.len(), 10_001, "rq itself and its 10 000 subtopics");
        assert_eq!(seen[0], "rq");
        assert!(seen.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn messages_retained_after_the_subscription_are_not_replayed() {
        let s = RetainStore::in_memory();
        s.set(&msg("a/1", "old"), None);
        s.set(&msg("a/3", "old"), None);
        let mut r = s.replay("a/+");
        s.set(&msg("a/2", "new"), None);
        s.set(&msg("a/3", "newer"), None);
        s.set(&msg("a/1", ""), None);
        let page = s.page(&mut r, 100);
        assert!(page.done);
        assert!(topics(&page).is_empty(), "{:?}", topics(&page));
        let mut r = s.replay("a/+");
        assert_eq!(topics(&s.page(&mut r, 100)), ["a/2", "a/3"]);
    }

    #[test]
    fn a_sparse_filter_scans_a_bounded_number_of_topics_per_page() {
        let s = RetainStore::in_memory();
        for i in 0..(3 * PAGE_SCAN) {
            s.set(&msg(&format!("t/{i:06}/x"), "x"), None);
        }
        s.set(&msg("t/zzzzzz/y", "x"), None);
        let mut r = s.replay("t/+/y");
        let mut pages = 0;
        let mut found = Vec::new();
        loop {
            let page = s.page(&mut r, 64);
            pages += 1;
            found.extend(topics(&page));
            if page.done {
                break;
            }
        }
        assert_eq!(found, ["t/zzzzzz/y"]);
        assert!(pages >= 3, "{pages} pages");
    }

    #[test]
    fn wildcards_at_the_start_do_not_replay_system_topics() {
        let s = RetainStore::in_memory();
        s.set(&msg("$SYS/x", "x"), None);
        s.set(&msg("a", "x"), None);
        assert_eq!(s.matching("#").len(), 1);
        assert_eq!(s.matching("$SYS/#").len(), 1);
        assert_eq!(s.matching("a").len(), 1);
        assert_eq!(s.matching("b").len(), 0);
    }
}
