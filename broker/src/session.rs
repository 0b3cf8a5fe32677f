//! Session state: what outlives a connection.
//!
//! A session holds a client's subscriptions, the messages waiting for it and
//! the QoS 1/2 messages sent to it but not yet acknowledged. Each session has
//! its own mutex; the store is sharded by Client ID, so no lock is shared by
//! all messages. The connection that currently serves a session attaches to it
//! with a generation number and its own `Notify`, through which it is woken
//! when work arrives; a connection that finds another generation attached has
//! been taken over and closes.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::durable::{self, Pending, Released, SessionRecord, Store, StoredWill};
pub use crate::message::Delivery;
use crate::message::{Message, QoS};
use crate::peers::Handover;
use crate::retain::Replay;
use crate::router::{ClientId, SubOptions};
use crate::token::{Claims, TokenType};
use crate::tombstone::Tombstones;
use crate::util::FastMap;

const SHARDS: usize = 16;

/// The retained messages a subscription has still to receive.
#[derive(Debug, Clone)]
pub struct RetainedReplay {
    pub cursor: Replay,
    /// The subscription's options: its maximum QoS and identifier.
    pub opts: SubOptions,
}

/// Why a connection was told to go away (a takeover needs no kick: the old
/// connection sees another generation attached).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KickReason {
    /// An operator or the broker closed it.
    Administrative,
    /// The broker is shutting down.
    Shutdown,
    /// The session moved to another node of the cluster: the client
    /// reconnects and finds it there (no will: the session goes on).
    Moved,
}

/// What happened to a message offered to a session.
#[derive(Debug)]
pub enum Enqueued {
    /// Waiting for the online connection.
    Online,
    /// Stored as an offline message.
    Offline,
    /// Stored offline; the oldest offline message was dropped for it.
    OfflineDroppedOldest,
    /// Not stored: QoS 0 for an offline client or a full online queue.
    Dropped,
    /// QoS 1/2 queued for an online client beyond its queue limit: kept (in
    /// order), and the publisher should wait for room before it acknowledges
    /// (backpressure).
    OverLimit,
    /// The session has moved to this node of the cluster: the delivery comes
    /// back to be sent after it.
    Moved(Arc<str>, Delivery),
}

/// Limits that shape a session's queues.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    pub online: usize,
    /// QoS 1/2 messages queued past `online` while their publishers wait.
    pub overflow: usize,
    pub offline: usize,
}

#[derive(Debug)]
pub struct Session {
    pub client_id: ClientId,
    state: Mutex<State>,
    /// Where a persistent session's changes are written, in the order
    /// they happen under `state`'s lock.
    persist: Arc<dyn Store>,
    /// Signalled when the connection takes messages from the live queue.
    pub space: Notify,
    /// Messages the client published, and messages sent to it (O2).
    pub received: AtomicU64,
    pub sent: AtomicU64,
}

/// The connection serving a session.
#[derive(Debug, Clone)]
pub struct Conn {
    pub generation: u64,
    /// Wakes the connection when there is something to send or to do.
    pub wake: Arc<Notify>,
}

#[derive(Debug)]
pub struct State {
    /// The attached connection, `None` while offline.
    pub attached: Option<Conn>,
    /// Asks the attached connection to close.
    pub kick: Option<KickReason>,
    /// Kept after disconnect (cleanSession=false / session expiry > 0).
    pub persistent: bool,
    pub expiry: Duration,
    pub disconnected_at: Option<Instant>,
    /// Raw filter (with any `$share/` prefix) to its options.
    pub subscriptions: HashMap<String, SubOptions>,
    /// Live messages waiting for the online connection.
    pub queue: VecDeque<Delivery>,
    /// Messages stored while the client was offline (B5).
    pub offline: VecDeque<Delivery>,
    /// Sent with QoS 1/2, not yet acknowledged.
    pub inflight: Inflight,
    /// Sent before a reconnect and not acknowledged: resent first, with DUP.
    pub resend: VecDeque<Delivery>,
    /// Retained messages still to send for new subscriptions, one cursor
    /// per filter (`retain`), taken by the pump before live messages.
    pub replays: VecDeque<RetainedReplay>,
    /// The client switched to `$SYS/getOfflineMsg` pulls on this connection (B6).
    pub pull_mode: bool,
    /// The client asked for ordered storage (`$SYS/enableOrderMsg`, B11).
    pub ordered: bool,
    /// Token mode: offline messages wait until a token is verified.
    pub offline_hold: bool,
    /// Token mode: the tokens the current connection uploaded, one per type.
    pub tokens: HashMap<TokenType, Claims>,
    /// A will message waiting for its delay (MQTT 5), cancelled on reconnect;
    /// a persistent session's record keeps it across a restart.
    pub pending_will: Option<PendingWill>,
    /// Set when the session's state left for another node: what still
    /// arrives here follows it.
    pub moved_to: Option<Arc<str>>,
    /// What the connection query reports (O2).
    pub info: ClientInfo,
    /// The last number given to a stored delivery.
    pub last_seq: u64,
    /// Packet ids of QoS 2 PUBLISHes accepted from the client and not yet
    /// released (PUBREL), oldest first, at most the receive maximum.
    pub qos2_received: VecDeque<u16>,
    /// Packet ids of QoS 2 messages to the client whose PUBREC arrived and
    /// whose PUBCOMP has not: the next connection sends their PUBREL again
    /// (`pubrel`), and no new message takes them before.
    pub released: Vec<Released>,
    /// Read back from this node's store at start-up and not attached
    /// since, with the last message number read: while this node was down
    /// another node may have served it (from its replica), so a session
    /// handed over from there replaces what was read back rather than
    /// merging with it. Messages queued here since the restart (numbered
    /// above it) stay: they were acknowledged here.
    pub stale_upto: Option<u64>,
    /// The session's owner generation (`durable::SessionRecord::epoch`).
    pub epoch: u64,
    /// The will of the attached connection of a persistent session, in its
    /// record (`durable::SessionRecord::armed_will`).
    pub armed_will: Option<durable::ArmedWill>,
}

