//! Acknowledged frames over the links: a session change as it travels to
//! a replica (`Frame::Replicate`, the store's record format for its value),
//! a publish forwarded to the owner of its subscribers, and a session
//! handed to its new owner, with the sender's account of which of them a
//! client's acknowledgement (or the sender's letting go of a session)
//! waits for.
//!
//! Each such frame for a peer gets the next number of its sequence for
//! that peer, taken under the same lock as its place in the peer's queue,
//! so numbers follow the order the peer reads them in. Replica changes and
//! forwarded publishes are two sequences: the peer acknowledges the
//! highest number of each it is through with (`Ack`, tagged with this
//! process's run and the sequence): a replica change once applied to its
//! copy (`replica::Replicas`), a publish once the persistent sessions it
//! reached keep it, a session once installed and written. Apart, because a publish waits for its sessions'
//! replicas: in one sequence, a replica change behind it on the same link
//! would wait for it too, and two nodes forwarding to each other whose
//! sessions replicate to each other would each wait for the other's
//! acknowledgement for ever. Frames queued while a link is down go out on
//! the next one with their numbers, so the count never restarts within a
//! process.
//!
//! When the peer leaves the ring first, what waits for it is released: a
//! replica change as kept (this node has it; the session is
//! under-replicated until the next replica has it whole), a forwarded
//! publish or a session handed over as refused (nobody may have it: the
//! client sends it again; the sender serves the session again).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use ntex::util::Bytes;
use ring::rand::{SecureRandom, SystemRandom};

use tokio::sync::mpsc;

use super::wire::{ChangeKind, Frame};
use super::{Cluster, ClusterError, DataQueue};
use crate::broker::Broker;
use crate::durable::{Change, Commit, Mailbox, Pending, SessionRecord};
use crate::message::now_ms;
use crate::persist::record::{self, RecordError};
use crate::session::Session;

/// The numbered frames queued for one peer, and the commits waiting for
/// the peer's acknowledgement of them: replica changes, and forwards
/// (publishes, P2P messages and sessions handed over), each its own
/// sequence.
#[derive(Debug, Default)]
pub struct Awaiting {
    replica: Mutex<State>,
    forward: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The number of the last frame queued.
    last: u64,
    /// The highest number the peer said it is through with.
    acked: u64,
    /// Commits waiting, by the number of the frame they wait for (rising),
    /// with what the loss of the peer means for them.
    waiting: VecDeque<(u64, Arc<Commit>, OnLoss)>,
}

/// What a frame waiting for its acknowledgement becomes when the peer
/// leaves the ring first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnLoss {
    /// Done without it (a replica change: this node keeps the session).
    Kept,
    /// Refused (a forwarded publish: the client must send it again; a
    /// session handed over: its sender serves it again).
    Refused,
}

impl Awaiting {
    /// The sequence of replica changes, or (`forward`) of forwards.
    fn state(&self, forward: bool) -> std::sync::MutexGuard<'_, State> {
        let s = if forward {
            &self.forward
        } else {
            &self.replica
        };
        // The numbers and the list hold no invariant a panic could break.
        s.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Numbers a frame, queues it, and makes `commit` wait for its
    /// acknowledgement.
    pub(super) fn push(
        &self,
        queue: &DataQueue,
        frame: impl FnOnce(u64) -> Frame,
        commit: Option<Arc<Commit>>,
        on_loss: OnLoss,
    ) {
        // A forwarded publish is the one refused when its peer is lost.
        let mut st = self.state(on_loss == OnLoss::Refused);
        st.last += 1;
        let n = st.last;
        queue.push(frame(n));
        if let Some(c) = commit {
            st.waiting.push_back((n, c, on_loss));
        }
    }

    /// The peer is through with every frame of the sequence (`forward`:
    /// the publishes') up to `n`; `failed`: frame `n` itself was not kept.
    pub(super) fn acked(&self, n: u64, failed: bool, forward: bool) {
        let done: Vec<(Arc<Commit>, bool)> = {
            let mut st = self.state(forward);
            st.acked = st.acked.max(n);
            let upto = st.waiting.partition_point(|(m, _, _)| *m <= n);
            st.waiting
                .drain(..upto)
                .map(|(m, c, _)| (c, !(failed && m == n)))
                .collect()
        };
        resolve(done);
    }

