//! What goes into Kafka and what comes out of it: the uplink record (K2), the
//! device event record (K5) and the downlink headers (K4). Pure functions, so
//! that the formats are tested and fuzzed without a Kafka cluster.

use std::borrow::Cow;

use base64::Engine as _;
use serde::Serialize;

use crate::message::{Message, QoS};
use crate::storage::DeviceEvent;

/// Why a downlink record is not delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("header mqttTopic is missing")]
    NoTopic,
    #[error("header {0} is not UTF-8")]
    NotUtf8(&'static str),
    #[error("header qoslevel must be 0, 1 or 2, not {0:?}")]
    Qos(String),
    #[error("header cleanSession must be true or false, not {0:?}")]
    CleanSession(String),
}

pub type Result<T> = std::result::Result<T, RecordError>;

/// The JSON value of an uplink record. `payload` is the MQTT payload as text
/// when it is valid UTF-8 (`payloadEncoding: "utf8"`), otherwise standard
/// base64 with padding (`payloadEncoding: "base64"`).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Uplink<'a> {
    client_id: &'a str,
    topic: &'a str,
    payload: Cow<'a, str>,
    payload_encoding: &'static str,
    ts: u64,
    qos: u8,
    msg_id: String,
    retain: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    user_properties: Vec<[&'a str; 2]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content_type: Option<&'a str>,
}

/// Encodes an MQTT message as the value of its uplink record. `msgId` is
/// the Message ID the operations API's message trace knows the message by:
/// unique in the instance per received PUBLISH, so consumers can drop the
/// second copy of a QoS 1 message that a client sent again after a lost
/// PUBACK.
pub fn uplink(msg: &Message) -> Vec<u8> {
    let (payload, payload_encoding) = match std::str::from_utf8(&msg.payload) {
        Ok(text) => (Cow::Borrowed(text), "utf8"),
        Err(_) => (
            Cow::Owned(base64::engine::general_purpose::STANDARD.encode(&msg.payload)),
            "base64",
        ),
    };
    let record = Uplink {
        client_id: &msg.publisher,
        topic: &msg.topic,
        payload,
        payload_encoding,
        ts: msg.ts_ms,
        qos: msg.qos as u8,
        msg_id: msg.id.to_string(),
        retain: msg.retain,
        user_properties: msg
            .properties
            .user
            .iter()
            .map(|(k, v)| [&**k, &**v])
            .collect(),
        content_type: msg.properties.content_type.as_deref(),
    };
    // Serialising strings and integers into a Vec cannot fail.
    serde_json::to_vec(&record).unwrap_or_default()
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Event<'a> {
    client_id: &'a str,
    ts: u64,
    event_type: &'static str,
    channel_id: &'a str,
    client_ip: Option<String>,
    event_index: u64,
}

/// Encodes a device event record value.
pub fn event(e: &DeviceEvent) -> Vec<u8> {
    let record = Event {
        client_id: &e.client_id,
        ts: e.ts_ms,
        event_type: e.kind.as_str(),
        channel_id: &e.channel_id,
        client_ip: e.client_ip.map(|ip| ip.to_string()),
        event_index: e.index,
    };
    serde_json::to_vec(&record).unwrap_or_default()
}

/// The MQTT attributes of a downlink record (K4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downlink {
    pub topic: String,
    pub qos: QoS,
    /// `true`: only online subscribers get the message.
    pub clean_session: bool,
}

