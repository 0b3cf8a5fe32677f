//! Replicated sessions (D2): each persistent session's durable state is
//! kept by its ring owner and by the next `replication_factor - 1` distinct
//! nodes of the ring, so that a node lost without warning loses no session
//! and no acknowledged message.
//!
//! - Owner side: `Replicated` wraps the node's store (`durable::Store`):
//!   every change it is given also goes, as a `durable::Change`, to the
//!   session's replicas through `peers::Peers::replicate`, on the link's
//!   ordered data queue, and what waits for the local write (a PUBACK, a
//!   SUBACK) waits for the replicas too.
//! - Replica side: `Replicas` holds the copies this node keeps for others,
//!   in memory, sharded by Client ID. A copy counts as kept once it is
//!   applied here; the link then acknowledges it to the owner.
//! - Failover: the ring's successor of a lost owner is its first replica;
//!   `Replicas::promotable` hands the broker the copies whose owner is gone
//!   and which this node now owns, and the broker serves them as sessions
//!   read back from a store (`Broker::restore`).

use std::collections::BTreeMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, PoisonError};

use crate::durable::{Change, Pending, RecoveredSession, SessionRecord, Store};
use crate::message::{Delivery, Message};
use crate::peers::Peers;
use crate::ring::Ring;
use crate::util::FastMap;

/// Who keeps a replica of which session: the ring and the factor.
#[derive(Debug)]
pub struct Replication {
    peers: Arc<dyn Peers>,
    factor: usize,
}

impl Replication {
    /// `factor`: how many nodes keep each session, the owner included (at
    /// least 2: with 1 there is nothing to replicate).
    pub fn new(peers: Arc<dyn Peers>, factor: usize) -> Arc<Self> {
        Arc::new(Self {
            peers,
            factor: factor.max(2),
        })
    }

    /// The nodes besides this one that keep a replica of `client`'s
    /// session on `ring`: the next distinct nodes clockwise, the ones that
    /// would own it if the nodes before them left.
    pub fn replicas_of(&self, ring: &Ring, client: &str) -> Vec<Arc<str>> {
        ring.successors(client, self.factor + 1)
            .into_iter()
            .filter(|n| !self.peers.is_local(n))
            .take(self.factor - 1)
            .cloned()
            .collect()
    }

    /// How many nodes keep each session, the owner included.
    pub fn factor(&self) -> usize {
        self.factor
    }

    /// Sends `change` to the replicas of `client`'s session; `pending`
    /// waits for each replica that has a link.
    fn send(&self, client: &str, change: Change, mut pending: Option<&mut Pending>) {
        let nodes = self.replicas_of(&self.peers.ring(), client);
        let mut change = Some(change);
        for (i, node) in nodes.iter().enumerate() {
            let c = if i + 1 == nodes.len() {
                change.take()
            } else {
                change.clone()
            };
            if let Some(c) = c {
                self.peers
                    .replicate(node, client, c, pending.as_deref_mut());
            }
        }
    }

    /// Sends a session whole to one replica: its record, then every
    /// message its store holds. Called under the session's lock, so that
    /// it is in order with the session's other changes.
    pub fn send_whole<'a>(
        &self,
        node: &str,
        client: &str,
        record: SessionRecord,
        messages: impl Iterator<Item = &'a Delivery>,
    ) {
        self.peers
            .replicate(node, client, Change::Reset(record), None);
        for d in messages {
            self.peers
                .replicate(node, client, Change::Queue(d.clone()), None);
        }
    }

    /// Tells `node` that every session this node owns and `node` keeps a
    /// replica of went out whole on `stream`.
    pub async fn synced(&self, node: &str, stream: u64) {
        let msg = crate::peers::PeerMsg::Synced { stream };
        self.peers.send(node, msg, self.peers.heartbeat() * 4).await;
    }
}

/// The node's store with replication in front: what the store is given,
/// the session's replicas are given too.
#[derive(Debug)]
pub struct Replicated {
    local: Arc<dyn Store>,
    replication: Arc<Replication>,
}

impl Replicated {
    pub fn new(local: Arc<dyn Store>, replication: Arc<Replication>) -> Self {
        Self { local, replication }
    }
}

impl Replicated {
    /// Every peer but `except` forgets its copy of `client`'s session (a
    /// forget for a copy a peer does not hold costs nothing).
    fn forget_at_peers(&self, client: &Arc<str>, except: &str) {
        for node in self.replication.peers.members() {
            if *node != *except {
                self.replication
                    .peers
                    .replicate(&node, client, Change::Forget, None);
            }
        }
    }
}

