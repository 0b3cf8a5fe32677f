//! The cluster: broker nodes that share session ownership through a
//! consistent-hash ring (C1–C5).
//!
//! - Membership: every node dials every address of `cluster.peers` and keeps
//!   one authenticated link to each (`link`). A node is a member while its
//!   link is up and it was heard from within `failure_timeout_ms`; the ring
//!   is this node plus the members.
//! - Ownership: the ring owner of a Client ID holds its session. A client
//!   that connects through another node is forwarded, bytes and all, to the
//!   owner (`gate`), so takeover, persistent sessions and offline messages
//!   behave exactly as on one node.
//! - Routing: each node tells the others which filters its sessions
//!   subscribe to; the router holds those as routes to *node markers*. A
//!   publish reaches local subscribers and is forwarded once to each node
//!   with a matching filter; a shared group picks one member among local
//!   sessions and remote nodes, so it gets a message once.
//! - Retained messages are copied to every node; P2P goes to the target's
//!   owner.

pub mod gate;
pub mod link;
pub mod replication;
mod routes;
pub mod wire;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::broker::Broker;
use crate::config::ClusterConfig;
use crate::durable::{Change, Pending};
use crate::message::Delivery;
use crate::message::{Message, MessageId, Properties};
use crate::peers::{Answered, Handover, PeerMsg, Peers, Sent};
use crate::ring::Ring;
use crate::router::SubOptions;
use crate::secret_file::SecretFile;
use crate::shutdown::Shutdown;
use wire::{Frame, WireMessage};

/// Errors while starting the cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot read cluster.secret_file {path}: {error}")]
    Secret {
        path: std::path::PathBuf,
        error: std::io::Error,
    },
    #[error("cluster link: {0}")]
    Link(String),
}

pub type Result<T> = std::result::Result<T, ClusterError>;

/// The data frames waiting for one peer, in order. Pushing never waits (so
/// concurrent publishers cannot overtake each other); backpressure comes
/// from `wait_below`, which publishers await after pushing.
#[derive(Debug, Clone)]
pub struct DataQueue {
    tx: mpsc::UnboundedSender<Frame>,
    len: Arc<std::sync::atomic::AtomicUsize>,
    room: Arc<tokio::sync::Notify>,
}

impl DataQueue {
    pub fn new() -> (Self, DataReceiver) {
        let (tx, rx) = mpsc::unbounded_channel();
        let q = Self {
            tx,
            len: Arc::default(),
            room: Arc::default(),
        };
        let r = DataReceiver {
            rx,
            len: q.len.clone(),
            room: q.room.clone(),
        };
        (q, r)
    }

