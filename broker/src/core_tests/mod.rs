//! The broker core without sockets: sessions, routing, takeover, expiry,
//! retained messages and the outbound pump, driven through `Broker`'s
//! operations and a fake `OutSink` in place of an ntex-mqtt connection;
//! `peers`: the same core in a cluster, through a fake `Peers` port.

mod peers;

use std::cell::RefCell;
use std::num::NonZeroU16;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ntex::util::Bytes;

use crate::auth::{Auth, Identity};
use crate::broker::{Broker, Parts, SendRetained};
use crate::config::Config;
use crate::connection::{CloseReason, Connection, Origin, OutSink};
use crate::durable::Pending;
use crate::message::{Message, QoS};
use crate::router::SubOptions;
use crate::session::{Attached, Delivery};
use crate::storage::NoStorage;

fn broker(config: Config) -> Arc<Broker> {
    broker_with(config, None)
}

/// A broker whose other nodes are `peers`.
fn broker_with(config: Config, peers: Option<Arc<dyn crate::peers::Peers>>) -> Arc<Broker> {
    broker_stored(config, peers, Arc::new(crate::durable::NoStore), None)
}

/// A broker whose other nodes are `peers`, writing to `persist`, its
/// sessions replicated as `replication` says.
fn broker_stored(
    config: Config,
    peers: Option<Arc<dyn crate::peers::Peers>>,
    persist: Arc<dyn crate::durable::Store>,
    replication: Option<Arc<crate::replica::Replication>>,
) -> Arc<Broker> {
    let metrics = crate::metrics::Metrics::new().unwrap_or_else(|e| panic!("{e}"));
    let auth = Auth::open(&config.auth.login, metrics.registry()).unwrap_or_else(|e| panic!("{e}"));
    let usage = crate::node::usage(&config, &metrics).unwrap_or_else(|e| panic!("{e}"));
    Broker::new(
        config,
        Parts {
            metrics,
            auth,
            tokens: None,
            storage: Arc::new(NoStorage),
            peers,
            usage,
            persist,
            replication,
        },
    )
}

fn opts(qos: QoS) -> SubOptions {
    SubOptions::at(qos)
}

fn msg(b: &Broker, topic: &str, qos: QoS, retain: bool, body: &str) -> Arc<Message> {
    Arc::new(b.message(
        topic.into(),
        Bytes::from(body.to_owned()),
        qos,
        retain,
        Arc::from("publisher"),
    ))
}

fn queued(a: &Attached) -> Vec<String> {
    let st = a.session.lock();
    st.queue.iter().map(|d| d.msg.topic.to_string()).collect()
}

fn subscribe(b: &Broker, a: &Attached, filter: &str, qos: QoS) {
    b.subscribe_now(
        &a.session,
        filter,
        opts(qos),
        SendRetained::Never,
        &mut Default::default(),
    )
    .unwrap_or_else(|e| panic!("subscribe {filter}: {e}"));
}

const HOUR: Duration = Duration::from_secs(3600);

#[test]
fn a_publish_reaches_each_matching_session_once() {
    let b = broker(Config::default());
    let a = b.attach("a", true, Duration::ZERO);
    let c = b.attach("c", true, Duration::ZERO);
    // Overlapping filters of one client give one copy.
    subscribe(&b, &a, "t/#", QoS::AtLeastOnce);
    subscribe(&b, &a, "t/+", QoS::AtMostOnce);
    subscribe(&b, &c, "t/x", QoS::AtLeastOnce);
    subscribe(&b, &c, "other", QoS::AtLeastOnce);
    let n = b.publish(&msg(&b, "t/x", QoS::AtLeastOnce, false, "1"), false);
    assert_eq!(n, 2);
    assert_eq!(queued(&a), ["t/x"]);
    assert_eq!(queued(&c), ["t/x"]);
    let st = a.session.lock();
    assert_eq!(st.queue[0].qos, QoS::AtLeastOnce, "the highest granted QoS");
}

