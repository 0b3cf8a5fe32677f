//! The broker core: sessions, routing table and retained messages of one node,
//! and the operations that the protocol layer calls for every packet.
//!
//! Nothing here knows about MQTT versions or sockets; `protocol` translates
//! ntex-mqtt's v3 and v5 packets into these calls.

mod failover;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::alarm::Alarms;
use crate::auth::Auth;
use crate::capacity::Capacity;
use crate::config::Config;
use crate::durable::{Pending, Recovered, RecoveredSession, Released, Store, WriteFailed};
use crate::message::{Message, MessageIds, QoS};
use crate::meter::{Meter, weight};
use crate::metrics::Metrics;
use crate::order::Gate;
use crate::peers::{Handover, PeerMsg, Peers};
use crate::retain::RetainStore;
use crate::router::{ClientId, Route, Router, Scope, SubOptions, node_route, route_node};
use crate::session::{
    Attached, Delivery, Enqueued, KickReason, QueueLimits, RetainedReplay, Session, SessionStore,
};
use crate::storage::{DeviceEvent, Durability, EventKind, OnFull, Storage, StorageError};
use crate::token::TokenService;
use crate::topic::{self, ClientIdError, TopicError};
use crate::trace::{MessageAction, Traces};

/// Why a PUBLISH was refused.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("invalid topic: {0}")]
    Topic(#[from] TopicError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("a node with subscribers is unreachable")]
    Cluster,
    /// The node's store could not write (disk full, read-only).
    #[error("the message could not be stored for the persistent sessions it reached: {0}")]
    Persist(#[from] WriteFailed),
}

/// Why one filter of a SUBSCRIBE was refused.
#[derive(Debug, thiserror::Error)]
pub enum SubscribeError {
    #[error("invalid topic filter: {0}")]
    Filter(#[from] TopicError),
    #[error("too many subscriptions (at most {0} per client)")]
    Quota(usize),
    #[error("the instance's subscription capacity is used up")]
    Capacity,
    #[error("the subscription could not be stored (disk full or read-only?)")]
    Store,
}

pub type Result<T, E = PublishError> = std::result::Result<T, E>;

/// One node's broker state, shared by every connection and worker thread.
#[derive(Debug)]
pub struct Broker {
    config: Config,
    sessions: SessionStore,
    router: Router,
    retained: RetainStore,
    metrics: Metrics,
    ids: MessageIds,
    auth: Auth,
    /// The token service, when a signing key is configured.
    tokens: Option<TokenService>,
    storage: Arc<dyn Storage>,
    /// Cleared when the node starts shutting down (`/readyz` answers 503).
    ready: AtomicBool,
    /// Set once what the store held is restored (`restore`): until then
    /// CONNECTs are refused, as a session on disk would look absent.
    restored: AtomicBool,
    /// This node's name (`Config::node_name`).
    node: Arc<str>,
    /// Sequence of channel IDs (one per TCP connection).
    channels: AtomicU64,
    /// Last device event index handed out.
    event_clock: AtomicU64,
    /// The other nodes, when this node is part of a cluster.
    peers: Option<Arc<dyn Peers>>,
    /// Descriptors MQTT connections may take (the admin port keeps a reserve).
    fds: Arc<crate::descriptors::Budget>,
    /// Sessions that moved to another node, by Client ID, with their new
    /// owner: while their routes linger here, messages for them follow them.
    moved: std::sync::Mutex<std::collections::HashMap<ClientId, Arc<str>>>,
    usage: Usage,
    /// Signalled when a connection ends or a session leaves for another
    /// node: what a shutdown or a drain waits on.
    drained: tokio::sync::Notify,
    /// Where persistent sessions and retained messages are kept on disk.
    persist: Arc<dyn Store>,
    /// Which nodes keep a replica of each session, when sessions are
    /// replicated (a cluster with `replication_factor` above 1).
    replication: Option<Arc<crate::replica::Replication>>,
    /// The copies of other nodes' sessions this node keeps.
    replicas: crate::replica::Replicas,
    /// What this node sent whole to its replicas.
    resync: failover::Resync,
    /// Held while copies taken out of `replicas` become sessions (a ring
    /// pass, or a client's claim): a client that connects meanwhile finds
    /// its session served, rather than neither copy nor session and a new
    /// empty one (session present 0; the chaos test).
    serving_copies: std::sync::Mutex<()>,
}

/// What the node measures and remembers for the operations API, and the
/// capacity it enforces.
#[derive(Debug)]
pub struct Usage {
    meter: Meter,
    traces: Traces,
    capacity: Capacity,
    alarms: Alarms,
}

impl Usage {
    pub fn new(meter: Meter, traces: Traces, capacity: Capacity, alarms: Alarms) -> Self {
        Self {
            meter,
            traces,
            capacity,
            alarms,
        }
    }

    /// Weighted TPS, counts per parent topic, the resource report's history.
    pub fn meter(&self) -> &Meter {
        &self.meter
    }

    /// Device and message traces.
    pub fn traces(&self) -> &Traces {
        &self.traces
    }

    /// The declared capacity and its enforcement.
    pub fn capacity(&self) -> &Capacity {
        &self.capacity
    }

    /// Alarm rules and records.
    pub fn alarms(&self) -> &Alarms {
        &self.alarms
    }
}

/// The QoS with which a remote node's marker subscribes: the highest, so
/// that downgrades happen at the subscriber's node.
const MARKER_QOS: QoS = QoS::ExactlyOnce;

/// Messages for other nodes that a publish produced.
type Forwards = Vec<(Arc<str>, PeerMsg)>;

/// One of a ring's hand-overs (a session, a copy, a tombstone) is on its
/// way, or back here: the last one tells the peers this node settled.
fn one_handed_over(c: &dyn Peers, left: &std::sync::atomic::AtomicUsize) {
    if left.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == 1 {
        c.announce_settled();
    }
}

/// How a session's hand-over to its new owner ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handed {
    /// The new owner keeps it.
    Kept,
    /// It never left: the new owner had no link.
    NotSent,
    /// It left, and the new owner was lost (or its link broke) before it
    /// said it keeps it: it may have served the session meanwhile.
    Unconfirmed,
}

/// What a change waits with: a commit when someone waits for it (`acked`),
/// otherwise nothing to allocate or count.
fn waited(acked: bool) -> Pending {
    if acked {
        Pending::default()
    } else {
        Pending::detached()
    }
}

/// Who publishes a message, as the storage and routing rules need it.
#[derive(Debug, Clone, Copy)]
pub struct Publisher<'a> {
    /// The publisher's session: its `ordered` flag keys stored records.
    pub session: &'a Session,
    /// cleanSession=false / session expiry > 0: decides P2P offline queueing.
    pub persistent: bool,
    /// What a full storage buffer does to this publisher's QoS 1/2 messages.
    pub on_full: OnFull,
    /// The message's place in its client's arrival order (`None`: nothing
    /// to keep in order with).
    pub ticket: Option<&'a crate::order::Ticket<'a>>,
    /// The packet id of a QoS 2 PUBLISH: until its PUBREL, a resend of it
    /// (after a reconnect or a restart) is acknowledged, not delivered again.
    pub qos2_id: Option<u16>,
}

/// Which offline sessions keep a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeepOffline {
    /// MQTT publishes: every persistent session, except that P2P follows the
    /// sender's flag (B10).
    Publisher { persistent: bool },
    /// Downlink records: the `cleanSession` header decides for every target.
    Record { persistent: bool },
}

/// What a successful subscription gives back.
#[derive(Debug)]
pub struct Subscribed {
    /// The subscription replaced an existing one with the same filter.
    pub existed: bool,
    /// Its retained messages are being sent (never for a shared one).
    pub replaying: bool,
}

/// Which subscriptions get the retained messages that match them when
/// they are made (MQTT 5 retain handling; MQTT 3.1.1: always).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendRetained {
    Always,
    /// Only a subscription that did not exist before.
    IfNew,
    Never,
}