impl State {
    /// Forgets the messages numbered up to `upto` (read back from the
    /// store) and the QoS 2 exchanges and will read back with them; the
    /// subscriptions and the messages queued since stay.
    pub fn forget_stored_upto(&mut self, upto: u64) {
        let newer = |d: &Delivery| d.seq == 0 || d.seq > upto;
        self.queue.retain(newer);
        self.offline.retain(newer);
        self.resend.retain(newer);
        self.inflight.retain(newer);
        self.replays.clear();
        self.qos2_received.clear();
        self.released.clear();
        self.pending_will = None;
    }

    /// Whether packet id `id` waits for its PUBCOMP.
    pub fn is_released(&self, id: u16) -> bool {
        self.released.iter().any(|r| r.id == id)
    }

    /// The packet ids waiting for their PUBCOMP, for the PUBRELs a new
    /// connection sends again.
    pub fn released_ids(&self) -> Vec<u16> {
        self.released.iter().map(|r| r.id).collect()
    }

    /// The ids of the messages this session holds (in flight, to resend,
    /// offline, queued).
    pub fn message_ids(&self) -> std::collections::HashSet<crate::message::MessageId> {
        self.inflight
            .iter()
            .chain(self.resend.iter())
            .chain(self.offline.iter())
            .chain(self.queue.iter())
            .map(|d| d.msg.id)
            .collect()
    }

    /// The messages the store holds for this session (in flight, to
    /// resend, offline, queued), each with its number.
    pub fn stored(&self) -> impl Iterator<Item = &Delivery> {
        self.inflight
            .iter()
            .chain(self.resend.iter())
            .chain(self.offline.iter())
            .chain(self.queue.iter())
            .filter(|d| d.seq != 0)
    }

    /// Takes a detached persistent session's state for its new owner on
    /// another node; the session is left empty. What was in flight goes
    /// first, with DUP (it may have been sent), then what waited.
    pub fn take_handover(&mut self, client_id: &str, now: Instant) -> Handover {
        let left = self.disconnected_at.map_or(self.expiry, |t| {
            self.expiry.saturating_sub(now.saturating_duration_since(t))
        });
        let mut resend: Vec<Delivery> = self
            .inflight
            .take_in_order()
            .map(|mut d| {
                d.dup = true;
                d
            })
            .collect();
        resend.extend(self.resend.drain(..));
        resend.extend(self.queue.drain(..));
        let mut offline: Vec<Delivery> = self.offline.drain(..).collect();
        // A copy read back at start-up and not served since: what was
        // queued after the restart was acknowledged here and goes on even
        // if the copy is older than the receiver's state.
        let stale = self.stale_upto.take();
        let from_copy = stale.is_some();
        let since = match stale {
            Some(upto) => {
                let newer = |d: &Delivery| d.seq > upto;
                let mut since: Vec<Delivery> = resend.extract_if(.., |d| newer(d)).collect();
                since.extend(offline.extract_if(.., |d| newer(d)));
                since
            }
            None => Vec::new(),
        };
        Handover {
            client_id: client_id.to_owned(),
            expiry: left,
            ordered: self.ordered,
            subscriptions: self.subscriptions.drain().collect(),
            resend,
            offline,
            since,
            qos2_received: self.qos2_received.drain(..).collect(),
            released: self.released.drain(..).map(|r| r.id).collect(),
            will: self.pending_will.take().map(|w| (w.msg, w.due_ms)),
            epoch: self.epoch,
            from_copy,
            copy: None,
        }
    }

    /// Takes message `packet_id` out of flight, when the connection of
    /// `generation` (the one that sent it) is still the attached one.
    fn take_inflight(&mut self, generation: u64, packet_id: u16) -> Option<Delivery> {
        if self.attached.as_ref()?.generation != generation {
            return None;
        }
        self.inflight.remove(packet_id)
    }

    /// The session as the store keeps it.
    pub fn record(&self) -> SessionRecord {
        SessionRecord {
            expiry_ms: u64::try_from(self.expiry.as_millis()).unwrap_or(u64::MAX),
            disconnected_ms: match self.attached {
                Some(_) => 0,
                None => self.info.disconnected_at.unwrap_or(0),
            },
            ordered: self.ordered,
            qos2_ids: self.qos2_received.iter().copied().collect(),
            released: self.released.clone(),
            replays: self
                .replays
                .iter()
                .map(|r| {
                    let c = &r.cursor;
                    (c.filter().to_owned(), c.after().map(str::to_owned))
                })
                .collect(),
            epoch: self.epoch,
            armed_will: self.armed_will.clone(),
            subscriptions: self
                .subscriptions
                .iter()
                .map(|(f, o)| (f.clone(), *o))
                .collect(),
            will: self.pending_will.as_ref().map(|w| StoredWill {
                due_ms: w.due_ms,
                msg: w.msg.clone(),
            }),
        }
    }
}

/// A will waiting for its delay: published at `due_ms` (wall clock) unless
/// a connection after `generation` attached first.
#[derive(Debug, Clone)]
pub struct PendingWill {
    pub generation: u64,
    pub msg: Arc<Message>,
    pub due_ms: u64,
}

