//! One MQTT connection, whatever its protocol version: the state ntex-mqtt
//! keeps for it, what happens when it ends, and the outbound pump that moves
//! messages from the session's queues to the socket.
//!
//! The pump is a task on the connection's worker thread. It is woken through
//! the connection's `Notify` when a message is queued, the client pulls
//! offline messages, or the session is taken over or kicked. QoS 1/2 messages
//! enter the session's in-flight map before they are written, so a connection
//! that dies loses none of them: the next connection resends them with DUP.

use std::cell::{Cell, RefCell};
use std::net::IpAddr;
use std::num::NonZeroU16;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::auth::{Grants, Identity};
use crate::broker::{Broker, SubscribeError};
use crate::durable::{ArmedWill, Pending};
use crate::message::{Message, QoS};
use crate::router::ClientId;
use crate::session::{ClientInfo, Conn, Delivery, KickReason, PendingWill, Session};
use crate::storage::EventKind;
use crate::token::{TokenError, TokenType};
use crate::trace::{DeviceAction, DeviceReason, MessageAction};

/// Why the pump closes the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The Client ID connected again elsewhere ("clientId conflict").
    Takeover,
    Kick(KickReason),
}

/// The outbound side of an ntex-mqtt sink, implemented for v3 and v5.
pub trait OutSink {
    /// Waits for send credit (the client's receive maximum); false once closed.
    fn ready(&self) -> impl Future<Output = bool>;
    /// QoS 1/2 messages that may be sent now without waiting.
    fn credit(&self) -> usize;
    fn send_qos0(&self, d: &Delivery, now: Instant) -> impl Future<Output = bool>;
    /// Writes a QoS 1 PUBLISH without waiting; the ack arrives through `on_ack`.
    fn send_qos1(&self, d: &Delivery, id: NonZeroU16, now: Instant) -> bool;
    /// Writes a QoS 2 PUBLISH without waiting (false: the connection is
    /// gone): `received` is called when its PUBREC arrives, the PUBREL
    /// follows once what it returns is written (`None`: no PUBREL, the
    /// connection is closed at once instead), and `completed` is called
    /// when the PUBCOMP arrives (or right after `received` for a refusing
    /// PUBREC, which ends the exchange). The exchanges of a session
    /// overlap up to the client's credit, as QoS 1 deliveries do.
    fn send_qos2(
        &self,
        d: &Delivery,
        id: NonZeroU16,
        now: Instant,
        received: Box<dyn FnOnce() -> Option<Pending>>,
        completed: Box<dyn FnOnce()>,
    ) -> bool;
    /// Registers the QoS 1 acknowledgement callback.
    fn on_ack(&self, f: Box<dyn Fn(u16)>);
    fn close(&self, reason: CloseReason);
    /// Largest packet the client accepts (MQTT 5), to skip what it would refuse.
    fn max_packet_size(&self) -> Option<u32>;
}

/// A will message and when it is due.
#[derive(Debug)]
pub struct Will {
    pub msg: Arc<Message>,
    pub delay: Duration,
}

/// The application state ntex-mqtt keeps for one connection.
#[derive(Debug)]
pub struct Connection {
    pub broker: Arc<Broker>,
    pub session: Arc<Session>,
    pub conn: Conn,
    pub client_id: ClientId,
    /// Who the client authenticated as; grants are looked up by it on every
    /// PUBLISH and SUBSCRIBE, so reloaded credentials apply at once.
    pub identity: Identity,
    /// The credentials this connection checks against, refreshed when they
    /// are reloaded.
    grants: RefCell<Grants>,
    /// cleanSession=false / session expiry > 0.
    pub persistent: bool,
    pub will: RefCell<Option<Will>>,
    /// The client sent DISCONNECT (the will is not published).
    pub graceful: Cell<bool>,
    /// Start of the current one-second window and pulls made in it (B6).
    pub pulls: Cell<(Instant, u32)>,
    /// Unique per TCP connection; named in device events (K5).
    pub channel_id: Arc<str>,
    pub peer: Option<IpAddr>,
    /// Why the connection ends, for the device trace: set by the pump (a
    /// takeover, a kick) or by the protocol layer (no heart, an error).
    close_reason: Rc<Cell<Option<DeviceReason>>>,
    /// The client's publishes in arrival order.
    pub arrivals: crate::order::Arrivals,
}