/// What a node is built from, besides its configuration.
#[derive(Debug)]
pub struct Parts {
    pub metrics: Metrics,
    pub auth: Auth,
    pub tokens: Option<TokenService>,
    pub storage: Arc<dyn Storage>,
    pub peers: Option<Arc<dyn Peers>>,
    pub usage: Usage,
    /// The durable store (`durable::NoStore` for none), with replication
    /// in front when sessions are replicated (`replica::Replicated`).
    pub persist: Arc<dyn Store>,
    /// Who keeps a replica of each session (`None`: nobody).
    pub replication: Option<Arc<crate::replica::Replication>>,
}

impl Broker {
    /// The node's configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// This node's name (`Config::node_name`).
    pub fn node(&self) -> &Arc<str> {
        &self.node
    }

    /// The sessions of this node.
    pub fn sessions(&self) -> &SessionStore {
        &self.sessions
    }

    /// Which sessions (and which other nodes) each topic reaches.
    pub fn router(&self) -> &Router {
        &self.router
    }

    /// The retained messages.
    pub fn retained(&self) -> &RetainStore {
        &self.retained
    }

    /// The node's Prometheus metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Authentication and authorisation of clients.
    pub fn auth(&self) -> &Auth {
        &self.auth
    }

    /// The token service, when a signing key is configured.
    pub fn tokens(&self) -> Option<&TokenService> {
        self.tokens.as_ref()
    }

    /// Descriptors MQTT connections may take (the admin port keeps a reserve).
    pub fn descriptors(&self) -> &Arc<crate::descriptors::Budget> {
        &self.fds
    }

    /// Metering, traces, capacity and alarms.
    pub fn usage(&self) -> &Usage {
        &self.usage
    }

    /// The other nodes, when this node is part of a cluster.
    pub fn peers(&self) -> Option<&Arc<dyn Peers>> {
        self.peers.as_ref()
    }

    pub fn new(config: Config, parts: Parts) -> Arc<Self> {
        let Parts {
            metrics,
            auth,
            tokens,
            storage,
            peers,
            usage,
            persist,
            replication,
        } = parts;
        let config_node = config.node_name();
        let fds = crate::descriptors::Budget::new(config.limits.reserved_file_descriptors);
        Arc::new(Self {
            config,
            sessions: SessionStore::new(persist.clone()),
            router: Router::default(),
            retained: RetainStore::new(persist.clone()),
            metrics,
            ids: MessageIds::new(&config_node),
            auth,
            tokens,
            storage,
            ready: AtomicBool::new(true),
            restored: AtomicBool::new(false),
            node: Arc::from(config_node.as_str()),
            channels: AtomicU64::new(0),
            event_clock: AtomicU64::new(0),
            peers,
            fds,
            moved: std::sync::Mutex::default(),
            usage,
            drained: tokio::sync::Notify::new(),
            persist,
            replication,
            replicas: crate::replica::Replicas::default(),
            resync: failover::Resync::default(),
            serving_copies: std::sync::Mutex::default(),
        })
    }

    /// Whether the node accepts new work.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Whether what the store held is restored (always, once started,
    /// unless the store could not be opened at start-up).
    pub fn is_restored(&self) -> bool {
        self.restored.load(Ordering::Acquire)
    }

    /// Starts a shutdown: not ready any more, every connection told to close
    /// (MQTT 5: "server shutting down"). Persistent sessions stay.
    pub fn close_all(&self) {
        self.ready.store(false, Ordering::Relaxed);
        for s in self.sessions.all() {
            s.kick(KickReason::Shutdown);
        }
    }

    pub fn queue_limits(&self) -> QueueLimits {
        let l = &self.config.limits;
        QueueLimits {
            online: l.max_queued_messages,
            // Room for every publish a client may have unacknowledged.
            overflow: l.max_queued_messages.max(usize::from(l.receive_maximum)),
            offline: l.offline_queue_len,
        }
    }

    /// Attaches a connection to its session and drops a discarded session's
    /// subscriptions from the routing table.
    pub fn attach(self: &Arc<Self>, client_id: &str, clean: bool, expiry: Duration) -> Attached {
        if let Some(to) = self.moved_to(client_id)
            && self.sessions.get(client_id).is_none()
        {
            // Its session is on its way to `to`, and the store still keeps
            // it: forgotten before the new session writes, so that none of
            // the old one's stored messages joins it.
            self.sessions.forget_moved(&Arc::from(client_id), &to);
        }
        self.claim_copy(client_id);
        let attached = self.sessions.attach(client_id, clean, expiry);
        self.drop_routes(
            &attached.session.client_id,
            &attached.discarded_subscriptions,
        );
        if attached.took_over {
            self.metrics.takeovers.inc();
        }
        self.metrics.sessions.set(gauge(self.sessions.len()));
        attached
    }

    /// MQTT 5 DISCONNECT changed the session expiry: a persistent session
    /// that no longer is leaves a tombstone.
    pub fn set_expiry(&self, session: &Session, expiry: Duration) {
        if let Some((epoch, ttl)) = session.set_expiry(expiry) {
            self.sessions.ended().record(&session.client_id, epoch, ttl);
        }
    }

    /// Detaches a connection; a session that ends with it leaves the routing table.
    pub fn detach(&self, session: &Arc<Session>, generation: u64) {
        if let Some(subs) = self.sessions.detach(session, generation) {
            self.drop_routes(&session.client_id, &subs);
        }
        self.metrics.sessions.set(gauge(self.sessions.len()));
    }

    fn drop_routes(&self, client: &ClientId, filters: &[String]) {
        for raw in filters {
            if let Some(c) = &self.peers {
                c.filter_removed(raw);
            }
            // Filters in a session were validated when they were added.
            if let Ok(f) = topic::parse_filter(raw, usize::MAX, false)
                && self.router.unsubscribe(client, &f)
            {
                self.metrics.subscriptions.dec();
            }
        }
    }

    /// Removes sessions whose expiry interval has passed.
    pub fn expire_sessions(&self, now: Instant) {
        for (client, subs) in self.sessions.expire(now) {
            tracing::debug!(client_id = %client, "session expired");
            self.drop_routes(&client, &subs);
        }
        self.metrics.sessions.set(gauge(self.sessions.len()));
    }

    /// The Client ID a CONNECT gets: a generated one for an empty request,
    /// otherwise the requested one if it passes the rules (B8, B12). A refusal
    /// is counted and logged.
    pub fn client_id(&self, requested: &str) -> Result<String, ClientIdError> {
        let id = if requested.is_empty() {
            format!("ringmq-{}", self.ids.next())
        } else {
            requested.to_owned()
        };
        let rules = &self.config.client_id;
        match topic::parse_client_id(
            &id,
            self.config.limits.max_client_id_length,
            rules.require_group_id,
            rules.strict_names,
        ) {
            Ok(_) => Ok(id),
            Err(e) => {
                self.metrics.reject("client_id_invalid");
                tracing::info!(client_id = id, error = %e, "CONNECT refused");
                Err(e)
            }
        }
    }

    /// Validates a topic name against the configured limits.
    pub fn check_topic(&self, topic: &str) -> Result<(), TopicError> {
        topic::validate_name(
            topic,
            self.config.limits.max_topic_length,
            self.config.client_id.strict_names,
        )
    }