/// The last connection of a session, as the connection query shows it (O2).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientInfo {
    pub ip: Option<std::net::IpAddr>,
    /// `MQTT 3.1.1` or `MQTT 5`.
    pub protocol: &'static str,
    pub clean_session: bool,
    /// The user or AccessKey it authenticated as.
    pub user: Option<Arc<str>>,
    pub channel_id: Option<Arc<str>>,
    /// Milliseconds since the Unix epoch.
    pub connected_at: u64,
    pub disconnected_at: Option<u64>,
}

impl Session {
    fn new(client_id: ClientId, persist: Arc<dyn Store>) -> Self {
        Self {
            client_id,
            persist,
            state: Mutex::new(State {
                attached: None,
                kick: None,
                persistent: false,
                expiry: Duration::ZERO,
                disconnected_at: None,
                subscriptions: HashMap::new(),
                queue: VecDeque::new(),
                offline: VecDeque::new(),
                inflight: Inflight::default(),
                resend: VecDeque::new(),
                replays: VecDeque::new(),
                pull_mode: false,
                ordered: false,
                offline_hold: false,
                tokens: HashMap::new(),
                pending_will: None,
                moved_to: None,
                info: ClientInfo::default(),
                last_seq: 0,
                qos2_received: VecDeque::new(),
                released: Vec::new(),
                stale_upto: None,
                epoch: 0,
                armed_will: None,
            }),
            space: Notify::new(),
            received: AtomicU64::new(0),
            sent: AtomicU64::new(0),
        }
    }