/// How a connection came to its session, for the device trace.
#[derive(Debug, Clone, Copy)]
pub struct Origin {
    /// `MQTT 3.1.1` or `MQTT 5`.
    pub protocol: &'static str,
    pub clean: bool,
}

impl Connection {
    pub fn new(
        broker: Arc<Broker>,
        attached: crate::session::Attached,
        identity: Identity,
        persistent: bool,
        will: Option<Will>,
        peer: Option<IpAddr>,
        origin: Origin,
    ) -> Self {
        broker.metrics().connections.inc();
        broker.metrics().connections_total.inc();
        broker
            .usage()
            .meter()
            .connections_now(u64::try_from(broker.metrics().connections.get()).unwrap_or(0));
        let channel_id = broker.next_channel_id();
        let client_id = &attached.session.client_id;
        broker.device_event(client_id, EventKind::Connect, &channel_id, peer);
        let traces = &broker.usage().traces();
        let trace =
            |action| traces.device(client_id, &channel_id, action, DeviceReason::Accepted, None);
        trace(DeviceAction::Connect);
        if attached.took_over {
            trace(DeviceAction::Takeovered);
        }
        if attached.present {
            trace(DeviceAction::Resumed);
        } else if !attached.discarded_subscriptions.is_empty()
            || (origin.clean && attached.took_over)
        {
            trace(DeviceAction::Discarded);
        }
        let mut st = attached.session.lock();
        if let Some(w) = &will {
            attached.session.arm_will(
                &mut st,
                ArmedWill {
                    delay_ms: u64::try_from(w.delay.as_millis()).unwrap_or(u64::MAX),
                    msg: w.msg.clone(),
                },
            );
        }
        st.info = ClientInfo {
            ip: peer,
            protocol: origin.protocol,
            clean_session: origin.clean,
            user: match &identity {
                Identity::Anonymous => None,
                Identity::User(u) | Identity::AccessKey(u) | Identity::Token(u) => Some(u.clone()),
            },
            channel_id: Some(channel_id.clone()),
            connected_at: crate::message::now_ms(),
            disconnected_at: None,
        };
        drop(st);
        Self {
            client_id: attached.session.client_id.clone(),
            session: attached.session,
            conn: attached.conn,
            identity,
            grants: RefCell::new(broker.auth().grants()),
            broker,
            persistent,
            will: RefCell::new(will),
            graceful: Cell::new(false),
            pulls: Cell::new((Instant::now(), 0)),
            channel_id,
            peer,
            close_reason: Rc::new(Cell::new(None)),
            arrivals: crate::order::Arrivals::default(),
        }
    }

    /// Records a device trace event of this connection.
    pub fn trace(&self, action: DeviceAction, reason: DeviceReason, detail: Option<&str>) {
        self.broker.usage().traces().device(
            &self.client_id,
            &self.channel_id,
            action,
            reason,
            detail,
        );
    }

    /// Records the outcome of one SUBSCRIBE filter.
    pub fn trace_subscribe(&self, filter: &str, refused: Option<&SubscribeError>) {
        let reason = match refused {
            None => DeviceReason::Accepted,
            Some(SubscribeError::Filter(_)) => DeviceReason::Invalid,
            Some(SubscribeError::Quota(_) | SubscribeError::Capacity | SubscribeError::Store) => {
                DeviceReason::QuotaExceeded
            }
        };
        self.trace(DeviceAction::Subscribed, reason, Some(filter));
    }

    /// Why the connection is about to end, unless a reason is known already.
    pub fn closing(&self, reason: DeviceReason) {
        if self.close_reason.get().is_none() {
            self.close_reason.set(Some(reason));
        }
    }