impl Store for Replicated {
    /// Kept beyond the process: on the replicas, even when this node keeps
    /// nothing on disk.
    fn is_durable(&self) -> bool {
        true
    }

    fn is_healthy(&self) -> bool {
        self.local.is_healthy()
    }

    fn session(
        &self,
        client: &Arc<str>,
        record: &SessionRecord,
        mut pending: Option<&mut Pending>,
    ) {
        self.local.session(client, record, pending.as_deref_mut());
        self.replication
            .send(client, Change::Record(record.clone()), pending);
    }

    fn forget(&self, client: &Arc<str>) {
        // Every peer: a node that kept it under an earlier ring drops it too
        // (a forget for a copy it does not hold costs nothing).
        self.forget_moved(client, "");
    }

    fn forget_moved(&self, client: &Arc<str>, to: &str) {
        self.local.forget(client);
        self.forget_at_peers(client, to);
    }

    fn clean_will(&self, client: &Arc<str>, record: Option<&SessionRecord>) {
        match record {
            // Whole: it replaces whatever copy a replica holds of the
            // Client ID, whoever sent that.
            Some(r) => self
                .replication
                .send(client, Change::Reset(r.clone()), None),
            // Every peer: the ring may have changed since the will went
            // out (a join moves the connection away, without its will),
            // and a copy left on a former replica would be published when
            // this node is lost.
            None => self.forget_at_peers(client, ""),
        }
    }

    fn reset(&self, client: &Arc<str>, record: &SessionRecord, mut pending: Option<&mut Pending>) {
        self.local.reset(client, record, pending.as_deref_mut());
        self.replication
            .send(client, Change::Reset(record.clone()), pending);
    }

    fn queue(
        &self,
        client: &str,
        seq: u64,
        delivery: &Delivery,
        mut pending: Option<&mut Pending>,
    ) {
        self.local
            .queue(client, seq, delivery, pending.as_deref_mut());
        let mut d = delivery.clone();
        d.seq = seq;
        self.replication.send(client, Change::Queue(d), pending);
    }

    fn unqueue(&self, client: &str, seq: u64) {
        self.local.unqueue(client, seq);
        if seq != 0 {
            self.replication.send(client, Change::Unqueue(seq), None);
        }
    }

    fn retain(&self, msg: &Message, pending: Option<&mut Pending>) {
        // Every node holds every retained message already (cluster `Retain`).
        self.local.retain(msg, pending);
    }

    fn measure(&self) {
        self.local.measure();
    }
}

/// Whether this node (`is_local`) keeps the copy of `client`'s session
/// that `from` sent, on `ring` with `factor` copies of each session. It
/// drops it only when `from` owns the Client ID still and this node is not
/// among its replicas any more (`from` sends the session whole to those).
/// Kept besides a replica's: the copy of a session moving away from its
/// live owner, until the owner says the new one keeps it
/// (`Store::forget_moved`) — were the owner lost first, it is what is left
/// of the session — and a lost owner's, which the ring pass that follows
/// serves here or sends to the Client ID's owner
/// (`Broker::orphaned_copies`). A clean connection's will kept so goes
/// with the forget its node sends every peer when the connection ends.
pub fn keeps_copy(
    ring: &Ring,
    factor: usize,
    client: &str,
    from: &str,
    is_local: impl Fn(&str) -> bool,
) -> bool {
    ring.owner(client).is_none_or(|o| **o != *from)
        || ring.successors(client, factor).iter().any(|n| is_local(n))
}

/// What a session handed over without its messages is checked by
/// (`peers::Handover::copy`): each stored message's number, message id,
/// packet id and QoS, in number order. The owner's digest of its session
/// and the replica's of its copy are equal when the copy holds what the
/// owner holds; the DUP flag is left out (advisory, and a client's leave
/// sets it in the owner's memory first).
pub fn digest<'a>(messages: impl Iterator<Item = &'a Delivery>) -> u64 {
    let mut keys: Vec<(u64, u64, u16, u8)> = messages
        .map(|d| {
            let packet_id = d.packet_id().map_or(0, std::num::NonZeroU16::get);
            (d.seq, d.msg.id.0, packet_id, d.qos as u8)
        })
        .collect();
    keys.sort_unstable();
    let mut bytes = Vec::with_capacity(keys.len() * 19);
    for (seq, id, packet_id, qos) in keys {
        bytes.extend(seq.to_be_bytes());
        bytes.extend(id.to_be_bytes());
        bytes.extend(packet_id.to_be_bytes());
        bytes.push(qos);
    }
    crate::ring::hash(&bytes)
}