    /// Replica changes queued for the peer that it has not confirmed yet.
    pub(super) fn lag(&self) -> u64 {
        let st = self.state(false);
        st.last.saturating_sub(st.acked)
    }

    /// The peer left the ring: everything waiting for it is settled by
    /// its `OnLoss`. Returns how many replica changes went on without it.
    pub(super) fn release(&self) -> u64 {
        let mut done: Vec<(Arc<Commit>, bool)> = Vec::new();
        for forward in [false, true] {
            done.extend(
                self.state(forward)
                    .waiting
                    .drain(..)
                    .map(|(_, c, l)| (c, l == OnLoss::Kept)),
            );
        }
        let kept = done.iter().filter(|(_, ok)| *ok).count();
        resolve(done);
        u64::try_from(kept).unwrap_or(u64::MAX)
    }
}

/// Settles each commit (`true`: its peer is through with it), waking each
/// worker once.
fn resolve(done: Vec<(Arc<Commit>, bool)>) {
    let mut rung: Vec<Arc<Mailbox>> = Vec::new();
    for (c, ok) in done {
        if let Some(m) = c.written(ok)
            && !rung.iter().any(|r| Arc::ptr_eq(r, &m))
        {
            rung.push(m);
        }
    }
    for m in rung {
        m.ring();
    }
}

/// The receiving end of the numbered frames a peer sends on one link:
/// each is handed, in order, to the task of its sequence, which
/// acknowledges them as they are through (one `Ack` for all that are
/// through when it looks).
#[derive(Debug)]
pub(super) struct Inbound {
    run: u64,
    link: u64,
    replica: mpsc::UnboundedSender<Done>,
    forward: mpsc::UnboundedSender<Done>,
}

#[derive(Debug)]
enum Done {
    /// Frame `n` of run `run`: through once `pending` is, and once each of
    /// the sessions in `room` is below its queue limit (or the broker's
    /// `queue_full_wait_ms` passed): the sender's publishers wait for a
    /// full subscriber, as local ones do, and the link goes on.
    Frame {
        run: u64,
        n: u64,
        pending: Pending,
        room: Vec<Arc<Session>>,
        /// A write that failed refuses the frame (false: the frame is
        /// through once its writes are, whatever became of them).
        must_write: bool,
    },
    /// A heartbeat: the last acknowledgement again, in case it was lost
    /// with a link of this node's.
    Again,
}

impl Inbound {
    /// Starts the acknowledging task; it ends when this is dropped (the
    /// link's reading task ends).
    pub(super) fn new(cluster: Arc<Cluster>, broker: Arc<Broker>, peer: Arc<str>) -> Self {
        let (replica, rx) = mpsc::unbounded_channel();
        let replicas = Acknowledger {
            cluster: cluster.clone(),
            broker: broker.clone(),
            peer: peer.clone(),
            forward: false,
        };
        ntex::rt::spawn(replicas.run(rx));
        let (forward, rx) = mpsc::unbounded_channel();
        let forwards = Acknowledger {
            cluster,
            broker,
            peer,
            forward: true,
        };
        ntex::rt::spawn(forwards.run(rx));
        Self {
            run: 0,
            link: 0,
            replica,
            forward,
        }
    }

    /// The peer's `Stream` frame: its run and this link's stream.
    pub(super) fn started(&mut self, run: u64, link: u64) {
        self.run = run;
        self.link = link;
    }

    /// This link's stream (the replicas it refreshes are tagged with it).
    pub(super) fn link(&self) -> u64 {
        self.link
    }

    /// Replica change `n`, applied.
    pub(super) fn replica_change(&self, n: u64) {
        self.numbered(&self.replica, n, Pending::default(), Vec::new(), true);
    }

    /// Forwarded publish `n` (0: not numbered) is through once `pending` is
    /// and the sessions of `room` (over their queue limit) have room.
    pub(super) fn forward(&self, n: u64, pending: Pending, room: Vec<Arc<Session>>) {
        self.numbered(&self.forward, n, pending, room, true);
    }

