//! ntex-mqtt glue: translates v3.1.1 and v5 packets into broker calls.
//!
//! `v3` and `v5` hold the handlers of each version; the inbound publish path
//! and the error type they share live here.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use ntex_mqtt::Reason;

use crate::auth::{Identity, Refusal};
use crate::broker::{Broker, PublishError, Publisher};
use crate::connection::Connection;
use crate::durable::Pending;
use crate::message::Message;
use crate::order;
use crate::session::Session;
use crate::storage::{OnFull, StorageError};
use crate::sys::{self, SysError};
use crate::token::{Claims, TokenError, TokenType};
use crate::topic::TopicError;
use crate::trace::{DeviceAction, DeviceReason};

pub mod v3;
pub mod v5;

/// Errors that end a connection.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("publish refused: {0}")]
    Publish(#[from] PublishError),
    #[error("system topic request refused: {0}")]
    Sys(#[from] SysError),
    #[error("payload could not be read: {0}")]
    Payload(String),
    #[error("transport: {0}")]
    Transport(String),
    #[error("protocol handler failed")]
    Handler,
    #[error("topic auth failed")]
    NotAuthorized,
    #[error("token refused: {0}")]
    Token(TokenError, TokenType),
}

pub type Result<T> = std::result::Result<T, Error>;

impl From<()> for Error {
    fn from((): ()) -> Self {
        Error::Handler
    }
}

impl From<TopicError> for Error {
    fn from(e: TopicError) -> Self {
        Error::Publish(PublishError::Topic(e))
    }
}

impl Error {
    /// The device trace's reason for a refusal (A4).
    pub fn device_reason(&self) -> DeviceReason {
        match self {
            Error::NotAuthorized => DeviceReason::TopicAuthFailed,
            Error::Token(..) | Error::Sys(SysError::Token(..)) => DeviceReason::NotAuthorized,
            Error::Publish(
                PublishError::Storage(StorageError::BufferFull) | PublishError::Persist(_),
            ) => DeviceReason::QuotaExceeded,
            Error::Transport(_) => DeviceReason::ClosedByClient,
            _ => DeviceReason::Invalid,
        }
    }

    /// Label of the `packets_rejected_total` metric.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Publish(PublishError::Topic(_)) => "topic_invalid",
            Error::Publish(PublishError::Storage(StorageError::BufferFull)) => {
                "storage_buffer_full"
            }
            Error::Publish(PublishError::Storage(_)) => "storage_unavailable",
            Error::Publish(PublishError::Cluster) => "cluster_unavailable",
            Error::Publish(PublishError::Persist(_)) => "store_unavailable",
            Error::Sys(SysError::RateLimited(_)) => "offline_pull_rate",
            Error::Sys(SysError::Malformed(_)) => "sys_request_malformed",
            Error::Payload(_) => "payload",
            Error::Transport(_) => "transport",
            Error::Handler => "handler",
            Error::NotAuthorized => "topic_auth_failed",
            Error::Token(..) | Error::Sys(SysError::Token(..)) => "token_invalid",
        }
    }
}

/// The keep-alive granted to a client that asked for `requested` seconds:
/// the operator's default for clients that ask for none, capped by the
/// maximum; 0 means none.
pub fn granted_keep_alive(limits: &crate::config::LimitsConfig, requested: u16) -> u16 {
    let granted = if requested == 0 {
        limits.default_keep_alive_secs
    } else {
        requested
    };
    match limits.max_keep_alive_secs {
        0 => granted,
        max if granted == 0 || granted > max => max,
        _ => granted,
    }
}

/// Authenticates a CONNECT from `ip`, with the tokens a token-mode password
/// carries; a refusal is counted, traced and logged ("not authorized"; the
/// log cut short and rate-limited, see `login`).
pub async fn authenticate(
    broker: &Broker,
    client_id: &str,
    username: Option<&str>,
    password: Option<&[u8]>,
    ip: Option<std::net::IpAddr>,
) -> std::result::Result<(Identity, Vec<(TokenType, Claims)>), Refusal> {
    let verdict = broker
        .auth()
        .authenticate(client_id, username, password, ip)
        .await
        .and_then(|identity| {
            let tokens = match &identity {
                Identity::Token(ak) => connect_tokens(broker, ak, password)?,
                _ => Vec::new(),
            };
            Ok((identity, tokens))
        });
    if let Err(r) = &verdict {
        if *r == Refusal::TooManyFailures {
            // Held, not answered at once: see `LoginConfig::limited_delay_ms`.
            let delay = broker.config().auth.login.limited_delay_ms;
            ntex::time::sleep(std::time::Duration::from_millis(delay)).await;
        }
        broker.metrics().reject(r.reason());
        let why = match r {
            Refusal::Busy => DeviceReason::QuotaExceeded,
            _ => DeviceReason::NotAuthorized,
        };
        refused(broker, client_id, why);
        if broker.auth().login().may_log() {
            let user = crate::login::shown_user(username.unwrap_or(""));
            tracing::info!(client_id, user, ip = ?ip, reason = %r, "CONNECT refused");
        }
    }
    verdict
}

