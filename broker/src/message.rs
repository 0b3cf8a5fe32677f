//! The application message as it travels through the broker.
//!
//! A message is built once when it is received and shared behind an `Arc` by
//! every subscriber, queue and retained slot: fan-out copies a pointer, never
//! the payload.

use std::num::{NonZeroU16, NonZeroU32};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ntex::util::{ByteString, Bytes};

/// Quality of service, ordered so that `min` gives the downgraded level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QoS {
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl QoS {
    /// Label used in metrics.
    pub fn label(self) -> &'static str {
        match self {
            QoS::AtMostOnce => "0",
            QoS::AtLeastOnce => "1",
            QoS::ExactlyOnce => "2",
        }
    }
}

/// MQTT 5 properties that travel with a message from publisher to subscriber.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Properties {
    pub user: Vec<(ByteString, ByteString)>,
    pub content_type: Option<ByteString>,
    pub response_topic: Option<ByteString>,
    pub correlation_data: Option<Bytes>,
    pub utf8_payload: bool,
}

/// One application message.
#[derive(Debug)]
pub struct Message {
    /// Unique within this node's lifetime; reported in traces and the API.
    pub id: MessageId,
    pub topic: ByteString,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// Client ID of the publisher (empty for messages made by the broker).
    pub publisher: Arc<str>,
    /// Wall-clock receive time, milliseconds since the Unix epoch.
    pub ts_ms: u64,
    /// When the message was received, for expiry.
    pub received: Instant,
    /// MQTT 5 message expiry interval.
    pub expiry: Option<Duration>,
    pub properties: Properties,
}

impl Message {
    /// A message received now, without MQTT 5 properties or expiry.
    ///
    /// The topic and payload are copied out of the read page they arrived
    /// in: a slice keeps its whole page (up to 64 KiB) alive, and a message
    /// may outlive the rest of the page by hours (retained, offline, a slow
    /// subscriber's queue, a will) — 140 KiB per retained message was
    /// measured with other traffic between them.
    pub fn new(
        id: MessageId,
        mut topic: ByteString,
        mut payload: Bytes,
        qos: QoS,
        retain: bool,
        publisher: Arc<str>,
    ) -> Self {
        topic.trimdown();
        payload.trimdown();
        Self {
            id,
            topic,
            payload,
            qos,
            retain,
            publisher,
            ts_ms: now_ms(),
            received: Instant::now(),
            expiry: None,
            properties: Properties::default(),
        }
    }

    /// Sets the MQTT 5 properties, copied out of their read page (see `new`).
    pub fn set_properties(&mut self, mut properties: Properties) {
        for (k, v) in &mut properties.user {
            k.trimdown();
            v.trimdown();
        }
        for s in [&mut properties.content_type, &mut properties.response_topic]
            .into_iter()
            .flatten()
        {
            s.trimdown();
        }
        if let Some(d) = &mut properties.correlation_data {
            d.trimdown();
        }
        self.properties = properties;
    }

    /// Whether the message has outlived its expiry interval or `max_age`.
    pub fn is_expired(&self, now: Instant, max_age: Duration) -> bool {
        let age = now.saturating_duration_since(self.received);
        age > max_age || self.expiry.is_some_and(|e| age > e)
    }

    /// The expiry interval left, in whole seconds, for forwarding (MQTT 5 3.3.2.3.3).
    pub fn remaining_expiry_secs(&self, now: Instant) -> Option<u32> {
        self.expiry.map(|e| {
            let left = e.saturating_sub(now.saturating_duration_since(self.received));
            u32::try_from(left.as_secs()).unwrap_or(u32::MAX).max(1)
        })
    }
}

/// A message identifier: node-local sequence number, printed as hex.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(pub u64);

impl std::fmt::Display for MessageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Hands out message ids, unique in the instance: the top 12 bits name the
/// node (a hash of its name), the rest count up from the start time in
/// milliseconds × 1024, so a restarted node does not reuse its old ids
/// unless it issued more than a million a second.
#[derive(Debug)]
pub struct MessageIds {
    node: u64,
    next: AtomicU64,
}