    /// Session `n` handed over is through once `pending`
    /// (its writes, here and on its replicas) is. A write that failed does
    /// not refuse it: this node serves the session already, and the sender
    /// taking it back would serve it twice; the store's own alarm tells.
    pub(super) fn session(&self, n: u64, pending: Pending) {
        self.numbered(&self.forward, n, pending, Vec::new(), false);
    }

    /// Session `n` handed over is refused (it came for a copy this node
    /// does not have): the sender sends it whole.
    pub(super) fn refuse(&self, n: u64) {
        self.numbered(&self.forward, n, Pending::refused(), Vec::new(), true);
    }

    fn numbered(
        &self,
        to: &mpsc::UnboundedSender<Done>,
        n: u64,
        pending: Pending,
        room: Vec<Arc<Session>>,
        must_write: bool,
    ) {
        if n != 0 {
            let _ = to.send(Done::Frame {
                run: self.run,
                n,
                pending,
                room,
                must_write,
            });
        }
    }

    pub(super) fn heartbeat(&self) {
        let _ = self.replica.send(Done::Again);
        let _ = self.forward.send(Done::Again);
    }
}

/// How often, and how long apart, a refusal is told again while this
/// node has no link to the sender (10 s in all: by then the sender has
/// lost the link that carried the frame too, and settled it as refused).
const REFUSAL_TRIES: usize = 100;
const REFUSAL_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

/// The task that acknowledges a link's numbered frames of one sequence
/// (`forward`: the publishes') in order as they are through.
struct Acknowledger {
    cluster: Arc<Cluster>,
    broker: Arc<Broker>,
    peer: Arc<str>,
    forward: bool,
}

impl Acknowledger {
    /// Tells the peer it is through up to `at`; false if it was not sent.
    fn tell(&self, at: Option<(u64, u64)>, failed: bool) -> bool {
        at.is_some_and(|(run, n)| {
            self.cluster.control(
                &self.peer,
                Frame::Ack {
                    run,
                    n,
                    failed,
                    forward: self.forward,
                },
            )
        })
    }

    async fn run(self, mut rx: mpsc::UnboundedReceiver<Done>) {
        // The last frame through, and the last acknowledged.
        let mut through: Option<(u64, u64)> = None;
        let mut told: Option<(u64, u64)> = None;
        loop {
            let next = match rx.try_recv() {
                Ok(d) => d,
                Err(mpsc::error::TryRecvError::Empty) => {
                    // Nothing more is through yet: tell what is.
                    if through != told && self.tell(through, false) {
                        told = through;
                    }
                    match rx.recv().await {
                        Some(d) => d,
                        None => return,
                    }
                }
                Err(mpsc::error::TryRecvError::Disconnected) => return,
            };
            match next {
                Done::Again => {
                    if self.tell(through, false) {
                        told = through;
                    }
                }
                Done::Frame {
                    run,
                    n,
                    pending,
                    room,
                    must_write,
                } => {
                    let waits = pending.settled().is_none() || !room.is_empty();
                    if waits && through != told && self.tell(through, false) {
                        // The sender need not wait for the earlier ones
                        // while this one is written or waits for room.
                        told = through;
                    }
                    through = Some((run, n));
                    if pending.wait().await.is_err() && must_write {
                        // A refusal must reach the sender before a later
                        // acknowledgement, which would cover it as done:
                        // told again while this node's link to it is down.
                        for _ in 0..REFUSAL_TRIES {
                            if self.tell(through, true) {
                                break;
                            }
                            ntex::time::sleep(REFUSAL_RETRY).await;
                        }
                        told = through;
                    }
                    for session in &room {
                        self.broker.wait_for_room(session).await;
                    }
                }
            }
        }
    }
}

/// A random 64-bit id (a run, a link's stream).
pub fn random_id() -> Result<u64, ClusterError> {
    let mut b = [0u8; 8];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| ClusterError::Link("no randomness".into()))?;
    Ok(u64::from_be_bytes(b))
}

/// A change as it travels: its kind, the message's number, the value.
pub fn to_wire(change: &Change) -> (ChangeKind, u64, Bytes) {
    let (now, ms) = (Instant::now(), now_ms());
    match change {
        Change::Record(r) => (ChangeKind::Record, 0, r.encode(now, ms)),
        Change::Reset(r) => (ChangeKind::Reset, 0, r.encode(now, ms)),
        Change::Queue(d) => (
            ChangeKind::Queue,
            d.seq,
            record::encode_delivery(d, now, ms),
        ),
        Change::Unqueue(seq) => (ChangeKind::Unqueue, *seq, Bytes::new()),
        Change::Forget => (ChangeKind::Forget, 0, Bytes::new()),
    }
}