    /// Starts the outbound pump on this worker thread.
    pub fn start_pump<S: OutSink + 'static>(&self, sink: S) {
        let pump = Pump {
            broker: self.broker.clone(),
            session: self.session.clone(),
            conn: self.conn.clone(),
            next_id: Cell::new(0),
            close_reason: self.close_reason.clone(),
        };
        ntex::rt::spawn(async move { pump.run(sink).await });
    }

    /// The current grants: an atomic read per packet, a lock only after a
    /// credentials reload.
    pub fn grants(&self) -> std::cell::Ref<'_, Grants> {
        if !self.broker.auth().is_current(&self.grants.borrow()) {
            *self.grants.borrow_mut() = self.broker.auth().grants();
        }
        self.grants.borrow()
    }

    /// Token mode: whether the connection's tokens allow writing to `topic`
    /// (or reading `filter`), and if not, the seed's reason.
    pub fn token_check(&self, write: bool, target: &str) -> Result<(), (TokenError, TokenType)> {
        let wanted = if write { TokenType::W } else { TokenType::R };
        let Some(service) = &self.broker.tokens() else {
            return Err((TokenError::Account, wanted));
        };
        let st = self.session.lock();
        let mut failure = (TokenError::ActionMismatch, wanted);
        let now = crate::message::now_ms();
        for (ty, claims) in &st.tokens {
            let verdict = if !self.grants().has_access_key(&claims.ak) {
                Err(TokenError::Account)
            } else if claims.exp <= now {
                Err(TokenError::Expired)
            } else if service.is_revoked(&claims.id) {
                Err(TokenError::Revoked)
            } else if write {
                claims.may_write(target)
            } else {
                claims.may_read(target)
            };
            match verdict {
                Ok(()) => return Ok(()),
                // A token that does not grant the action says least.
                Err(TokenError::ActionMismatch) => {}
                Err(e) => failure = (e, *ty),
            }
        }
        Err(failure)
    }

    /// Builds a message published by this client.
    pub fn message(
        &self,
        topic: ntex::util::ByteString,
        payload: ntex::util::Bytes,
        qos: QoS,
        retain: bool,
    ) -> Message {
        self.broker
            .message(topic, payload, qos, retain, self.client_id.clone())
    }

    fn publish_will(&self) {
        let Some(will) = self.will.borrow_mut().take() else {
            return;
        };
        let broker = self.broker.clone();
        let msg = will.msg;
        let persistent = self.persistent;
        if will.delay.is_zero() || !persistent {
            let ordered = self.session.lock().ordered;
            broker.publish_will(&msg, ordered, persistent);
            return;
        }
        // MQTT 5 will delay: published when the delay or the session ends,
        // whichever is first, unless the client reconnects before. The
        // session's record keeps it, so a restart in between keeps it too.
        let session = self.session.clone();
        let generation = self.conn.generation;
        let delay = will.delay.min(session.lock().expiry);
        let due_ms = crate::message::now_ms()
            .saturating_add(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX));
        session.lock().pending_will = Some(PendingWill {
            generation,
            msg,
            due_ms,
        });
        broker.schedule_will(session, generation, delay);
    }
}

impl Connection {
    fn event(&self, kind: EventKind) {
        self.broker
            .device_event(&self.client_id, kind, &self.channel_id, self.peer);
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.broker.metrics().connections.dec();
        let superseded = self
            .session
            .lock()
            .attached
            .as_ref()
            .is_none_or(|c| c.generation != self.conn.generation);
        // Told to reconnect as its session moves (the pump took the kick
        // and closed with it, or the kick still waits): no will.
        let moved = self.close_reason.get() == Some(DeviceReason::SessionMoved)
            || self.session.lock().kick == Some(KickReason::Moved);
        if self.graceful.get() {
            self.event(EventKind::Disconnect);
            self.trace(
                DeviceAction::Disconnect,
                DeviceReason::DisconnectedByClient,
                None,
            );
        } else {
            if !moved {
                if !self.persistent && self.will.borrow().is_some() {
                    self.session.disarm_clean_will(self.conn.generation);
                }
                self.publish_will();
            }
            let reason = self.close_reason.get().unwrap_or(if superseded {
                DeviceReason::ClientIdConflict
            } else {
                DeviceReason::ClosedByClient
            });
            self.trace(DeviceAction::Close, reason, None);
        }
        self.event(EventKind::TcpClean);
        tracing::debug!(
            client_id = %self.client_id,
            graceful = self.graceful.get(),
            superseded,
            "connection closed"
        );
        self.broker.detach(&self.session, self.conn.generation);
        // Ends the pump if it is waiting.
        self.conn.wake.notify_one();
        // A shutdown or a drain may be waiting for the last connection.
        self.broker.drained_some();
    }
}

