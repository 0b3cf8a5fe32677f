//! The durable store as the core sees it (a port): what a persistent
//! session, its queued QoS 1/2 messages and the retained messages must
//! survive, and how an acknowledgement waits until they would.
//!
//! The core (`session`, `retain`, `broker`) calls a `Store` as state
//! changes, under the lock that orders the change, and collects what an
//! acknowledgement must wait for in a `Pending`; `persist` is the store
//! of a node (fjall behind one group-commit writer thread), `NoStore`
//! keeps nothing (`persistence.dir: null`, and the core's unit tests).
//! `wake` hands finished commits back to the connection worker that waits
//! for them, once per batch.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::message::{Delivery, Message};
use crate::router::SubOptions;

mod commit;
mod wake;

pub use commit::{Commit, Pending};
#[cfg(test)]
pub(crate) use wake::current as current_mailbox;
pub use wake::{Mailbox, attach_worker};

/// A change did not reach the disk (disk full, read-only, I/O error): what
/// waited for it is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the store could not write (disk full or read-only?)")]
pub struct WriteFailed;

/// Where the core keeps what must outlive the process. Every method returns
/// at once: a change is queued in the order of the calls, and a `pending`
/// given with it resolves once it is written (`Pending::wait`).
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Whether changes are kept at all (false: memory only).
    fn is_durable(&self) -> bool;
    /// False while the store cannot write (disk full, read-only).
    fn is_healthy(&self) -> bool;
    /// Stores a session's record; `pending` (if any) waits for it.
    fn session(&self, client: &Arc<str>, record: &SessionRecord, pending: Option<&mut Pending>);
    /// Drops a session and every message queued for it.
    fn forget(&self, client: &Arc<str>);
    /// Drops a session that moved to node `to`: as `forget`, except that
    /// the copy `to` may keep stays there, for the hand-over to take its
    /// messages from (`peers::Handover::copy`).
    fn forget_moved(&self, client: &Arc<str>, _to: &str) {
        self.forget(client);
    }
    /// The session arrives whole (from another node, or a replica taking
    /// over): what was kept of it is replaced by `record`, and its messages
    /// follow as `queue` calls. `pending` (if any) waits for it.
    fn reset(&self, client: &Arc<str>, record: &SessionRecord, pending: Option<&mut Pending>) {
        self.forget(client);
        self.session(client, record, pending);
    }
    /// A clean session's connection armed a will (`Some`: its record, of
    /// expiry 0, naming the will) or no longer has one (`None`: it ended,
    /// or its will was published). Kept where the node's loss leaves it
    /// (the replicas: the Client ID's next owner publishes it), not in the
    /// node's own store: a clean session does not outlive its node's
    /// restart, and neither does its connection's will.
    fn clean_will(&self, _client: &Arc<str>, _record: Option<&SessionRecord>) {}
    /// Stores message `seq` of a session's queue.
    fn queue(&self, client: &str, seq: u64, delivery: &Delivery, pending: Option<&mut Pending>);
    /// Deletes message `seq` of a session's queue: acknowledged, dropped or expired.
    fn unqueue(&self, client: &str, seq: u64);
    /// Stores (or, for an empty payload, deletes) the retained message of a topic.
    fn retain(&self, msg: &Message, pending: Option<&mut Pending>);
    /// Updates the store's size metric (housekeeping calls it).
    fn measure(&self);
}

/// A store that keeps nothing: every change is done at once.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoStore;

impl Store for NoStore {
    fn is_durable(&self) -> bool {
        false
    }
    fn is_healthy(&self) -> bool {
        true
    }
    fn session(&self, _: &Arc<str>, _: &SessionRecord, _: Option<&mut Pending>) {}
    fn forget(&self, _: &Arc<str>) {}
    fn queue(&self, _: &str, _: u64, _: &Delivery, _: Option<&mut Pending>) {}
    fn unqueue(&self, _: &str, _: u64) {}
    fn retain(&self, _: &Message, _: Option<&mut Pending>) {}
    fn measure(&self) {}
}

/// A change of one persistent session's durable state, as its owner sends
/// it to the nodes that keep a replica (`replica`), in the order the
/// session changed.
#[derive(Debug, Clone)]
pub enum Change {
    /// The session's record changed.
    Record(SessionRecord),
    /// The session arrives whole: what was held of it is replaced by this
    /// record; its queued messages follow.
    Reset(SessionRecord),
    /// A message joined its queue (`Delivery::seq` set).
    Queue(Delivery),
    /// Message `seq` left its queue (acknowledged, dropped, expired).
    Unqueue(u64),
    /// The session ended, or left the sender for another node.
    Forget,
}