/// A change as it arrived.
pub fn from_wire(kind: ChangeKind, seq: u64, value: &[u8]) -> Result<Change, RecordError> {
    let (now, ms) = (Instant::now(), now_ms());
    Ok(match kind {
        ChangeKind::Record => Change::Record(SessionRecord::decode(value, now, ms)?),
        ChangeKind::Reset => Change::Reset(SessionRecord::decode(value, now, ms)?),
        ChangeKind::Queue => {
            let mut d = record::decode_delivery(value, now, ms)?;
            d.seq = seq;
            Change::Queue(d)
        }
        ChangeKind::Unqueue => Change::Unqueue(seq),
        ChangeKind::Forget => Change::Forget,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::durable::{Pending, WriteFailed};
    use crate::message::{Delivery, Message, MessageId, QoS};

    fn numbered(n: u64) -> Frame {
        Frame::ReplicaSynced { link: n }
    }

    #[test]
    fn a_commit_waits_for_its_frame_and_is_settled_by_the_peers_loss() {
        let (q, mut rx) = DataQueue::new();
        let a = Awaiting::default();
        let mut p: Vec<Pending> = (0..5).map(|_| Pending::default()).collect();
        let loss = [
            OnLoss::Kept,
            OnLoss::Kept,
            OnLoss::Refused,
            OnLoss::Kept,
            OnLoss::Kept,
        ];
        for (p, l) in p.iter_mut().zip(loss) {
            a.push(&q, numbered, p.join(), l);
        }
        // Numbers follow the queue, each sequence its own: replica changes
        // 1, 2, 3, 4, the forwarded publish 1.
        for n in [1, 2, 1, 3, 4] {
            assert_eq!(rx.try_recv(), Some(numbered(n)));
        }
        assert_eq!(p[0].settled(), None);
        // The replication lag counts replica changes, not publishes.
        assert_eq!(a.lag(), 4);
        a.acked(1, false, false);
        assert_eq!(p[0].settled(), Some(Ok(())));
        assert_eq!(a.lag(), 3);
        assert_eq!(p[1].settled(), None);
        // Frame 2 was not kept.
        a.acked(2, true, false);
        assert_eq!(p[1].settled(), Some(Err(WriteFailed)));
        // A replica change is not held back by the publish queued before
        // it, which waits for the peer's sessions (and their replicas).
        a.acked(3, false, false);
        assert_eq!(p[3].settled(), Some(Ok(())));
        assert_eq!(p[2].settled(), None);
        assert_eq!(a.lag(), 1);
        // An acknowledgement repeated with a heartbeat does not go back.
        a.acked(2, false, false);
        assert_eq!(a.lag(), 1);
        // The peer leaves: a replica change goes on, a forward is refused.
        assert_eq!(a.release(), 1);
        assert_eq!(p[4].settled(), Some(Ok(())));
        assert_eq!(p[2].settled(), Some(Err(WriteFailed)));
    }

    #[test]
    fn changes_cross_the_wire_unchanged() {
        let msg = Message::new(
            MessageId(3),
            "a/b".into(),
            Bytes::from_static(b"payload"),
            QoS::ExactlyOnce,
            false,
            Arc::from("pub"),
        );
        let mut d = Delivery::new(Arc::new(msg), QoS::ExactlyOnce);
        d.seq = 12;
        let (kind, seq, value) = to_wire(&Change::Queue(d));
        let Ok(Change::Queue(back)) = from_wire(kind, seq, &value) else {
            panic!("not a queued message");
        };
        assert_eq!(back.seq, 12);
        assert_eq!(&back.msg.payload[..], b"payload");
        assert_eq!(back.qos, QoS::ExactlyOnce);
        let (kind, seq, value) = to_wire(&Change::Unqueue(12));
        assert!(matches!(
            from_wire(kind, seq, &value),
            Ok(Change::Unqueue(12))
        ));
        assert!(from_wire(ChangeKind::Record, 0, b"damaged").is_err());
    }
}
