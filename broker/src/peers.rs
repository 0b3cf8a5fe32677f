//! The other nodes of a cluster as the core sees them (a port): who owns a
//! Client ID, and the messages the core sends them. `cluster` implements it
//! with the ring, the links and their wire format; the core never sees a
//! frame or a socket, and a single node has no `Peers` at all.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::durable::{Change, Pending};
use crate::message::{Delivery, Message, QoS};
use crate::ring::Ring;
use crate::router::SubOptions;

/// What the core sends another node.
#[derive(Debug, Clone)]
pub enum PeerMsg {
    /// A publish for the peer's subscribers, and the shared groups this
    /// node chose the peer to serve.
    Publish {
        msg: Arc<Message>,
        groups: Vec<String>,
    },
    /// A message for one session the peer owns, at `qos` (the subscription's
    /// downgrade applied).
    Direct {
        client_id: String,
        persistent: bool,
        msg: Arc<Message>,
        qos: QoS,
    },
    /// A retained message, for every node's copy of the retained store.
    Retain { msg: Arc<Message> },
    /// A persistent session handed to its new owner.
    Session(Handover),
    /// A persistent session of `epoch` ended at the sender (a clean
    /// start, its expiry, an MQTT 5 expiry of 0), which no longer owns its
    /// Client ID: the owner drops an older copy of it (one read back from
    /// a returning node's store), now and when one arrives later.
    SessionGone {
        client_id: String,
        epoch: u64,
        /// How long a copy of it may still surface.
        ttl: Duration,
    },
    /// This node's load, for the instance-wide capacity and the per-node table.
    Load {
        connections: u64,
        subscriptions: u64,
        pub_tps: u64,
        sub_tps: u64,
        /// Persistent sessions this node owns with too few copies (D2).
        under_replicated: u64,
    },
    /// A token revoked here: every node that verifies tokens must refuse it.
    Revoked { id: String, exp_ms: u64 },
    /// Every session this node owns and the peer keeps a replica of has
    /// been sent whole on the link's replication stream `stream`: the peer
    /// drops the replicas of this node that the stream did not refresh.
    Synced { stream: u64 },
}

/// A persistent session as it moves between nodes: what its new owner
/// needs to serve it (`session::State::take_handover` takes it).
#[derive(Debug, Clone)]
pub struct Handover {
    pub client_id: String,
    /// Session expiry left.
    pub expiry: Duration,
    pub ordered: bool,
    pub subscriptions: Vec<(String, SubOptions)>,
    /// Sent before and not acknowledged, or queued for the connection:
    /// sent first when the client is back.
    pub resend: Vec<Delivery>,
    /// Offline messages (B5).
    pub offline: Vec<Delivery>,
    /// Of a copy read back from the sender's store (`from_copy`): the
    /// messages queued there since its restart, which were acknowledged
    /// there and stay even when the copy is dropped.
    pub since: Vec<Delivery>,
    /// Packet ids of QoS 2 PUBLISHes accepted from the client and not yet
    /// released: the client may send them again, and they are not new.
    pub qos2_received: Vec<u16>,
    /// Packet ids of QoS 2 messages to the client that wait for their
    /// PUBCOMP: the client holds them until it gets their PUBREL.
    pub released: Vec<u16>,
    /// A will waiting for its delay (MQTT 5) or, from a lost owner's copy,
    /// the will of the connection that ended with it: the message and when
    /// it is due (wall clock, ms). Published by the receiver unless its
    /// client is back.
    pub will: Option<(Arc<Message>, u64)>,
    /// The sender's owner generation of the session.
    pub epoch: u64,
    /// A copy, not a session the sender served: a replica's copy of a lost
    /// owner's session, or one the sender read back from its store at
    /// start-up and did not serve since. When the receiver's own state is of a higher epoch,
    /// the owner handed the session on before it was lost and the copy is
    /// older, so it is dropped (`Broker::install_session`). A session
    /// served elsewhere is merged whatever its epoch (a partition healed:
    /// what each side acknowledged stays).
    pub from_copy: bool,
    /// Sent without its stored messages (`resend` and `offline` empty): the
    /// receiver kept a replica of the session from the sender, and takes
    /// them from it if its digest of them (`replica::digest`) is this one;
    /// a receiver whose copy differs refuses it, and it is sent whole.
    pub copy: Option<u64>,
}