    /// The inbound publish path: store (when the parent topic is stored),
    /// then route, both in the client's arrival order (`protocol::order`).
    /// Resolves when the PUBLISH may be acknowledged.
    pub async fn accept(&self, msg: Arc<Message>, publisher: Publisher<'_>) -> Result<usize> {
        let ticket = publisher.ticket;
        if let Some(id) = publisher.qos2_id
            && publisher.session.holds_qos2(id)
        {
            // Delivered already: its PUBREC went missing.
            self.metrics.drop_message("qos2_duplicate");
            ticket.inspect(|t| t.pass(Gate::Store));
            if let Some(t) = ticket {
                t.wait(Gate::Route).await;
            }
            ticket.inspect(|t| t.pass(Gate::Route));
            return Ok(0);
        }
        self.metrics.received(msg.qos, msg.payload.len());
        self.count_produced(&msg, &publisher.session.client_id, MessageAction::Published);
        publisher.session.received.fetch_add(1, Ordering::Relaxed);
        if self.storage.stores(topic::parent_topic(&msg.topic)) {
            let ordered = publisher.session.lock().ordered;
            let durability = if msg.qos == QoS::AtMostOnce {
                Durability::BestEffort
            } else {
                Durability::Acknowledged(publisher.on_full)
            };
            // Submitted when called; the acknowledgement is awaited with the
            // next messages already submitted behind it.
            let stored = self.storage.store(msg.clone(), ordered, durability);
            ticket.inspect(|t| t.pass(Gate::Store));
            stored.await?;
        } else {
            ticket.inspect(|t| t.pass(Gate::Store));
        }
        if let Some(t) = ticket {
            t.wait(Gate::Route).await;
        }
        if msg.qos != QoS::AtMostOnce && self.reaches_unlinked(&msg) {
            // Refused whole, before any session has it: the client's next
            // attempt reaches every subscriber once.
            return Err(PublishError::Cluster);
        }
        let mut over = Vec::new();
        let mut forwards = Vec::new();
        let mut pending = Pending::default();
        if let Some(id) = publisher.qos2_id {
            // In the same commit as the deliveries: on disk before PUBREC.
            let max = usize::from(self.config.limits.receive_maximum);
            publisher.session.hold_qos2(id, max, &mut pending);
        }
        let keep = KeepOffline::Publisher {
            persistent: publisher.persistent,
        };
        let reached = self.route(
            &msg,
            keep,
            Scope::All,
            &mut over,
            &mut forwards,
            &mut pending,
        );
        // Boxed waits, here and below: they are rare, and the publish
        // handler's future is allocated per message at its full size.
        let acked = (msg.qos != QoS::AtMostOnce).then_some(&mut pending);
        if !forwards.is_empty()
            && !Box::pin(self.forward_waiting(forwards, acked)).await
            && msg.qos != QoS::AtMostOnce
        {
            return Err(PublishError::Cluster);
        }
        // Queued here and on the links: the client's next message may route.
        ticket.inspect(|t| t.pass(Gate::Route));
        // In the store for every persistent session it reached (the next
        // messages join the same group commit meanwhile). QoS 0 has no
        // acknowledgement to hold back: its retained copy is written in
        // order with the rest, and nobody waits for it.
        if msg.qos != QoS::AtMostOnce {
            pending.wait().await?;
        }
        for session in over {
            if !self.has_room(&session) {
                Box::pin(self.wait_for_room(&session)).await;
            }
        }
        Ok(reached)
    }

    /// Queues frames for other nodes, waiting while a link queue is full
    /// (backpressure across nodes: a full link holds the PUBACK). False if
    /// a link stayed full or is gone: the publish is refused, so that the
    /// client sends it again rather than believe it arrived. `pending`
    /// (a QoS 1/2 publish) then also waits until each node is through
    /// with it: kept by the persistent sessions it reached there.
    async fn forward_waiting(&self, forwards: Forwards, mut pending: Option<&mut Pending>) -> bool {
        let Some(c) = &self.peers else {
            return false;
        };
        let wait = Duration::from_millis(self.config.limits.queue_full_wait_ms);
        let mut delivered = true;
        for (node, forward) in forwards {
            let sent = match pending.as_deref_mut() {
                Some(p) => c.send_acked(&node, forward, p, wait).await,
                None => c.send(&node, forward, wait).await,
            };
            if !sent {
                self.metrics.drop_message("cluster_link");
                delivered = false;
            }
        }
        delivered
    }

    /// Whether a message would reach the filters of a node this one has no
    /// link to: one that left the ring, whose sessions' new owners have not
    /// all announced theirs yet, or one back whose link is not up yet.
    /// Looked up only while such filters exist (`Peers::routes_unlinked`).
    fn reaches_unlinked(&self, msg: &Message) -> bool {
        let Some(c) = &self.peers else {
            return false;
        };
        if !c.routes_unlinked() || topic::p2p_target(&msg.topic).is_some() {
            return false;
        }
        let mut routes = Vec::new();
        let markers = |client: &ClientId| route_node(client).is_some();
        self.router
            .route(&msg.topic, &markers, Scope::All, &mut routes);
        routes
            .iter()
            .any(|r| route_node(&r.client).is_some_and(|n| !c.is_linked(n)))
    }

    /// Meters, charges and traces a message entering the broker.
    fn count_produced(&self, msg: &Message, client_id: &ClientId, action: MessageAction) {
        let u = &self.usage;
        u.meter.produced(&msg.topic, msg.qos);
        u.capacity.charge(weight(msg.qos));
        u.traces.message(client_id, msg, action, msg.qos);
    }

    /// A will message: stored like a QoS 0 message (nobody waits for it),
    /// then routed.
    /// `ordered`: its session asked for ordered storage.
    pub fn publish_will(&self, msg: &Arc<Message>, ordered: bool, persistent: bool) {
        if self.storage.stores(topic::parent_topic(&msg.topic)) {
            // BestEffort resolves at once: the future has nothing left to do.
            drop(
                self.storage
                    .store(msg.clone(), ordered, Durability::BestEffort),
            );
        }
        self.publish(msg, persistent);
    }

    /// Publishes a session's delayed will after `delay`, unless a connection
    /// attached meanwhile (the will is no longer the one of `generation`).
    pub fn schedule_will(
        self: &Arc<Self>,
        session: Arc<Session>,
        generation: u64,
        delay: Duration,
    ) {
        let broker = self.clone();
        ntex::rt::spawn(async move {
            ntex::time::sleep(delay).await;
            broker.will_due(&session, generation);
        });
    }

    fn will_due(&self, session: &Session, generation: u64) {
        let due = |st: &crate::session::State| {
            st.pending_will
                .as_ref()
                .filter(|w| w.generation == generation)
                .map(|w| w.msg.clone())
        };
        let Some(msg) = due(&session.lock()) else {
            return;
        };
        // Published before the record forgets it, and outside the lock
        // (the session may subscribe to its own will): a crash in between
        // publishes it again after the restart, never not at all.
        let (ordered, persistent) = {
            let st = session.lock();
            (st.ordered, st.persistent)
        };
        self.publish_will(&msg, ordered, persistent);
        let mut st = session.lock();
        if due(&st).is_some() {
            st.pending_will = None;
            session.save(&st, None);
        }
    }

    /// A test message sent through the operations API (O8): stored when its
    /// parent topic is (best effort), then routed like a QoS 0 publish of a
    /// client without a session. Returns the sessions reached.
    pub fn publish_api(&self, msg: &Arc<Message>) -> usize {
        self.metrics.received(msg.qos, msg.payload.len());
        self.count_produced(msg, &msg.publisher, MessageAction::Published);
        if self.storage.stores(topic::parent_topic(&msg.topic)) {
            drop(
                self.storage
                    .store(msg.clone(), false, Durability::BestEffort),
            );
        }
        self.publish(msg, false)
    }

    /// A downlink record from Kafka (K4): routed like a publish; offline
    /// persistent sessions keep it only when the record says
    /// `cleanSession=false`. Returns the sessions that went over their queue
    /// limit, for the consumer to wait on, with the number of sessions reached.
    pub fn publish_downlink(
        &self,
        msg: &Arc<Message>,
        clean_session: bool,
    ) -> (usize, Vec<Arc<Session>>, Pending) {
        self.metrics.received(msg.qos, msg.payload.len());
        self.count_produced(msg, &msg.publisher, MessageAction::FromKafka);
        let mut over = Vec::new();
        let mut forwards = Vec::new();
        let keep = KeepOffline::Record {
            persistent: !clean_session,
        };
        // Every node reads every record: each delivers to its own sessions,
        // and a shared group is served by the one node the ring designates.
        let owns = |group: &str| {
            self.peers
                .as_ref()
                .is_none_or(|c| c.is_local(&c.owner(group)))
        };
        let scope = Scope::Designated { owns: &owns };
        // The consumer stores the record's offset only once the persistent
        // sessions it reached have it on disk.
        let mut pending = Pending::default();
        let reached = self.route(msg, keep, scope, &mut over, &mut forwards, &mut pending);
        self.forward_now(forwards);
        (reached, over, pending)
    }

    /// Sends forwards without waiting; what finds a full link is counted.
    fn forward_now(&self, forwards: Forwards) {
        if let Some(c) = &self.peers {
            for (node, forward) in forwards {
                if !c.try_send(&node, forward) {
                    self.metrics.drop_message("cluster_link");
                }
            }
        }
    }