/// The copy of one session kept for its owner.
#[derive(Debug)]
struct Held {
    /// The owner that sent it, and on which of its link's streams.
    from: Arc<str>,
    stream: u64,
    /// `None` until the record arrives (messages may come first when this
    /// node just became a replica); such a copy is never promoted.
    record: Option<SessionRecord>,
    messages: BTreeMap<u64, Delivery>,
}

impl Held {
    fn new(from: &Arc<str>, stream: u64) -> Self {
        Self {
            from: from.clone(),
            stream,
            record: None,
            messages: BTreeMap::new(),
        }
    }

    /// The copy as a session read back from a store (messages in sequence
    /// order); `None` without its record.
    fn recovered(self, client: Arc<str>) -> Option<RecoveredSession> {
        Some(RecoveredSession {
            client,
            record: self.record?,
            messages: self.messages.into_values().collect(),
        })
    }
}

const SHARDS: usize = 16;

/// The replicas this node keeps for other nodes' sessions.
#[derive(Debug)]
pub struct Replicas {
    shards: Vec<Mutex<FastMap<Arc<str>, Held>>>,
    hasher: foldhash::fast::RandomState,
}

impl Default for Replicas {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: foldhash::fast::RandomState::default(),
        }
    }
}

/// What `Replicas::count` found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Kept {
    pub sessions: usize,
    pub messages: usize,
    /// Copies of clean sessions' connections, each holding its will.
    pub wills: usize,
}

