//! The file descriptor budget of MQTT connections.
//!
//! At the open-file limit `accept` fails on every listener alike, and the
//! admin port (probes, `/metrics`) stops answering until clients leave: the
//! moment an operator needs it most. So MQTT connections take a slot each
//! (a forwarded one two: its link to the owner) from a budget that leaves
//! `limits.reserved_file_descriptors` free for the admin port, cluster
//! links, Kafka and the journal; a connection accepted past the budget is
//! closed at once and counted (`fd_limit`). The reserve also absorbs TLS
//! and WebSocket handshakes in progress, which take their slot once done.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Slots for MQTT connections.
#[derive(Debug)]
pub struct Budget {
    used: AtomicUsize,
    max: usize,
    /// When a refusal was last logged (seconds since start).
    logged: AtomicU64,
    started: std::time::Instant,
}

/// A slot held for as long as its connection lives.
#[derive(Debug)]
pub struct Slot {
    budget: Arc<Budget>,
    n: usize,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.n, Ordering::Relaxed);
    }
}

impl Budget {
    /// The budget under the process's open-file limit, `reserved` (at most
    /// a quarter of the limit) kept free. Unlimited when the limit cannot
    /// be read.
    pub fn new(reserved: usize) -> Arc<Self> {
        let max = match open_file_limit() {
            Some(limit) => limit.saturating_sub(reserved.min(limit / 4)),
            None => usize::MAX,
        };
        Self::with_max(max)
    }

    /// A budget of `max` slots.
    pub fn with_max(max: usize) -> Arc<Self> {
        Arc::new(Self {
            used: AtomicUsize::new(0),
            max,
            logged: AtomicU64::new(0),
            started: std::time::Instant::now(),
        })
    }

    /// Takes `n` slots, or none when they would go past the budget.
    pub fn take(self: &Arc<Self>, n: usize) -> Option<Slot> {
        let before = self.used.fetch_add(n, Ordering::Relaxed);
        if before.saturating_add(n) > self.max {
            self.used.fetch_sub(n, Ordering::Relaxed);
            let now = self.started.elapsed().as_secs() + 1;
            let last = self.logged.load(Ordering::Relaxed);
            if now >= last + 10
                && self
                    .logged
                    .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                tracing::warn!(
                    slots = self.max,
                    "MQTT connection refused: near the open-file limit (raise `ulimit -n`); logged every 10 s at most"
                );
            }
            return None;
        }
        Some(Slot {
            budget: self.clone(),
            n,
        })
    }

    /// Slots in use.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

/// The soft open-file limit, from `/proc/self/limits` (no libc call, no
/// unsafe code).
fn open_file_limit() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_run_out_at_the_budget_and_come_back_when_dropped() {
        let b = Budget::with_max(3);
        let one = b.take(1);
        let two = b.take(2);
        assert!(one.is_some() && two.is_some());
        assert!(b.take(1).is_none());
        drop(two);
        assert_eq!(b.used(), 1);
        assert!(b.take(2).is_some());
    }

    #[test]
    fn the_limit_of_this_process_is_read() {
        assert!(open_file_limit().is_some_and(|n| n > 0));
    }
}