    /// A message another node forwarded: delivered to this node's sessions
    /// (and to the shared groups the sender chose this node for). Returns
    /// the sessions that went over their queue limit: the publish's
    /// acknowledgement waits for them (`cluster::replication::Inbound`),
    /// which holds the publisher's PUBACK — backpressure across nodes.
    /// With them, when the sender waits (`acked`), what the persistent
    /// sessions it reached must write (here and on their replicas) before
    /// it is told.
    pub fn publish_forwarded(
        &self,
        msg: Arc<Message>,
        groups: &[String],
        acked: bool,
    ) -> (Vec<Arc<Session>>, Pending) {
        let keep = KeepOffline::Publisher { persistent: true };
        let mut forwards = Vec::new();
        let mut over = Vec::new();
        let mut pending = waited(acked);
        self.route(
            &msg,
            keep,
            Scope::Local { groups },
            &mut over,
            &mut forwards,
            &mut pending,
        );
        // Only sessions that just moved produce forwards here.
        self.forward_now(forwards);
        (over, pending)
    }

    /// A P2P message another node forwarded to the owner of its target;
    /// what it returns as `publish_forwarded` does.
    pub fn deliver_direct(
        &self,
        client_id: &str,
        persistent: bool,
        msg: Arc<Message>,
        acked: bool,
    ) -> (Vec<Arc<Session>>, Pending) {
        if self.sessions.get(client_id).is_none()
            && let Some(owner) = self.moved_to(client_id)
        {
            // It moved on while the message travelled.
            let qos = msg.qos;
            let forward = PeerMsg::Direct {
                client_id: client_id.to_owned(),
                persistent,
                msg,
                qos,
            };
            self.forward_now(vec![(owner, forward)]);
            return (Vec::new(), Pending::default());
        }
        let mut over = Vec::new();
        let mut pending = waited(acked);
        self.publish_p2p(&msg, client_id, persistent, &mut over, &mut pending);
        (over, pending)
    }

    /// A retained message another node stored.
    pub fn retain_replica(&self, msg: Arc<Message>) {
        let n = self.retained.set_if_newer(&msg);
        self.metrics.retained.set(gauge(n));
    }

    /// A peer announced filters its sessions added or dropped.
    pub fn remote_routes(&self, node: &str, add: &[String], del: &[String]) {
        let marker = node_route(node);
        let opts = SubOptions {
            qos: MARKER_QOS,
            no_local: false,
            retain_as_published: true,
            id: None,
        };
        for raw in add {
            if let Ok(f) = topic::parse_filter(raw, usize::MAX, false) {
                self.router.subscribe(&marker, &f, opts);
            }
        }
        for raw in del {
            if let Ok(f) = topic::parse_filter(raw, usize::MAX, false) {
                self.router.unsubscribe(&marker, &f);
            }
        }
    }

    fn moved_to(&self, client: &str) -> Option<Arc<str>> {
        self.moved.lock().ok()?.get(client).cloned()
    }

    /// Moves every session this node no longer owns to its owner on the
    /// current ring (C4). Called when the ring changes.
    pub fn rebalance(self: &Arc<Self>) {
        let Some(c) = &self.peers else {
            return;
        };
        self.replicate_ring();
        let orphans = self.orphaned_copies();
        let ring = c.ring();
        let ended = self
            .sessions
            .ended()
            .take_unowned(|client| ring.owner(client).is_none_or(|o| c.is_local(o)));
        let mut moves = Vec::new();
        for session in self.sessions.all() {
            let Some(owner) = ring.owner(&session.client_id).cloned() else {
                continue;
            };
            if c.is_local(&owner) {
                continue;
            }
            {
                let Ok(mut moved) = self.moved.lock() else {
                    continue;
                };
                if moved.contains_key(&session.client_id) {
                    continue;
                }
                moved.insert(session.client_id.clone(), owner.clone());
            }
            moves.push((session, owner));
        }
        // Once every session of this ring is on its way (the frames go in
        // order on each link), the new owners may serve them.
        let left = Arc::new(std::sync::atomic::AtomicUsize::new(
            moves.len() + orphans.len() + ended.len(),
        ));
        if moves.is_empty() && orphans.is_empty() && ended.is_empty() {
            c.announce_settled();
        }
        for (client, epoch, ttl) in ended {
            let (broker, left) = (self.clone(), left.clone());
            ntex::rt::spawn(async move {
                broker.send_tombstone(client, epoch, ttl, &left).await;
            });
        }
        for (owner, h) in orphans {
            let (broker, left) = (self.clone(), left.clone());
            ntex::rt::spawn(async move {
                broker.send_copy(h, owner, &left).await;
            });
        }
        for (session, owner) in moves {
            let (broker, left) = (self.clone(), left.clone());
            ntex::rt::spawn(async move {
                broker.move_session(session, owner, &left).await;
            });
        }
    }

    /// Hands one session to `owner`: the connection is told to reconnect
    /// (it lands on the owner), then the state moves. The session's routes
    /// stay here for a grace period and forward what still arrives, so no
    /// message is lost while the other nodes learn the new owner's routes
    /// (a message may arrive twice in that window).
    async fn move_session(
        self: Arc<Self>,
        session: Arc<Session>,
        owner: Arc<str>,
        left: &std::sync::atomic::AtomicUsize,
    ) {
        let Some(c) = self.peers.clone() else {
            return;
        };
        let client = session.client_id.clone();
        session.kick(KickReason::Moved);
        let deadline = Instant::now() + Duration::from_secs(2);
        while session.is_online() && Instant::now() < deadline {
            ntex::time::sleep(Duration::from_millis(10)).await;
        }
        let snapshot = {
            let mut st = session.lock();
            if st.attached.is_some() || !st.persistent {
                None
            } else {
                // From here on, deliveries that still find this object
                // follow the session instead of landing in it.
                st.moved_to = Some(owner.clone());
                Some(st.take_handover(&client, Instant::now()))
            }
        };
        let subs: Vec<String> = match &snapshot {
            Some(h) => h.subscriptions.iter().map(|(f, _)| f.clone()).collect(),
            None => Vec::new(),
        };
        if let Some(h) = snapshot {
            self.sessions.remove(&client);
            self.metrics.sessions.set(gauge(self.sessions.len()));
            self.drained_some();
            // The store and the replicas keep the session until the owner
            // does: this node lost with the frame still on its way, the
            // session is served from them.
            let handed = self.hand_over(c.as_ref(), &owner, h.clone()).await;
            if handed == Handed::Kept {
                // Unless the client opened a session here meanwhile (the
                // ring moved back), which forgot it first (`attach`).
                self.sessions.forget_moved_unless_back(&client, &owner);
                self.metrics.sessions_moved.inc();
                tracing::debug!(client_id = %client, owner = %owner, "session moved");
            } else {
                // The owner is gone too: the session stays here, and the
                // next ring change moves it again.
                self.metrics.reject("session_move");
                tracing::warn!(client_id = %client, owner = %owner, ?handed, "session not moved: the owner is unreachable or lost before it kept the session; kept here");
                if let Ok(mut moved) = self.moved.lock() {
                    moved.remove(&client);
                }
                self.serve_again(h, handed);
                one_handed_over(c.as_ref(), left);
                return;
            }
        }
        one_handed_over(c.as_ref(), left);
        // Grace: long enough for the owner's routes to reach every node.
        ntex::time::sleep(4 * c.heartbeat()).await;
        if let Ok(mut moved) = self.moved.lock() {
            moved.remove(&client);
        }
        self.drained_some();
        // Unless the client came back here meanwhile (the ring moved back)
        // and holds these routes again.
        if self.sessions.get(&client).is_none() {
            self.drop_routes(&client, &subs);
        }
    }

    /// Sends a session to `owner` and waits until it keeps it (installed,
    /// and written to its store and its replicas); on a planned leave
    /// first without its messages, for the copy `owner` keeps.
    async fn hand_over(&self, c: &dyn Peers, owner: &str, h: Handover) -> Handed {
        let mut sent = false;
        if let Some(light) = self.without_messages(c, &h) {
            match self.send_session(c, owner, light).await {
                Handed::Kept => return Handed::Kept,
                Handed::Unconfirmed => sent = true,
                Handed::NotSent => {}
            }
        }
        match self.send_session(c, owner, h).await {
            Handed::NotSent if sent => Handed::Unconfirmed,
            handed => handed,
        }
    }

