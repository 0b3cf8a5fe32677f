//! A client's publishes in the order they arrived (MQTT 3.1.1 4.6, MQTT 5
//! 4.6: every topic is an ordered topic).
//!
//! ntex-mqtt hands a PUBLISH to its handler as soon as the header is in,
//! even when the payload straddles the end of the read buffer, and the
//! client's next PUBLISH, complete, to the next handler: without a gate the
//! later one is routed first (one message in about every 64 KiB of input was
//! overtaken that way). Each handler takes a ticket when it starts, in
//! arrival order, and passes two points in ticket order: submission to
//! storage (Kafka records keep the client's order) and routing (subscribers
//! get the messages in that order too, also when Kafka acknowledges records
//! of different partitions out of order).

use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;

use tokio::sync::Notify;

/// The points publishes pass in arrival order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    Store = 0,
    Route = 1,
}

/// One connection's tickets; lives in the connection state, on its worker
/// thread.
#[derive(Debug, Default)]
pub struct Arrivals {
    issued: Cell<u64>,
    points: [Point; 2],
}

#[derive(Debug, Default)]
struct Point {
    /// The ticket whose turn it is.
    next: Cell<u64>,
    /// Tickets that gave up their turn before it came (an error, a closed
    /// connection).
    early: RefCell<BTreeSet<u64>>,
    /// Handlers waiting for their turn; notifying costs a lock, so only
    /// when someone waits.
    waiting: Cell<usize>,
    wake: Notify,
}

impl Point {
    fn pass(&self, ticket: u64) {
        if ticket != self.next.get() {
            self.early.borrow_mut().insert(ticket);
            return;
        }
        let mut next = ticket + 1;
        let mut early = self.early.borrow_mut();
        while early.remove(&next) {
            next += 1;
        }
        self.next.set(next);
        if self.waiting.get() > 0 {
            self.wake.notify_waiters();
        }
    }
}

impl Arrivals {
    /// The next ticket: call when the handler starts, before it awaits.
    pub fn ticket(&self) -> Ticket<'_> {
        let n = self.issued.get();
        self.issued.set(n + 1);
        Ticket {
            arrivals: self,
            n,
            passed: [Cell::new(false), Cell::new(false)],
        }
    }
}

/// One publish's place in the order. Dropping it passes every point it has
/// not passed, so a publish that fails never holds up the ones behind it.
#[derive(Debug)]
pub struct Ticket<'a> {
    arrivals: &'a Arrivals,
    n: u64,
    passed: [Cell<bool>; 2],
}

impl Ticket<'_> {
    /// Waits until every earlier publish has passed `gate`.
    pub async fn wait(&self, gate: Gate) {
        let point = &self.arrivals.points[gate as usize];
        // Nearly always: the previous publish has passed already, and
        // registering with the `Notify` (a lock) is not needed.
        if point.next.get() == self.n {
            return;
        }
        loop {
            let notified = point.wake.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if point.next.get() == self.n {
                return;
            }
            point.waiting.set(point.waiting.get() + 1);
            notified.await;
            point.waiting.set(point.waiting.get() - 1);
        }
    }

    /// Passes `gate`: the next publish may go through it.
    pub fn pass(&self, gate: Gate) {
        if !self.passed[gate as usize].replace(true) {
            self.arrivals.points[gate as usize].pass(self.n);
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.pass(Gate::Store);
        self.pass(Gate::Route);
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Waker};

    use super::*;

    fn poll(f: &mut std::pin::Pin<&mut impl Future<Output = ()>>) -> bool {
        f.as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
            .is_ready()
    }

    #[test]
    fn a_later_publish_waits_for_the_earlier_one_at_each_gate() {
        let a = Arrivals::default();
        let first = a.ticket();
        let second = a.ticket();
        let mut w = pin!(second.wait(Gate::Route));
        assert!(!poll(&mut w), "the first has not routed yet");
        first.pass(Gate::Store);
        assert!(!poll(&mut w), "storing is not routing");
        first.pass(Gate::Route);
        assert!(poll(&mut w));
    }

    #[test]
    fn a_dropped_ticket_lets_the_next_through_even_out_of_turn() {
        let a = Arrivals::default();
        let first = a.ticket();
        let second = a.ticket();
        let third = a.ticket();
        // The second fails before its turn: gives it up early.
        drop(second);
        let mut w = pin!(third.wait(Gate::Store));
        assert!(!poll(&mut w));
        drop(first);
        assert!(poll(&mut w), "first and second both done");
    }
}