impl Replicas {
    fn shard(&self, client: &str) -> std::sync::MutexGuard<'_, FastMap<Arc<str>, Held>> {
        // The modulo keeps the value below SHARDS, so the cast cannot truncate.
        let i = (self.hasher.hash_one(client) % SHARDS as u64) as usize;
        // A copy holds no invariant a panic could break.
        self.shards[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn each_shard(
        &self,
    ) -> impl Iterator<Item = std::sync::MutexGuard<'_, FastMap<Arc<str>, Held>>> {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Applies a change `from` sent on its replication stream `stream`.
    /// A change from a node other than the one whose copy is held is from
    /// an earlier owner, late: only a whole session (`Reset`) replaces a
    /// copy, so a late change never mixes into the newer owner's.
    pub fn apply(&self, from: &Arc<str>, stream: u64, client: &str, change: Change) {
        let mut shard = self.shard(client);
        if let Change::Reset(record) = change {
            let mut held = Held::new(from, stream);
            held.record = Some(record);
            shard.insert(Arc::from(client), held);
            return;
        }
        let held = match shard.get_mut(client) {
            Some(h) if h.from == *from => h,
            Some(_) => return,
            None if matches!(change, Change::Forget | Change::Unqueue(_)) => return,
            None => shard
                .entry(Arc::from(client))
                .or_insert_with(|| Held::new(from, stream)),
        };
        held.stream = stream;
        match change {
            Change::Record(r) => held.record = Some(r),
            Change::Queue(d) => {
                held.messages.insert(d.seq, d);
            }
            Change::Unqueue(seq) => {
                held.messages.remove(&seq);
            }
            Change::Forget => {
                shard.remove(client);
            }
            Change::Reset(_) => {}
        }
    }

    /// `from` sent every session it owns and this node keeps whole on
    /// `stream`: its copies the stream did not refresh were forgotten
    /// while the link was down.
    pub fn synced(&self, from: &str, stream: u64) {
        for mut shard in self.each_shard() {
            shard.retain(|_, h| &*h.from != from || h.stream == stream);
        }
    }

    /// Drops the copy of `client` (its session is here now).
    pub fn drop_copy(&self, client: &str) {
        self.shard(client).remove(client);
    }

    /// Takes the copies `promote(client, from)` picks, as sessions read
    /// back from a store (messages in sequence order). Copies without a
    /// record are left.
    pub fn promotable(&self, mut promote: impl FnMut(&str, &str) -> bool) -> Vec<RecoveredSession> {
        let mut out = Vec::new();
        for mut shard in self.each_shard() {
            let picked: Vec<Arc<str>> = shard
                .iter()
                .filter(|(c, h)| h.record.is_some() && promote(c, &h.from))
                .map(|(c, _)| c.clone())
                .collect();
            for client in picked {
                if let Some(rs) = shard.remove(&client).and_then(|h| h.recovered(client)) {
                    out.push(rs);
                }
            }
        }
        out
    }

    /// Takes the copy of `client` if `promote(from, record)` picks it, as
    /// `promotable` does (one lookup: a CONNECT asks this).
    pub fn take_one(
        &self,
        client: &str,
        promote: impl FnOnce(&str, &SessionRecord) -> bool,
    ) -> Option<RecoveredSession> {
        let mut shard = self.shard(client);
        let h = shard.get(client)?;
        let Some(record) = &h.record else {
            return None;
        };
        if !promote(&h.from, record) {
            return None;
        }
        let (client, h) = shard.remove_entry(client)?;
        h.recovered(client)
    }

    /// Takes the messages of the copy of `client` that `from` sent, if
    /// their digest is `expected` (`digest`); a copy that differs stays.
    pub fn take_matching(&self, client: &str, from: &str, expected: u64) -> Option<Vec<Delivery>> {
        let mut shard = self.shard(client);
        let h = shard.get(client)?;
        if *h.from != *from || h.record.is_none() || digest(h.messages.values()) != expected {
            return None;
        }
        shard
            .remove(client)
            .map(|h| h.messages.into_values().collect())
    }

    /// Keeps only the copies `keep(client, from)` says this node should
    /// still keep.
    pub fn retain(&self, mut keep: impl FnMut(&str, &str) -> bool) {
        for mut shard in self.each_shard() {
            shard.retain(|c, h| keep(c, &h.from));
        }
    }

    /// The sessions, messages and clean connections' wills kept.
    pub fn count(&self) -> Kept {
        let mut k = Kept::default();
        for shard in self.each_shard() {
            let wills = shard
                .values()
                .filter(|h| h.record.as_ref().is_some_and(SessionRecord::is_clean))
                .count();
            k.wills += wills;
            k.sessions += shard.len() - wills;
            k.messages += shard.values().map(|h| h.messages.len()).sum::<usize>();
        }
        k
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{MessageId, QoS};

    fn record(expiry_ms: u64) -> SessionRecord {
        SessionRecord {
            expiry_ms,
            disconnected_ms: 1,
            ordered: false,
            qos2_ids: Vec::new(),
            subscriptions: Vec::new(),
            will: None,
            released: Vec::new(),
            replays: Vec::new(),
            epoch: 0,
            armed_will: None,
        }
    }

    fn delivery(seq: u64) -> Delivery {
        let msg = Message::new(
            MessageId(seq),
            "t".into(),
            ntex::util::Bytes::from_static(b"p"),
            QoS::AtLeastOnce,
            false,
            Arc::from("pub"),
        );
        let mut d = Delivery::new(Arc::new(msg), QoS::AtLeastOnce);
        d.seq = seq;
        d
    }

    fn all(r: &Replicas) -> Vec<RecoveredSession> {
        r.promotable(|_, _| true)
    }

    #[test]
    fn changes_build_the_copy_and_acknowledged_messages_leave_it() {
        let (r, a) = (Replicas::default(), Arc::from("a"));
        r.apply(&a, 1, "c", Change::Record(record(5)));
        for seq in 1..=3 {
            r.apply(&a, 1, "c", Change::Queue(delivery(seq)));
        }
        r.apply(&a, 1, "c", Change::Unqueue(2));
        assert_eq!(
            r.count(),
            Kept {
                sessions: 1,
                messages: 2,
                wills: 0
            }
        );
        let got = all(&r);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].record.expiry_ms, 5);
        let seqs: Vec<u64> = got[0].messages.iter().map(|d| d.seq).collect();
        assert_eq!(seqs, [1, 3]);
        assert_eq!(r.count(), Kept::default());
    }