    /// A session whose hand-over did not end with its new owner keeping it
    /// is served here again. `Unconfirmed`: the owner may have served it
    /// before it was lost, and that newer state, if its replicas have it,
    /// must win over this one: the session comes back as a copy
    /// (`install_session` marks it not served since, as one read back
    /// after a restart), so the newer state replaces its messages, and it
    /// moves on as a copy, which gives way to a newer epoch.
    fn serve_again(self: &Arc<Self>, mut h: Handover, handed: Handed) {
        h.from_copy |= handed == Handed::Unconfirmed;
        // Numbered again as they are stored, after the session's last
        // number (as a hand-over from another node is).
        for d in h
            .resend
            .iter_mut()
            .chain(&mut h.offline)
            .chain(&mut h.since)
        {
            d.unnumber();
        }
        self.install_session(h, &mut Pending::detached());
    }

    /// On a planned leave the Client ID's new owner is the session's first
    /// replica, whose copy holds the stored messages already: the session
    /// goes without them, with their digest (`Handover::copy`). `None` when
    /// that does not hold: no replicas, not leaving, a message not stored
    /// (QoS 0), or a copy read back from the store (`since`).
    fn without_messages(&self, c: &dyn Peers, h: &Handover) -> Option<Handover> {
        let eligible = self.replication.is_some()
            && c.is_leaving()
            && !h.from_copy
            && h.since.is_empty()
            && !(h.resend.is_empty() && h.offline.is_empty())
            && h.resend.iter().chain(&h.offline).all(|d| d.seq != 0);
        eligible
            .then(|| h.without_messages(crate::replica::digest(h.resend.iter().chain(&h.offline))))
    }

    /// Sends one `Session` frame and waits for its acknowledgement.
    async fn send_session(&self, c: &dyn Peers, owner: &str, h: Handover) -> Handed {
        let mut kept = Pending::default();
        let wait = Duration::from_secs(5);
        if !c
            .send_acked(owner, PeerMsg::Session(h), &mut kept, wait)
            .await
        {
            return Handed::NotSent;
        }
        match kept.wait().await {
            Ok(()) => Handed::Kept,
            Err(_) => Handed::Unconfirmed,
        }
    }

    /// Sends a lost owner's copy to the Client ID's owner now
    /// (`orphaned_copies`); an owner that cannot be reached leaves it a
    /// session here, moved on by the next ring change.
    async fn send_copy(
        self: Arc<Self>,
        h: Handover,
        owner: Arc<str>,
        left: &std::sync::atomic::AtomicUsize,
    ) {
        let Some(c) = self.peers.clone() else {
            return;
        };
        let client = h.client_id.clone();
        let handed = self.hand_over(c.as_ref(), &owner, h.clone()).await;
        if handed == Handed::Kept {
            self.metrics.sessions_moved.inc();
            tracing::info!(client_id = %client, owner = %owner, "a lost owner's session sent from its replica to the owner now");
        } else {
            self.metrics.reject("session_move");
            tracing::warn!(client_id = %client, owner = %owner, ?handed, "a lost owner's session kept here: its owner now is unreachable or was lost before it kept the session");
            self.serve_again(h, handed);
        }
        one_handed_over(c.as_ref(), left);
    }

    /// Sends the tombstone of a Client ID another node owns now to it; kept
    /// here if that node cannot be reached (the next ring change tries again).
    async fn send_tombstone(
        self: Arc<Self>,
        client: ClientId,
        epoch: u64,
        ttl: Duration,
        left: &std::sync::atomic::AtomicUsize,
    ) {
        let Some(c) = self.peers.clone() else {
            return;
        };
        let owner = c.owner(&client);
        let gone = PeerMsg::SessionGone {
            client_id: client.to_string(),
            epoch,
            ttl,
        };
        if !c.send(&owner, gone, Duration::from_secs(5)).await {
            self.sessions.ended().record(&client, epoch, ttl);
        }
        one_handed_over(c.as_ref(), left);
    }

    /// A planned leave (SIGTERM, or the drain API): off the ring, and every
    /// session handed to its new owner.
    pub fn leave_cluster(self: &Arc<Self>) {
        if let Some(c) = &self.peers {
            c.leave();
            self.rebalance();
        }
    }

    /// A connection ended or a session left: wakes `wait_until`.
    pub fn drained_some(&self) {
        self.drained.notify_waiters();
    }

    /// Waits until `done` holds or `deadline` passes; `done` is checked
    /// whenever a connection ends or a session leaves (and once a second,
    /// for changes nothing signals).
    pub async fn wait_until(&self, deadline: Instant, done: impl Fn(&Self) -> bool) {
        loop {
            let woken = self.drained.notified();
            let mut woken = std::pin::pin!(woken);
            woken.as_mut().enable();
            let now = Instant::now();
            if done(self) || now >= deadline {
                return;
            }
            let nap = (deadline - now).min(Duration::from_secs(1));
            let _ = ntex::util::select(woken, ntex::time::sleep(nap)).await;
        }
    }