/// Messages the pump takes from the session in one go.
const BATCH: usize = 64;

/// Ready at its second poll: lets the worker's other tasks run once.
struct YieldNow(bool);

impl Future for YieldNow {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if self.0 {
            return std::task::Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    }
}

struct Pump {
    broker: Arc<Broker>,
    session: Arc<Session>,
    conn: Conn,
    next_id: Cell<u16>,
    close_reason: Rc<Cell<Option<DeviceReason>>>,
}

/// A delivery the pump writes: its packet id (QoS 1/2) and whether it comes
/// from the offline queue (the message trace tells them apart).
struct Outgoing {
    d: Delivery,
    id: Option<NonZeroU16>,
    offline: bool,
}

/// How long a message waits before it looks again whether the packet id
/// its number gives is free.
const HELD_ID_RETRY: Duration = Duration::from_millis(100);

enum Step {
    /// A batch, with the clock read that took it.
    Send(Vec<Outgoing>, Instant),
    Wait(Option<Duration>),
    /// QoS 1/2 messages wait in the live queue for the client's credit.
    WaitCredit,
    /// More to do at once (a retained replay scanning on), after the other
    /// tasks of the worker had their turn.
    Yield,
    Close(Option<CloseReason>),
}

impl Pump {
    async fn run<S: OutSink>(self, sink: S) {
        let session = self.session.clone();
        let generation = self.conn.generation;
        sink.on_ack(Box::new(move |id| session.acked(generation, id)));
        let limits = &self.broker.config().limits;
        let batch_interval = Duration::from_secs(limits.offline_batch_interval_secs);
        let mut next_offline = Instant::now();
        loop {
            let notified = self.conn.wake.notified();
            let step = self.take(&mut next_offline, batch_interval, sink.credit());
            match step {
                Step::Close(reason) => {
                    if let Some(r) = reason {
                        self.close_reason.set(Some(match r {
                            CloseReason::Takeover => DeviceReason::ClientIdConflict,
                            CloseReason::Kick(KickReason::Administrative) => DeviceReason::Kicked,
                            CloseReason::Kick(KickReason::Shutdown) => DeviceReason::ServerShutdown,
                            CloseReason::Kick(KickReason::Moved) => DeviceReason::SessionMoved,
                        }));
                        sink.close(r);
                    }
                    return;
                }
                Step::Wait(None) => notified.await,
                Step::Yield => YieldNow(false).await,
                Step::Wait(Some(d)) => {
                    let _ = ntex::util::select(notified, ntex::time::sleep(d)).await;
                }
                Step::WaitCredit => {
                    if let ntex::util::Either::Right(false) =
                        ntex::util::select(notified, sink.ready()).await
                    {
                        return;
                    }
                }
                Step::Send(batch, now) => {
                    // Boxed: the sending state (the sink's publish futures)
                    // would otherwise stay in every idle connection's task.
                    if !Box::pin(self.send(&sink, batch, now)).await {
                        return;
                    }
                }
            }
        }
    }

