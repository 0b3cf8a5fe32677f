//! The storage hook of the publish path and of connection events.
//!
//! A QoS 1/2 PUBLISH on a stored parent topic is acknowledged only after
//! `Storage::store` resolved (K3). Without Kafka configured the broker uses
//! `NoStorage`, which stores nothing; `kafka::Kafka` is the real one.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;

use crate::message::Message;

/// Why a message could not be stored.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StorageError {
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    #[error("storage buffer full")]
    BufferFull,
}

pub type Result<T> = std::result::Result<T, StorageError>;

/// A future returned by `Storage::store`.
pub type StoreFuture = Pin<Box<dyn Future<Output = Result<()>> + Send>>;

/// What a full storage buffer does to a message that needs an acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFull {
    /// Fail at once (MQTT 5 answers with a reason code).
    Refuse,
    /// Wait for room (MQTT 3.1.1 has no negative acknowledgement).
    Wait,
}

/// How much a caller needs to know about a stored message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// QoS 0 messages and wills: written when there is room, otherwise
    /// dropped and counted; the future resolves at once.
    BestEffort,
    /// QoS 1/2: the future resolves once the record is durable.
    Acknowledged(OnFull),
}

/// One device connect or disconnect (K5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceEvent {
    pub client_id: Arc<str>,
    pub kind: EventKind,
    /// Unique per TCP connection: `<node>-<sequence>`.
    pub channel_id: Arc<str>,
    pub client_ip: Option<IpAddr>,
    /// Wall-clock time, milliseconds since the Unix epoch.
    pub ts_ms: u64,
    /// Increases with every event of the node, so with every event of a
    /// client (see `Broker::next_event_index`).
    pub index: u64,
}

/// See `DeviceEvent::kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Connect,
    /// The client sent DISCONNECT.
    Disconnect,
    /// The connection is gone, whatever the cause; always sent.
    TcpClean,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Connect => "connect",
            EventKind::Disconnect => "disconnect",
            EventKind::TcpClean => "tcpclean",
        }
    }
}

/// Durable storage of uplink messages and device events.
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Whether messages of this parent topic are stored.
    fn stores(&self, parent_topic: &str) -> bool;
    /// Stores one message; `ordered` keys it by the publisher so that the
    /// client's messages keep their order.
    fn store(&self, msg: Arc<Message>, ordered: bool, durability: Durability) -> StoreFuture;
    /// Records a device event; never waits.
    fn device_event(&self, event: DeviceEvent);
}

/// The embedded default: nothing is stored.
#[derive(Debug, Default)]
pub struct NoStorage;

impl Storage for NoStorage {
    fn stores(&self, _parent_topic: &str) -> bool {
        false
    }

    fn store(&self, _msg: Arc<Message>, _ordered: bool, _durability: Durability) -> StoreFuture {
        Box::pin(async { Ok(()) })
    }

    fn device_event(&self, _event: DeviceEvent) {}
}
