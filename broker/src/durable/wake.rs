//! Acknowledgements woken on their own worker thread, once per batch.
//!
//! Why: a QoS 1/2 PUBLISH waits for its batch in a task of a connection
//! worker. Woken one by one from the store's writer thread, those tasks
//! reached the worker through its queue for other threads, which the worker
//! serves after its own: each task ran, wrote its PUBACK, and the
//! connection's write task flushed it before the next wake-up came in, so
//! a batch of fifty acknowledgements went out as fifty small TCP writes
//! (measured: 2.5 times the `sendto` calls of the in-memory node for a
//! third of its messages). A worker that takes part registers a mailbox:
//! the writer leaves a batch's finished commits there and wakes the worker
//! once; the worker then wakes them from its own thread, all queued before
//! the write task, so the acknowledgements of one connection leave in one
//! write. Threads without a mailbox (the HTTP API, tests) are woken
//! directly, as before.

use std::cell::RefCell;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Notify;

use super::Commit;

thread_local! {
    static MAILBOX: RefCell<Option<Arc<Mailbox>>> = const { RefCell::new(None) };
}

/// A worker's finished commits, and the wake-up of the task that resolves them.
#[derive(Debug, Default)]
pub struct Mailbox {
    ready: Mutex<Vec<Arc<Commit>>>,
    wake: Notify,
}

impl Mailbox {
    /// Leaves a finished commit for the worker to wake (writer thread).
    pub(super) fn put(&self, commit: Arc<Commit>) {
        self.ready().push(commit);
    }

    /// The list holds no invariant a panic could break: a poisoned lock
    /// is used as it is, so that no waiter is left asleep.
    fn ready(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Commit>>> {
        self.ready.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wakes the worker's resolving task, once for everything put since.
    pub fn ring(&self) {
        self.wake.notify_one();
    }

    async fn serve(self: Arc<Self>) {
        loop {
            self.wake.notified().await;
            let ready = std::mem::take(&mut *self.ready());
            for c in ready {
                c.wake();
            }
        }
    }
}

/// This thread's mailbox, if it registered one.
pub(super) fn current() -> Option<Arc<Mailbox>> {
    MAILBOX.with(|m| m.borrow().clone())
}

/// Makes acknowledgements waiting on this thread wake through a mailbox
/// served by a task of this thread's ntex runtime; called by each
/// connection worker as it builds its services (again: no effect). The
/// task lives as long as the worker's runtime, which the server stops and
/// joins at shutdown.
pub fn attach_worker() {
    MAILBOX.with(|m| {
        let mut m = m.borrow_mut();
        if m.is_none() {
            let mailbox = Arc::new(Mailbox::default());
            ntex::rt::spawn(mailbox.clone().serve());
            *m = Some(mailbox);
        }
    });
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use prometheus::Registry;

    use super::*;
    use crate::config::PersistenceConfig;
    use crate::durable::{Pending, Store};
    use crate::message::Delivery;
    use crate::message::{Message, MessageId, QoS};
    use crate::persist::Persist;

    /// Acknowledgements waiting on a worker with a mailbox are woken by it,
    /// batch after batch, and a failed write still reaches them.
    #[ntex::test]
    async fn a_worker_with_a_mailbox_gets_every_acknowledgement() {
        attach_worker();
        assert!(current().is_some());
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let config = PersistenceConfig {
            dir: Some(dir.path().join("store")),
            ..PersistenceConfig::default()
        };
        let (persist, _) =
            Persist::open(&config, &Registry::new()).unwrap_or_else(|e| panic!("{e}"));
        let msg = Arc::new(Message::new(
            MessageId(1),
            "t".into(),
            vec![1].into(),
            QoS::AtLeastOnce,
            false,
            Arc::from("p"),
        ));
        for round in 0..3u64 {
            let mut waits = Vec::new();
            for i in 0..200 {
                let mut p = Pending::default();
                let d = Delivery::new(msg.clone(), QoS::AtLeastOnce);
                persist.queue("c", round * 1000 + i + 1, &d, Some(&mut p));
                waits.push(p.wait());
            }
            for w in waits {
                let r = ntex::time::timeout(Duration::from_secs(10), w).await;
                assert!(matches!(r, Ok(Ok(()))), "round {round}: {r:?}");
            }
        }
        // The writer is gone: what is sent now is refused, and the waiter
        // hears of it rather than sleeping on.
        persist.close();
        let mut p = Pending::default();
        persist.queue(
            "c",
            9999,
            &Delivery::new(msg, QoS::AtLeastOnce),
            Some(&mut p),
        );
        let r = ntex::time::timeout(Duration::from_secs(10), p.wait()).await;
        assert!(matches!(r, Ok(Err(_))), "{r:?}");
    }
}