    /// Decides what to do next, under the session lock. QoS 1/2 messages stay
    /// in the live queue until the client has credit for them, so a slow
    /// client's backlog is visible to the publishers' backpressure.
    fn take(&self, next_offline: &mut Instant, interval: Duration, credit: usize) -> Step {
        let limits = &self.broker.config().limits;
        let now = Instant::now();
        let ttl = Duration::from_secs(limits.offline_message_ttl_secs);
        let mut st = self.session.lock();
        match &st.attached {
            Some(c) if c.generation == self.conn.generation => {}
            Some(_) => return Step::Close(Some(CloseReason::Takeover)),
            None => return Step::Close(None),
        }
        if let Some(k) = st.kick.take() {
            return Step::Close(Some(CloseReason::Kick(k)));
        }
        let mut batch = Vec::new();
        let mut expired = 0u64;
        while batch.len() < BATCH {
            let Some(d) = st.resend.pop_front() else {
                break;
            };
            batch.push(d);
        }
        let resent = batch.len();
        let mut offline = 0;
        let mut wait = None;
        if !st.pull_mode && !st.offline_hold && !st.offline.is_empty() {
            if now >= *next_offline {
                let n = limits.offline_batch.min(st.offline.len());
                offline = n;
                batch.extend(st.offline.drain(..n));
                *next_offline = now + interval;
            }
            if !st.offline.is_empty() {
                wait = Some(next_offline.saturating_duration_since(now));
            }
        }
        let before = st.queue.len();
        let mut credit =
            credit.saturating_sub(batch.iter().filter(|d| d.qos != QoS::AtMostOnce).count());
        let mut starved = false;
        // Retained messages of new subscriptions go before live ones, which
        // wait in the queue (and hold their publishers back) meanwhile: a
        // live message on a topic follows its retained one.
        let mut replaying = false;
        let mut paged = false;
        while batch.len() < BATCH
            && let Some(r) = st.replays.front_mut()
        {
            let mut room = BATCH - batch.len();
            if r.opts.qos != QoS::AtMostOnce {
                room = room.min(credit);
            }
            if room == 0 {
                starved = true;
                replaying = true;
                break;
            }
            let opts = r.opts;
            let page = self.broker.retained().page(&mut r.cursor, room);
            if page.done {
                st.replays.pop_front();
            } else {
                replaying = true;
            }
            let found = !page.messages.is_empty();
            paged = true;
            for m in page.messages {
                let qos = opts.qos.min(m.qos);
                let mut d = Delivery {
                    retain: true,
                    sub_ids: opts.id.into_iter().collect(),
                    ..Delivery::new(m, qos)
                };
                if qos != QoS::AtMostOnce {
                    credit = credit.saturating_sub(1);
                    // In flight, it is a queued message like any other: a
                    // crash brings it back, as the cursor moved past it.
                    if st.persistent {
                        self.session
                            .number_and_store(&mut st.last_seq, &mut d, None);
                    }
                }
                batch.push(d);
            }
            if replaying && !found {
                // A page of non-matching topics: the rest in another step,
                // so the session lock is not held for a whole scan.
                break;
            }
        }
        if paged {
            // Where the replays are now, after the messages they stored.
            self.session.save(&st, None);
        }
        while batch.len() < BATCH && !replaying {
            let Some(front) = st.queue.front() else { break };
            if front.qos != QoS::AtMostOnce {
                if credit == 0 {
                    starved = true;
                    break;
                }
                credit -= 1;
            }
            if let Some(d) = st.queue.pop_front() {
                batch.push(d);
            }
        }
        // Publishers holding acknowledgements for this queue may go on once
        // it is down to half its limit: woken at every message taken, they
        // would go over again at once and each wait anew per message.
        let low = limits.max_queued_messages / 2;
        if before > low && st.queue.len() <= low {
            self.session.space.notify_waiters();
        }
        let mut out = Vec::with_capacity(batch.len());
        let mut held = false;
        let mut batch = batch.into_iter().enumerate();
        while let Some((i, mut d)) = batch.next() {
            if d.msg.is_expired(now, ttl) {
                expired += 1;
                self.session.discard(&d);
                continue;
            }
            let from_offline = i >= resent && i < resent + offline;
            let id = if d.qos == QoS::AtMostOnce {
                None
            } else {
                let taken = |id: u16| st.inflight.contains(id) || st.is_released(id);
                let own = d.packet_id();
                if own.is_some_and(|id| taken(id.get())) {
                    // Its id is still held by a message 65 535 before it:
                    // it waits (and what follows it, in order) rather than
                    // go out under another id, which a crash would forget.
                    let rest: Vec<Delivery> = std::iter::once(d)
                        .chain(batch.by_ref().map(|(_, d)| d))
                        .collect();
                    for d in rest.into_iter().rev() {
                        st.resend.push_front(d);
                    }
                    held = true;
                    tracing::debug!(client_id = %self.session.client_id, id = ?own, "a message waits: its packet id is still taken");
                    break;
                }
                let id = own.unwrap_or_else(|| self.packet_id(taken));
                d.sent_as = Some(id);
                st.inflight.insert(id.get(), d.clone());
                Some(id)
            };
            out.push(Outgoing {
                d,
                id,
                offline: from_offline,
            });
        }
        drop(st);
        if expired > 0 {
            self.broker.metrics().offline_dropped.inc_by(expired);
            self.broker
                .metrics()
                .messages_dropped
                .with_label_values(&["expired"])
                .inc_by(expired);
        }
        if !out.is_empty() {
            Step::Send(out, now)
        } else if held {
            // Rare enough (an id held through 65 535 others) to look again
            // later rather than be woken when it frees.
            Step::Wait(Some(HELD_ID_RETRY))
        } else if starved {
            Step::WaitCredit
        } else if replaying {
            Step::Yield
        } else {
            Step::Wait(wait)
        }
    }

