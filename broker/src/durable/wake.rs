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
pub(crate) fn current() -> Option<Arc<Mailbox>> {
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