    /// Whether sessions are still on their way to other nodes.
    pub fn moving(&self) -> usize {
        self.moved.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// A session node `from` handed over (`Frame::Session`). While this
    /// node is moving the same Client ID's session on (`moved`) to
    /// another node, what arrives follows it: installed here, nothing
    /// would move it on (the ring change that moves sessions passed), and
    /// it would be served here beside the owner (the chaos test had such a
    /// session collect every message for seconds, then merge them back as
    /// new). `kept` then waits until the next node keeps it, or this node
    /// serves it again, for twice the failure timeout at most (hand-overs
    /// that wait on each other in a ring of moves end so).
    pub fn receive_session(self: &Arc<Self>, from: &str, h: Handover, kept: &mut Pending) {
        let Some(to) = self.moved_to(&h.client_id).filter(|to| **to != *from) else {
            self.install_session(h, kept);
            return;
        };
        let done = kept.join();
        let (passed, passing) = tokio::sync::oneshot::channel::<()>();
        let broker = self.clone();
        ntex::rt::spawn(async move {
            broker.pass_on(h, to).await;
            let _ = passed.send(());
        });
        let bound = self.settle_bound();
        ntex::rt::spawn(async move {
            let _ = ntex::util::select(passing, ntex::time::sleep(bound)).await;
            if let Some(m) = done.and_then(|c| c.written(true)) {
                m.ring();
            }
        });
    }

    /// Twice the failure timeout: how long the peers may take to hand over
    /// what they hold for a ring (zero outside a cluster).
    fn settle_bound(&self) -> Duration {
        Duration::from_millis(
            self.config
                .cluster
                .as_ref()
                .map_or(0, |c| c.failure_timeout_ms.saturating_mul(2)),
        )
    }

    /// Hands a session that arrived on to `to`, where its Client ID's
    /// session went; served here if `to` does not keep it.
    async fn pass_on(self: Arc<Self>, h: Handover, to: Arc<str>) {
        let handed = match self.peers.clone() {
            Some(c) => self.hand_over(c.as_ref(), &to, h.clone()).await,
            None => Handed::NotSent,
        };
        if handed == Handed::Kept {
            tracing::info!(client_id = %h.client_id, to = %to, "a session that arrived passed on to where its Client ID's session went");
        } else {
            self.serve_again(h, handed);
        }
    }

    /// A persistent session another node handed over: installed here, or
    /// merged into the session its client already opened here. `kept`
    /// waits for its writes (the store and its replicas here): the sender
    /// lets go of it once they are through.
    pub fn install_session(self: &Arc<Self>, h: Handover, kept: &mut Pending) {
        if h.from_copy
            && let Some(newer) = self.newer_copy_here(&h.client_id, h.epoch)
        {
            self.install_session(newer, &mut Pending::detached());
        }
        // The session itself is newer than any copy of it kept here.
        self.replicas.drop_copy(&h.client_id);
        if h.from_copy && self.sessions.ended().covers(&h.client_id, h.epoch) {
            // A copy of a session that ended here (or where this node has
            // its tombstone from): it would come back.
            tracing::info!(client_id = %h.client_id, epoch = h.epoch, "a copy of a session that ended dropped");
            self.metrics.session_copies_dropped.inc();
            return;
        }
        let existed = self.sessions.get(&h.client_id).is_some();
        let session = self.sessions.adopt(&h.client_id);
        let mut added = Vec::new();
        let mut dropped = Vec::new();
        let mut will_due = None;
        let wake = {
            let mut st = session.lock();
            if st.attached.is_some() && !st.persistent {
                // The client came back first with a clean start: the old
                // state is discarded, as it would be on one node.
                return;
            }
            // A copy older than the session here: its owner handed the
            // session on (here, or to the node this one has it from)
            // before the copy surfaced, so what it holds went on with the
            // session. Only what its node queued since its restart is new.
            let older = h.from_copy && st.persistent && h.epoch < st.epoch;
            // A copy taken in where no state was, or only one not served
            // since either, with no client here: still a state nobody
            // served since it was copied. Marked so (`stale_upto`), a newer
            // state that arrives later replaces its messages rather than
            // joining them, and a client that connects waits for the
            // peers' hand-overs first (`await_current`).
            let unserved = h.from_copy && !older && (!existed || st.stale_upto.is_some());
            let (mut resend, mut offline) = if older {
                tracing::info!(client_id = %session.client_id, epoch = h.epoch, here = st.epoch, kept = h.since.len(), "an older copy of a session dropped");
                self.metrics.session_copies_dropped.inc();
                (Vec::new(), h.since)
            } else {
                st.epoch = st.epoch.max(h.epoch).saturating_add(1);
                if let Some(upto) = st.stale_upto.take() {
                    // This node's copy from before its restart: the session
                    // was served elsewhere since, and what it held then is
                    // older than what arrives (messages delivered and
                    // acknowledged there would come again). What was queued
                    // here since the restart was acknowledged here, and stays.
                    dropped = st
                        .subscriptions
                        .keys()
                        .filter(|f| !h.subscriptions.iter().any(|(g, _)| g == *f))
                        .cloned()
                        .collect();
                    for f in &dropped {
                        st.subscriptions.remove(f);
                    }
                    st.forget_stored_upto(upto);
                }
                for (filter, opts) in h.subscriptions {
                    if !st.subscriptions.contains_key(&filter) {
                        st.subscriptions.insert(filter.clone(), opts);
                        added.push((filter, opts));
                    }
                }
                st.persistent = true;
                st.expiry = st.expiry.max(h.expiry);
                st.ordered |= h.ordered;
                for id in h.qos2_received {
                    if !st.qos2_received.contains(&id) {
                        st.qos2_received.push_back(id);
                    }
                }
                for id in h.released {
                    if !st.is_released(id) {
                        // Numbered by the node it came from: nothing here to drop.
                        st.released.push(Released { id, seq: 0 });
                    }
                }
                // A will due while the client is away; a client that is
                // back has cancelled it.
                if let Some((msg, due_ms)) = h.will
                    && st.attached.is_none()
                    && st.pending_will.is_none()
                {
                    st.pending_will = Some(crate::session::PendingWill {
                        generation: 0,
                        msg,
                        due_ms,
                    });
                    will_due = Some(due_ms);
                }
                let mut offline = h.offline;
                offline.extend(h.since);
                (h.resend, offline)
            };
            // Two states of one session can share messages (a copy and
            // the state served from it, both reaching this node): each
            // message is kept once, by its instance-wide id, or a QoS 2
            // message would go to the client twice.
            let mut have = st.message_ids();
            let before = resend.len() + offline.len();
            resend.retain(|d| have.insert(d.msg.id));
            offline.retain(|d| have.insert(d.msg.id));
            let shared = before - resend.len() - offline.len();
            if shared > 0 {
                tracing::info!(client_id = %session.client_id, shared, "messages the session here holds already left out of the state merged in");
            }
            let wake = match &st.attached {
                // The client came back first: the messages join its live queue.
                Some(conn) => {
                    let wake = conn.wake.clone();
                    st.queue.extend(resend.into_iter().chain(offline));
                    Some(wake)
                }
                None => {
                    st.resend.extend(resend);
                    st.offline.extend(offline);
                    None
                }
            };
            // This node keeps it now.
            session.save_all(&mut st, Some(kept));
            if unserved && st.attached.is_none() {
                st.stale_upto = Some(st.last_seq);
            }
            wake
        };
        if let Some(w) = wake {
            w.notify_one();
        }
        if let Some(due_ms) = will_due {
            let delay = Duration::from_millis(due_ms.saturating_sub(crate::message::now_ms()));
            self.schedule_will(session.clone(), 0, delay);
        }
        self.drop_routes(&session.client_id, &dropped);
        self.add_routes(&session.client_id, added);
        self.metrics.sessions.set(gauge(self.sessions.len()));
        tracing::debug!(client_id = %session.client_id, "session moved in");
        // The ring changed again while the session travelled (or this node
        // is leaving): it goes on to its owner.
        if self
            .peers
            .as_ref()
            .is_some_and(|c| !c.is_local(&c.owner(&session.client_id)))
        {
            self.rebalance();
        }
    }

    /// A node that no longer owns `client` says its persistent session of
    /// `epoch` ended there: a copy read back here from the store and not
    /// served since ends too, and the tombstone stays here (the Client ID's
    /// owner) for copies that arrive later.
    pub fn session_gone(&self, client: &str, epoch: u64, ttl: Duration) {
        let id: ClientId = Arc::from(client);
        self.sessions.ended().record(&id, epoch, ttl);
        if let Some(subs) = self.sessions.end_stale(client, epoch) {
            tracing::info!(
                client_id = client,
                epoch,
                "a session read back from the store ended: it ended on the node that served it meanwhile"
            );
            self.metrics.session_copies_dropped.inc();
            self.drop_routes(&id, &subs);
            self.metrics.sessions.set(gauge(self.sessions.len()));
        }
    }

    /// Routes the subscriptions a session brought (from another node or
    /// the store): filters that were valid when they were added.
    fn add_routes(&self, client: &ClientId, filters: Vec<(String, SubOptions)>) {
        for (raw, opts) in filters {
            if let Ok(f) = topic::parse_filter(&raw, usize::MAX, false)
                && self.router.subscribe(client, &f, opts)
            {
                self.metrics.subscriptions.inc();
            }
            if let Some(c) = &self.peers {
                c.filter_added(&raw);
            }
        }
    }

    /// Installs what the store read back at start-up: persistent sessions
    /// (offline, with their queued messages and routes) and retained
    /// messages.
    pub fn restore(self: &Arc<Self>, recovered: Recovered) {
        let mut n = 0;
        for m in recovered.retained {
            n = self.retained.restore(&Arc::new(m));
        }
        for session in self.restore_sessions(recovered.sessions, false) {
            let mut st = session.lock();
            st.stale_upto = Some(st.last_seq);
        }
        self.metrics.retained.set(gauge(n));
        self.metrics.sessions.set(gauge(self.sessions.len()));
        for (msg, ordered) in recovered.wills {
            self.publish_will(&msg, ordered, true);
        }
        self.restored.store(true, Ordering::Release);
    }

    /// Serves sessions read back from a store (or, `from_replica`, a lost
    /// node's replica): offline, their routes added, their delayed wills
    /// scheduled, their retained replays resumed. Returns them.
    fn restore_sessions(
        self: &Arc<Self>,
        stored: Vec<RecoveredSession>,
        from_replica: bool,
    ) -> Vec<Arc<Session>> {
        // The will of a connection that ended with its node is published
        // as for any abnormal end, after its delay. A node restarting in a
        // cluster waits a while longer: if another node served the session
        // meanwhile (and published the will), the session it hands back
        // replaces this copy and cancels it.
        let grace = match &self.peers {
            Some(_) if !from_replica => self.settle_bound(),
            _ => Duration::ZERO,
        };
        let (now, now_ms) = (Instant::now(), crate::message::now_ms());
        let mut replays = Vec::new();
        let mut restored = Vec::with_capacity(stored.len());
        for mut rs in stored {
            // Handed over by a peer while a late store was being opened:
            // that copy is the newer one.
            if self.sessions.get(&rs.client).is_some() {
                tracing::info!(client_id = %rs.client, "stored session not restored: a newer one arrived meanwhile");
                continue;
            }
            // Connected at the crash: its oldest messages may have been in
            // flight, and MQTT's DUP means "may have been sent before".
            let crashed = rs.record.disconnected_ms == 0;
            let owed = std::mem::take(&mut rs.record.replays);
            let armed = rs.record.armed_will.take();
            let session = self.sessions.restore(rs, now, now_ms);
            if !owed.is_empty() {
                replays.push((session.clone(), owed));
            }
            if crashed {
                let window = self.config.limits.max_inflight;
                let mut st = session.lock();
                for d in st.offline.iter_mut().take(window.into()) {
                    d.dup = true;
                }
                if let Some(w) = armed {
                    let delay = Duration::from_millis(w.delay_ms).min(st.expiry) + grace;
                    st.pending_will = Some(crate::session::PendingWill {
                        generation: 0,
                        msg: w.msg,
                        due_ms: now_ms
                            .saturating_add(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX)),
                    });
                    session.save(&st, None);
                }
            }
            let will_in = session
                .lock()
                .pending_will
                .as_ref()
                .map(|w| Duration::from_millis(w.due_ms.saturating_sub(now_ms)));
            if let Some(delay) = will_in {
                self.schedule_will(session.clone(), 0, delay);
            }
            let filters: Vec<(String, SubOptions)> = session
                .lock()
                .subscriptions
                .iter()
                .map(|(f, o)| (f.clone(), *o))
                .collect();
            self.add_routes(&session.client_id, filters);
            restored.push(session);
        }
        // Replays under way go on where they were, through what is retained now.
        for (session, owed) in replays {
            let mut st = session.lock();
            for (filter, after) in owed {
                if let Some(&opts) = st.subscriptions.get(&filter) {
                    let cursor = self.retained.resume(&filter, after);
                    st.replays.push_back(RetainedReplay { cursor, opts });
                }
            }
        }
        restored
    }

