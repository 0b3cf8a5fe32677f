//! Device trace (O4) and message trace (O5) of one node.
//!
//! Events live in sixteen ring buffers chosen by Client ID, so a query for
//! one client reads one buffer and recording takes one of sixteen locks.
//! Each buffer holds its share of the configured count and drops events
//! older than the retention; the API merges the answers of every node.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::config::TraceConfig;
use crate::message::QoS;

const SHARDS: usize = 16;

/// What happened to a device (O4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceAction {
    /// A CONNECT, accepted or refused.
    Connect,
    /// A SUBSCRIBE filter, accepted or refused.
    Subscribed,
    /// A persistent session resumed by a new connection.
    Resumed,
    /// The client sent DISCONNECT.
    Disconnect,
    /// The connection ended without a DISCONNECT from the client.
    Close,
    /// A clean-session connection discarded the previous session.
    Discarded,
    /// A connection took over the session of a connection still open.
    Takeovered,
    /// A PUBLISH refused (not in the seeds' list: a refused publish is
    /// what a device developer looks for first).
    Publish,
}

/// Why it happened. The seeds' reasons, and a few more the broker knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceReason {
    #[serde(rename = "accepted")]
    Accepted,
    #[serde(rename = "not authorized")]
    NotAuthorized,
    #[serde(rename = "clientId conflict")]
    ClientIdConflict,
    #[serde(rename = "topic auth failed")]
    TopicAuthFailed,
    #[serde(rename = "no heart")]
    NoHeart,
    #[serde(rename = "closed by client")]
    ClosedByClient,
    #[serde(rename = "disconnected by client")]
    DisconnectedByClient,
    #[serde(rename = "quota exceeded")]
    QuotaExceeded,
    #[serde(rename = "kicked")]
    Kicked,
    #[serde(rename = "session moved")]
    SessionMoved,
    #[serde(rename = "server shutting down")]
    ServerShutdown,
    #[serde(rename = "protocol error")]
    ProtocolError,
    #[serde(rename = "invalid")]
    Invalid,
}

/// One device trace event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceEvent {
    pub ts: u64,
    pub client_id: Arc<str>,
    pub channel_id: Arc<str>,
    pub action: DeviceAction,
    pub reason: DeviceReason,
    /// The filter of a subscription, the topic of a refused publish.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// What happened to a message (O5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageAction {
    /// Sent by an MQTT client (received by the broker).
    Published,
    /// Pushed to an MQTT client.
    Pushed,
    /// Sent by a backend application through Kafka (`mq2mqtt`).
    FromKafka,
    /// Pushed to an MQTT client from its offline queue.
    OfflinePushed,
}

/// One message trace event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageEvent {
    pub ts: u64,
    pub message_id: String,
    /// The publisher for `published`, the receiver for `pushed`.
    pub client_id: Arc<str>,
    pub action: MessageAction,
    pub topic: String,
    pub qos: u8,
}

/// A message event as recorded: no formatting on the hot path.
#[derive(Debug, Clone)]
struct RawMessageEvent {
    ts: u64,
    message_id: u64,
    client_id: Arc<str>,
    action: MessageAction,
    topic: ntex::util::ByteString,
    qos: QoS,
}

impl RawMessageEvent {
    fn render(&self) -> MessageEvent {
        MessageEvent {
            ts: self.ts,
            message_id: crate::message::MessageId(self.message_id).to_string(),
            client_id: self.client_id.clone(),
            action: self.action,
            topic: self.topic.to_string(),
            qos: self.qos as u8,
        }
    }
}

#[derive(Debug)]
struct Rings<T> {
    shards: [Mutex<VecDeque<T>>; SHARDS],
    per_shard: usize,
}

impl<T> Rings<T> {
    fn new(total: usize) -> Self {
        Self {
            shards: std::array::from_fn(|_| Mutex::new(VecDeque::new())),
            per_shard: total.div_ceil(SHARDS),
        }
    }

