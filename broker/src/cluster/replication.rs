//! Replication over the links: a session change as it travels
//! (`Frame::Replicate`, the store's record format for its value), and the
//! owner's account of which changes a client's acknowledgement waits for.
//!
//! Each change for a peer gets the next number of the peer's queue, taken
//! under the same lock as its place in the queue, so numbers follow the
//! order the peer reads them in. The peer applies a change to its copy
//! (`replica::Replicas`) and acknowledges the highest number applied
//! (`ReplicaAck`, tagged with this process's run) when it has read all it
//! has, and with every heartbeat. Changes queued while a link is down go
//! out on the next one with their numbers, so the count never restarts
//! within a process.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use ntex::util::Bytes;
use ring::rand::{SecureRandom, SystemRandom};

use super::wire::{ChangeKind, Frame};
use super::{ClusterError, DataQueue};
use crate::durable::{Change, Commit, Mailbox, SessionRecord};
use crate::message::now_ms;
use crate::persist::record::{self, RecordError};

/// The replication changes queued for one peer, and the commits waiting
/// for the peer's acknowledgement of them.
#[derive(Debug, Default)]
pub struct Awaiting {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The number of the last change queued.
    last: u64,
    /// Commits waiting, by the number of the change they wait for (rising).
    waiting: VecDeque<(u64, Arc<Commit>)>,
}

impl Awaiting {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // The numbers and the list hold no invariant a panic could break.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Numbers a change, queues its frame, and makes `commit` wait for it.
    pub(super) fn push(
        &self,
        queue: &DataQueue,
        frame: impl FnOnce(u64) -> Frame,
        commit: Option<Arc<Commit>>,
    ) {
        let mut st = self.state();
        st.last += 1;
        let n = st.last;
        queue.push(frame(n));
        if let Some(c) = commit {
            st.waiting.push_back((n, c));
        }
    }

    /// The peer keeps every change up to `n`.
    pub(super) fn acked(&self, n: u64) {
        let done: Vec<Arc<Commit>> = {
            let mut st = self.state();
            let upto = st.waiting.partition_point(|(m, _)| *m <= n);
            st.waiting.drain(..upto).map(|(_, c)| c).collect()
        };
        resolve(done);
    }

    /// The peer left the ring: everything waiting for it goes on without
    /// it. Returns how many commits were released.
    pub(super) fn release(&self) -> u64 {
        let done: Vec<Arc<Commit>> = self.state().waiting.drain(..).map(|(_, c)| c).collect();
        let n = u64::try_from(done.len()).unwrap_or(u64::MAX);
        resolve(done);
        n
    }
}

/// Tells each commit its replica is through, waking each worker once.
fn resolve(done: Vec<Arc<Commit>>) {
    let mut rung: Vec<Arc<Mailbox>> = Vec::new();
    for c in done {
        if let Some(m) = c.written(true)
            && !rung.iter().any(|r| Arc::ptr_eq(r, &m))
        {
            rung.push(m);
        }
    }
    for m in rung {
        m.ring();
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
    use crate::durable::Pending;
    use crate::message::{Delivery, Message, MessageId, QoS};

    #[test]
    fn a_commit_waits_for_the_replica_and_is_released_when_it_leaves() {
        let (q, mut rx) = DataQueue::new();
        let a = Awaiting::default();
        let mut first = Pending::default();
        let mut second = Pending::default();
        for p in [&mut first, &mut second] {
            a.push(&q, |n| Frame::ReplicaAck { run: 0, n }, p.join());
        }
        // Numbers follow the queue.
        assert_eq!(rx.try_recv(), Some(Frame::ReplicaAck { run: 0, n: 1 }));
        assert_eq!(rx.try_recv(), Some(Frame::ReplicaAck { run: 0, n: 2 }));
        assert_eq!(first.settled(), None);
        a.acked(1);
        assert_eq!(first.settled(), Some(Ok(())));
        assert_eq!(second.settled(), None);
        assert_eq!(a.release(), 1);
        assert_eq!(second.settled(), Some(Ok(())));
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
