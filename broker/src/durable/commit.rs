//! What an acknowledgement waits for: the store's writes of every change
//! one publish or subscribe made (`Commit`), collected as they are made
//! (`Pending`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::Notify;

use super::WriteFailed;
use super::wake::Mailbox;
use crate::message::Stored;

/// What one acknowledgement waits for: every change it made, across the
/// sessions it reached, written by the store.
#[derive(Debug)]
pub struct Commit {
    /// Changes not yet written, plus one while the caller still adds.
    pending: AtomicUsize,
    failed: AtomicBool,
    done: Notify,
    /// The waiter's worker, which wakes it (`wake`); `None`: woken directly.
    mailbox: Option<Arc<Mailbox>>,
    /// One delivery's own commit (`Pending::one`): the flag it opens, and
    /// the acknowledgement's commit it counts in.
    part_of: Option<(Stored, Option<Arc<Commit>>)>,
}

impl Commit {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            pending: AtomicUsize::new(1),
            failed: AtomicBool::new(false),
            done: Notify::new(),
            mailbox: super::wake::current(),
            part_of: None,
        })
    }

    /// One change is through (`ok`: written); true once it was the last.
    fn finish(&self, ok: bool) -> bool {
        if !ok {
            self.failed.store(true, Ordering::Release);
        }
        self.pending.fetch_sub(1, Ordering::AcqRel) == 1
    }

    /// Wakes the waiter, which may not have started waiting (a stored permit).
    pub(super) fn wake(&self) {
        self.done.notify_one();
    }

    /// The store is through with one change: the last one wakes the
    /// waiter, through its worker's mailbox (returned, to be rung once for
    /// the whole batch) when it has one.
    pub fn written(self: Arc<Self>, ok: bool) -> Option<Arc<Mailbox>> {
        if !self.finish(ok) {
            return None;
        }
        if let Some((stored, parent)) = &self.part_of {
            stored.open();
            return parent.clone().and_then(|p| p.written(ok));
        }
        match self.mailbox.clone() {
            Some(m) => {
                m.put(self);
                Some(m)
            }
            None => {
                self.wake();
                None
            }
        }
    }

    /// Resolves once every change is written; an error if one was not.
    pub async fn wait(&self) -> Result<(), WriteFailed> {
        self.finish(true);
        while self.pending.load(Ordering::Acquire) > 0 {
            self.done.notified().await;
        }
        if self.failed.load(Ordering::Acquire) {
            Err(WriteFailed)
        } else {
            Ok(())
        }
    }
}

/// Collects the changes of one publish or subscribe that its
/// acknowledgement must wait for; made only when there is one.
/// `Pending::detached()` collects nothing: the changes of work nobody
/// acknowledges (wills, downlink records, forwarded messages) are written
/// in order with the rest, without a `Commit` to allocate and count.
#[derive(Debug, Default)]
pub struct Pending {
    commit: Option<Arc<Commit>>,
    detached: bool,
}

impl Pending {
    /// For work whose acknowledgement nobody waits for.
    pub fn detached() -> Self {
        Self {
            commit: None,
            detached: true,
        }
    }

    /// Refused before it changed anything: `wait` fails at once.
    pub fn refused() -> Self {
        let commit = Commit::new();
        commit.failed.store(true, Ordering::Release);
        Self {
            commit: Some(commit),
            detached: false,
        }
    }

    /// Waits for the store; at once when nothing was changed.
    pub async fn wait(self) -> Result<(), WriteFailed> {
        match self.commit {
            Some(c) => c.wait().await,
            None => Ok(()),
        }
    }

    /// Without waiting: `Some` once every change is written (or one was
    /// refused), `None` while the store is still at it. For a thread that
    /// is not a task (the Kafka downlink consumer).
    pub fn settled(&self) -> Option<Result<(), WriteFailed>> {
        let Some(c) = &self.commit else {
            return Some(Ok(()));
        };
        // Only the caller's own count left: the writer is through.
        if c.pending.load(Ordering::Acquire) > 1 {
            return None;
        }
        Some(if c.failed.load(Ordering::Acquire) {
            Err(WriteFailed)
        } else {
            Ok(())
        })
    }

    /// A commit of its own for the write of one delivery, which `parent`
    /// (the acknowledgement the delivery is part of, when there is one)
    /// waits for too; the flag opens once that write is through. Changes
    /// join the returned `Pending`; `seal` it after the last.
    pub fn one(parent: Option<&mut Pending>) -> (Pending, Stored) {
        let stored = Stored::default();
        let commit = Arc::new(Commit {
            pending: AtomicUsize::new(1),
            failed: AtomicBool::new(false),
            done: Notify::new(),
            mailbox: None,
            part_of: Some((stored.clone(), parent.and_then(Pending::join))),
        });
        let own = Pending {
            commit: Some(commit),
            detached: false,
        };
        (own, stored)
    }

    /// Every change of a `Pending::one` joined: from now on the last write
    /// opens its flag (at once if they are all through already).
    pub fn seal(self) {
        if let Some(m) = self.commit.and_then(|c| c.written(true)) {
            m.ring();
        }
    }

    /// A change to wait for: the commit it reports to (`None` for
    /// detached work). For a `Store` implementation.
    pub fn join(&mut self) -> Option<Arc<Commit>> {
        if self.detached {
            return None;
        }
        let c = self.commit.get_or_insert_with(Commit::new);
        c.pending.fetch_add(1, Ordering::AcqRel);
        Some(c.clone())
    }
}