    fn shard(&self, client_id: &str) -> std::sync::MutexGuard<'_, VecDeque<T>> {
        let h = client_id.bytes().fold(0x811c_9dc5_u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        });
        let i = usize::try_from(h).unwrap_or(0) % SHARDS;
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, client_id: &str, event: T, ts: impl Fn(&T) -> u64, oldest: u64) {
        if self.per_shard == 0 {
            return;
        }
        let mut ring = self.shard(client_id);
        self.push_locked(&mut ring, event, ts, oldest);
    }

    fn push_locked(&self, ring: &mut VecDeque<T>, event: T, ts: impl Fn(&T) -> u64, oldest: u64) {
        while ring.len() >= self.per_shard || ring.front().is_some_and(|e| ts(e) < oldest) {
            ring.pop_front();
        }
        ring.push_back(event);
    }
}

/// Where trace events are kept beyond memory (the journal implements it),
/// so that a restarted node still answers for the retention window.
/// Recording never waits.
pub trait TraceJournal: Send + Sync + std::fmt::Debug {
    fn device(&self, event: DeviceEvent);
    fn message(&self, event: MessageEvent);
}

/// The traces of one node.
#[derive(Debug)]
pub struct Traces {
    devices: Rings<DeviceEvent>,
    messages: Rings<RawMessageEvent>,
    retention_ms: u64,
    journal: Option<Arc<dyn TraceJournal>>,
}

impl Traces {
    pub fn new(config: &TraceConfig, journal: Option<Arc<dyn TraceJournal>>) -> Self {
        Self {
            devices: Rings::new(config.device_events),
            messages: Rings::new(config.message_events),
            retention_ms: config.retention_secs.saturating_mul(1000),
            journal,
        }
    }

    /// Puts back what the journal held (oldest first).
    pub fn restore(&self, devices: Vec<DeviceEvent>, messages: Vec<MessageEvent>) {
        let oldest = self.oldest(crate::message::now_ms());
        for e in devices {
            let client = e.client_id.clone();
            self.devices.push(&client, e, |e| e.ts, oldest);
        }
        for e in messages {
            let Ok(id) = e.message_id.parse::<crate::message::MessageId>() else {
                continue;
            };
            let raw = RawMessageEvent {
                ts: e.ts,
                message_id: id.0,
                client_id: e.client_id,
                action: e.action,
                topic: e.topic.into(),
                qos: match e.qos {
                    0 => QoS::AtMostOnce,
                    1 => QoS::AtLeastOnce,
                    _ => QoS::ExactlyOnce,
                },
            };
            let client = raw.client_id.clone();
            self.messages.push(&client, raw, |e| e.ts, oldest);
        }
    }

    fn oldest(&self, now: u64) -> u64 {
        now.saturating_sub(self.retention_ms)
    }

    /// Records a device event now.
    pub fn device(
        &self,
        client_id: &Arc<str>,
        channel_id: &Arc<str>,
        action: DeviceAction,
        reason: DeviceReason,
        detail: Option<&str>,
    ) {
        let ts = crate::message::now_ms();
        let event = DeviceEvent {
            ts,
            client_id: client_id.clone(),
            channel_id: channel_id.clone(),
            action,
            reason,
            detail: detail.map(str::to_owned),
        };
        if let Some(j) = &self.journal {
            j.device(event.clone());
        }
        self.devices
            .push(client_id, event, |e| e.ts, self.oldest(ts));
    }

    /// Whether message events are recorded at all.
    pub fn traces_messages(&self) -> bool {
        self.messages.per_shard > 0
    }

    /// Records the event of a message entering the broker, at its receive
    /// time (read when the message was made: no second clock read).
    pub fn message(
        &self,
        client_id: &Arc<str>,
        msg: &crate::message::Message,
        action: MessageAction,
        qos: QoS,
    ) {
        if self.traces_messages() {
            self.record_messages(client_id, msg.ts_ms, std::iter::once((msg, action, qos)));
        }
    }

    /// Records message events of one client at once, now: one lock, one
    /// clock read (the pump's batches).
    pub fn messages<'a>(
        &self,
        client_id: &Arc<str>,
        events: impl Iterator<Item = (&'a crate::message::Message, MessageAction, QoS)>,
    ) {
        if self.traces_messages() {
            self.record_messages(client_id, crate::message::now_ms(), events);
        }
    }