#[test]
fn an_offline_persistent_session_keeps_qos1_and_not_qos0() {
    let b = broker(Config::default());
    let p = b.attach("p", false, HOUR);
    subscribe(&b, &p, "s/#", QoS::ExactlyOnce);
    b.detach(&p.session, p.conn.generation);
    b.publish(&msg(&b, "s/1", QoS::AtLeastOnce, false, "kept"), false);
    b.publish(&msg(&b, "s/2", QoS::AtMostOnce, false, "dropped"), false);
    let again = b.attach("p", false, HOUR);
    assert!(again.present, "the session is resumed");
    let st = again.session.lock();
    let offline: Vec<_> = st.offline.iter().map(|d| d.msg.topic.to_string()).collect();
    assert_eq!(offline, ["s/1"]);
}

#[test]
fn a_second_connection_takes_the_session_over_and_the_first_detach_changes_nothing() {
    let b = broker(Config::default());
    let first = b.attach("dup", false, HOUR);
    subscribe(&b, &first, "d/#", QoS::AtLeastOnce);
    let second = b.attach("dup", false, HOUR);
    assert!(second.took_over && second.present);
    // The old connection goes away afterwards: the session stays attached
    // to the new one and keeps receiving.
    b.detach(&first.session, first.conn.generation);
    assert!(second.session.is_online());
    assert_eq!(
        b.publish(&msg(&b, "d/1", QoS::AtLeastOnce, false, "x"), false),
        1
    );
    assert_eq!(queued(&second), ["d/1"]);
}

#[test]
fn a_clean_connection_discards_the_old_session_and_its_routes() {
    let b = broker(Config::default());
    let old = b.attach("c1", false, HOUR);
    subscribe(&b, &old, "gone/#", QoS::AtLeastOnce);
    b.detach(&old.session, old.conn.generation);
    let fresh = b.attach("c1", true, Duration::ZERO);
    assert!(!fresh.present);
    assert_eq!(
        b.publish(&msg(&b, "gone/1", QoS::AtLeastOnce, false, "x"), false),
        0
    );
}

#[test]
fn expired_sessions_leave_with_their_routes() {
    let b = broker(Config::default());
    let p = b.attach("e", false, Duration::from_secs(1));
    subscribe(&b, &p, "exp/#", QoS::AtLeastOnce);
    b.detach(&p.session, p.conn.generation);
    b.expire_sessions(Instant::now());
    assert!(b.sessions().get("e").is_some(), "not expired yet");
    b.expire_sessions(Instant::now() + Duration::from_secs(2));
    assert!(b.sessions().get("e").is_none());
    assert_eq!(
        b.publish(&msg(&b, "exp/1", QoS::AtLeastOnce, false, "x"), false),
        0
    );
}

#[test]
fn retained_messages_are_kept_replaced_and_cleared() {
    let b = broker(Config::default());
    b.publish(&msg(&b, "r/1", QoS::AtLeastOnce, true, "old"), false);
    b.publish(&msg(&b, "r/1", QoS::AtLeastOnce, true, "new"), false);
    b.publish(&msg(&b, "r/2", QoS::AtLeastOnce, true, "two"), false);
    let got: Vec<_> = b
        .retained()
        .matching("r/#")
        .iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect();
    assert_eq!(got, ["new", "two"]);
    b.publish(&msg(&b, "r/1", QoS::AtLeastOnce, true, ""), false);
    assert_eq!(
        b.retained().len(),
        1,
        "an empty retained message clears the topic"
    );
}

/// What the fake connection was asked to write.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Written {
    topic: String,
    qos: QoS,
    id: Option<u16>,
    dup: bool,
    retain: bool,
}

/// The acknowledgement callback the pump registers.
type AckFn = Box<dyn Fn(u16)>;

/// A QoS 2 message's PUBCOMP callback, by packet id.
type Completions = Rc<RefCell<Vec<(u16, Box<dyn FnOnce()>)>>>;

/// What the pump does when a QoS 2 message's PUBREC arrives; `None`: no
/// PUBREL is sent.
type Received = Box<dyn FnOnce() -> Option<Pending>>;

/// PUBRECs the client holds back, by packet id (`None`: it holds none).
type HeldPubrecs = Rc<RefCell<Option<Vec<(u16, Received)>>>>;

/// An `OutSink` that records, with a settable credit.
#[derive(Clone, Default)]
struct FakeSink {
    written: Rc<RefCell<Vec<Written>>>,
    credit: Rc<RefCell<usize>>,
    acks: Rc<RefCell<Option<AckFn>>>,
    closed: Rc<RefCell<Option<CloseReason>>>,
    /// QoS 2 messages PUBRECed (the fake says yes at once), PUBCOMP pending.
    completions: Completions,
    /// `Some`: the client's PUBRECs wait here until `pubrec` sends them.
    held_pubrecs: HeldPubrecs,
}