impl Handover {
    /// The same session without its messages, which the receiver takes
    /// from its copy if their digest is `digest` (`copy`).
    pub fn without_messages(&self, digest: u64) -> Self {
        Self {
            client_id: self.client_id.clone(),
            expiry: self.expiry,
            ordered: self.ordered,
            subscriptions: self.subscriptions.clone(),
            resend: Vec::new(),
            offline: Vec::new(),
            since: Vec::new(),
            qos2_received: self.qos2_received.clone(),
            released: self.released.clone(),
            will: self.will.clone(),
            epoch: self.epoch,
            from_copy: self.from_copy,
            copy: Some(digest),
        }
    }
}

/// Resolves once a message is queued for a peer and its link is below its
/// limit (true), or the peer has no link (false).
pub type Sent<'a> = Pin<Box<dyn Future<Output = bool> + 'a>>;

/// Resolves to a peer's answer, or `None` when it has no link or did not
/// answer in time.
pub type Answered<'a> = Pin<Box<dyn Future<Output = Option<String>> + 'a>>;

/// The cluster this node is part of.
pub trait Peers: Send + Sync + std::fmt::Debug {
    /// The current ring.
    fn ring(&self) -> Arc<Ring>;
    /// The node that owns `client_id`'s session.
    fn owner(&self, client_id: &str) -> Arc<str>;
    /// Whether `node` is this node.
    fn is_local(&self, node: &str) -> bool;
    /// The ring's other members.
    fn members(&self) -> Vec<Arc<str>>;
    /// Whether every other member has handed this node its sessions.
    fn is_settled(&self) -> bool;
    /// Whether this node is leaving the ring.
    fn is_leaving(&self) -> bool;
    /// Starts leaving: off the ring, and every peer told.
    fn leave(&self);
    /// Tells every peer that this node handed over the sessions of its ring.
    fn announce_settled(&self);
    /// A peer left: the filters its sessions had announced.
    fn forget(&self, node: &str) -> Vec<String>;
    /// Whether some node's announced filters are kept while this node has
    /// no link to it (`is_linked`): one that left, until its sessions' new
    /// owners announced theirs, or one back whose link is not up yet.
    fn routes_unlinked(&self) -> bool;
    /// Whether this node has a link to `node` (frames for it can go out).
    fn is_linked(&self, node: &str) -> bool;
    /// A session of this node subscribed to `raw`.
    fn filter_added(&self, raw: &str);
    /// A session of this node dropped its subscription to `raw`.
    fn filter_removed(&self, raw: &str);
    /// Queues `msg` for `node` unless its link is full; false if dropped.
    fn try_send(&self, node: &str, msg: PeerMsg) -> bool;
    /// Queues `msg` for `node` at once (messages keep the order of the
    /// calls), then waits up to `wait` while the link is over its limit.
    fn send<'a>(&'a self, node: &'a str, msg: PeerMsg, wait: Duration) -> Sent<'a>;
    /// Like `send`, and `pending` then also waits until `node` is through
    /// with the message (a publish or a P2P message: kept by the
    /// persistent sessions it reached there; a session: installed and
    /// written); if `node` leaves the ring before it answers, or refuses
    /// it, `pending` fails (the client sends it again; the sender serves
    /// the session again).
    fn send_acked<'a>(
        &'a self,
        node: &'a str,
        msg: PeerMsg,
        pending: &mut Pending,
        wait: Duration,
    ) -> Sent<'a>;
    /// Waits up to `wait` while the link to `node` is over its limit.
    fn room<'a>(&'a self, node: &'a str, wait: Duration) -> Sent<'a>;
    /// Sends `msg` to every peer with a link.
    fn broadcast(&self, msg: PeerMsg);
    /// Asks `node` an operations API question (JSON).
    fn ask<'a>(&'a self, node: &'a str, question: String, timeout: Duration) -> Answered<'a>;
    /// How often peers hear from each other: the time a change takes to
    /// reach them is a few of these.
    fn heartbeat(&self) -> Duration;
    /// Queues a change of `client`'s session for `node`, which keeps a
    /// replica of it, in order with the other frames for `node`; `pending`
    /// (if any) then also waits until `node` has it. False (and nothing
    /// waits) if `node` has no link.
    fn replicate(
        &self,
        node: &str,
        client: &str,
        change: Change,
        pending: Option<&mut Pending>,
    ) -> bool;
    /// The replication stream of the link to each peer: a new number each
    /// time a link comes up, whose replica must then be sent whole.
    fn streams(&self) -> Vec<(Arc<str>, u64)>;
    /// Whether `node` announced a planned leave and is still heard from: it
    /// hands its sessions over itself, its replicas are not promoted.
    fn is_handing_over(&self, node: &str) -> bool;
    /// When `node` was last heard from, also after it left the ring.
    fn last_heard(&self, node: &str) -> Option<std::time::Instant>;
}