/// Records a refused CONNECT in the device trace.
pub fn refused(broker: &Broker, client_id: &str, reason: DeviceReason) {
    let channel = broker.next_channel_id();
    broker.usage().traces().device(
        &Arc::from(client_id),
        &channel,
        DeviceAction::Connect,
        reason,
        None,
    );
}

/// Arms the connection's `pubrel` layer with the PUBRELs its session owes
/// the client from an earlier connection (sent after the CONNACK); with
/// none, the layer stops looking at the stream.
pub fn resend_releases(io: &ntex::io::IoBoxed, session: &Arc<Session>) {
    let Some(releases) = io.query::<crate::pubrel::Releases>().into_inner() else {
        return;
    };
    let ids = session.lock().released_ids();
    if !ids.is_empty() {
        tracing::debug!(client_id = %session.client_id, ids = ?ids, "PUBREL sent again for QoS 2 messages of an earlier connection");
    }
    let session = session.clone();
    releases.resend(ids, move |id| session.completed(id));
}

/// Whether the node has restored what its store holds: until then (a
/// store that could not be opened at start-up) every CONNECT is refused
/// with "server unavailable", since a stored session would look absent.
pub fn store_open(broker: &Broker) -> bool {
    if broker.is_restored() {
        return true;
    }
    broker.metrics().reject("store_not_open");
    false
}

/// Whether the instance's connection capacity admits this client (L3); a
/// client that takes over its own live connection adds none. A refusal is
/// counted, logged and traced.
pub fn admit(broker: &Broker, client_id: &str) -> bool {
    if broker
        .sessions()
        .get(client_id)
        .is_some_and(|s| s.is_online())
    {
        return true;
    }
    let local = u64::try_from(broker.metrics().connections.get()).unwrap_or(0);
    if broker.usage().capacity().admit_connection(local) {
        return true;
    }
    broker.metrics().reject("capacity_connections");
    refused(broker, client_id, DeviceReason::QuotaExceeded);
    tracing::info!(
        client_id,
        "CONNECT refused: the instance's connection capacity is used up"
    );
    false
}

/// Whether the client may subscribe to `filter`; a refusal is counted and
/// logged ("topic auth failed").
pub fn may_subscribe(conn: &Connection, filter: &str) -> Result<()> {
    let verdict = if let Identity::Token(_) = conn.identity {
        conn.token_check(false, filter)
            .map_err(|(e, ty)| Error::Token(e, ty))
    } else if conn.grants().may_subscribe(&conn.identity, filter) {
        Ok(())
    } else {
        Err(Error::NotAuthorized)
    };
    if let Err(e) = &verdict {
        conn.broker.metrics().reject(e.reason());
        conn.trace(DeviceAction::Subscribed, e.device_reason(), Some(filter));
        tracing::info!(client_id = %conn.client_id, filter, error = %e, "SUBSCRIBE refused: topic auth failed");
    }
    verdict
}

/// The `$SYS/tokenInvalidNotice` payload for a token refusal, if it is one.
pub fn token_notice(e: &Error) -> Option<String> {
    match e {
        Error::Token(err, ty) | Error::Sys(SysError::Token(err, ty)) => {
            Some(crate::token::invalid_notice(*err, *ty))
        }
        _ => None,
    }
}

/// Token mode: installs the tokens of the CONNECT; without any, offline
/// messages wait for the first `$SYS/uploadToken`.
pub fn install_tokens(conn: &Connection, tokens: Vec<(TokenType, Claims)>) {
    if !matches!(conn.identity, Identity::Token(_)) {
        return;
    }
    if tokens.is_empty() {
        conn.session.lock().offline_hold = true;
    }
    for (ty, claims) in tokens {
        sys::install_token(conn, ty, claims);
    }
}