    /// Locks the session state. A poisoned lock only means another thread
    /// panicked mid-update of plain data; the state is still usable.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_online(&self) -> bool {
        self.lock().attached.is_some()
    }

    /// Offers a message; online sessions queue it for the connection, offline
    /// persistent ones store QoS 1/2 messages as offline messages. A QoS 1/2
    /// message kept by a persistent session is written to the store, and
    /// `pending` (when given) waits for it.
    pub fn enqueue(
        &self,
        mut d: Delivery,
        limits: QueueLimits,
        pending: Option<&mut Pending>,
    ) -> Enqueued {
        let mut st = self.lock();
        if let Some(owner) = &st.moved_to {
            return Enqueued::Moved(owner.clone(), d);
        }
        let durable = st.persistent && d.qos != QoS::AtMostOnce && self.persist.is_durable();
        if let Some(conn) = &st.attached {
            let len = st.queue.len();
            // QoS 1/2 may go past the limit by `overflow`, so that waiting
            // publishers keep their order; beyond that, or for QoS 0, drop.
            if len >= limits.online
                && (d.qos == QoS::AtMostOnce || len >= limits.online + limits.overflow)
            {
                Enqueued::Dropped
            } else {
                let over = len >= limits.online;
                // Only a message into an empty queue wakes the pump: with
                // messages queued it is sending, about to take them, or
                // waiting for the client's credit, which new messages do not
                // give (woken for each, it took nothing, and across workers
                // each wake-up was a cross-thread wake).
                let wake = (len == 0).then(|| conn.wake.clone());
                if durable {
                    self.number_and_store(&mut st.last_seq, &mut d, pending);
                }
                st.queue.push_back(d);
                drop(st);
                if let Some(wake) = wake {
                    wake.notify_one();
                }
                if over {
                    Enqueued::OverLimit
                } else {
                    Enqueued::Online
                }
            }
        } else if d.qos == QoS::AtMostOnce || !st.persistent || limits.offline == 0 {
            Enqueued::Dropped
        } else {
            let dropped = if st.offline.len() >= limits.offline {
                if let Some(old) = st.offline.pop_front() {
                    self.persist.unqueue(&self.client_id, old.seq);
                }
                true
            } else {
                false
            };
            if durable {
                self.number_and_store(&mut st.last_seq, &mut d, pending);
            }
            st.offline.push_back(d);
            if dropped {
                Enqueued::OfflineDroppedOldest
            } else {
                Enqueued::Offline
            }
        }
    }

    /// Wakes the attached connection's pump (new work it cannot see coming).
    pub fn wake(&self) {
        let wake = self.lock().attached.as_ref().map(|c| c.wake.clone());
        if let Some(wake) = wake {
            wake.notify_one();
        }
    }

    /// Marks a packet id acknowledged by the connection of `generation`.
    pub fn acked(&self, generation: u64, packet_id: u16) {
        let mut st = self.lock();
        if let Some(d) = st.take_inflight(generation, packet_id) {
            self.persist.unqueue(&self.client_id, d.seq);
        }
    }

    /// PUBREC of a QoS 2 message: the client has it; its packet id stays
    /// taken until the PUBCOMP (`completed`). The PUBREL waits for the
    /// returned `Pending`: the release written to the store and the
    /// replicas. A client forgets the id at PUBREL, so a PUBLISH of it
    /// coming again after a crash or a failover would be a new message to
    /// it: whoever serves the session next must know it was released.
    ///
    /// `None`: no PUBREL. The PUBREC came on a connection a newer one of
    /// the client replaced, and that one already sent the message again
    /// (it waits for its PUBREC there): a PUBREL on the old connection
    /// would free the id at the client before that resend arrives, which
    /// the client would then take for a new message.
    pub fn pubrec(&self, generation: u64, packet_id: u16) -> Option<Pending> {
        let mut stored = Pending::default();
        let mut st = self.lock();
        let current = st
            .attached
            .as_ref()
            .is_some_and(|c| c.generation == generation);
        let d = if current {
            st.inflight.remove(packet_id)
        } else if st.is_released(packet_id) {
            None
        } else {
            // Replaced: the message is among those the new connection
            // sends again (or, with none attached, stored again): released
            // here if it is still waiting there.
            let waiting = |q: &VecDeque<Delivery>| {
                q.iter().position(|d| {
                    d.qos == QoS::ExactlyOnce
                        && d.packet_id().map(std::num::NonZeroU16::get) == Some(packet_id)
                })
            };
            match (waiting(&st.resend), waiting(&st.offline)) {
                (Some(i), _) => st.resend.remove(i),
                (None, Some(i)) => st.offline.remove(i),
                (None, None) => return None,
            }
        };
        let Some(d) = d else {
            return Some(stored);
        };
        if !st.is_released(packet_id) {
            st.released.push(Released {
                id: packet_id,
                seq: d.seq,
            });
        }
        // The record before the delete: a copy read back between the two
        // has the message and its release, and drops the message by its
        // number (`SessionStore::restore`); never neither.
        self.save(&st, Some(&mut stored));
        self.persist.unqueue(&self.client_id, d.seq);
        Some(stored)
    }

    /// PUBCOMP: the QoS 2 exchange of `packet_id` is over.
    pub fn completed(&self, packet_id: u16) {
        let mut st = self.lock();
        if let Some(i) = st.released.iter().position(|r| r.id == packet_id) {
            st.released.swap_remove(i);
            self.save(&st, None);
        }
    }

    /// Gives a delivery the session's next sequence number and writes it
    /// to the store; a QoS 2 one gets the flag its PUBLISH waits for.
    /// Called with the lock held (`last_seq` is the state's).
    pub fn number_and_store(
        &self,
        last_seq: &mut u64,
        d: &mut Delivery,
        pending: Option<&mut Pending>,
    ) {
        *last_seq += 1;
        d.seq = *last_seq;
        if d.qos == QoS::ExactlyOnce {
            // Its PUBLISH waits for this write (`message::Stored`).
            let (mut own, stored) = Pending::one(pending);
            self.persist
                .queue(&self.client_id, d.seq, d, Some(&mut own));
            own.seal();
            d.stored = Some(stored);
        } else {
            self.persist.queue(&self.client_id, d.seq, d, pending);
        }
    }

    /// Arms the will of the connection just attached: what this node's
    /// crash (a persistent session's record keeps it) or its loss (the
    /// replicas keep it, for a clean session too) publishes as the
    /// connection's abnormal end. Called with the lock held.
    pub fn arm_will(&self, st: &mut State, will: durable::ArmedWill) {
        st.armed_will = Some(will);
        if st.persistent {
            self.save(st, None);
        } else {
            self.persist.clean_will(&self.client_id, Some(&st.record()));
        }
    }

    /// The connection of `generation` of a clean session ends abnormally
    /// and is about to publish its will: the copies of it are forgotten
    /// first, on the same ordered links as the will's publish, so that a
    /// node that got the will got the forget before it and does not
    /// publish it again if this node is lost right after.
    pub fn disarm_clean_will(&self, generation: u64) {
        let mut st = self.lock();
        if st.persistent
            || st
                .attached
                .as_ref()
                .is_none_or(|c| c.generation != generation)
        {
            return;
        }
        if st.armed_will.take().is_some() {
            self.persist.clean_will(&self.client_id, None);
        }
    }

    /// Writes the session's record if it is persistent; `pending` (when
    /// given) waits for it. Called with the lock held, so that records reach
    /// the store in the order the session changed.
    pub fn save(&self, st: &State, pending: Option<&mut Pending>) {
        if st.persistent {
            self.persist.session(&self.client_id, &st.record(), pending);
        }
    }

    /// Writes the session whole (it arrived from another node, or from a
    /// replica taking over): the store's copy is replaced by its record and
    /// every QoS 1/2 message it holds, numbered if it was not yet.
    /// `pending` (when given) waits for all of it. Called with the lock
    /// held.
    pub fn save_all(&self, st: &mut State, mut pending: Option<&mut Pending>) {
        if !st.persistent || !self.persist.is_durable() {
            return;
        }
        self.persist
            .reset(&self.client_id, &st.record(), pending.as_deref_mut());
        let State {
            resend,
            offline,
            queue,
            inflight,
            last_seq,
            ..
        } = st;
        for d in inflight
            .iter_mut()
            .chain(resend.iter_mut())
            .chain(offline.iter_mut())
            .chain(queue.iter_mut())
        {
            if d.qos == QoS::AtMostOnce {
                continue;
            }
            if d.seq == 0 {
                self.number_and_store(last_seq, d, pending.as_deref_mut());
            } else {
                self.persist
                    .queue(&self.client_id, d.seq, d, pending.as_deref_mut());
            }
        }
    }

    /// MQTT 5 DISCONNECT changed the session expiry: a session that is no
    /// longer persistent leaves the store.
    /// Returns the epoch and the expiry of the persistent state that ended
    /// so, if one did (for its tombstone).
    pub fn set_expiry(&self, expiry: Duration) -> Option<(u64, Duration)> {
        let mut st = self.lock();
        let was = st.persistent;
        let before = st.expiry;
        st.expiry = expiry;
        st.persistent = expiry > Duration::ZERO;
        if was && !st.persistent {
            self.persist.forget(&self.client_id);
            // A new state from here on (`Tombstones::epoch_after`).
            let ended = st.epoch;
            st.epoch = st.epoch.saturating_add(1);
            Some((ended, before))
        } else {
            self.save(&st, None);
            None
        }
    }

    /// Whether the QoS 2 PUBLISH `id` was accepted and not yet released.
    pub fn holds_qos2(&self, id: u16) -> bool {
        self.lock().qos2_received.contains(&id)
    }

    /// Remembers an accepted QoS 2 PUBLISH of a persistent session until
    /// its PUBREL (at most `max`, the oldest forgotten first); the record
    /// joins `pending`.
    pub fn hold_qos2(&self, id: u16, max: usize, pending: &mut Pending) {
        let mut st = self.lock();
        if !st.persistent {
            return;
        }
        st.qos2_received.retain(|&x| x != id);
        st.qos2_received.push_back(id);
        while st.qos2_received.len() > max {
            st.qos2_received.pop_front();
        }
        self.save(&st, Some(pending));
    }

    /// PUBREL: the client will not send `id` again.
    pub fn release_qos2(&self, id: u16) {
        let mut st = self.lock();
        if let Some(i) = st.qos2_received.iter().position(|&x| x == id) {
            st.qos2_received.remove(i);
            self.save(&st, None);
        }
    }

    /// A message the session will not send (expired, too large): out of the store.
    pub fn discard(&self, d: &Delivery) {
        self.persist.unqueue(&self.client_id, d.seq);
    }

    /// Asks the attached connection to close.
    pub fn kick(&self, reason: KickReason) {
        let mut st = self.lock();
        if let Some(conn) = st.attached.clone() {
            st.kick = Some(reason);
            drop(st);
            conn.wake.notify_one();
        }
    }
}