impl FakeSink {
    fn with_credit(n: usize) -> Self {
        let s = Self::default();
        *s.credit.borrow_mut() = n;
        s
    }

    fn record(&self, d: &Delivery, id: Option<NonZeroU16>) {
        self.written.borrow_mut().push(Written {
            topic: d.msg.topic.to_string(),
            qos: d.qos,
            id: id.map(NonZeroU16::get),
            dup: d.dup,
            retain: d.retain,
        });
    }

    /// A sink whose client sends its PUBRECs only when told (`pubrec`).
    fn holding_pubrecs(credit: usize) -> Self {
        let s = Self::with_credit(credit);
        *s.held_pubrecs.borrow_mut() = Some(Vec::new());
        s
    }

    /// The client's PUBREC for `id` arrives: `Some(true)` when a PUBREL is
    /// sent for it, `None` when no message of that id waited for one.
    fn pubrec(&self, id: u16) -> Option<bool> {
        let received = {
            let mut held = self.held_pubrecs.borrow_mut();
            let held = held.as_mut()?;
            let i = held.iter().position(|(x, _)| *x == id)?;
            held.remove(i).1
        };
        Some(received().is_some())
    }

    fn ack(&self, id: u16) {
        if let Some(f) = self.acks.borrow().as_ref() {
            f(id);
        }
    }

    /// The client's PUBCOMP for `id`.
    fn complete(&self, id: u16) {
        let mut all = self.completions.borrow_mut();
        if let Some(i) = all.iter().position(|(x, _)| *x == id) {
            let (_, f) = all.remove(i);
            drop(all);
            f();
        }
    }

    fn topics(&self) -> Vec<String> {
        self.written
            .borrow()
            .iter()
            .map(|w| w.topic.clone())
            .collect()
    }
}

impl OutSink for FakeSink {
    /// Waits for credit, as ntex-mqtt's sink does (this fake's credit only
    /// grows with a new sink, so without credit it waits for ever).
    async fn ready(&self) -> bool {
        if self.credit() == 0 {
            std::future::pending::<()>().await;
        }
        self.closed.borrow().is_none()
    }

    fn credit(&self) -> usize {
        let inflight = self
            .written
            .borrow()
            .iter()
            .filter(|w| w.qos != QoS::AtMostOnce)
            .count();
        self.credit.borrow().saturating_sub(inflight)
    }

    async fn send_qos0(&self, d: &Delivery, _now: Instant) -> bool {
        self.record(d, None);
        true
    }

    fn send_qos1(&self, d: &Delivery, id: NonZeroU16, _now: Instant) -> bool {
        self.record(d, Some(id));
        true
    }

    /// The client's PUBREC comes at once, unless the sink holds them.
    fn send_qos2(
        &self,
        d: &Delivery,
        id: NonZeroU16,
        _now: Instant,
        received: Box<dyn FnOnce() -> Option<Pending>>,
        completed: Box<dyn FnOnce()>,
    ) -> bool {
        self.record(d, Some(id));
        match self.held_pubrecs.borrow_mut().as_mut() {
            Some(held) => held.push((id.get(), received)),
            None => drop(received()),
        }
        self.completions.borrow_mut().push((id.get(), completed));
        true
    }

    fn on_ack(&self, f: Box<dyn Fn(u16)>) {
        *self.acks.borrow_mut() = Some(f);
    }

    fn close(&self, reason: CloseReason) {
        *self.closed.borrow_mut() = Some(reason);
    }

    fn max_packet_size(&self) -> Option<u32> {
        None
    }
}

fn connect(b: &Arc<Broker>, id: &str, persistent: bool, sink: &FakeSink) -> Rc<Connection> {
    let expiry = if persistent { HOUR } else { Duration::ZERO };
    let attached = b.attach(id, !persistent, expiry);
    let conn = Rc::new(Connection::new(
        b.clone(),
        attached,
        Identity::Anonymous,
        persistent,
        None,
        None,
        Origin {
            protocol: "test",
            clean: !persistent,
        },
    ));
    conn.start_pump(sink.clone());
    conn
}