    fn record_messages<'a>(
        &self,
        client_id: &Arc<str>,
        ts: u64,
        events: impl Iterator<Item = (&'a crate::message::Message, MessageAction, QoS)>,
    ) {
        let oldest = self.oldest(ts);
        let mut ring = self.messages.shard(client_id);
        for (msg, action, qos) in events {
            let event = RawMessageEvent {
                ts,
                message_id: msg.id.0,
                client_id: client_id.clone(),
                action,
                topic: msg.topic.clone(),
                qos,
            };
            if let Some(j) = &self.journal {
                j.message(event.render());
            }
            self.messages
                .push_locked(&mut ring, event, |e| e.ts, oldest);
        }
    }

    /// Device events of one client in `[from, to]`, oldest first, at most `limit`.
    pub fn device_events(
        &self,
        client_id: &str,
        from: u64,
        to: u64,
        limit: usize,
    ) -> Vec<DeviceEvent> {
        self.devices
            .shard(client_id)
            .iter()
            .filter(|e| &*e.client_id == client_id && e.ts >= from && e.ts <= to)
            .take(limit)
            .cloned()
            .collect()
    }

    /// Message events in `[from, to]` of a client, of a message, or both.
    pub fn message_events(
        &self,
        client_id: Option<&str>,
        message_id: Option<u64>,
        from: u64,
        to: u64,
        limit: usize,
    ) -> Vec<MessageEvent> {
        let matches = |e: &&RawMessageEvent| {
            e.ts >= from
                && e.ts <= to
                && client_id.is_none_or(|c| *e.client_id == *c)
                && message_id.is_none_or(|m| e.message_id == m)
        };
        let mut out: Vec<MessageEvent> = match client_id {
            Some(c) => self
                .messages
                .shard(c)
                .iter()
                .filter(matches)
                .take(limit)
                .map(RawMessageEvent::render)
                .collect(),
            None => {
                let mut out = Vec::new();
                for shard in &self.messages.shards {
                    let ring = shard.lock().unwrap_or_else(|e| e.into_inner());
                    out.extend(ring.iter().filter(matches).map(RawMessageEvent::render));
                }
                out
            }
        };
        out.sort_by_key(|e| e.ts);
        out.truncate(limit);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_events_are_kept_per_client_within_the_bound() {
        let t = Traces::new(
            &TraceConfig {
                device_events: 32,
                ..TraceConfig::default()
            },
            None,
        );
        let (a, b, ch): (Arc<str>, Arc<str>, Arc<str>) = ("a".into(), "b".into(), "c1".into());
        for _ in 0..100 {
            t.device(&a, &ch, DeviceAction::Connect, DeviceReason::Accepted, None);
        }
        t.device(&b, &ch, DeviceAction::Close, DeviceReason::NoHeart, None);
        let got = t.device_events("a", 0, u64::MAX, 1000);
        assert!(!got.is_empty() && got.len() <= 2, "{}", got.len());
        let got = t.device_events("b", 0, u64::MAX, 1000);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].reason, DeviceReason::NoHeart);
        let json = serde_json::to_string(&got[0]).unwrap_or_default();
        assert!(json.contains("\"reason\":\"no heart\""), "{json}");
    }

    #[test]
    fn message_events_by_client_and_by_id() {
        let t = Traces::new(&TraceConfig::default(), None);
        let pubr: Arc<str> = "pub".into();
        let sub: Arc<str> = "sub".into();
        let msg = crate::message::Message::new(
            crate::message::MessageId(7),
            "t/x".into(),
            ntex::util::Bytes::new(),
            QoS::AtLeastOnce,
            false,
            pubr.clone(),
        );
        t.message(&pubr, &msg, MessageAction::Published, QoS::AtLeastOnce);
        t.message(&sub, &msg, MessageAction::Pushed, QoS::AtMostOnce);
        let by_id = t.message_events(None, Some(7), 0, u64::MAX, 10);
        assert_eq!(by_id.len(), 2);
        let by_client = t.message_events(Some("sub"), None, 0, u64::MAX, 10);
        assert_eq!(by_client.len(), 1);
        assert_eq!(by_client[0].action, MessageAction::Pushed);
        assert_eq!(by_client[0].qos, 0);
        assert!(
            t.message_events(Some("sub"), Some(8), 0, u64::MAX, 10)
                .is_empty()
        );
    }
}