    #[test]
    fn a_late_change_of_an_earlier_owner_does_not_mix_into_the_new_one() {
        let (r, a, b) = (Replicas::default(), Arc::from("a"), Arc::from("b"));
        r.apply(&a, 1, "c", Change::Record(record(1)));
        r.apply(&a, 1, "c", Change::Queue(delivery(7)));
        // b took the session over and sent it whole.
        r.apply(&b, 1, "c", Change::Reset(record(2)));
        r.apply(&b, 1, "c", Change::Queue(delivery(1)));
        // a's last frames arrive late on its own link.
        r.apply(&a, 1, "c", Change::Queue(delivery(8)));
        r.apply(&a, 1, "c", Change::Forget);
        let got = all(&r);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].record.expiry_ms, 2);
        assert_eq!(got[0].messages.len(), 1);
    }

    #[test]
    fn a_new_stream_drops_the_copies_its_owner_did_not_send_again() {
        let (r, a) = (Replicas::default(), Arc::from("a"));
        r.apply(&a, 1, "kept", Change::Record(record(1)));
        r.apply(&a, 1, "ended", Change::Record(record(1)));
        // The link came up again (stream 2): `kept` is sent whole, `ended`
        // ended while the link was down.
        r.apply(&a, 2, "kept", Change::Reset(record(1)));
        r.synced("a", 2);
        let got = all(&r);
        assert_eq!(got.len(), 1);
        assert_eq!(&*got[0].client, "kept");
    }

    #[test]
    fn one_copy_is_taken_by_its_client_id_when_picked() {
        let (r, a) = (Replicas::default(), Arc::from("a"));
        r.apply(&a, 1, "c", Change::Record(record(1)));
        r.apply(&a, 1, "other", Change::Record(record(1)));
        assert!(
            r.take_one("c", |from, _| from == "b").is_none(),
            "not picked"
        );
        assert!(r.take_one("missing", |_, _| true).is_none());
        let got = r.take_one("c", |from, _| from == "a");
        assert_eq!(got.map(|s| s.client), Some(Arc::from("c")));
        assert_eq!(r.count().sessions, 1, "the other copy stays");
    }

    #[test]
    fn a_copy_without_its_record_is_not_promoted() {
        let (r, a) = (Replicas::default(), Arc::from("a"));
        r.apply(&a, 1, "c", Change::Queue(delivery(1)));
        assert!(all(&r).is_empty());
        r.apply(&a, 1, "c", Change::Forget);
        assert_eq!(r.count(), Kept::default());
    }

    #[test]
    fn a_copy_is_taken_for_a_hand_over_only_if_it_holds_what_the_owner_holds() {
        let (r, a) = (Replicas::default(), Arc::from("a"));
        r.apply(&a, 1, "c", Change::Record(record(1)));
        for seq in 1..=3 {
            r.apply(&a, 1, "c", Change::Queue(delivery(seq)));
        }
        let owner: Vec<Delivery> = (1..=3).map(delivery).collect();
        let missing: Vec<Delivery> = (1..=2).map(delivery).collect();
        assert!(
            r.take_matching("c", "a", digest(missing.iter())).is_none(),
            "the owner holds one message fewer"
        );
        let mut sent = delivery(3);
        sent.sent_as = std::num::NonZeroU16::new(9);
        let other_id = [delivery(1), delivery(2), sent];
        assert!(
            r.take_matching("c", "a", digest(other_id.iter())).is_none(),
            "the owner sent one under another packet id"
        );
        assert!(
            r.take_matching("c", "b", digest(owner.iter())).is_none(),
            "a copy from another node"
        );
        assert_eq!(r.count().sessions, 1, "a copy that differs stays");
        // In any order: the owner's lists are not in number order.
        let got = r.take_matching("c", "a", digest(owner.iter().rev()));
        let seqs: Vec<u64> = got.unwrap_or_default().iter().map(|d| d.seq).collect();
        assert_eq!(seqs, [1, 2, 3]);
        assert_eq!(r.count(), Kept::default(), "taken");
    }

    #[test]
    fn a_clean_connections_will_is_counted_apart_and_replaces_an_older_copy() {
        let (r, a, b) = (Replicas::default(), Arc::from("a"), Arc::from("b"));
        r.apply(&a, 1, "c", Change::Record(record(5)));
        r.apply(&a, 1, "c", Change::Queue(delivery(1)));
        // The client came back to `b` with a clean start and a will.
        r.apply(&b, 1, "c", Change::Reset(record(0)));
        assert_eq!(
            r.count(),
            Kept {
                sessions: 0,
                messages: 0,
                wills: 1
            }
        );
        r.apply(&b, 1, "c", Change::Forget);
        assert_eq!(r.count(), Kept::default(), "the connection ended");
    }

    #[test]
    fn a_copy_is_dropped_only_when_its_owner_keeps_the_session_and_has_other_replicas() {
        let ring = Ring::new(["a", "b", "c", "d"]);
        let client = "some-client";
        let order: Vec<Arc<str>> = ring.successors(client, 4).into_iter().cloned().collect();
        let (owner, second, outside) = (&*order[0], &*order[1], &*order[3]);
        let keeps = |node: &str, from: &str| keeps_copy(&ring, 2, client, from, |n| n == node);
        assert!(keeps(second, owner), "the owner's replica");
        assert!(
            !keeps(outside, owner),
            "no longer a replica of a live owner"
        );
        assert!(
            keeps(outside, second),
            "the session moves away from the node that sent the copy"
        );
        assert!(keeps(outside, "gone"), "a lost owner's copy");
    }
}
