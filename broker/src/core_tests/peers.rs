//! The core in a cluster, without a socket or a frame: a fake `Peers` owns
//! the ring and records what the core sends, so routing to other nodes,
//! P2P to a remote owner, retained copies, route announcements, session
//! handover in both directions and backpressure from a full link are
//! checked on the core alone.

use std::num::NonZeroU16;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::{broker_stored, broker_with, msg, queued, subscribe};
use crate::broker::{Broker, PublishError, Publisher};
use crate::config::Config;
use crate::message::{Delivery, QoS};
use crate::peers::{Answered, Handover, PeerMsg, Peers, Sent};
use crate::ring::Ring;
use crate::router::SubOptions;
use crate::storage::OnFull;

const HOUR: Duration = Duration::from_secs(3600);

/// Two nodes, `n0` (the broker under test) and `n1`; what `n0` sends is
/// recorded; `full` makes every link refuse.
#[derive(Debug)]
struct FakePeers {
    ring: Arc<Ring>,
    sent: Mutex<Vec<(String, PeerMsg)>>,
    announced: Mutex<Vec<String>>,
    full: bool,
    /// `Some`: what is sent for an acknowledgement waits for `answer`
    /// (the commits it joined are held here); `None`: acknowledged at once.
    held: Option<Mutex<Vec<Arc<crate::durable::Commit>>>>,
    leaving: bool,
}

impl FakePeers {
    fn new(full: bool) -> Arc<Self> {
        Arc::new(Self {
            ring: Arc::new(Ring::new(["n0", "n1"])),
            sent: Mutex::default(),
            announced: Mutex::default(),
            full,
            held: None,
            leaving: false,
        })
    }

    /// Peers that acknowledge what they are sent only when told (`answer`);
    /// `leaving`: `n0` is leaving the ring.
    fn holding_acks(leaving: bool) -> Arc<Self> {
        Arc::new(Self {
            ring: Arc::new(Ring::new(["n0", "n1"])),
            sent: Mutex::default(),
            announced: Mutex::default(),
            full: false,
            held: Some(Mutex::default()),
            leaving,
        })
    }

    /// The peers answer everything held: kept (`ok`) or refused.
    fn answer(&self, ok: bool) {
        let held = self.held.as_ref().map_or_else(Vec::new, |h| {
            std::mem::take(&mut *h.lock().unwrap_or_else(PoisonError::into_inner))
        });
        for c in held {
            if let Some(m) = c.written(ok) {
                m.ring();
            }
        }
    }