/// What `SessionStore::attach` found.
#[derive(Debug)]
pub struct Attached {
    pub session: Arc<Session>,
    pub conn: Conn,
    /// An existing session was resumed (CONNACK session present).
    pub present: bool,
    /// A live connection held the Client ID and has been told to close.
    pub took_over: bool,
    /// Subscriptions of a discarded previous session, to drop from the router.
    pub discarded_subscriptions: Vec<String>,
}

/// Deliveries sent with QoS 1/2 and not yet acknowledged, in the order they
/// were sent: a reconnecting client gets them again in that order
/// (MQTT-4.6.0-1), also across the wrap of packet ids, which an ordering by
/// id would break. Clients acknowledge in order, so an acknowledgement is
/// usually the oldest entry.
#[derive(Debug, Default)]
pub struct Inflight {
    entries: VecDeque<(u16, Delivery)>,
    /// Packet ids are given out counting up (wrapping), so they rise from
    /// the oldest entry to the newest; set when an id came round past the
    /// oldest (a message left unacknowledged for 65 535 others), until the
    /// window empties.
    came_round: bool,
}

impl Inflight {
    pub fn insert(&mut self, packet_id: u16, d: Delivery) {
        if let (Some((first, _)), Some((last, _))) = (self.entries.front(), self.entries.back())
            && packet_id.wrapping_sub(*first) <= last.wrapping_sub(*first)
        {
            self.came_round = true;
        }
        self.entries.push_back((packet_id, d));
    }

    /// Whether `packet_id` is taken. Called for every QoS 1/2 delivery with
    /// the id after the newest: while ids rise from the oldest entry, one
    /// past the newest is free without a look at each entry (the window can
    /// be `max_inflight`, up to 65 535, long).
    pub fn contains(&self, packet_id: u16) -> bool {
        let (Some((first, _)), Some((last, _))) = (self.entries.front(), self.entries.back())
        else {
            return false;
        };
        if !self.came_round && packet_id.wrapping_sub(*first) > last.wrapping_sub(*first) {
            return false;
        }
        self.entries.iter().any(|(id, _)| *id == packet_id)
    }

    pub fn remove(&mut self, packet_id: u16) -> Option<Delivery> {
        let i = self.entries.iter().position(|(id, _)| *id == packet_id)?;
        let removed = self.entries.remove(i).map(|(_, d)| d);
        if self.entries.is_empty() {
            self.came_round = false;
        }
        removed
    }

    /// The messages in flight, in the order they were sent.
    pub fn iter(&self) -> impl Iterator<Item = &Delivery> {
        self.entries.iter().map(|(_, d)| d)
    }

    /// Keeps the messages in flight that `keep` says to.
    fn retain(&mut self, keep: impl Fn(&Delivery) -> bool) {
        self.entries.retain(|(_, d)| keep(d));
    }

    /// The messages in flight, to number them (`Session::save_all`).
    fn iter_mut(&mut self) -> impl Iterator<Item = &mut Delivery> {
        self.entries.iter_mut().map(|(_, d)| d)
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.came_round = false;
    }

    /// Empties it, oldest first.
    pub fn take_in_order(&mut self) -> impl Iterator<Item = Delivery> + use<> {
        self.came_round = false;
        std::mem::take(&mut self.entries)
            .into_iter()
            .map(|(_, d)| d)
    }
}

/// All sessions of this node, sharded by Client ID.
#[derive(Debug)]
pub struct SessionStore {
    shards: Vec<RwLock<FastMap<ClientId, Arc<Session>>>>,
    hasher: foldhash::fast::RandomState,
    generation: std::sync::atomic::AtomicU64,
    persist: Arc<dyn Store>,
    /// Persistent sessions that ended here.
    ended: Tombstones,
}

impl Default for SessionStore {
    /// Sessions in memory only.
    fn default() -> Self {
        Self::new(Arc::new(durable::NoStore))
    }
}