/// A persistent session as stored: what a reconnect needs besides its
/// messages.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRecord {
    pub expiry_ms: u64,
    /// When the client disconnected; 0 while it was connected (a crash:
    /// the expiry counts from the restart).
    pub disconnected_ms: u64,
    /// The client asked for ordered storage (B11).
    pub ordered: bool,
    /// QoS 2 packet ids accepted and not yet released.
    pub qos2_ids: Vec<u16>,
    pub subscriptions: Vec<(String, SubOptions)>,
    /// An MQTT 5 will waiting for its delay (or the session's end).
    pub will: Option<StoredWill>,
    /// Outbound QoS 2 messages PUBRECed and not yet PUBCOMPed.
    pub released: Vec<Released>,
    /// Retained replays of new subscriptions still under way: the filter
    /// and the last topic paged.
    pub replays: Vec<(String, Option<String>)>,
    /// The will of the connection attached when the record was written:
    /// read back with the session marked connected (a crash, or a lost
    /// owner's replica), it is published as that connection's abnormal end.
    pub armed_will: Option<ArmedWill>,
    /// Its owner generation: one more at each change of owner (a handover,
    /// a replica served after its owner was lost). Of two states of one
    /// session, the one of the lower epoch is an older one (`peers::Handover`).
    pub epoch: u64,
}

impl SessionRecord {
    /// The record of a clean session's connection (expiry 0): it only
    /// carries the connection's armed will, and is never a session to
    /// serve (`Store::clean_will`).
    pub fn is_clean(&self) -> bool {
        self.expiry_ms == 0
    }
}

/// The will of a connected client, with its delay (MQTT 5 will delay;
/// 0 for 3.1.1).
#[derive(Debug, Clone)]
pub struct ArmedWill {
    pub delay_ms: u64,
    pub msg: Arc<Message>,
}

impl PartialEq for ArmedWill {
    fn eq(&self, other: &Self) -> bool {
        self.delay_ms == other.delay_ms && same_will(&self.msg, &other.msg)
    }
}

/// A QoS 2 message to the client whose PUBREC arrived and whose PUBCOMP
/// has not: its packet id stays taken, and the next connection sends its
/// PUBREL again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    pub id: u16,
    /// The message's number in the queue (0: it was not stored). The
    /// record saying it was released is written before the message's
    /// delete; a copy read back between the two drops the message by this
    /// number rather than send it again.
    pub seq: u64,
}

/// A will whose client went away without DISCONNECT, published at `due_ms`
/// (wall clock) unless the client is back before (MQTT 5 3.1.3.2.2).
#[derive(Debug, Clone)]
pub struct StoredWill {
    pub due_ms: u64,
    pub msg: Arc<Message>,
}

impl PartialEq for StoredWill {
    /// The same will: due at the same time, the same message as a
    /// subscriber would see it (its clock fields are read back relative to
    /// the restart, so they are not compared).
    fn eq(&self, other: &Self) -> bool {
        self.due_ms == other.due_ms && same_will(&self.msg, &other.msg)
    }
}

/// The same will message as a subscriber would see it (its clock fields are
/// read back relative to the restart, so they are not compared).
fn same_will(a: &Message, b: &Message) -> bool {
    a.id == b.id
        && a.topic == b.topic
        && a.payload == b.payload
        && a.qos == b.qos
        && a.retain == b.retain
        && a.publisher == b.publisher
        && a.properties == b.properties
}

/// A persistent session as the store kept it.
#[derive(Debug)]
pub struct RecoveredSession {
    pub client: Arc<str>,
    pub record: SessionRecord,
    /// Its queued messages in the order they were queued, `seq` set.
    pub messages: Vec<Delivery>,
}

impl RecoveredSession {
    /// Drops the messages the record says the client PUBRECed: their
    /// deletes did not reach the store before it stopped (`Released::seq`).
    /// Returns their numbers.
    pub fn drop_released(&mut self) -> Vec<u64> {
        let released = &self.record.released;
        let mut gone = Vec::new();
        self.messages.retain(|d| {
            let keep = d.seq == 0 || !released.iter().any(|r| r.seq == d.seq);
            if !keep {
                gone.push(d.seq);
            }
            keep
        });
        gone
    }
}

/// Everything read back.
#[derive(Debug, Default)]
pub struct Recovered {
    pub sessions: Vec<RecoveredSession>,
    pub retained: Vec<Message>,
    /// Delayed wills of sessions that ended while the node was down: due
    /// now (with whether their session asked for ordered storage).
    pub wills: Vec<(Arc<Message>, bool)>,
}

/// When a recovered session disconnected, as an `Instant` of this process.
pub fn disconnected_at(rec: &SessionRecord, now: Instant, now_ms: u64) -> Instant {
    if rec.disconnected_ms == 0 {
        return now;
    }
    let ago = Duration::from_millis(now_ms.saturating_sub(rec.disconnected_ms));
    now.checked_sub(ago).unwrap_or(now)
}
