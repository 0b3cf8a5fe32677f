//! One shutdown signal for every background task of a node, and the count
//! of those still running, so that the node can wait for them all.
//!
//! The node (`node::run`) holds the `Trigger`; every long-lived task (the
//! ticker, the cluster watch, the link dialers, housekeeping, topic
//! creation) gets a `Shutdown`, takes a `TaskGuard` for as long as it runs
//! and ends when the signal fires. `Trigger::join` waits until no guard is
//! left, with a deadline, however many tasks were started and on whichever
//! thread.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, watch};

#[derive(Debug, Default)]
struct Live {
    count: AtomicUsize,
    /// Tasks that ever took a guard.
    started: AtomicUsize,
    gone: Notify,
}

/// Fires the signal and waits for the tasks.
#[derive(Debug)]
pub struct Trigger {
    tx: watch::Sender<bool>,
    live: Arc<Live>,
}

/// What a background task watches.
#[derive(Debug, Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
    live: Arc<Live>,
}

/// Held by a running task; its drop counts the task as ended.
#[derive(Debug)]
pub struct TaskGuard {
    live: Arc<Live>,
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if self.live.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.live.gone.notify_waiters();
        }
    }
}

impl Trigger {
    pub fn new() -> (Trigger, Shutdown) {
        let (tx, rx) = watch::channel(false);
        let live = Arc::new(Live::default());
        (
            Trigger {
                tx,
                live: live.clone(),
            },
            Shutdown { rx, live },
        )
    }

    /// Tells every task to end.
    pub fn fire(&self) {
        self.tx.send_replace(true);
    }

    /// Tasks that took a guard so far.
    pub fn started(&self) -> usize {
        self.live.started.load(Ordering::Acquire)
    }

    /// Tasks still running.
    pub fn running(&self) -> usize {
        self.live.count.load(Ordering::Acquire)
    }

    /// Waits until every task ended or `timeout` passed; the tasks still
    /// running then.
    pub async fn join(&self, timeout: Duration) -> usize {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let gone = self.live.gone.notified();
            let mut gone = std::pin::pin!(gone);
            gone.as_mut().enable();
            let left = self.running();
            let now = std::time::Instant::now();
            if left == 0 || now >= deadline {
                return left;
            }
            let _ = ntex::util::select(gone, ntex::time::sleep(deadline - now)).await;
        }
    }
}

impl Shutdown {
    /// Whether the signal fired.
    pub fn is_set(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves once the signal fired.
    pub async fn wait(&self) {
        let mut rx = self.rx.clone();
        // An error means the trigger is gone: the node is ending too.
        let _ = rx.wait_for(|fired| *fired).await;
    }

    /// Sleeps for `d`; false when the signal fired first.
    pub async fn sleep(&self, d: Duration) -> bool {
        matches!(
            ntex::util::select(ntex::time::sleep(d), std::pin::pin!(self.wait())).await,
            ntex::util::Either::Left(())
        )
    }

    /// Counts the calling task as running until the guard drops.
    pub fn guard(&self) -> TaskGuard {
        self.live.count.fetch_add(1, Ordering::AcqRel);
        self.live.started.fetch_add(1, Ordering::AcqRel);
        TaskGuard {
            live: self.live.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[ntex::test]
    async fn join_waits_for_every_guarded_task_to_see_the_signal() {
        let (trigger, shutdown) = Trigger::new();
        for _ in 0..3 {
            let s = shutdown.clone();
            ntex::rt::spawn(async move {
                let _guard = s.guard();
                while s.sleep(Duration::from_millis(5)).await {}
            });
        }
        ntex::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(trigger.running(), 3);
        trigger.fire();
        assert_eq!(trigger.join(Duration::from_secs(5)).await, 0);
    }

    #[ntex::test]
    async fn join_gives_up_at_its_deadline() {
        let (trigger, shutdown) = Trigger::new();
        let _stuck = shutdown.guard();
        trigger.fire();
        assert!(shutdown.is_set());
        assert_eq!(trigger.join(Duration::from_millis(50)).await, 1);
    }
}