    pub fn push(&self, frame: Frame) {
        if self.tx.send(frame).is_ok() {
            self.len.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
    }

    pub fn len(&self) -> usize {
        self.len.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until fewer than `limit` frames wait, or `wait` passed.
    async fn wait_below(&self, limit: usize, wait: Duration) {
        let deadline = Instant::now() + wait;
        loop {
            let notified = self.room.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            let left = deadline.saturating_duration_since(Instant::now());
            if self.len() < limit || left.is_zero() {
                return;
            }
            let _ = ntex::util::select(notified, ntex::time::sleep(left)).await;
        }
    }
}

/// The link task's end of a `DataQueue`.
#[derive(Debug)]
pub struct DataReceiver {
    rx: mpsc::UnboundedReceiver<Frame>,
    len: Arc<std::sync::atomic::AtomicUsize>,
    room: Arc<tokio::sync::Notify>,
}

impl DataReceiver {
    fn took(&self) {
        self.len.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        self.room.notify_waiters();
    }

    pub fn try_recv(&mut self) -> Option<Frame> {
        let f = self.rx.try_recv().ok()?;
        self.took();
        Some(f)
    }

    pub async fn recv(&mut self) -> Option<Frame> {
        let f = self.rx.recv().await?;
        self.took();
        Some(f)
    }
}

/// What this node knows of one peer.
#[derive(Debug)]
struct Peer {
    /// The address this node dials it at.
    addr: String,
    /// Data frames for the peer; the link task writes them.
    tx: DataQueue,
    /// Control frames for the peer (never dropped).
    ctl: mpsc::UnboundedSender<Frame>,
    /// Replication changes queued for the peer that an acknowledgement
    /// waits for (`replication`).
    acks: Arc<replication::Awaiting>,
    /// This connection's replication stream: a new one each time the link
    /// comes up, on which the peer's replicas are sent whole again.
    link: u64,
    last_seen: Instant,
    leaving: bool,
}

/// The cluster state of one node.
/// How a node answers a peer's operations API question: the question's
/// JSON in, the answer's JSON out.
pub type QueryAnswerer = fn(&Broker, &str) -> String;

#[derive(Debug)]
pub struct Cluster {
    pub node: Arc<str>,
    pub config: ClusterConfig,
    secret: SecretFile,
    peers: RwLock<HashMap<Arc<str>, Peer>>,
    ring: RwLock<Arc<Ring>>,
    /// Filters of this node's sessions, with how many sessions hold each.
    local_filters: Mutex<HashMap<String, usize>>,
    /// Filters each peer announced, and how long they are kept.
    peer_routes: routes::PeerRoutes,
    /// Wakes the ring watch at once (the ring changed, a peer settled)
    /// rather than at its next heartbeat tick.
    changed: tokio::sync::Notify,
    /// Set once this node announced that it leaves.
    leaving: std::sync::atomic::AtomicBool,
    /// Addresses a link task dials.
    dialing: Mutex<HashSet<String>>,
    /// Bumped whenever the ring changes.
    generation: std::sync::atomic::AtomicU64,
    /// The ring members each peer last said it has handed sessions over for.
    settled_by: Mutex<HashMap<Arc<str>, HashSet<String>>>,
    started: Instant,
    /// Where other nodes reach this node's cluster port.
    advertise: String,
    /// Operations API questions asked of peers, waiting for their replies.
    queries: Mutex<HashMap<u64, tokio::sync::oneshot::Sender<String>>>,
    next_query: std::sync::atomic::AtomicU64,
    /// The node's shutdown: link dialers started from anywhere watch it.
    shutdown: Shutdown,
    /// Answers a peer's operations API question (`ops`, above this layer,
    /// hands it in).
    answer_query: QueryAnswerer,
    /// This process's run: acknowledgements of another run's replication
    /// changes (a peer that has not noticed the restart) are ignored.
    run: u64,
    /// Replication changes acknowledged without the replica's word since
    /// the metric last took them (`take_released`).
    released: std::sync::atomic::AtomicU64,
    /// When peers that left the ring (link down, silent) were last heard
    /// from, for the failover time (`last_heard`).
    lost: std::sync::Mutex<HashMap<Arc<str>, Instant>>,
}

impl Peer {
    /// Not heard from for `timeout` and not handing over (a node that
    /// announced it leaves is waited for).
    fn silent(&self, timeout: Duration) -> bool {
        !self.leaving && self.last_seen.elapsed() >= timeout
    }
}

impl Cluster {
    /// A peer's operations API question, answered as JSON.
    pub fn answer_query(&self, broker: &Broker, question: &str) -> String {
        (self.answer_query)(broker, question)
    }

    /// `bound`: the address the cluster port is bound to (its real port
    /// when the configuration asked for port 0).
    pub fn new(
        config: &ClusterConfig,
        node: &str,
        bound: Option<std::net::SocketAddr>,
        shutdown: Shutdown,
        answer_query: QueryAnswerer,
    ) -> Result<Arc<Self>> {
        let secret =
            SecretFile::load(&config.secret_file).map_err(|error| ClusterError::Secret {
                path: config.secret_file.clone(),
                error,
            })?;
        Ok(Arc::new(Self {
            node: Arc::from(node),
            config: config.clone(),
            secret,
            peers: RwLock::new(HashMap::new()),
            ring: RwLock::new(Arc::new(Ring::new([node]))),
            local_filters: Mutex::new(HashMap::new()),
            peer_routes: routes::PeerRoutes::default(),
            changed: tokio::sync::Notify::new(),
            leaving: std::sync::atomic::AtomicBool::new(false),
            dialing: Mutex::new(HashSet::new()),
            generation: std::sync::atomic::AtomicU64::new(0),
            settled_by: Mutex::new(HashMap::new()),
            started: Instant::now(),
            advertise: advertise(config, node, bound),
            queries: Mutex::new(HashMap::new()),
            next_query: std::sync::atomic::AtomicU64::new(0),
            shutdown,
            answer_query,
            run: replication::random_id()?,
            released: std::sync::atomic::AtomicU64::new(0),
            lost: std::sync::Mutex::default(),
        }))
    }

    /// The node's shutdown signal.
    pub fn shutdown(&self) -> &Shutdown {
        &self.shutdown
    }

    /// Where other nodes reach this node.
    pub fn advertised(&self) -> String {
        self.advertise.clone()
    }

    /// Claims `addr` for a link task; false if one already dials it.
    fn start_dialing(&self, addr: &str) -> bool {
        self.dialing
            .lock()
            .is_ok_and(|mut d| d.insert(addr.to_owned()))
    }

    fn stop_dialing(&self, addr: &str) {
        if let Ok(mut d) = self.dialing.lock() {
            d.remove(addr);
        }
    }

    /// Whether a link task dials `addr`, or it is this node's own address.
    fn dials(&self, addr: &str) -> bool {
        addr == self.advertise || self.dialing.lock().is_ok_and(|d| d.contains(addr))
    }

    pub fn secret(&self) -> &SecretFile {
        &self.secret
    }

    /// The current ring.
    pub fn ring(&self) -> Arc<Ring> {
        self.ring
            .read()
            .map(|r| r.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    /// The node that owns `client_id`'s session.
    pub fn owner(&self, client_id: &str) -> Arc<str> {
        self.ring()
            .owner(client_id)
            .cloned()
            .unwrap_or_else(|| self.node.clone())
    }

    pub fn is_local(&self, node: &str) -> bool {
        *self.node == *node
    }

    /// The address a member is dialled at.
    pub fn addr_of(&self, node: &str) -> Option<String> {
        let peers = self.peers.read().ok()?;
        peers.get(node).map(|p| p.addr.clone())
    }

    /// A link to `node` came up (called by its link task).
    fn link_up(&self, node: &Arc<str>, addr: &str, link: link::Outbound) {
        if let Ok(mut peers) = self.peers.write() {
            peers.insert(
                node.clone(),
                Peer {
                    addr: addr.to_owned(),
                    tx: link.data,
                    ctl: link.control,
                    acks: link.acks,
                    link: link.stream,
                    last_seen: Instant::now(),
                    leaving: false,
                },
            );
        }
        tracing::info!(peer = %node, addr, "cluster link up");
        self.count_unlinked_routes();
        // Even when the ring looks the same (a node restarted under its old
        // name before the others noticed it was gone), the new process needs
        // its sessions and a `Settled`: a new link always counts as a change.
        if !self.update_ring() {
            self.generation
                .fetch_add(1, std::sync::atomic::Ordering::Release);
            self.changed.notify_one();
        }
    }

    /// The link to `node` numbered `stream` went down, unless a newer link
    /// (a restarted node of the same name) replaced it already. The
    /// filters `node` announced stay until `parted` lets them go
    /// (`routes::PeerRoutes`).
    fn link_down(&self, node: &str, stream: u64) {
        let removed = match self.peers.write() {
            Ok(mut peers) if peers.get(node).is_some_and(|p| p.link == stream) => {
                if let Some(p) = peers.remove(node) {
                    self.lost_at(node, p.last_seen);
                }
                true
            }
            _ => false,
        };
        if removed {
            tracing::info!(peer = node, "cluster link down");
            self.part(node);
            self.update_ring();
        }
    }

    /// A new inbound link: its number.
    pub(super) fn inbound_opened(&self) -> u64 {
        self.peer_routes.link_opened()
    }

    /// Inbound link `link` from `node` closed.
    pub(super) fn inbound_closed(&self, node: &str, link: u64) {
        if self.peer_routes.link_closed(node, link) {
            self.part(node);
        }
    }

    /// `node` left, or the link its filters came on closed.
    fn part(&self, node: &str) {
        self.peer_routes.part(node, self.is_linked(node));
        self.count_unlinked_routes();
    }

    /// Peers that left whose announced filters go now (`routes::PeerRoutes`):
    /// every member settled a ring without them, or twice the failure
    /// timeout passed.
    pub fn parted(&self) -> Vec<Arc<str>> {
        let members = self.members();
        let bound = Duration::from_millis(2 * self.config.failure_timeout_ms);
        let linked: HashSet<Arc<str>> = self
            .peers
            .read()
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default();
        let Ok(settled) = self.settled_by.lock() else {
            return Vec::new();
        };
        self.peer_routes.parted(&linked, &members, &settled, bound)
    }

    fn count_unlinked_routes(&self) {
        self.peer_routes.recount(|node| self.is_linked(node));
    }

    /// Whether some peer's announced filters have no link now.
    pub fn routes_unlinked(&self) -> bool {
        self.peer_routes.unlinked()
    }

    /// Whether `node` has a link and said nothing for the failure timeout
    /// (a node that announced it leaves is waited for: it hands over).
    pub fn is_silent(&self, node: &str) -> bool {
        let timeout = Duration::from_millis(self.config.failure_timeout_ms);
        self.peers
            .read()
            .is_ok_and(|p| p.get(node).is_some_and(|p| p.silent(timeout)))
    }

    /// Whether this node has a link to `node`.
    pub fn is_linked(&self, node: &str) -> bool {
        self.peers.read().is_ok_and(|p| p.contains_key(node))
    }

    /// Addresses of the peers this node has links to, and its own.
    fn known_addrs(&self) -> Vec<String> {
        let mut out: Vec<String> = match self.peers.read() {
            Ok(peers) => peers.values().map(|p| p.addr.clone()).collect(),
            Err(_) => Vec::new(),
        };
        out.push(self.advertise.clone());
        out
    }

    /// Releases what waits for a replica that left (counted).
    fn release(&self, acks: &replication::Awaiting) {
        let n = acks.release();
        if n > 0 {
            self.released
                .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Replication changes acknowledged without their replica since the
    /// last call.
    pub fn take_released(&self) -> u64 {
        self.released.swap(0, std::sync::atomic::Ordering::Relaxed)
    }

    /// Replica changes queued for every peer and not yet confirmed.
    pub fn replication_lag(&self) -> u64 {
        self.peers
            .read()
            .map(|p| p.values().map(|p| p.acks.lag()).sum())
            .unwrap_or(0)
    }

    fn lost_at(&self, node: &str, last_seen: Instant) {
        if let Ok(mut lost) = self.lost.lock() {
            lost.insert(Arc::from(node), last_seen);
        }
    }

    /// When `node` was last heard from (a heartbeat or any frame), also
    /// after it left the ring.
    pub fn last_heard(&self, node: &str) -> Option<Instant> {
        let live = self
            .peers
            .read()
            .ok()
            .and_then(|p| p.get(node).map(|p| p.last_seen));
        live.or_else(|| self.lost.lock().ok()?.get(node).copied())
    }

    /// The data queue of `node`'s link and its numbered frames.
    fn numbered_link(&self, node: &str) -> Option<(DataQueue, Arc<replication::Awaiting>)> {
        let peers = self.peers.read().ok()?;
        peers.get(node).map(|p| (p.tx.clone(), p.acks.clone()))
    }

    /// Queues a change of `client`'s session for `node`; `pending` (if
    /// any) waits for its acknowledgement. False if `node` has no link.
    pub fn replicate(
        &self,
        node: &str,
        client: &str,
        change: Change,
        pending: Option<&mut Pending>,
    ) -> bool {
        let Some((q, acks)) = self.numbered_link(node) else {
            return false;
        };
        let (change, seq, value) = replication::to_wire(&change);
        let client = client.to_owned();
        acks.push(
            &q,
            |n| Frame::Replicate {
                n,
                client,
                change,
                seq,
                value,
            },
            pending.and_then(Pending::join),
            replication::OnLoss::Kept,
        );
        true
    }

    /// Queues a publish or a P2P message for `node` at once, numbered so
    /// that `commit` waits until `node` is through with it (kept by the
    /// persistent sessions it reached there), then waits up to `wait`
    /// while the queue is over `link_queue`. False if `node` has no link;
    /// if it leaves the ring before it answers, `commit` fails.
    pub async fn send_acked(
        &self,
        node: &str,
        msg: PeerMsg,
        commit: Option<Arc<crate::durable::Commit>>,
        wait: Duration,
    ) -> bool {
        let Some((q, acks)) = self.numbered_link(node) else {
            // Nobody will answer for it.
            if let Some(m) = commit.and_then(|c| c.written(false)) {
                m.ring();
            }
            return false;
        };
        acks.push(
            &q,
            |n| numbered_frame(msg, n),
            commit,
            replication::OnLoss::Refused,
        );
        q.wait_below(self.config.link_queue, wait).await;
        true
    }

    /// `node` is through with every numbered frame of this run's
    /// sequence (`forward`: the forwards', else the replica changes') up
    /// to `n` (`failed`: `n` itself was not kept).
    pub fn acked(&self, node: &str, run: u64, n: u64, failed: bool, forward: bool) {
        if run != self.run {
            return;
        }
        if let Some((_, acks)) = self.numbered_link(node) {
            acks.acked(n, failed, forward);
        }
    }

    /// This process's run (`Stream`).
    pub fn run(&self) -> u64 {
        self.run
    }

    /// The replication stream of each peer's link.
    pub fn streams(&self) -> Vec<(Arc<str>, u64)> {
        self.peers
            .read()
            .map(|p| p.iter().map(|(n, p)| (n.clone(), p.link)).collect())
            .unwrap_or_default()
    }

    /// Whether `node` announced a planned leave and is still heard from.
    pub fn is_handing_over(&self, node: &str) -> bool {
        let timeout = Duration::from_millis(self.config.failure_timeout_ms);
        self.peers.read().is_ok_and(|p| {
            p.get(node)
                .is_some_and(|p| p.leaving && p.last_seen.elapsed() < timeout)
        })
    }

    /// Waits up to `wait` while the data queue for `node` is over its limit.
    pub async fn room(&self, node: &str, wait: Duration) -> bool {
        let Some(q) = self.queue(node) else {
            return false;
        };
        q.wait_below(self.config.link_queue, wait).await;
        true
    }

    /// A heartbeat arrived from `node`.
    fn heard(&self, node: &str, leaving: bool) {
        let changed = match self.peers.write() {
            Ok(mut peers) => match peers.get_mut(node) {
                Some(p) => {
                    p.last_seen = Instant::now();
                    std::mem::replace(&mut p.leaving, leaving) != leaving
                }
                None => false,
            },
            Err(_) => false,
        };
        if changed {
            self.update_ring();
        }
    }

    /// Recomputes the ring from the live members; true if it changed.
    /// A peer off the ring keeps no replica: what waits for its
    /// acknowledgement is released (counted).
    pub fn update_ring(&self) -> bool {
        let timeout = Duration::from_millis(self.config.failure_timeout_ms);
        let mut members: Vec<Arc<str>> = match self.peers.read() {
            Ok(peers) => {
                let (live, off): (Vec<_>, Vec<_>) = peers
                    .iter()
                    .partition(|(_, p)| !p.leaving && !p.silent(timeout));
                for (n, p) in off {
                    self.release(&p.acks);
                    self.lost_at(n, p.last_seen);
                }
                live.into_iter().map(|(n, _)| n.clone()).collect()
            }
            Err(_) => Vec::new(),
        };
        if !self.leaving.load(std::sync::atomic::Ordering::Relaxed) {
            members.push(self.node.clone());
        }
        let ring = Ring::new(&members);
        let Ok(mut current) = self.ring.write() else {
            return false;
        };
        if **current == ring {
            return false;
        }
        tracing::info!(members = ?ring.nodes(), "cluster ring changed");
        *current = Arc::new(ring);
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        self.changed.notify_one();
        true
    }

    /// A peer finished handing over the sessions of its ring of `members`.
    fn settled_from(&self, peer: &Arc<str>, members: Vec<String>) {
        if let Ok(mut s) = self.settled_by.lock() {
            s.insert(peer.clone(), members.into_iter().collect());
        }
        // A lost peer's routes may go now (`parted`).
        self.changed.notify_one();
    }

    /// Whether every other member has handed this node its sessions: a node
    /// that joins serves its own sessions only from then on, so that a
    /// client never finds an empty session that is still on its way.
    pub fn is_settled(&self) -> bool {
        // A node that has just started has not met its peers yet: it waits
        // as long as it would take to notice them.
        if self.started.elapsed() < Duration::from_millis(self.config.failure_timeout_ms) {
            return false;
        }
        let members = self.members();
        let Ok(settled) = self.settled_by.lock() else {
            return false;
        };
        members
            .iter()
            .all(|m| settled.get(m).is_some_and(|s| s.contains(&*self.node)))
    }

    /// Tells every peer that this node has handed over the sessions of its
    /// current ring.
    pub fn announce_settled(&self) {
        let members: Vec<String> = self.ring().nodes().iter().map(|n| n.to_string()).collect();
        // On the data queues, behind the `Session` frames it vouches for.
        if let Ok(peers) = self.peers.read() {
            for p in peers.values() {
                p.tx.push(Frame::Settled {
                    members: members.clone(),
                });
            }
        }
    }

    /// Members other than this node, by name.
    pub fn members(&self) -> Vec<Arc<str>> {
        self.ring()
            .nodes()
            .iter()
            .filter(|n| !self.is_local(n))
            .cloned()
            .collect()
    }

    /// Starts leaving: off the ring here, and told to every peer (the next
    /// heartbeat says so too).
    pub fn leave(&self) {
        self.leaving
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.update_ring();
        self.broadcast(&Frame::Heartbeat { leaving: true });
    }

    pub fn is_leaving(&self) -> bool {
        self.leaving.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn queue(&self, node: &str) -> Option<DataQueue> {
        let peers = self.peers.read().ok()?;
        peers.get(node).map(|p| p.tx.clone())
    }

    /// Queues a frame for `node` unless its queue is over `link_queue`
    /// (best effort: QoS 0, wills, notices); false if dropped.
    pub fn try_send(&self, node: &str, frame: Frame) -> bool {
        self.queue(node).is_some_and(|q| {
            q.len() < self.config.link_queue && {
                q.push(frame);
                true
            }
        })
    }

    /// Queues a frame for `node` at once (so frames keep the order of the
    /// calls), then waits up to `wait` while the queue is over `link_queue`:
    /// the caller's acknowledgement waits for the link. False if `node` has
    /// no link.
    pub async fn send(&self, node: &str, frame: Frame, wait: Duration) -> bool {
        let Some(q) = self.queue(node) else {
            return false;
        };
        q.push(frame);
        q.wait_below(self.config.link_queue, wait).await;
        true
    }

    /// Sends a control frame to every peer with a link; it is never
    /// dropped while the link is up, and what a link down misses, the next
    /// link's greeting carries.
    pub fn broadcast(&self, frame: &Frame) {
        if let Ok(peers) = self.peers.read() {
            for p in peers.values() {
                let _ = p.ctl.send(frame.clone());
            }
        }
    }

    /// Sends a control frame to one peer; false if it has no link.
    pub fn control(&self, node: &str, frame: Frame) -> bool {
        self.peers
            .read()
            .ok()
            .and_then(|p| p.get(node).map(|p| p.ctl.send(frame).is_ok()))
            .unwrap_or(false)
    }

    /// Asks `node` an operations API question; `None` if it has no link or
    /// does not answer within `timeout`.
    pub async fn ask(&self, node: &str, body: String, timeout: Duration) -> Option<String> {
        let id = self
            .next_query
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.queries.lock().ok()?.insert(id, tx);
        let answer = if self.control(node, Frame::Query { id, body }) {
            match ntex::util::select(rx, ntex::time::sleep(timeout)).await {
                ntex::util::Either::Left(Ok(body)) => Some(body),
                _ => None,
            }
        } else {
            None
        };
        if let Ok(mut q) = self.queries.lock() {
            q.remove(&id);
        }
        answer
    }

    /// A peer answered question `id`.
    pub fn answered(&self, id: u64, body: String) {
        let waiting = self.queries.lock().ok().and_then(|mut q| q.remove(&id));
        if let Some(tx) = waiting {
            let _ = tx.send(body);
        }
    }

    /// A session of this node subscribed to `raw` (a filter or `$share/…`).
    pub fn filter_added(&self, raw: &str) {
        // The frame is queued under the lock, so adds and removes of one
        // filter reach the peers in the order they happened.
        if let Ok(mut f) = self.local_filters.lock() {
            let n = f.entry(raw.to_owned()).or_insert(0);
            *n += 1;
            if *n == 1 {
                self.broadcast(&Frame::RouteAdd {
                    filter: raw.to_owned(),
                });
            }
        }
    }

    /// A session of this node dropped its subscription to `raw`.
    pub fn filter_removed(&self, raw: &str) {
        if let Ok(mut f) = self.local_filters.lock() {
            let last = match f.get_mut(raw) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    false
                }
                Some(_) => {
                    f.remove(raw);
                    true
                }
                None => false,
            };
            if last {
                self.broadcast(&Frame::RouteDel {
                    filter: raw.to_owned(),
                });
            }
        }
    }

    /// Every filter this node's sessions hold, for a new link.
    fn local_snapshot(&self) -> Vec<String> {
        self.local_filters
            .lock()
            .map(|f| f.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Records what a peer announced on its inbound link `link`; returns
    /// the filters to add to and remove from its marker's routes.
    fn remote_routes(
        &self,
        node: &Arc<str>,
        link: u64,
        frame: &Frame,
    ) -> (Vec<String>, Vec<String>) {
        let changes = self.peer_routes.announced(node, link, frame);
        self.count_unlinked_routes();
        changes
    }

    /// Forgets what a departed peer announced; returns its filters.
    pub(crate) fn forget(&self, node: &str) -> Vec<String> {
        let filters = self.peer_routes.forget(node);
        self.count_unlinked_routes();
        filters
    }
}

/// This node's cluster address as others should dial it: `cluster.advertise`,
/// or the bound address, with the node name in place of an unspecified IP
/// (on Kubernetes the pod name, resolvable under the headless Service when
/// the peers are given as such).
fn advertise(config: &ClusterConfig, node: &str, bound: Option<std::net::SocketAddr>) -> String {
    if let Some(a) = &config.advertise {
        return a.clone();
    }
    let addr = bound.unwrap_or(config.listen);
    if let Some(domain) = &config.advertise_domain {
        format!("{node}.{domain}:{}", addr.port())
    } else if addr.ip().is_unspecified() {
        format!("{node}:{}", addr.port())
    } else {
        addr.to_string()
    }
}

/// A message as it crosses to another node.
pub fn to_wire(msg: &Message, now: Instant) -> WireMessage {
    WireMessage {
        id: msg.id.0,
        topic: msg.topic.clone(),
        payload: msg.payload.clone(),
        qos: msg.qos,
        retain: msg.retain,
        publisher: ntex::util::ByteString::from(&*msg.publisher),
        ts_ms: msg.ts_ms,
        expiry_ms: msg.expiry.map(|e| {
            let left = e.saturating_sub(now.saturating_duration_since(msg.received));
            u64::try_from(left.as_millis()).unwrap_or(u64::MAX)
        }),
        user: msg.properties.user.clone(),
        content_type: msg.properties.content_type.clone(),
        response_topic: msg.properties.response_topic.clone(),
        correlation_data: msg.properties.correlation_data.clone(),
        utf8_payload: msg.properties.utf8_payload,
    }
}

/// A message that arrived from another node.
pub fn from_wire(w: WireMessage) -> Message {
    let mut msg = Message::new(
        MessageId(w.id),
        w.topic,
        w.payload,
        w.qos,
        w.retain,
        Arc::from(&*w.publisher),
    );
    msg.ts_ms = w.ts_ms;
    msg.expiry = w.expiry_ms.map(Duration::from_millis);
    msg.set_properties(Properties {
        user: w.user,
        content_type: w.content_type,
        response_topic: w.response_topic,
        correlation_data: w.correlation_data,
        utf8_payload: w.utf8_payload,
    });
    msg
}

/// A waiting message as it travels.
fn delivery_to_wire(d: Delivery, now: Instant) -> wire::WireDelivery {
    wire::WireDelivery {
        msg: to_wire(&d.msg, now),
        qos: d.qos,
        retain: d.retain,
        dup: d.dup,
        sub_ids: d.sub_ids.iter().map(|i| i.get()).collect(),
        // Numbered again where it goes: the id its number gave here stays
        // with it, as the client may hold it.
        packet_id: d.packet_id().map_or(0, |i| i.get()),
    }
}

/// A session handed over, as it travels.
pub fn handover_to_wire(h: Handover, now: Instant) -> wire::WireSession {
    wire::WireSession {
        client_id: h.client_id,
        expiry_ms: u64::try_from(h.expiry.as_millis()).unwrap_or(u64::MAX),
        ordered: h.ordered,
        subscriptions: h
            .subscriptions
            .into_iter()
            .map(|(filter, o)| wire::WireSub {
                filter,
                qos: o.qos,
                no_local: o.no_local,
                retain_as_published: o.retain_as_published,
                id: o.id.map_or(0, |i| i.get()),
            })
            .collect(),
        resend: h
            .resend
            .into_iter()
            .map(|d| delivery_to_wire(d, now))
            .collect(),
        offline: h
            .offline
            .into_iter()
            .map(|d| delivery_to_wire(d, now))
            .collect(),
        since: h
            .since
            .into_iter()
            .map(|d| delivery_to_wire(d, now))
            .collect(),
        qos2_ids: h.qos2_received,
        released: h.released,
        will: h.will.map(|(m, due)| (to_wire(&m, now), due)),
        epoch: h.epoch,
        from_copy: h.from_copy,
        copy: h.copy,
    }
}

/// A session handed over, as it arrived.
pub fn handover_from_wire(ws: wire::WireSession) -> Handover {
    Handover {
        client_id: ws.client_id,
        expiry: Duration::from_millis(ws.expiry_ms),
        ordered: ws.ordered,
        subscriptions: ws
            .subscriptions
            .iter()
            .map(|s| (s.filter.clone(), sub_options(s)))
            .collect(),
        resend: ws.resend.into_iter().map(delivery_from_wire).collect(),
        offline: ws.offline.into_iter().map(delivery_from_wire).collect(),
        since: ws.since.into_iter().map(delivery_from_wire).collect(),
        qos2_received: ws.qos2_ids,
        released: ws.released,
        will: ws.will.map(|(m, due)| (Arc::new(from_wire(m)), due)),
        epoch: ws.epoch,
        from_copy: ws.from_copy,
        copy: ws.copy,
    }
}

/// A subscription's options as they arrived.
fn sub_options(s: &wire::WireSub) -> SubOptions {
    SubOptions {
        qos: s.qos,
        no_local: s.no_local,
        retain_as_published: s.retain_as_published,
        id: std::num::NonZeroU32::new(s.id),
    }
}

/// A waiting message as it arrived.
fn delivery_from_wire(d: wire::WireDelivery) -> Delivery {
    Delivery {
        msg: Arc::new(from_wire(d.msg)),
        qos: d.qos,
        retain: d.retain,
        dup: d.dup,
        sub_ids: d
            .sub_ids
            .into_iter()
            .filter_map(std::num::NonZeroU32::new)
            .collect(),
        // The receiving node numbers it when it stores it.
        seq: 0,
        sent_as: std::num::NonZeroU16::new(d.packet_id),
        stored: None,
    }
}

/// The frame that carries a message of the core.
fn frame(msg: PeerMsg) -> Frame {
    numbered_frame(msg, 0)
}

/// The frame that carries a message of the core, as number `n` of its
/// link's acknowledged frames (0: not numbered; only a publish, a P2P
/// message or a session handed over carries the number).
fn numbered_frame(msg: PeerMsg, n: u64) -> Frame {
    let now = Instant::now();
    match msg {
        PeerMsg::Publish { msg, groups } => Frame::Publish {
            n,
            msg: to_wire(&msg, now),
            groups,
        },
        PeerMsg::Direct {
            client_id,
            persistent,
            msg,
            qos,
        } => {
            let mut w = to_wire(&msg, now);
            w.qos = qos;
            Frame::Direct {
                n,
                client_id,
                persistent,
                msg: w,
            }
        }
        PeerMsg::Retain { msg } => Frame::Retain {
            msg: to_wire(&msg, now),
        },
        PeerMsg::Session(h) => Frame::Session {
            n,
            session: handover_to_wire(h, now),
        },
        PeerMsg::SessionGone {
            client_id,
            epoch,
            ttl,
        } => Frame::SessionGone {
            client: client_id,
            epoch,
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
        },
        PeerMsg::Load {
            connections,
            subscriptions,
            pub_tps,
            sub_tps,
            under_replicated,
        } => Frame::Load {
            connections,
            subscriptions,
            pub_tps,
            sub_tps,
            under_replicated,
        },
        PeerMsg::Revoked { id, exp_ms } => Frame::Revoked { id, exp_ms },
        PeerMsg::Synced { stream } => Frame::ReplicaSynced { link: stream },
    }
}

// The core's view of the cluster: its messages become frames here.
impl Peers for Cluster {
    fn ring(&self) -> Arc<Ring> {
        Cluster::ring(self)
    }

    fn owner(&self, client_id: &str) -> Arc<str> {
        Cluster::owner(self, client_id)
    }

    fn is_local(&self, node: &str) -> bool {
        Cluster::is_local(self, node)
    }

    fn members(&self) -> Vec<Arc<str>> {
        Cluster::members(self)
    }

    fn is_settled(&self) -> bool {
        Cluster::is_settled(self)
    }

    fn is_leaving(&self) -> bool {
        Cluster::is_leaving(self)
    }

    fn leave(&self) {
        Cluster::leave(self);
    }

    fn announce_settled(&self) {
        Cluster::announce_settled(self);
    }

    fn forget(&self, node: &str) -> Vec<String> {
        Cluster::forget(self, node)
    }

    fn routes_unlinked(&self) -> bool {
        Cluster::routes_unlinked(self)
    }

    fn is_linked(&self, node: &str) -> bool {
        Cluster::is_linked(self, node)
    }

    fn filter_added(&self, raw: &str) {
        Cluster::filter_added(self, raw);
    }

    fn filter_removed(&self, raw: &str) {
        Cluster::filter_removed(self, raw);
    }

    fn try_send(&self, node: &str, msg: PeerMsg) -> bool {
        Cluster::try_send(self, node, frame(msg))
    }

    fn send<'a>(&'a self, node: &'a str, msg: PeerMsg, wait: Duration) -> Sent<'a> {
        Box::pin(Cluster::send(self, node, frame(msg), wait))
    }

    fn broadcast(&self, msg: PeerMsg) {
        Cluster::broadcast(self, &frame(msg));
    }

    fn ask<'a>(&'a self, node: &'a str, question: String, timeout: Duration) -> Answered<'a> {
        Box::pin(Cluster::ask(self, node, question, timeout))
    }

    fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.config.heartbeat_ms)
    }

    fn replicate(
        &self,
        node: &str,
        client: &str,
        change: Change,
        pending: Option<&mut Pending>,
    ) -> bool {
        Cluster::replicate(self, node, client, change, pending)
    }

    fn streams(&self) -> Vec<(Arc<str>, u64)> {
        Cluster::streams(self)
    }

    fn is_handing_over(&self, node: &str) -> bool {
        Cluster::is_handing_over(self, node)
    }

    fn last_heard(&self, node: &str) -> Option<Instant> {
        Cluster::last_heard(self, node)
    }

    fn room<'a>(&'a self, node: &'a str, wait: Duration) -> Sent<'a> {
        Box::pin(Cluster::room(self, node, wait))
    }

    fn send_acked<'a>(
        &'a self,
        node: &'a str,
        msg: PeerMsg,
        pending: &mut Pending,
        wait: Duration,
    ) -> Sent<'a> {
        // Joined now, while the caller holds `pending`; the frame is
        // queued when the future first runs, which the caller awaits at once.
        let commit = pending.join();
        Box::pin(Cluster::send_acked(self, node, msg, commit, wait))
    }
}

/// Keeps the ring current: a peer that stops sending heartbeats leaves it
/// after `failure_timeout_ms` even while its TCP connection looks open.
pub async fn watch(cluster: Arc<Cluster>, broker: Arc<crate::broker::Broker>, shutdown: Shutdown) {
    let _guard = shutdown.guard();
    let every = Duration::from_millis(cluster.config.heartbeat_ms);
    let mut seen = 0;
    loop {
        // Every heartbeat, and at once when the ring changed or a peer
        // settled: the failover waits for this pass.
        let woken = ntex::util::select(
            std::pin::pin!(shutdown.sleep(every)),
            cluster.changed.notified(),
        )
        .await;
        if let ntex::util::Either::Left(false) = woken {
            break;
        }
        cluster.update_ring();
        let now = cluster
            .generation
            .load(std::sync::atomic::Ordering::Acquire);
        if now != seen {
            seen = now;
            broker.rebalance();
        }
        // After the pass that took over what this node serves of them.
        for node in cluster.parted() {
            broker.peer_gone(&node);
        }
        let m = broker.metrics();
        m.cluster_nodes
            .set(i64::try_from(cluster.ring().nodes().len()).unwrap_or(i64::MAX));
        m.replication_released.inc_by(cluster.take_released());
        m.replication_lag
            .set(i64::try_from(cluster.replication_lag()).unwrap_or(i64::MAX));
        broker.count_replicas();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertised_address_follows_the_configuration() {
        let any = ClusterConfig::default();
        assert_eq!(advertise(&any, "n0", None), "n0:7946");
        let pods = ClusterConfig {
            advertise_domain: Some("ringmq-nodes.mqtt.svc".into()),
            ..ClusterConfig::default()
        };
        assert_eq!(
            advertise(&pods, "ringmq-2", None),
            "ringmq-2.ringmq-nodes.mqtt.svc:7946"
        );
        let fixed = ClusterConfig {
            advertise: Some("10.0.0.5:7000".into()),
            ..pods
        };
        assert_eq!(advertise(&fixed, "ringmq-2", None), "10.0.0.5:7000");
        let local = ClusterConfig {
            listen: "127.0.0.1:7000".parse().unwrap_or_else(|e| panic!("{e}")),
            ..ClusterConfig::default()
        };
        assert_eq!(advertise(&local, "n0", None), "127.0.0.1:7000");
    }
}