    /// The next packet id not in flight.
    fn packet_id(&self, in_use: impl Fn(u16) -> bool) -> NonZeroU16 {
        loop {
            let id = self.next_id.get().wrapping_add(1);
            self.next_id.set(id);
            if let Some(id) = NonZeroU16::new(id)
                && !in_use(id.get())
            {
                return id;
            }
        }
    }

    /// Writes a batch; false once the connection is gone.
    async fn send<S: OutSink>(&self, sink: &S, batch: Vec<Outgoing>, now: Instant) -> bool {
        let mut sent = Vec::with_capacity(batch.len());
        let mut ok = true;
        for Outgoing { d, id, offline } in batch {
            if sink
                .max_packet_size()
                .is_some_and(|max| d.msg.payload.len() + d.msg.topic.len() + 16 > max as usize)
            {
                // MQTT 5 3.1.2.11.4: a message the client cannot take is dropped.
                self.broker.metrics().drop_message("client_max_packet_size");
                match id {
                    Some(id) => self.session.acked(self.conn.generation, id.get()),
                    None => self.session.discard(&d),
                }
                continue;
            }
            if let Some(stored) = &d.stored {
                // Not before the store and the replicas have it: the
                // client holds the id from here (`message::Stored`).
                stored.wait().await;
            }
            ok = match id {
                None => sink.send_qos0(&d, now).await,
                Some(id) => {
                    if !sink.ready().await {
                        false
                    } else if d.qos == QoS::AtLeastOnce {
                        sink.send_qos1(&d, id, now)
                    } else {
                        let (session, generation) = (self.session.clone(), self.conn.generation);
                        // PUBREC received: the client has the message.
                        let received = Box::new(move || session.pubrec(generation, id.get()));
                        let session = self.session.clone();
                        let completed = Box::new(move || session.completed(id.get()));
                        sink.send_qos2(&d, id, now, received, completed)
                    }
                }
            };
            if !ok {
                break;
            }
            let action = if offline {
                MessageAction::OfflinePushed
            } else {
                MessageAction::Pushed
            };
            sent.push((d.msg, d.qos, action));
        }
        self.account(&sent);
        ok
    }

    /// Counts, meters, charges and traces the messages of one batch that
    /// were written: once per batch (and per run of one topic), not once
    /// per message.
    fn account(&self, sent: &[(Arc<Message>, QoS, MessageAction)]) {
        if sent.is_empty() {
            return;
        }
        let usage = &self.broker.usage();
        let mut per_qos = [(0u64, 0u64); 3];
        let mut weight = 0;
        for (msg, qos, _) in sent {
            let q = &mut per_qos[*qos as usize];
            q.0 += 1;
            q.1 += msg.payload.len() as u64;
            weight += crate::meter::weight(*qos);
        }
        for (qos, (n, bytes)) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce]
            .into_iter()
            .zip(per_qos)
        {
            if n > 0 {
                self.broker.metrics().sent_many(qos, n, bytes);
            }
        }
        let mut i = 0;
        while i < sent.len() {
            let (msg, qos, _) = &sent[i];
            let run = sent[i..]
                .iter()
                .take_while(|(m, q, _)| q == qos && m.topic == msg.topic)
                .count();
            usage.meter().consumed(&msg.topic, *qos, run as u64);
            i += run;
        }
        usage.capacity().charge(weight);
        usage.traces().messages(
            &self.session.client_id,
            sent.iter().map(|(m, q, a)| (&**m, *a, *q)),
        );
        self.session
            .sent
            .fetch_add(sent.len() as u64, std::sync::atomic::Ordering::Relaxed);
    }
}