/// Reads the downlink headers: `mqttTopic` (required), `qoslevel` (default
/// one) and `cleanSession` (default true). Header names are matched exactly,
/// values are trimmed; `cleanSession` ignores case, as Java's
/// `Boolean.toString` and hand-written values differ.
pub fn downlink<'a>(
    headers: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
) -> Result<Downlink> {
    let mut topic = None;
    let mut qos = QoS::AtLeastOnce;
    let mut clean_session = true;
    for (key, value) in headers {
        let text = |name| {
            std::str::from_utf8(value.unwrap_or_default())
                .map(str::trim)
                .map_err(|_| RecordError::NotUtf8(name))
        };
        match key {
            "mqttTopic" => topic = Some(text("mqttTopic")?.to_owned()),
            "qoslevel" => {
                qos = match text("qoslevel")? {
                    "0" => QoS::AtMostOnce,
                    "1" => QoS::AtLeastOnce,
                    "2" => QoS::ExactlyOnce,
                    other => return Err(RecordError::Qos(other.to_owned())),
                }
            }
            "cleanSession" => {
                let v = text("cleanSession")?;
                clean_session = if v.eq_ignore_ascii_case("true") {
                    true
                } else if v.eq_ignore_ascii_case("false") {
                    false
                } else {
                    return Err(RecordError::CleanSession(v.to_owned()));
                };
            }
            _ => {}
        }
    }
    let topic = topic
        .filter(|t| !t.is_empty())
        .ok_or(RecordError::NoTopic)?;
    Ok(Downlink {
        topic,
        qos,
        clean_session,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::MessageId;
    use crate::storage::EventKind;
    use ntex::util::{ByteString, Bytes};
    use std::sync::Arc;

    fn msg(payload: &'static [u8]) -> Message {
        Message::new(
            MessageId(0x2a),
            ByteString::from_static("sensors/a"),
            Bytes::from_static(payload),
            QoS::AtLeastOnce,
            false,
            Arc::from("g@@@d1"),
        )
    }

    fn json(bytes: &[u8]) -> serde_json::Value {
        serde_json::from_slice(bytes).unwrap_or_default()
    }

    #[test]
    fn text_payload_is_kept_as_text() {
        let v = json(&uplink(&msg(b"21.5 C")));
        assert_eq!(v["clientId"], "g@@@d1");
        assert_eq!(v["topic"], "sensors/a");
        assert_eq!(v["payload"], "21.5 C");
        assert_eq!(v["payloadEncoding"], "utf8");
        assert_eq!(v["qos"], 1);
        assert_eq!(v["msgId"], "000000000000002a");
        assert!(v["ts"].as_u64().is_some_and(|t| t > 0));
        assert!(v.get("userProperties").is_none());
    }

    #[test]
    fn binary_payload_is_base64() {
        let v = json(&uplink(&msg(&[0xff, 0x00, 0x10])));
        assert_eq!(v["payload"], "/wAQ");
        assert_eq!(v["payloadEncoding"], "base64");
    }

    #[test]
    fn event_has_every_field() {
        let e = DeviceEvent {
            client_id: Arc::from("c1"),
            kind: EventKind::TcpClean,
            channel_id: Arc::from("n0-7"),
            client_ip: "127.0.0.1".parse().ok(),
            ts_ms: 5,
            index: 9,
        };
        let v = json(&event(&e));
        assert_eq!(
            v,
            serde_json::json!({"clientId":"c1","ts":5,"eventType":"tcpclean",
                "channelId":"n0-7","clientIp":"127.0.0.1","eventIndex":9})
        );
    }

    fn h<'a>(pairs: &'a [(&'a str, &'a str)]) -> Vec<(&'a str, Option<&'a [u8]>)> {
        pairs
            .iter()
            .map(|(k, v)| (*k, Some(v.as_bytes())))
            .collect()
    }

    #[test]
    fn downlink_defaults_and_values() {
        assert_eq!(
            downlink(h(&[("mqttTopic", "cmd/d1")])),
            Ok(Downlink {
                topic: "cmd/d1".into(),
                qos: QoS::AtLeastOnce,
                clean_session: true
            })
        );
        assert_eq!(
            downlink(h(&[
                ("qoslevel", "0"),
                ("cleanSession", "FALSE"),
                ("mqttTopic", "a/p2p/c1"),
                ("other", "x")
            ])),
            Ok(Downlink {
                topic: "a/p2p/c1".into(),
                qos: QoS::AtMostOnce,
                clean_session: false
            })
        );
    }

    #[test]
    fn downlink_errors_are_named() {
        assert_eq!(downlink(h(&[("qoslevel", "1")])), Err(RecordError::NoTopic));
        assert_eq!(downlink(h(&[("mqttTopic", "")])), Err(RecordError::NoTopic));
        assert_eq!(
            downlink(h(&[("mqttTopic", "t"), ("qoslevel", "3")])),
            Err(RecordError::Qos("3".into()))
        );
        assert_eq!(
            downlink(h(&[("mqttTopic", "t"), ("cleanSession", "yes")])),
            Err(RecordError::CleanSession("yes".into()))
        );
        assert_eq!(
            downlink(vec![("mqttTopic", Some(&[0xffu8][..]))]),
            Err(RecordError::NotUtf8("mqttTopic"))
        );
    }
}