impl MessageIds {
    pub fn new(node: &str) -> Self {
        let h = node.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        Self {
            node: (h >> 52) << 52,
            next: AtomicU64::new(now_ms() << 10),
        }
    }

    pub fn next(&self) -> MessageId {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        MessageId(self.node | (n & ((1 << 52) - 1)))
    }
}

impl std::str::FromStr for MessageId {
    type Err = std::num::ParseIntError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        u64::from_str_radix(s, 16).map(MessageId)
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// One message on its way to one session.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub msg: Arc<Message>,
    /// QoS after downgrade to the subscription's maximum.
    pub qos: QoS,
    pub retain: bool,
    pub dup: bool,
    pub sub_ids: Vec<NonZeroU32>,
    /// Its number in the session's durable queue; 0 when it is not stored
    /// (QoS 0, clean sessions, no store).
    pub seq: u64,
    /// The packet id it was sent with (None before its first send): a
    /// resend uses the id of the first send (MQTT-4.4.0-1), or a client
    /// holding a QoS 2 id takes it for a new message.
    pub sent_as: Option<NonZeroU16>,
    /// For a QoS 2 message a persistent session keeps: opens once its own
    /// write is through (the store and the replicas); the PUBLISH leaves
    /// only then (`Stored`).
    pub stored: Option<Stored>,
}

/// Opens once one delivery's write is through, in the node's store and on
/// the session's replicas (`durable::Pending::one`). Why a QoS 2 PUBLISH
/// waits for it: the client holds its packet id from the PUBLISH to the
/// PUBREL. Sent before its write, the message can be lost with its node
/// (it was never acknowledged to its publisher, so that is allowed), but
/// the id stays held; the state read back after the crash or on a replica
/// does not know it, gives it to a later message, and the client drops
/// that one as a duplicate of what it holds. The chaos test lost a message
/// so. A message the store could not write opens it too: it is in memory,
/// and its publisher was refused.
#[derive(Debug, Clone, Default)]
pub struct Stored(Arc<Latch>);

#[derive(Debug, Default)]
struct Latch {
    open: AtomicBool,
    opened: tokio::sync::Notify,
}

impl Stored {
    /// The write is through (the store's side).
    pub fn open(&self) {
        self.0.open.store(true, Ordering::Release);
        self.0.opened.notify_waiters();
    }

    pub fn is_open(&self) -> bool {
        self.0.open.load(Ordering::Acquire)
    }

    /// Resolves once `open` was called.
    pub async fn wait(&self) {
        loop {
            let opened = self.0.opened.notified();
            let mut opened = std::pin::pin!(opened);
            // Registered before the check: an `open` in between wakes it.
            opened.as_mut().enable();
            if self.is_open() {
                return;
            }
            opened.await;
        }
    }
}

impl Delivery {
    /// A first delivery at `qos`: not retained, no DUP, no subscription ids.
    pub fn new(msg: Arc<Message>, qos: QoS) -> Self {
        Self {
            msg,
            qos,
            retain: false,
            dup: false,
            sub_ids: Vec::new(),
            seq: 0,
            sent_as: None,
            stored: None,
        }
    }

    /// The packet id this delivery is sent with, when it has one of its
    /// own: the id of an earlier send, else the one its number gives. A
    /// stored message's id follows from its number, so that whoever reads
    /// it back (this node after a crash, a replica after failover) resends
    /// it under the id the client may hold, with nothing more written per
    /// send. Numbers rise by one per message of a session, so ids in
    /// flight together differ unless 65 535 messages passed one left
    /// unacknowledged (the sender waits then: `Pump::take`).
    /// For a session that numbers it again (another node's, or the same
    /// session taken back): the packet id its number gave stays, as the
    /// client may hold it.
    pub fn unnumber(&mut self) {
        self.sent_as = self.packet_id();
        self.seq = 0;
    }

    pub fn packet_id(&self) -> Option<NonZeroU16> {
        self.sent_as.or_else(|| {
            let n = self.seq.checked_sub(1)? % u64::from(u16::MAX);
            // n < 65 535, so n + 1 is a non-zero u16.
            NonZeroU16::new(u16::try_from(n + 1).ok()?)
        })
    }
}