    /// Whether the session of `client_id` has QoS 2 messages whose PUBREL
    /// its next connection sends again (`pubrel`).
    pub fn owes_pubrel(&self, client_id: &str) -> bool {
        self.sessions
            .get(client_id)
            .is_some_and(|s| !s.lock().released.is_empty())
    }

    /// False while the node's store cannot write.
    pub fn store_writes(&self) -> bool {
        self.persist.is_healthy()
    }

    /// Updates the store's size metric.
    pub fn measure_store(&self) {
        self.persist.measure();
    }

    /// A peer that left is done with: the filters it announced go (its
    /// sessions' new owners announced theirs).
    pub fn peer_gone(&self, node: &str) {
        if let Some(c) = &self.peers {
            let filters = c.forget(node);
            self.remote_routes(node, &[], &filters);
        }
    }

    /// Whether a session's live queue is within its limit (or nobody reads it).
    pub fn has_room(&self, session: &Session) -> bool {
        let st = session.lock();
        st.attached.is_none() || st.queue.len() <= self.config.limits.max_queued_messages
    }

    /// A new channel ID, unique per TCP connection of this node.
    pub fn next_channel_id(&self) -> Arc<str> {
        let n = self.channels.fetch_add(1, Ordering::Relaxed) + 1;
        Arc::from(format!("{}-{n}", self.node))
    }