/// Token mode: the tokens a CONNECT carries in its password
/// (`R|token|W|token`, any order, one per type).
fn connect_tokens(
    broker: &Broker,
    ak: &str,
    password: Option<&[u8]>,
) -> std::result::Result<Vec<(TokenType, Claims)>, Refusal> {
    let Some(password) = password.filter(|p| !p.is_empty()) else {
        return Ok(Vec::new());
    };
    let service = broker.tokens().ok_or(Refusal::NotAuthorized)?;
    let text = std::str::from_utf8(password).map_err(|_| Refusal::BadCredentials)?;
    let parts: Vec<&str> = text.split('|').collect();
    if !parts.len().is_multiple_of(2) || parts.len() > 6 {
        return Err(Refusal::BadCredentials);
    }
    let mut tokens = Vec::new();
    for pair in parts.chunks(2) {
        let ty = TokenType::parse(pair[0]).ok_or(Refusal::BadCredentials)?;
        let claims = service
            .verify(pair[1])
            .map_err(|_| Refusal::BadCredentials)?;
        if claims.ak != ak || !claims.act.iter().any(|a| *a == ty || *a == TokenType::RW) {
            return Err(Refusal::BadCredentials);
        }
        tokens.push((ty, claims));
    }
    Ok(tokens)
}

/// The inbound publish path shared by both versions: validate, answer system
/// topics, store and route. Resolves when the PUBLISH may be acknowledged.
pub async fn publish(
    conn: &Connection,
    msg: Arc<Message>,
    on_full: OnFull,
    ticket: &order::Ticket<'_>,
    packet_id: Option<std::num::NonZeroU16>,
) -> Result<()> {
    let broker = &conn.broker;
    // In arrival order from here: the throttle below may hold a message.
    ticket.wait(order::Gate::Store).await;
    // Over the node's TPS share (L3): the next message waits. The waiting
    // is boxed, like every rare wait on this path: the handler's future is
    // allocated per message at its full size, which rare waits would
    // multiply (see `v3::publish`).
    if broker.usage().capacity().over_share() {
        tracing::debug!(client_id = %conn.client_id, "publisher throttled: TPS capacity");
        Box::pin(broker.usage().capacity().throttle()).await;
    }
    let result: Result<()> = async {
        broker.check_topic(&msg.topic)?;
        if sys::is_sys_request(&msg.topic) {
            broker.metrics().received(msg.qos, msg.payload.len());
            sys::handle(conn, &msg.topic, &msg.payload)?;
            return Ok(());
        }
        if let Identity::Token(_) = conn.identity {
            conn.token_check(true, &msg.topic)
                .map_err(|(e, ty)| Error::Token(e, ty))?;
        } else if !conn.grants().may_publish(&conn.identity, &msg.topic) {
            return Err(Error::NotAuthorized);
        }
        let publisher = Publisher {
            session: &conn.session,
            persistent: conn.persistent,
            on_full,
            ticket: Some(ticket),
            qos2_id: packet_id
                .filter(|_| msg.qos == crate::message::QoS::ExactlyOnce)
                .map(|id| id.get()),
        };
        broker.accept(msg.clone(), publisher).await?;
        Ok(())
    }
    .await;
    if let Err(e) = &result {
        broker.metrics().reject(e.reason());
        conn.trace(DeviceAction::Publish, e.device_reason(), Some(&msg.topic));
        tracing::info!(client_id = %conn.client_id, error = %e, "publish refused");
    }
    result
}

thread_local! {
    /// Client IP addresses of the connections another node forwarded to
    /// this worker thread, by stream (an ntex stream id is unique on its
    /// thread, and a connection never leaves its worker).
    static FORWARDED: RefCell<HashMap<ntex::io::Id, IpAddr>> = RefCell::new(HashMap::new());
}

/// While it lives, device events of a forwarded stream name the client
/// behind the node that forwarded it (the socket's peer is that node).
#[derive(Debug)]
pub struct ForwardedFrom(ntex::io::Id);

impl ForwardedFrom {
    pub fn new(io: &ntex::io::IoBoxed, ip: IpAddr) -> Self {
        FORWARDED.with(|m| m.borrow_mut().insert(io.id(), ip));
        Self(io.id())
    }
}

impl Drop for ForwardedFrom {
    fn drop(&mut self) {
        FORWARDED.with(|m| m.borrow_mut().remove(&self.0));
    }
}

/// The client's IP address, as device events report it: the socket's peer,
/// or for a connection another node forwarded, the client behind it.
fn peer_ip(io: &ntex::io::IoBoxed) -> Option<IpAddr> {
    FORWARDED
        .with(|m| m.borrow().get(&io.id()).copied())
        .or_else(|| socket_ip(io))
}

/// The peer address of the socket itself.
pub(crate) fn socket_ip(io: &ntex::io::IoBoxed) -> Option<std::net::IpAddr> {
    io.query::<ntex::io::types::PeerAddr>()
        .get()
        .map(|a| a.0.ip().to_canonical())
}