    fn sent(&self) -> Vec<(String, PeerMsg)> {
        self.sent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn record(&self, node: &str, msg: PeerMsg) -> bool {
        if self.full {
            return false;
        }
        self.sent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((node.to_owned(), msg));
        true
    }

    fn announce(&self, what: String) {
        self.announced
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(what);
    }

    /// A Client ID whose session the ring gives to `node`.
    fn client_of(&self, node: &str, prefix: &str) -> String {
        (0..1000)
            .map(|i| format!("{prefix}{i}"))
            .find(|c| self.ring.owner(c).is_some_and(|o| **o == *node))
            .unwrap_or_else(|| panic!("no Client ID of {node}"))
    }
}

impl Peers for FakePeers {
    fn ring(&self) -> Arc<Ring> {
        self.ring.clone()
    }
    fn owner(&self, client_id: &str) -> Arc<str> {
        self.ring
            .owner(client_id)
            .cloned()
            .unwrap_or_else(|| Arc::from("n0"))
    }
    fn is_local(&self, node: &str) -> bool {
        node == "n0"
    }
    fn members(&self) -> Vec<Arc<str>> {
        vec![Arc::from("n1")]
    }
    fn is_settled(&self) -> bool {
        true
    }
    fn is_leaving(&self) -> bool {
        self.leaving
    }
    fn leave(&self) {}
    fn announce_settled(&self) {
        self.announce("settled".into());
    }
    fn forget(&self, _: &str) -> Vec<String> {
        Vec::new()
    }
    fn routes_unlinked(&self) -> bool {
        false
    }
    fn is_linked(&self, _: &str) -> bool {
        true
    }
    fn filter_added(&self, raw: &str) {
        self.announce(format!("+{raw}"));
    }
    fn filter_removed(&self, raw: &str) {
        self.announce(format!("-{raw}"));
    }
    fn try_send(&self, node: &str, msg: PeerMsg) -> bool {
        self.record(node, msg)
    }
    fn send<'a>(&'a self, node: &'a str, msg: PeerMsg, _: Duration) -> Sent<'a> {
        let ok = self.record(node, msg);
        Box::pin(async move { ok })
    }
    fn broadcast(&self, msg: PeerMsg) {
        self.record("*", msg);
    }
    fn ask<'a>(&'a self, _: &'a str, _: String, _: Duration) -> Answered<'a> {
        Box::pin(async { None })
    }
    fn heartbeat(&self) -> Duration {
        // The moved session's routes linger 4 heartbeats: short for tests,
        // long enough for one to act within them.
        Duration::from_millis(100)
    }
    fn replicate(
        &self,
        _: &str,
        _: &str,
        _: crate::durable::Change,
        _: Option<&mut crate::durable::Pending>,
    ) -> bool {
        !self.full
    }
    fn streams(&self) -> Vec<(Arc<str>, u64)> {
        Vec::new()
    }
    fn is_handing_over(&self, _: &str) -> bool {
        false
    }
    fn last_heard(&self, _: &str) -> Option<std::time::Instant> {
        None
    }
    fn room<'a>(&'a self, _: &'a str, _: Duration) -> Sent<'a> {
        Box::pin(async { true })
    }
    fn send_acked<'a>(
        &'a self,
        node: &'a str,
        msg: PeerMsg,
        kept: &mut crate::durable::Pending,
        wait: Duration,
    ) -> Sent<'a> {
        // Unless told to hold, the fake peer is through with what it is
        // sent at once.
        if let Some(held) = &self.held
            && let Some(c) = kept.join()
        {
            held.lock().unwrap_or_else(PoisonError::into_inner).push(c);
        }
        self.send(node, msg, wait)
    }
}

/// A copy of `id`'s session (subscribed to `filter`) of `epoch`, holding
/// one offline message on `topic`, as a lost owner's replica sends it.
fn copy_of(id: &str, filter: &str, b: &Broker, topic: &str, qos: QoS, epoch: u64) -> Handover {
    Handover {
        client_id: id.to_owned(),
        expiry: HOUR,
        ordered: false,
        subscriptions: vec![(filter.into(), SubOptions::at(qos))],
        resend: Vec::new(),
        offline: vec![Delivery::new(msg(b, topic, qos, false, "x"), qos)],
        since: Vec::new(),
        qos2_received: Vec::new(),
        released: Vec::new(),
        will: None,
        epoch,
        from_copy: true,
        copy: None,
    }
}

/// A durable store that records the sessions it keeps and forgets.
#[derive(Debug, Default)]
struct RecordingStore {
    calls: Mutex<Vec<String>>,
}