    /// The next device event index: microseconds since the Unix epoch, or
    /// one more than the last index if the clock has not moved past it. It
    /// increases with every event of this node; across nodes it increases as
    /// long as their clocks differ by less than the time a client takes to
    /// reconnect.
    fn next_event_index(&self) -> u64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        let mut last = self.event_clock.load(Ordering::Relaxed);
        loop {
            let next = now.max(last.saturating_add(1));
            match self.event_clock.compare_exchange_weak(
                last,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return next,
                Err(seen) => last = seen,
            }
        }
    }

    /// Records a device connect or disconnect (K5).
    pub fn device_event(
        &self,
        client_id: &ClientId,
        kind: EventKind,
        channel_id: &Arc<str>,
        client_ip: Option<IpAddr>,
    ) {
        self.storage.device_event(DeviceEvent {
            client_id: client_id.clone(),
            kind,
            channel_id: channel_id.clone(),
            client_ip,
            ts_ms: crate::message::now_ms(),
            index: self.next_event_index(),
        });
    }

    /// Backpressure: holds the publisher's acknowledgement until the session's
    /// live queue is back within its limit, or `queue_full_wait_ms` passed.
    pub async fn wait_for_room(&self, session: &Session) {
        let deadline =
            Instant::now() + Duration::from_millis(self.config.limits.queue_full_wait_ms);
        loop {
            let notified = session.space.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            let room = self.has_room(session);
            let left = deadline.saturating_duration_since(Instant::now());
            if room || left.is_zero() {
                return;
            }
            let _ = ntex::util::select(notified, ntex::time::sleep(left)).await;
        }
    }

    /// Routes a message to every matching session (or the P2P target) and
    /// keeps it if it is retained; nothing waits for full queues here (wills,
    /// broker notices). Returns the number of sessions it reached.
    pub fn publish(&self, msg: &Arc<Message>, publisher_persistent: bool) -> usize {
        let keep = KeepOffline::Publisher {
            persistent: publisher_persistent,
        };
        let mut forwards = Vec::new();
        // Nothing waits for these: the store writes them in order with the rest.
        let mut pending = Pending::detached();
        let reached = self.route(
            msg,
            keep,
            Scope::All,
            &mut Vec::new(),
            &mut forwards,
            &mut pending,
        );
        self.forward_now(forwards);
        reached
    }

    /// Offers a message to every target; sessions whose queue went over its
    /// limit are added to `over`.
    fn route(
        &self,
        msg: &Arc<Message>,
        keep: KeepOffline,
        scope: Scope<'_>,
        over: &mut Vec<Arc<Session>>,
        forwards: &mut Forwards,
        pending: &mut Pending,
    ) -> usize {
        let origin = matches!(scope, Scope::All);
        if msg.retain && origin {
            let n = self.retained.set(msg, Some(&mut *pending));
            self.metrics.retained.set(gauge(n));
            if let Some(c) = &self.peers {
                c.broadcast(PeerMsg::Retain { msg: msg.clone() });
            }
        }
        if let Some(target) = topic::p2p_target(&msg.topic) {
            let persistent = match keep {
                KeepOffline::Publisher { persistent } | KeepOffline::Record { persistent } => {
                    persistent
                }
            };
            // The target's session lives on its ring owner. A downlink record
            // is read by every node: the owner's delivers it.
            if let Some(c) = &self.peers
                && matches!(scope, Scope::Designated { .. })
                && !c.is_local(&c.owner(target))
            {
                return 0;
            }
            if let Some(c) = &self.peers
                && origin
            {
                let owner = c.owner(target);
                if !c.is_local(&owner) {
                    let forward = PeerMsg::Direct {
                        client_id: target.to_owned(),
                        persistent,
                        msg: msg.clone(),
                        qos: msg.qos,
                    };
                    forwards.push((owner, forward));
                    return 0;
                }
            }
            return self.publish_p2p(msg, target, persistent, over, pending);
        }
        let mut routes: Vec<Route> = Vec::new();
        let is_online = |c: &ClientId| {
            route_node(c).is_some() || self.sessions.get(c).is_some_and(|s| s.is_online())
        };
        self.router
            .route(&msg.topic, &is_online, scope, &mut routes);
        if routes.is_empty() {
            return 0;
        }
        // Overlapping subscriptions of one client get one copy, at the highest
        // QoS, carrying every subscription identifier (MQTT 5 3.3.4).
        routes.sort_unstable_by(|a, b| {
            a.client
                .cmp(&b.client)
                .then(a.group.is_some().cmp(&b.group.is_some()))
        });
        let mut reached = 0;
        let mut i = 0;
        while i < routes.len() {
            let client = routes[i].client.clone();
            if let Some(node) = route_node(&client) {
                // Another node's subscriptions: one frame per node, naming
                // the shared groups chosen for it.
                let mut groups = Vec::new();
                while i < routes.len() && routes[i].client == client {
                    groups.extend(routes[i].group.as_deref().map(str::to_owned));
                    i += 1;
                }
                let forward = PeerMsg::Publish {
                    msg: msg.clone(),
                    groups,
                };
                forwards.push((Arc::from(node), forward));
                continue;
            }
            let mut j = i;
            let mut qos = QoS::AtMostOnce;
            let mut rap = false;
            let mut sub_ids = Vec::new();
            let mut wanted = false;
            while j < routes.len() && routes[j].client == client {
                let r = &routes[j];
                j += 1;
                if r.opts.no_local && r.group.is_none() && *r.client == *msg.publisher {
                    continue;
                }
                wanted = true;
                qos = qos.max(r.opts.qos);
                rap |= r.opts.retain_as_published;
                sub_ids.extend(r.opts.id);
            }
            i = j;
            if !wanted {
                continue;
            }
            let Some(session) = self.sessions.get(&client) else {
                // A session that just moved: the message follows it.
                if let Some(owner) = self.moved_to(&client) {
                    let forward = PeerMsg::Direct {
                        client_id: client.to_string(),
                        persistent: true,
                        msg: msg.clone(),
                        qos: qos.min(msg.qos),
                    };
                    forwards.push((owner, forward));
                    reached += 1;
                }
                continue;
            };
            if keep == (KeepOffline::Record { persistent: false }) && !session.is_online() {
                // cleanSession=true records are for online clients only.
                self.metrics.drop_message("offline");
                continue;
            }
            let d = Delivery {
                msg: msg.clone(),
                qos: qos.min(msg.qos),
                retain: rap && msg.retain,
                dup: false,
                sub_ids,
                seq: 0,
                sent_as: None,
                stored: None,
            };
            if self.deliver(session, d, over, pending) {
                reached += 1;
            }
        }
        reached
    }

    fn publish_p2p(
        &self,
        msg: &Arc<Message>,
        target: &str,
        publisher_persistent: bool,
        over: &mut Vec<Arc<Session>>,
        pending: &mut Pending,
    ) -> usize {
        let Some(session) = self.sessions.get(target) else {
            self.metrics.drop_message("p2p_no_session");
            return 0;
        };
        // The sender's session flags decide persistence (B10).
        let qos = if !publisher_persistent && !session.is_online() {
            QoS::AtMostOnce
        } else {
            msg.qos
        };
        usize::from(self.deliver(session, Delivery::new(msg.clone(), qos), over, pending))
    }

    /// Queues one delivery and counts it; a session that went over its queue
    /// limit joins `over`, for the publisher to wait on. True if kept.
    fn deliver(
        &self,
        session: Arc<Session>,
        d: Delivery,
        over: &mut Vec<Arc<Session>>,
        pending: &mut Pending,
    ) -> bool {
        let outcome = session.enqueue(d, self.queue_limits(), Some(pending));
        let outcome = self.follow_move(&session, outcome);
        let is_over = matches!(outcome, Enqueued::OverLimit);
        let kept = self.count(&session, outcome);
        if is_over {
            over.push(session);
        }
        kept
    }

    /// Offers one delivery to a session without waiting for room (retained
    /// replay, broker notices) and counts the outcome.
    pub fn offer(&self, session: &Session, d: Delivery) -> bool {
        let outcome = session.enqueue(d, self.queue_limits(), None);
        let outcome = self.follow_move(session, outcome);
        self.count(session, outcome)
    }

    /// A delivery to a session that left for another node goes after it.
    fn follow_move(&self, session: &Session, outcome: Enqueued) -> Enqueued {
        let Enqueued::Moved(owner, d) = outcome else {
            return outcome;
        };
        let forward = PeerMsg::Direct {
            client_id: session.client_id.to_string(),
            persistent: true,
            msg: d.msg,
            qos: d.qos,
        };
        match &self.peers {
            Some(c) if c.try_send(&owner, forward) => Enqueued::Online,
            _ => Enqueued::Dropped,
        }
    }

    /// Counts what happened to a delivery; true if it was kept.
    fn count(&self, session: &Session, outcome: Enqueued) -> bool {
        match outcome {
            Enqueued::Online | Enqueued::OverLimit => true,
            // `follow_move` resolved it already.
            Enqueued::Moved(..) => false,
            Enqueued::Offline => {
                self.metrics.offline_queued.inc();
                true
            }
            Enqueued::OfflineDroppedOldest => {
                self.metrics.offline_queued.inc();
                self.metrics.offline_dropped.inc();
                true
            }
            Enqueued::Dropped => {
                self.metrics.drop_message(if session.is_online() {
                    "queue_full"
                } else {
                    "offline"
                });
                false
            }
        }
    }

    /// Adds one subscription of a session; for a persistent session it
    /// resolves once the subscription is in the store (refused, and undone,
    /// when the store cannot write).
    pub async fn subscribe(
        &self,
        session: &Session,
        raw: &str,
        opts: SubOptions,
        retained: SendRetained,
    ) -> Result<Subscribed, SubscribeError> {
        let mut pending = Pending::default();
        let sub = self.subscribe_now(session, raw, opts, retained, &mut pending)?;
        if let Err(e) = pending.wait().await {
            tracing::warn!(client_id = %session.client_id, filter = raw, error = %e, "subscription not stored; refused");
            if !sub.existed {
                self.unsubscribe(session, raw);
            }
            return Err(SubscribeError::Store);
        }
        Ok(sub)
    }

    /// Adds one subscription of a session, with the replay of its retained
    /// messages (`retained`) in the same record, which joins `pending`: a
    /// crash after the SUBACK resumes the replay, never forgets it.
    pub fn subscribe_now(
        &self,
        session: &Session,
        raw: &str,
        opts: SubOptions,
        retained: SendRetained,
        pending: &mut Pending,
    ) -> Result<Subscribed, SubscribeError> {
        let limits = &self.config.limits;
        let filter = topic::parse_filter(
            raw,
            limits.max_topic_length,
            self.config.client_id.strict_names,
        )?;
        let mut st = session.lock();
        let existed = st.subscriptions.contains_key(raw);
        let max = limits.max_subscriptions_per_client;
        if !existed && max > 0 && st.subscriptions.len() >= max {
            return Err(SubscribeError::Quota(max));
        }
        let local = u64::try_from(self.metrics.subscriptions.get()).unwrap_or(0);
        if !existed && !self.usage.capacity.admit_subscription(local) {
            return Err(SubscribeError::Capacity);
        }
        st.subscriptions.insert(raw.to_owned(), opts);
        // Retained messages are not sent for shared subscriptions (MQTT 5 4.8.2).
        let replaying = filter.share_group.is_none()
            && match retained {
                SendRetained::Always => true,
                SendRetained::IfNew => !existed,
                SendRetained::Never => false,
            };
        if replaying {
            // One of the same filter still going starts over.
            st.replays.retain(|r| r.cursor.filter() != raw);
            st.replays.push_back(RetainedReplay {
                cursor: self.retained.replay(filter.filter),
                opts,
            });
        }
        session.save(&st, Some(pending));
        drop(st);
        if replaying {
            session.wake();
        }
        if self.router.subscribe(&session.client_id, &filter, opts) {
            self.metrics.subscriptions.inc();
        }
        if let Some(c) = &self.peers
            && !existed
        {
            c.filter_added(raw);
        }
        Ok(Subscribed { existed, replaying })
    }

    /// Removes one subscription of a session; returns whether it existed.
    pub fn unsubscribe(&self, session: &Session, raw: &str) -> bool {
        let existed = {
            let mut st = session.lock();
            st.replays.retain(|r| r.cursor.filter() != raw);
            let existed = st.subscriptions.remove(raw).is_some();
            if existed {
                session.save(&st, None);
            }
            existed
        };
        if let Some(c) = &self.peers
            && existed
        {
            c.filter_removed(raw);
        }
        if let Ok(filter) = topic::parse_filter(raw, usize::MAX, false)
            && self.router.unsubscribe(&session.client_id, &filter)
        {
            self.metrics.subscriptions.dec();
        }
        existed
    }

    /// Builds a message received from a client or made by the broker.
    pub fn message(
        &self,
        topic: ntex::util::ByteString,
        payload: ntex::util::Bytes,
        qos: QoS,
        retain: bool,
        publisher: ClientId,
    ) -> Message {
        Message::new(self.ids.next(), topic, payload, qos, retain, publisher)
    }
}

fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