/// Records why a connection of either version stopped ("no heart", protocol
/// error, peer gone).
pub fn trace_stop(conn: &Connection, reason: &Reason<Error>) {
    let client_id = &*conn.client_id;
    match reason {
        Reason::PeerGone(_) => tracing::debug!(client_id, "peer gone"),
        Reason::Protocol(p) => {
            let (label, why) = match p.get_ref() {
                ntex_mqtt::MqttProtocolError::KeepAliveTimeout => {
                    ("no_heart", DeviceReason::NoHeart)
                }
                ntex_mqtt::MqttProtocolError::Decode(_) => {
                    ("malformed_packet", DeviceReason::ProtocolError)
                }
                _ => ("protocol_error", DeviceReason::ProtocolError),
            };
            conn.broker.metrics().reject(label);
            conn.closing(why);
            tracing::info!(client_id, reason = label, error = %p.get_ref(), "connection closed");
        }
        Reason::Error(e) => {
            conn.closing(e.get_ref().device_reason());
            tracing::info!(client_id, error = %e.get_ref(), "connection closed by the broker");
        }
    }
}

// The core's QoS and ntex-mqtt's, converted here at the transport so that
// the core names no MQTT library.
impl From<ntex_mqtt::QoS> for crate::message::QoS {
    fn from(q: ntex_mqtt::QoS) -> Self {
        match q {
            ntex_mqtt::QoS::AtMostOnce => crate::message::QoS::AtMostOnce,
            ntex_mqtt::QoS::AtLeastOnce => crate::message::QoS::AtLeastOnce,
            ntex_mqtt::QoS::ExactlyOnce => crate::message::QoS::ExactlyOnce,
        }
    }
}

impl From<crate::message::QoS> for ntex_mqtt::QoS {
    fn from(q: crate::message::QoS) -> Self {
        match q {
            crate::message::QoS::AtMostOnce => ntex_mqtt::QoS::AtMostOnce,
            crate::message::QoS::AtLeastOnce => ntex_mqtt::QoS::AtLeastOnce,
            crate::message::QoS::ExactlyOnce => ntex_mqtt::QoS::ExactlyOnce,
        }
    }
}

/// Starts a QoS 2 delivery without holding the pump: `send` (the sink's
/// `send_exactly_once`) is polled once here, which writes the PUBLISH in
/// its place in the batch (the pump waited for the client's credit just
/// before, on this thread, so the write does not wait); waiting for the
/// PUBREC, then `on_received`, run in a task of their own. Before, the
/// pump waited for each PUBREC in turn: one QoS 2 message per round trip
/// and session (measured: 25 a second to a client whose acknowledgements
/// Nagle's algorithm held for the delayed ACK). False: the connection is gone.
pub(crate) fn exactly_once<T, E>(
    send: impl std::future::Future<Output = std::result::Result<T, E>> + 'static,
    on_received: impl FnOnce(T) + 'static,
) -> bool {
    use std::task::{Context, Poll, Waker};
    let mut send = Box::pin(send);
    match send.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(Ok(received)) => on_received(received),
        Poll::Ready(Err(_)) => return false,
        Poll::Pending => {
            ntex::rt::spawn(async move {
                // An error: the connection is gone; the message stays in
                // flight and goes again on the next connection.
                if let Ok(received) = send.await {
                    on_received(received);
                }
            });
        }
    }
    true
}

/// What follows a QoS 2 PUBREC, once the session recorded it (`stored`,
/// from `Session::pubrec`): the PUBREL (`release`, the sink's unpolled
/// release) once the release is stored and replicated, then `completed`
/// at the PUBCOMP. `None`: no PUBREL; the connection is aborted (`abort`,
/// its buffer discarded) before `release` is dropped, as dropping it
/// would send the PUBREL.
pub(crate) fn after_pubrec<E: 'static>(
    stored: Option<Pending>,
    release: impl std::future::Future<Output = std::result::Result<(), E>> + 'static,
    completed: Box<dyn FnOnce()>,
    abort: impl FnOnce(),
) {
    match stored {
        Some(stored) => {
            ntex::rt::spawn(release_when_stored(stored, release, completed));
        }
        None => {
            abort();
            drop(release);
        }
    }
}

/// The PUBREL once `stored` is written. A store that cannot write (disk
/// full) does not hold the PUBREL back: the client would keep the id for
/// ever; a crash before the store writes again may then deliver that
/// message once more.
async fn release_when_stored<E>(
    stored: Pending,
    release: impl std::future::Future<Output = std::result::Result<(), E>>,
    completed: Box<dyn FnOnce()>,
) {
    if stored.wait().await.is_err() {
        tracing::warn!("PUBREL sent before its release was stored: the store cannot write");
    }
    if release.await.is_ok() {
        completed();
    }
}