/// Lets the pump task run.
async fn settle() {
    ntex::time::sleep(Duration::from_millis(30)).await;
}

#[ntex::test]
async fn the_pump_numbers_qos1_deliveries_and_resends_the_unacknowledged_first_with_dup_and_their_ids()
 {
    let b = broker(Config::default());
    let sink = FakeSink::with_credit(10);
    let conn = connect(&b, "pumped", true, &sink);
    b.subscribe_now(
        &conn.session,
        "p/#",
        opts(QoS::AtLeastOnce),
        SendRetained::Never,
        &mut Default::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    for i in 1..=3 {
        b.publish(
            &msg(&b, &format!("p/{i}"), QoS::AtLeastOnce, false, "x"),
            false,
        );
    }
    settle().await;
    let ids: Vec<_> = sink.written.borrow().iter().map(|w| w.id).collect();
    assert_eq!(ids, [Some(1), Some(2), Some(3)]);
    sink.ack(1);
    drop(conn);
    // The next connection gets the two unacknowledged ones again, in the
    // order sent, marked DUP, before anything new.
    let again = FakeSink::with_credit(10);
    let conn = connect(&b, "pumped", true, &again);
    b.publish(&msg(&b, "p/4", QoS::AtLeastOnce, false, "x"), false);
    settle().await;
    let w = again.written.borrow().clone();
    assert_eq!(again.topics(), ["p/2", "p/3", "p/4"]);
    assert!(w[0].dup && w[1].dup && !w[2].dup, "{w:?}");
    // MQTT-4.4.0-1: the same ids as the first send; a new message takes a
    // free one.
    let ids: Vec<_> = w.iter().map(|w| w.id).collect();
    assert_eq!(ids, [Some(2), Some(3), Some(1)]);
    drop(conn);
}

#[ntex::test]
async fn the_pump_sends_no_more_qos1_than_the_client_has_credit_for() {
    let b = broker(Config::default());
    let sink = FakeSink::with_credit(2);
    let conn = connect(&b, "slow", false, &sink);
    b.subscribe_now(
        &conn.session,
        "c/#",
        opts(QoS::AtLeastOnce),
        SendRetained::Never,
        &mut Default::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    for i in 0..5 {
        b.publish(
            &msg(&b, &format!("c/{i}"), QoS::AtLeastOnce, false, "x"),
            false,
        );
    }
    settle().await;
    assert_eq!(sink.topics(), ["c/0", "c/1"], "two in flight at most");
    assert_eq!(
        conn.session.lock().queue.len(),
        3,
        "the rest waits in the queue"
    );
    drop(conn);
}

#[ntex::test]
async fn a_new_subscription_gets_its_retained_messages_before_live_ones() {
    let b = broker(Config::default());
    for i in 0..100 {
        b.publish(
            &msg(&b, &format!("ret/{i:03}"), QoS::AtLeastOnce, true, "r"),
            false,
        );
    }
    let sink = FakeSink::with_credit(1000);
    let conn = connect(&b, "late", false, &sink);
    let sub = b
        .subscribe_now(
            &conn.session,
            "ret/#",
            opts(QoS::AtLeastOnce),
            SendRetained::Always,
            &mut Default::default(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(sub.replaying);
    b.publish(&msg(&b, "ret/live", QoS::AtLeastOnce, false, "l"), false);
    settle().await;
    let w = sink.written.borrow().clone();
    assert_eq!(w.len(), 101);
    assert!(w[..100].iter().all(|w| w.retain), "retained first");
    assert_eq!(w[100].topic, "ret/live");
    assert!(!w[100].retain);
    drop(conn);
}

#[ntex::test]
async fn a_takeover_closes_the_old_connection() {
    let b = broker(Config::default());
    let first = FakeSink::with_credit(10);
    let old = connect(&b, "twice", true, &first);
    let second = FakeSink::with_credit(10);
    let new = connect(&b, "twice", true, &second);
    settle().await;
    assert_eq!(*first.closed.borrow(), Some(CloseReason::Takeover));
    assert!(second.closed.borrow().is_none());
    drop(old);
    assert!(
        new.session.is_online(),
        "the old connection's end leaves the new one attached"
    );
}

#[ntex::test]
async fn a_qos2_packet_id_stays_taken_from_pubrec_to_pubcomp() {
    let b = broker(Config::default());
    let sink = FakeSink::with_credit(10);
    let conn = connect(&b, "exactly", true, &sink);
    b.subscribe_now(
        &conn.session,
        "q2/#",
        opts(QoS::ExactlyOnce),
        SendRetained::Never,
        &mut Default::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    for i in 1..=2 {
        b.publish(
            &msg(&b, &format!("q2/{i}"), QoS::ExactlyOnce, false, "x"),
            false,
        );
    }
    settle().await;
    // The fake answers PUBREC at once: out of flight, owed a PUBCOMP.
    assert_eq!(conn.session.lock().released_ids(), [1, 2]);
    assert!(!conn.session.lock().inflight.contains(1));
    sink.complete(1);
    assert_eq!(conn.session.lock().released_ids(), [2]);
    b.publish(&msg(&b, "q2/3", QoS::ExactlyOnce, false, "x"), false);
    settle().await;
    let ids: Vec<_> = sink.written.borrow().iter().map(|w| w.id).collect();
    assert_eq!(ids, [Some(1), Some(2), Some(3)]);
    // A new connection of the session owes the client the PUBREL of 2
    // and 3, and gives no new message those ids.
    b.detach(&conn.session, conn.conn.generation);
    let again = b.attach("exactly", false, HOUR);
    assert!(again.present);
    assert_eq!(again.session.lock().released_ids(), [2, 3]);
    assert!(b.owes_pubrel("exactly"));
}

/// A client of a persistent session with a QoS 2 message in flight on
/// its connection, whose PUBREC it holds back.
async fn qos2_in_flight(b: &Arc<Broker>, id: &str) -> (FakeSink, Rc<Connection>) {
    let sink = FakeSink::holding_pubrecs(10);
    let conn = connect(b, id, true, &sink);
    b.subscribe_now(
        &conn.session,
        &format!("{id}/#"),
        opts(QoS::ExactlyOnce),
        SendRetained::Never,
        &mut Default::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    b.publish(
        &msg(b, &format!("{id}/1"), QoS::ExactlyOnce, false, "x"),
        false,
    );
    settle().await;
    assert_eq!(sink.topics(), [format!("{id}/1")]);
    (sink, conn)
}

/// A PUBREC that arrives on a connection a newer one replaced, after the
/// new one sent the message again: no PUBREL on the old connection (it
/// would free the id at the client before the resend arrives, which the
/// client would take for a new message); the new connection's PUBREC
/// releases it.
#[ntex::test]
async fn a_pubrec_on_a_replaced_connection_sends_no_pubrel_once_the_new_one_sent_it_again() {
    let b = broker(Config::default());
    let (old_sink, old) = qos2_in_flight(&b, "resent").await;
    let new_sink = FakeSink::holding_pubrecs(10);
    let new = connect(&b, "resent", true, &new_sink);
    settle().await;
    let w = new_sink.written.borrow().clone();
    assert_eq!((w.len(), w[0].id, w[0].dup), (1, Some(1), true), "{w:?}");
    assert_eq!(old_sink.pubrec(1), Some(false), "no PUBREL on the old one");
    assert!(new.session.lock().released_ids().is_empty());
    assert_eq!(new_sink.pubrec(1), Some(true), "PUBREL on the new one");
    assert_eq!(new.session.lock().released_ids(), [1]);
    drop((old, new));
}

/// The same PUBREC while the message still waits to go out on the new
/// connection (its pump has not taken it yet): it releases the message
/// (PUBREL on the old connection), and the new connection does not send
/// it again.
#[ntex::test]
async fn a_pubrec_on_a_replaced_connection_releases_a_message_the_new_one_did_not_take_yet() {
    let b = broker(Config::default());
    let (old_sink, old) = qos2_in_flight(&b, "waiting").await;
    let new = b.attach("waiting", false, HOUR);
    assert_eq!(new.session.lock().resend.len(), 1, "waits to go again");
    assert_eq!(old_sink.pubrec(1), Some(true), "PUBREL on the old one");
    let st = new.session.lock();
    assert_eq!(st.released_ids(), [1]);
    assert!(
        st.resend.is_empty() && st.queue.is_empty(),
        "not sent again"
    );
    drop(st);
    drop(old);
}