impl SessionStore {
    /// Sessions whose persistent state is written through `persist`.
    pub fn new(persist: Arc<dyn Store>) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
            hasher: foldhash::fast::RandomState::default(),
            generation: std::sync::atomic::AtomicU64::new(1),
            persist,
            ended: Tombstones::default(),
        }
    }

    /// The persistent sessions that ended here (`tombstone`).
    pub fn ended(&self) -> &Tombstones {
        &self.ended
    }

    /// Ends `client`'s session if it is one read back from the store and
    /// not served since (`stale_upto`) of `epoch` or older: another node
    /// served it after this one stopped, and it ended there. Returns its
    /// subscriptions, for the router.
    pub fn end_stale(&self, client: &str, epoch: u64) -> Option<Vec<String>> {
        let mut map = self
            .shard(client)
            .write()
            .unwrap_or_else(|e| e.into_inner());
        let session = map.get(client)?.clone();
        let mut st = session.lock();
        if st.stale_upto.is_none() || st.attached.is_some() || st.epoch > epoch {
            return None;
        }
        // A connection waiting for this session's newer state
        // (`Broker::await_current`) goes on, and gets a new one.
        st.stale_upto = None;
        st.pending_will = None;
        self.persist.forget(&session.client_id);
        let subs = st.subscriptions.drain().map(|(f, _)| f).collect();
        drop(st);
        map.remove(client);
        Some(subs)
    }

    /// A persistent session read back from the store at start-up: offline,
    /// its messages in the offline queue in the order they were queued.
    /// Returns it with its subscriptions, for the router.
    pub fn restore(
        &self,
        mut rs: durable::RecoveredSession,
        now: Instant,
        now_ms: u64,
    ) -> Arc<Session> {
        // A message the client PUBRECed whose delete did not reach the
        // store before it stopped: the client has it.
        let gone = rs.drop_released();
        let session = Arc::new(Session::new(rs.client.clone(), self.persist.clone()));
        {
            let mut st = session.lock();
            st.persistent = true;
            st.expiry = Duration::from_millis(rs.record.expiry_ms);
            st.disconnected_at = Some(durable::disconnected_at(&rs.record, now, now_ms));
            st.info.disconnected_at = Some(match rs.record.disconnected_ms {
                0 => now_ms,
                t => t,
            });
            st.ordered = rs.record.ordered;
            st.epoch = rs.record.epoch;
            st.qos2_received = rs.record.qos2_ids.into_iter().collect();
            st.released = rs.record.released;
            // Generation 0 is no connection's: any reconnect cancels it.
            st.pending_will = rs.record.will.map(|w| PendingWill {
                generation: 0,
                msg: w.msg,
                due_ms: w.due_ms,
            });
            st.subscriptions = rs.record.subscriptions.into_iter().collect();
            st.last_seq = rs.messages.last().map_or(0, |d| d.seq);
            for seq in gone {
                session.persist.unqueue(&session.client_id, seq);
            }
            st.offline = rs.messages.into();
            // A crash while it was connected: the record says "connected";
            // from now on it is offline (the others are stored as they are).
            if rs.record.disconnected_ms == 0 {
                session.save(&st, None);
            }
        }
        self.shard(&rs.client)
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(rs.client, session.clone());
        session
    }

    fn shard(&self, client_id: &str) -> &RwLock<FastMap<ClientId, Arc<Session>>> {
        // The modulo keeps the value below SHARDS, so the cast cannot truncate.
        let i = (self.hasher.hash_one(client_id) % SHARDS as u64) as usize;
        &self.shards[i]
    }

    pub fn get(&self, client_id: &str) -> Option<Arc<Session>> {
        self.shard(client_id)
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(client_id)
            .cloned()
    }

    /// Number of sessions, online or not.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Attaches a new connection to the Client ID's session, creating it or
    /// discarding the old one as `clean` asks. A connection already attached
    /// is kicked: the newest connection wins (B8).
    pub fn attach(&self, client_id: &str, clean: bool, expiry: Duration) -> Attached {
        let generation = self
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut map = self
            .shard(client_id)
            .write()
            .unwrap_or_else(|e| e.into_inner());
        let session = map
            .entry(Arc::from(client_id))
            .or_insert_with_key(|k| Arc::new(Session::new(k.clone(), self.persist.clone())))
            .clone();
        drop(map);
        let conn = Conn {
            generation,
            wake: Arc::new(Notify::new()),
        };
        let mut st = session.lock();
        // A client is back: its session is served here from now on.
        st.stale_upto = None;
        let previous = st.attached.replace(conn.clone());
        let took_over = previous.is_some();
        let existed = st.persistent || took_over || !st.subscriptions.is_empty();
        let was_persistent = st.persistent;
        let mut discarded = Vec::new();
        let present = if clean || !st.persistent {
            if st.persistent {
                // What the store kept of the old session goes with it, and
                // a copy of it elsewhere must not bring it back.
                self.persist.forget(&session.client_id);
                self.ended.record(&session.client_id, st.epoch, st.expiry);
            }
            // A new state, past every one that ended.
            st.epoch = st.epoch.max(self.ended.epoch_after(client_id));
            discarded = st.subscriptions.drain().map(|(f, _)| f).collect();
            st.queue.clear();
            st.offline.clear();
            st.inflight.clear();
            st.resend.clear();
            st.replays.clear();
            st.ordered = false;
            st.qos2_received.clear();
            st.released.clear();
            false
        } else {
            if expiry.is_zero() {
                // MQTT 5: resumed with a session expiry of 0, the session
                // ends with this connection. Its stored state goes now, as
                // for a DISCONNECT that sets the expiry to 0, or a restart
                // would bring it back.
                self.persist.forget(&session.client_id);
                self.ended.record(&session.client_id, st.epoch, st.expiry);
                st.epoch = st.epoch.saturating_add(1);
            }
            // Unacknowledged messages of the previous connection go out again first.
            let unacked: Vec<Delivery> = st.inflight.take_in_order().collect();
            let live: Vec<Delivery> = st.queue.drain(..).collect();
            for mut d in unacked {
                d.dup = true;
                st.resend.push_back(d);
            }
            st.resend.extend(live);
            existed
        };
        st.persistent = expiry > Duration::ZERO;
        st.expiry = expiry;
        st.disconnected_at = None;
        st.pull_mode = false;
        st.offline_hold = false;
        st.tokens.clear();
        st.pending_will = None;
        // The new connection's own will, if any, is armed by it.
        if st.armed_will.take().is_some() && !was_persistent {
            self.persist.clean_will(&session.client_id, None);
        }
        st.kick = None;
        session.save(&st, None);
        drop(st);
        if let Some(old) = previous {
            // The old connection sees another generation attached and closes.
            old.wake.notify_one();
        }
        Attached {
            session,
            conn,
            present,
            took_over,
            discarded_subscriptions: discarded,
        }
    }

    /// Detaches the connection of `generation`. Returns the subscriptions to
    /// drop from the router when the session ends with it.
    pub fn detach(&self, session: &Arc<Session>, generation: u64) -> Option<Vec<String>> {
        let mut st = session.lock();
        if st
            .attached
            .as_ref()
            .is_none_or(|c| c.generation != generation)
        {
            // A newer connection owns the session now.
            return None;
        }
        st.attached = None;
        st.kick = None;
        // Published or dropped by the connection that armed it.
        if st.armed_will.take().is_some() && !st.persistent {
            session.persist.clean_will(&session.client_id, None);
        }
        if st.persistent {
            st.disconnected_at = Some(Instant::now());
            st.info.disconnected_at = Some(crate::message::now_ms());
            let unacked: Vec<Delivery> = st.inflight.take_in_order().collect();
            let mut front: VecDeque<Delivery> = unacked
                .into_iter()
                .map(|mut d| {
                    d.dup = true;
                    // Stored again with its DUP flag, so that it keeps it
                    // across a restart (at most the in-flight window).
                    if d.seq != 0 {
                        session.persist.queue(&session.client_id, d.seq, &d, None);
                    }
                    d
                })
                .collect();
            front.extend(st.resend.drain(..));
            front.extend(st.queue.drain(..).filter(|d| d.qos != QoS::AtMostOnce));
            st.resend = front;
            session.save(&st, None);
            drop(st);
            // Publishers waiting for room in the live queue need not wait
            // for a client that is gone.
            session.space.notify_waiters();
            None
        } else {
            let subs = st.subscriptions.drain().map(|(f, _)| f).collect();
            st.queue.clear();
            st.resend.clear();
            st.replays.clear();
            drop(st);
            session.space.notify_waiters();
            self.remove_if_idle(session);
            Some(subs)
        }
    }

    fn remove_if_idle(&self, session: &Arc<Session>) {
        let mut map = self
            .shard(&session.client_id)
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(current) = map.get(&session.client_id)
            && Arc::ptr_eq(current, session)
            && session.lock().attached.is_none()
        {
            map.remove(&session.client_id);
        }
    }

    /// Removes sessions whose expiry passed; returns each with its subscriptions.
    pub fn expire(&self, now: Instant) -> Vec<(ClientId, Vec<String>)> {
        let mut gone = Vec::new();
        for shard in &self.shards {
            let mut map = shard.write().unwrap_or_else(|e| e.into_inner());
            map.retain(|id, s| {
                let mut st = s.lock();
                let expired = st.attached.is_none()
                    && st
                        .disconnected_at
                        .is_some_and(|t| now.saturating_duration_since(t) >= st.expiry);
                if expired {
                    self.persist.forget(id);
                    self.ended.record(id, st.epoch, st.expiry);
                    gone.push((
                        id.clone(),
                        st.subscriptions.drain().map(|(f, _)| f).collect(),
                    ));
                }
                !expired
            });
        }
        gone
    }

    /// Takes a session out of this node's sessions as it moves to another
    /// node; the durable store keeps it until that node does
    /// (`forget_moved`).
    pub fn remove(&self, client_id: &str) -> Option<Arc<Session>> {
        self.shard(client_id)
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(client_id)
    }

    /// The durable store (and the copies of it elsewhere, but for the one
    /// node `to` may keep) forgets a session that moved to node `to`.
    pub fn forget_moved(&self, client: &Arc<str>, to: &str) {
        self.persist.forget_moved(client, to);
    }

    /// As `forget_moved`, unless the client opened a session here again
    /// meanwhile (whose `attach` forgot the old one first). Checked and
    /// done under the shard's lock, which that `attach` takes to add the
    /// session, so that its first record is never forgotten.
    pub fn forget_moved_unless_back(&self, client: &Arc<str>, to: &str) {
        let map = self.shard(client).read().unwrap_or_else(|e| e.into_inner());
        if !map.contains_key(client) {
            self.persist.forget_moved(client, to);
        }
    }

    /// The session another node hands over: the one that exists already (its
    /// client reconnected first), or a new offline persistent one.
    pub fn adopt(&self, client_id: &str) -> Arc<Session> {
        let mut map = self
            .shard(client_id)
            .write()
            .unwrap_or_else(|e| e.into_inner());
        map.entry(Arc::from(client_id))
            .or_insert_with_key(|k| {
                let s = Session::new(k.clone(), self.persist.clone());
                {
                    let mut st = s.lock();
                    st.persistent = true;
                    st.disconnected_at = Some(Instant::now());
                    st.info.disconnected_at = Some(crate::message::now_ms());
                }
                Arc::new(s)
            })
            .clone()
    }

    /// Every session, for shutdown, housekeeping and rebalancing.
    pub fn all(&self) -> Vec<Arc<Session>> {
        self.shards
            .iter()
            .flat_map(|s| {
                s.read()
                    .unwrap_or_else(|e| e.into_inner())
                    .values()
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::MessageId;

    fn delivery(qos: QoS, n: u8) -> Delivery {
        let msg = Message::new(
            MessageId(u64::from(n)),
            "t".into(),
            vec![n].into(),
            qos,
            false,
            Arc::from("p"),
        );
        Delivery::new(Arc::new(msg), qos)
    }

    #[test]
    fn inflight_ids_are_found_also_when_ids_came_round_past_a_stuck_one() {
        let mut f = Inflight::default();
        // A message left unacknowledged while ids went round the range.
        f.insert(5, delivery(QoS::AtLeastOnce, 0));
        for id in [65_534, 65_535, 1, 2] {
            f.insert(id, delivery(QoS::AtLeastOnce, 1));
        }
        assert!(f.contains(5) && f.contains(65_535) && f.contains(1));
        assert!(!f.contains(3) && !f.contains(4) && !f.contains(6));
        assert!(f.remove(2).is_some() && !f.contains(2));
        // Past the stuck one: ids no longer rise from the oldest entry.
        f.insert(6, delivery(QoS::AtLeastOnce, 2));
        f.insert(7, delivery(QoS::AtLeastOnce, 3));
        assert!(f.contains(6) && f.contains(7) && f.contains(5) && f.contains(1));
        assert!(!f.contains(8) && !f.contains(2));
        let order: Vec<u8> = f.take_in_order().map(|d| d.msg.payload[0]).collect();
        assert_eq!(order, [0, 1, 1, 1, 2, 3]);
        assert!(!f.contains(5));
    }

    const LIMITS: QueueLimits = QueueLimits {
        online: 100,
        overflow: 100,
        offline: 3,
    };

    #[test]
    fn offline_queue_drops_oldest() {
        let store = SessionStore::default();
        let a = store.attach("c", false, Duration::from_secs(60));
        assert!(!a.present);
        assert!(store.detach(&a.session, a.conn.generation).is_none());
        let s = &a.session;
        assert!(matches!(
            s.enqueue(delivery(QoS::AtMostOnce, 0), LIMITS, None),
            Enqueued::Dropped
        ));
        for n in 1..=3 {
            assert!(matches!(
                s.enqueue(delivery(QoS::AtLeastOnce, n), LIMITS, None),
                Enqueued::Offline
            ));
        }
        assert!(matches!(
            s.enqueue(delivery(QoS::AtLeastOnce, 4), LIMITS, None),
            Enqueued::OfflineDroppedOldest
        ));
        let payloads: Vec<u8> = s.lock().offline.iter().map(|d| d.msg.payload[0]).collect();
        assert_eq!(payloads, [2, 3, 4]);
        let b = store.attach("c", false, Duration::from_secs(60));
        assert!(b.present);
        assert_eq!(b.session.lock().offline.len(), 3);
    }

    #[test]
    fn full_online_queue_takes_qos1_over_the_limit_and_drops_qos0() {
        let store = SessionStore::default();
        let a = store.attach("c", true, Duration::ZERO);
        let tight = QueueLimits {
            online: 1,
            overflow: 1,
            offline: 0,
        };
        let s = &a.session;
        assert!(matches!(
            s.enqueue(delivery(QoS::AtLeastOnce, 1), tight, None),
            Enqueued::Online
        ));
        assert!(matches!(
            s.enqueue(delivery(QoS::AtMostOnce, 2), tight, None),
            Enqueued::Dropped
        ));
        assert!(matches!(
            s.enqueue(delivery(QoS::AtLeastOnce, 3), tight, None),
            Enqueued::OverLimit
        ));
        assert!(matches!(
            s.enqueue(delivery(QoS::AtLeastOnce, 4), tight, None),
            Enqueued::Dropped
        ));
    }

    #[test]
    fn takeover_kicks_the_old_connection() {
        let store = SessionStore::default();
        let a = store.attach("c", true, Duration::ZERO);
        let b = store.attach("c", true, Duration::ZERO);
        assert!(b.took_over);
        let attached = a.session.lock().attached.as_ref().map(|c| c.generation);
        assert_eq!(attached, Some(b.conn.generation));
        // The old connection's detach must not end the new connection's session.
        assert!(store.detach(&a.session, a.conn.generation).is_none());
        assert!(store.get("c").is_some());
        assert!(store.detach(&b.session, b.conn.generation).is_some());
        assert!(store.get("c").is_none());
    }

    #[test]
    fn clean_session_discards_state_and_expiry_removes() {
        let store = SessionStore::default();
        let a = store.attach("c", false, Duration::from_millis(1));
        a.session.lock().subscriptions.insert(
            "x/#".into(),
            SubOptions {
                qos: QoS::AtLeastOnce,
                no_local: false,
                retain_as_published: false,
                id: None,
            },
        );
        store.detach(&a.session, a.conn.generation);
        let later = Instant::now() + Duration::from_secs(1);
        let gone = store.expire(later);
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].1, ["x/#"]);
        assert!(store.get("c").is_none());
    }
}