impl RecordingStore {
    fn calls(&self) -> Vec<String> {
        self.calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn call(&self, what: String) {
        self.calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(what);
    }
}

impl crate::durable::Store for RecordingStore {
    fn is_durable(&self) -> bool {
        true
    }
    fn is_healthy(&self) -> bool {
        true
    }
    fn session(
        &self,
        client: &Arc<str>,
        _: &crate::durable::SessionRecord,
        _: Option<&mut crate::durable::Pending>,
    ) {
        self.call(format!("session {client}"));
    }
    fn forget(&self, client: &Arc<str>) {
        self.call(format!("forget {client}"));
    }
    fn forget_moved(&self, client: &Arc<str>, to: &str) {
        self.call(format!("forget {client} moved to {to}"));
    }
    fn reset(
        &self,
        client: &Arc<str>,
        _: &crate::durable::SessionRecord,
        _: Option<&mut crate::durable::Pending>,
    ) {
        self.call(format!("reset {client}"));
    }
    fn queue(&self, _: &str, _: u64, _: &Delivery, _: Option<&mut crate::durable::Pending>) {}
    fn unqueue(&self, _: &str, _: u64) {}
    fn retain(&self, _: &crate::message::Message, _: Option<&mut crate::durable::Pending>) {}
    fn measure(&self) {}
}

/// `n0` writing to a recording store; `replicated`: its sessions have a
/// replica (on `n1`, which the fake keeps none of).
fn stored_node0(peers: &Arc<FakePeers>, replicated: bool) -> (Arc<Broker>, Arc<RecordingStore>) {
    let store = Arc::new(RecordingStore::default());
    let as_peers = peers.clone() as Arc<dyn Peers>;
    let replication = replicated.then(|| crate::replica::Replication::new(as_peers.clone(), 2));
    let b = broker_stored(
        Config {
            node_id: Some("n0".into()),
            ..Config::default()
        },
        Some(as_peers),
        store.clone(),
        replication,
    );
    (b, store)
}

fn node0(peers: &Arc<FakePeers>) -> Arc<Broker> {
    let config = Config {
        node_id: Some("n0".into()),
        ..Config::default()
    };
    broker_with(config, Some(peers.clone() as Arc<dyn Peers>))
}

#[test]
fn a_publish_matching_another_nodes_subscriptions_is_sent_there_once() {
    let peers = FakePeers::new(false);
    let b = node0(&peers);
    let local = b.attach(&peers.client_of("n0", "l"), true, Duration::ZERO);
    subscribe(&b, &local, "t/#", QoS::AtLeastOnce);
    // n1 announced two overlapping filters and a shared group.
    b.remote_routes(
        "n1",
        &["t/+".into(), "t/#".into(), "$share/g/t/x".into()],
        &[],
    );
    let m = msg(&b, "t/x", QoS::AtLeastOnce, false, "hello");
    b.publish(&m, false);
    assert_eq!(queued(&local), ["t/x"], "the local subscriber has it");
    let sent = peers.sent();
    assert_eq!(sent.len(), 1, "one message for the node: {sent:?}");
    match &sent[0] {
        (node, PeerMsg::Publish { msg, groups }) => {
            assert_eq!(node, "n1");
            assert!(Arc::ptr_eq(msg, &m), "the message itself, not a copy");
            assert_eq!(
                groups,
                &["$share/g/t/x"],
                "the shared subscription it serves"
            );
        }
        other => panic!("{other:?}"),
    }
    // Messages that came from a peer are not sent back out.
    b.publish_forwarded(msg(&b, "t/y", QoS::AtLeastOnce, false, "x"), &[], true);
    assert_eq!(peers.sent().len(), 1);
}

#[test]
fn p2p_to_a_client_another_node_owns_goes_to_the_owner() {
    let peers = FakePeers::new(false);
    let b = node0(&peers);
    let target = peers.client_of("n1", "dev");
    let m = msg(
        &b,
        &format!("app/p2p/{target}"),
        QoS::AtLeastOnce,
        false,
        "x",
    );
    assert_eq!(b.publish(&m, true), 0, "nothing delivered here");
    match &peers.sent()[..] {
        [
            (
                node,
                PeerMsg::Direct {
                    client_id,
                    persistent,
                    qos,
                    ..
                },
            ),
        ] => {
            assert_eq!(node, "n1");
            assert_eq!(client_id, &target);
            assert!(*persistent);
            assert_eq!(*qos, QoS::AtLeastOnce);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_retained_message_is_copied_to_every_node_and_announced_routes_follow_subscriptions() {
    let peers = FakePeers::new(false);
    let b = node0(&peers);
    b.publish(&msg(&b, "r/1", QoS::AtMostOnce, true, "kept"), false);
    assert!(
        matches!(&peers.sent()[..], [(to, PeerMsg::Retain { msg })] if to == "*" && &*msg.topic == "r/1"),
        "{:?}",
        peers.sent()
    );
    let a = b.attach(&peers.client_of("n0", "s"), false, HOUR);
    subscribe(&b, &a, "x/#", QoS::AtLeastOnce);
    subscribe(&b, &a, "x/#", QoS::AtMostOnce);
    assert!(b.unsubscribe(&a.session, "x/#"));
    let announced = peers
        .announced
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    assert_eq!(announced, ["+x/#", "-x/#"], "once each, in order");
}

#[ntex::test]
async fn a_session_the_ring_gives_another_node_is_handed_over_with_its_messages_in_order() {
    let peers = FakePeers::new(false);
    let b = node0(&peers);
    let id = peers.client_of("n1", "moving");
    let s = b.attach(&id, false, HOUR);
    subscribe(&b, &s, "m/#", QoS::AtLeastOnce);
    b.detach(&s.session, s.conn.generation);
    for i in 0..3 {
        b.publish(
            &msg(&b, &format!("m/{i}"), QoS::AtLeastOnce, false, "q"),
            false,
        );
    }
    b.rebalance();
    let deadline = Instant::now() + Duration::from_secs(5);
    while peers.sent().is_empty() && Instant::now() < deadline {
        ntex::time::sleep(Duration::from_millis(5)).await;
    }
    let sent = peers.sent();
    let handover = match &sent[..] {
        [(node, PeerMsg::Session(h))] if node == "n1" => h.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(handover.client_id, id);
    assert_eq!(
        handover.subscriptions,
        [("m/#".to_owned(), SubOptions::at(QoS::AtLeastOnce))]
    );
    let topics: Vec<String> = handover
        .offline
        .iter()
        .map(|d| d.msg.topic.to_string())
        .collect();
    assert_eq!(topics, ["m/0", "m/1", "m/2"], "queued order kept");
    assert!(b.sessions().get(&id).is_none(), "it left this node");
    assert!(
        peers
            .announced
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&"settled".to_owned()),
        "the handover is announced as done"
    );
}

/// Waits while `busy` holds, failing with `what` after 5 s.
async fn wait_while(what: impl std::fmt::Display, busy: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while busy() {
        assert!(Instant::now() < deadline, "{what}");
        ntex::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A persistent session of `id` on `b` (subscribed to `m/#`), offline
/// with one queued message, moved by a ring pass; returns once its
/// `Session` frame went out.
async fn moving(b: &Arc<Broker>, peers: &FakePeers, id: &str) {
    let s = b.attach(id, false, HOUR);
    subscribe(b, &s, "m/#", QoS::AtLeastOnce);
    b.detach(&s.session, s.conn.generation);
    b.publish(&msg(b, "m/0", QoS::AtLeastOnce, false, "q"), false);
    b.rebalance();
    wait_while("the session was not sent", || {
        !peers
            .sent()
            .iter()
            .any(|(_, m)| matches!(m, PeerMsg::Session(_)))
    })
    .await;
}

/// A session moving to its new owner stays in this node's store until the
/// owner says it keeps it: were this node lost with the frame still on its
/// way, its volume would still have the session (and its replicas their
/// copies, `replica::keeps_copy`). Then the store forgets it.
#[ntex::test]
async fn a_moving_session_stays_in_the_store_until_its_new_owner_keeps_it() {
    let peers = FakePeers::holding_acks(false);
    let (b, store) = stored_node0(&peers, false);
    let id = peers.client_of("n1", "moving");
    moving(&b, &peers, &id).await;
    let forgot = |s: &RecordingStore| s.calls().iter().any(|c| c.starts_with("forget"));
    assert!(
        b.sessions().get(&id).is_none(),
        "it left this node's sessions"
    );
    assert!(
        !forgot(&store),
        "kept while on its way: {:?}",
        store.calls()
    );
    peers.answer(true);
    wait_while(format!("never forgotten: {:?}", store.calls()), || {
        !forgot(&store)
    })
    .await;
    assert_eq!(
        store.calls().last().map(String::as_str),
        Some(format!("forget {id} moved to n1").as_str())
    );
}

/// A session whose new owner refuses it is kept here: written whole again
/// (`reset`), never forgotten, and sent again (the ring still gives it to
/// that owner).
#[ntex::test]
async fn a_session_its_new_owner_refuses_stays_in_the_store_and_goes_again() {
    let peers = FakePeers::holding_acks(false);
    let (b, store) = stored_node0(&peers, false);
    let id = peers.client_of("n1", "refused");
    moving(&b, &peers, &id).await;
    peers.answer(false);
    let sessions_sent = || {
        peers
            .sent()
            .iter()
            .filter(|(_, m)| matches!(m, PeerMsg::Session(h) if h.client_id == id))
            .count()
    };
    wait_while("not sent again", || sessions_sent() < 2).await;
    let calls = store.calls();
    assert!(calls.contains(&format!("reset {id}")), "{calls:?}");
    assert!(!calls.iter().any(|c| c.starts_with("forget")), "{calls:?}");
}

/// A client that opens a session here while its old one is on its way
/// (the ring moved back): the store forgets the old one first, so none of
/// its stored messages joins the new one, and the owner's answer later
/// does not forget the new one.
#[ntex::test]
async fn a_session_opened_here_while_the_old_one_travels_is_not_forgotten_with_it() {
    let peers = FakePeers::holding_acks(false);
    let (b, store) = stored_node0(&peers, false);
    let id = peers.client_of("n1", "back");
    moving(&b, &peers, &id).await;
    let before = store.calls().len();
    let again = b.attach(&id, false, HOUR);
    let forget = format!("forget {id} moved to n1");
    let since: Vec<String> = store.calls().split_off(before);
    assert_eq!(since.first(), Some(&forget), "{since:?}");
    assert!(since[1..].contains(&format!("session {id}")), "{since:?}");
    peers.answer(true);
    wait_while("the move did not end", || {
        b.metrics().sessions_moved.get() == 0
    })
    .await;
    let forgets = store.calls().iter().filter(|c| **c == forget).count();
    assert_eq!(forgets, 1, "{:?}", store.calls());
    assert!(again.session.is_online());
}

/// On a planned leave a session goes first without its messages, for the
/// copy its new owner keeps; refused (that copy differs, or is not there),
/// it goes again whole, and is moved once that is kept.
#[ntex::test]
async fn a_light_hand_over_refused_goes_again_whole() {
    let peers = FakePeers::holding_acks(true);
    let (b, _) = stored_node0(&peers, true);
    let id = peers.client_of("n1", "light");
    moving(&b, &peers, &id).await;
    let sessions = || -> Vec<Handover> {
        peers
            .sent()
            .into_iter()
            .filter_map(|(_, m)| match m {
                PeerMsg::Session(h) => Some(h),
                _ => None,
            })
            .collect()
    };
    let light = &sessions()[0];
    assert!(
        light.copy.is_some() && light.offline.is_empty(),
        "{light:?}"
    );
    peers.answer(false);
    wait_while("not sent again", || sessions().len() < 2).await;
    let whole = &sessions()[1];
    assert!(whole.copy.is_none(), "{whole:?}");
    let topics: Vec<String> = whole
        .offline
        .iter()
        .map(|d| d.msg.topic.to_string())
        .collect();
    assert_eq!(topics, ["m/0"]);
    peers.answer(true);
    wait_while("the move did not end", || {
        b.metrics().sessions_moved.get() == 0
    })
    .await;
    assert_eq!(sessions().len(), 2);
}

/// A copy of a session that arrives while this node is moving the same
/// Client ID's session on (a lost owner's replica sent it here, as the
/// owner on the sender's ring) follows the session to its new owner
/// instead of staying here, where nothing would move it on.
#[ntex::test]
async fn a_session_that_arrives_while_its_client_ids_session_moves_on_follows_it() {
    let peers = FakePeers::new(false);
    let b = node0(&peers);
    let id = peers.client_of("n1", "following");
    let s = b.attach(&id, false, HOUR);
    subscribe(&b, &s, "f/#", QoS::AtLeastOnce);
    b.detach(&s.session, s.conn.generation);
    b.rebalance();
    let deadline = Instant::now() + Duration::from_secs(5);
    while peers.sent().is_empty() && Instant::now() < deadline {
        ntex::time::sleep(Duration::from_millis(1)).await;
    }
    // The session left; its move lingers (forwarding to n1) while the copy
    // arrives.
    let copy = copy_of(&id, "f/#", &b, "f/copy", QoS::AtLeastOnce, 2);
    b.receive_session("n2", copy, &mut crate::durable::Pending::detached());
    let deadline = Instant::now() + Duration::from_secs(5);
    while peers.sent().len() < 2 && Instant::now() < deadline {
        ntex::time::sleep(Duration::from_millis(5)).await;
    }
    let sent = peers.sent();
    let to: Vec<(&str, bool)> = sent
        .iter()
        .map(|(node, m)| match m {
            PeerMsg::Session(h) => (node.as_str(), h.from_copy),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        to,
        [("n1", false), ("n1", true)],
        "the session, then the copy"
    );
    assert!(b.sessions().get(&id).is_none(), "nothing stays here");
}

/// Two states of one session that share messages (a copy, and the state
/// served from that copy elsewhere, both reaching this node) are merged
/// with each message once: a QoS 2 message must not reach its client
/// twice.
#[test]
fn a_state_merged_into_a_session_brings_each_message_once() {
    let peers = FakePeers::new(false);
    let b = node0(&peers);
    let id = peers.client_of("n0", "merged");
    let m: Vec<_> = (0..3)
        .map(|i| msg(&b, &format!("d/{i}"), QoS::ExactlyOnce, false, "x"))
        .collect();
    let state = |msgs: &[usize], epoch| Handover {
        client_id: id.clone(),
        expiry: HOUR,
        ordered: false,
        subscriptions: vec![("d/#".into(), SubOptions::at(QoS::ExactlyOnce))],
        resend: Vec::new(),
        offline: msgs
            .iter()
            .map(|&i| Delivery::new(m[i].clone(), QoS::ExactlyOnce))
            .collect(),
        since: Vec::new(),
        qos2_received: Vec::new(),
        released: Vec::new(),
        will: None,
        epoch,
        from_copy: false,
        copy: None,
    };
    b.install_session(state(&[0, 1], 1), &mut crate::durable::Pending::detached());
    b.install_session(state(&[1, 2], 1), &mut crate::durable::Pending::detached());
    let session = b
        .sessions()
        .get(&id)
        .unwrap_or_else(|| panic!("no session"));
    let topics: Vec<String> = session
        .lock()
        .offline
        .iter()
        .map(|d| d.msg.topic.to_string())
        .collect();
    assert_eq!(topics, ["d/0", "d/1", "d/2"]);
}

/// A lost owner's copy sent here by another node (which found the owner
/// lost first) gives way to the replica of the same session this node
/// keeps, of a newer epoch: that replica followed the owner's changes,
/// the copy is older (here: one message the client has completed since).
#[test]
fn a_copy_that_arrives_gives_way_to_a_newer_replica_kept_here() {
    let peers = FakePeers::new(false);
    let b = node0(&peers);
    let id = peers.client_of("n0", "newer");
    let owner: Arc<str> = Arc::from("n1");
    let record = crate::durable::SessionRecord {
        expiry_ms: 3_600_000,
        disconnected_ms: 1,
        ordered: false,
        qos2_ids: Vec::new(),
        subscriptions: vec![("r/#".into(), SubOptions::at(QoS::ExactlyOnce))],
        will: None,
        released: Vec::new(),
        replays: Vec::new(),
        armed_will: None,
        epoch: 5,
    };
    let mut current = Delivery::new(
        msg(&b, "r/current", QoS::ExactlyOnce, false, "x"),
        QoS::ExactlyOnce,
    );
    current.seq = 7;
    b.replica_change(&owner, 1, &id, crate::durable::Change::Reset(record));
    b.replica_change(&owner, 1, &id, crate::durable::Change::Queue(current));
    let copy = copy_of(&id, "r/#", &b, "r/completed", QoS::ExactlyOnce, 4);
    b.install_session(copy, &mut crate::durable::Pending::detached());
    let session = b
        .sessions()
        .get(&id)
        .unwrap_or_else(|| panic!("no session"));
    let topics: Vec<String> = session
        .lock()
        .offline
        .iter()
        .map(|d| d.msg.topic.to_string())
        .collect();
    assert_eq!(topics, ["r/current"]);
}

#[test]
fn a_session_handed_to_this_node_is_served_here_with_what_it_brought() {
    let peers = FakePeers::new(false);
    let b = node0(&peers);
    let id = peers.client_of("n0", "arriving");
    let queued_msg = |topic: &str, dup| {
        let mut d = Delivery::new(
            msg(&b, topic, QoS::AtLeastOnce, false, "x"),
            QoS::AtLeastOnce,
        );
        d.dup = dup;
        d
    };
    b.install_session(
        Handover {
            client_id: id.clone(),
            expiry: HOUR,
            ordered: false,
            subscriptions: vec![("h/#".into(), SubOptions::at(QoS::AtLeastOnce))],
            resend: vec![Delivery {
                sent_as: NonZeroU16::new(4_000),
                ..queued_msg("h/inflight", true)
            }],
            offline: vec![queued_msg("h/offline", false)],
            since: Vec::new(),
            qos2_received: vec![11],
            released: vec![12],
            will: None,
            epoch: 3,
            from_copy: false,
            copy: None,
        },
        &mut crate::durable::Pending::detached(),
    );
    let a = b.attach(&id, false, HOUR);
    assert!(a.present, "session present for its client");
    {
        let st = a.session.lock();
        let resend: Vec<_> = st
            .resend
            .iter()
            .map(|d| (d.msg.topic.to_string(), d.dup, d.packet_id()))
            .collect();
        let offline: Vec<_> = st.offline.iter().map(|d| d.msg.topic.to_string()).collect();
        // Sent again under the id the client may hold it by.
        assert_eq!(
            resend,
            [("h/inflight".to_owned(), true, NonZeroU16::new(4_000))]
        );
        assert_eq!(offline, ["h/offline"]);
        // A QoS 2 PUBLISH the client sends again is known; the PUBREL it
        // waits for is sent.
        assert!(st.qos2_received.contains(&11));
        assert_eq!(st.released_ids(), [12]);
        assert_eq!(st.epoch, 4, "one owner more than the sender's");
    }
    // A copy of the same session from before that handover (a replica of
    // the sender, or the sender's own store read back after a restart) is
    // older: dropped.
    b.install_session(
        Handover {
            client_id: id.clone(),
            expiry: HOUR,
            ordered: false,
            subscriptions: vec![("stale/#".into(), SubOptions::at(QoS::AtLeastOnce))],
            resend: Vec::new(),
            offline: vec![queued_msg("h/old", false)],
            since: vec![queued_msg("h/since", false)],
            qos2_received: Vec::new(),
            released: Vec::new(),
            will: None,
            epoch: 3,
            from_copy: true,
            copy: None,
        },
        &mut crate::durable::Pending::detached(),
    );
    {
        let st = a.session.lock();
        assert!(!st.subscriptions.contains_key("stale/#"));
        let topics: Vec<_> = st
            .offline
            .iter()
            .chain(&st.queue)
            .map(|d| d.msg.topic.to_string())
            .collect();
        assert!(!topics.contains(&"h/old".to_owned()), "{topics:?}");
        // What the copy's node queued after its restart was acknowledged
        // there: it stays.
        assert!(topics.contains(&"h/since".to_owned()), "{topics:?}");
    }
    // Its subscription routes here now.
    assert_eq!(
        b.publish(&msg(&b, "h/live", QoS::AtLeastOnce, false, "x"), false),
        1
    );
}

#[ntex::test]
async fn a_qos1_publish_is_refused_while_the_link_to_its_subscribers_is_full() {
    let peers = FakePeers::new(true);
    let b = node0(&peers);
    b.remote_routes("n1", &["f/#".into()], &[]);
    let publisher = b.attach(&peers.client_of("n0", "pub"), true, Duration::ZERO);
    let from = Publisher {
        session: &publisher.session,
        persistent: false,
        on_full: OnFull::Refuse,
        ticket: None,
        qos2_id: None,
    };
    let result = b
        .accept(msg(&b, "f/1", QoS::AtLeastOnce, false, "x"), from)
        .await;
    assert!(
        matches!(result, Err(PublishError::Cluster)),
        "no PUBACK for a message the other node may not get: {result:?}"
    );
    // QoS 0 promises nothing: it goes on.
    let qos0 = b
        .accept(msg(&b, "f/2", QoS::AtMostOnce, false, "x"), from)
        .await;
    assert!(qos0.is_ok(), "{qos0:?}");
}

/// A node that restarts reads its sessions back from its store; another
/// node served one of them meanwhile and hands it back: what was read back
/// is replaced (it was delivered elsewhere), what was queued here since
/// the restart stays (it was acknowledged here).
#[test]
fn a_session_served_elsewhere_replaces_the_copy_read_back_but_not_what_came_since() {
    let peers = FakePeers::new(false);
    let b = node0(&peers);
    let id = peers.client_of("n0", "back");
    let stored = |topic: &str, seq| {
        let mut d = Delivery::new(
            msg(&b, topic, QoS::AtLeastOnce, false, "x"),
            QoS::AtLeastOnce,
        );
        d.seq = seq;
        d
    };
    let record = crate::durable::SessionRecord {
        expiry_ms: 3_600_000,
        disconnected_ms: crate::message::now_ms(),
        ordered: false,
        qos2_ids: vec![7],
        subscriptions: vec![("s/#".into(), SubOptions::at(QoS::AtLeastOnce))],
        will: None,
        released: vec![crate::durable::Released { id: 9, seq: 0 }],
        replays: Vec::new(),
        epoch: 0,
        armed_will: None,
    };
    b.restore(crate::durable::Recovered {
        sessions: vec![crate::durable::RecoveredSession {
            client: Arc::from(id.as_str()),
            record,
            messages: vec![stored("s/old-1", 1), stored("s/old-2", 2)],
        }],
        ..Default::default()
    });
    // Routed here after the restart and before the handover.
    assert_eq!(
        b.publish(&msg(&b, "s/since", QoS::AtLeastOnce, false, "x"), false),
        1
    );
    b.install_session(
        Handover {
            client_id: id.clone(),
            expiry: HOUR,
            ordered: false,
            subscriptions: vec![("s/#".into(), SubOptions::at(QoS::AtLeastOnce))],
            resend: Vec::new(),
            offline: vec![Delivery::new(
                msg(&b, "s/served", QoS::AtLeastOnce, false, "x"),
                QoS::AtLeastOnce,
            )],
            since: Vec::new(),
            qos2_received: Vec::new(),
            released: Vec::new(),
            will: None,
            epoch: 0,
            from_copy: false,
            copy: None,
        },
        &mut crate::durable::Pending::detached(),
    );
    let a = b.attach(&id, false, HOUR);
    assert!(a.present);
    let st = a.session.lock();
    let offline: Vec<_> = st.offline.iter().map(|d| d.msg.topic.to_string()).collect();
    assert_eq!(offline, ["s/since", "s/served"]);
    assert!(st.released.is_empty() && st.qos2_received.is_empty());
    assert_eq!(st.subscriptions.len(), 1);
}
