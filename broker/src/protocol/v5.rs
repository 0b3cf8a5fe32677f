//! MQTT 5 handlers: reason codes for every refusal, session expiry, will
//! delay, message expiry, user properties, subscription options and
//! identifiers, shared subscriptions.

use std::cell::RefCell;
use std::collections::HashMap;
use std::num::NonZeroU16;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ntex::util::ByteString;
use ntex_mqtt::v5::codec::{
    self, ConnectAckReason, DisconnectReasonCode, PublishAckReason, RetainHandling,
    SubscribeAckReason,
};
use ntex_mqtt::{Control, Reason, v5};

use super::{Error, Result};
use crate::auth::Refusal;
use crate::broker::{Broker, PublishError, SendRetained, SubscribeError};
use crate::connection::{CloseReason, Connection, Origin, OutSink, Will};
use crate::durable::Pending;
use crate::message::{Message, Properties, QoS};
use crate::router::SubOptions;
use crate::session::{Delivery, KickReason};
use crate::storage::StorageError;
use crate::sys;
use crate::topic::ClientIdError;
use crate::trace::DeviceReason;

pub type St = Rc<Connection>;

impl TryFrom<Error> for v5::PublishAck {
    type Error = Error;

    /// Errors are answered with a reason code by `publish` itself; what reaches
    /// here closes the connection.
    fn try_from(err: Error) -> std::result::Result<Self, Error> {
        Err(err)
    }
}

/// CONNECT: validate, attach the session with its expiry interval.
pub async fn connect(broker: &Arc<Broker>, c: v5::Connect) -> Result<v5::ConnectAck<St>> {
    let pkt = c.packet();
    let limits = &broker.config().limits;
    if !super::store_open(broker) {
        return Ok(c.failed(ConnectAckReason::ServerUnavailable));
    }
    let assigned = pkt.client_id.is_empty();
    let client_id = match broker.client_id(&pkt.client_id) {
        Ok(id) => id,
        Err(e) => {
            let reason = match e {
                ClientIdError::BadGroupId | ClientIdError::GroupIdRequired => {
                    ConnectAckReason::NotAuthorized
                }
                _ => ConnectAckReason::ClientIdentifierNotValid,
            };
            super::refused(broker, &pkt.client_id, DeviceReason::Invalid);
            return Ok(c.failed(reason));
        }
    };
    let password = pkt.password.as_deref();
    let ip = super::peer_ip(c.io());
    let verdict =
        super::authenticate(broker, &client_id, pkt.username.as_deref(), password, ip).await;
    let (identity, tokens) = match verdict {
        Ok(v) => v,
        Err(r) => {
            return Ok(c.failed(match r {
                Refusal::BadCredentials => ConnectAckReason::BadUserNameOrPassword,
                Refusal::NotAuthorized => ConnectAckReason::NotAuthorized,
                Refusal::UnknownGroup => ConnectAckReason::ClientIdentifierNotValid,
                Refusal::TooManyFailures => ConnectAckReason::ConnectionRateExceeded,
                Refusal::Busy => ConnectAckReason::ServerBusy,
            }));
        }
    };
    if !super::admit(broker, &client_id) {
        return Ok(c.failed(ConnectAckReason::QuotaExceeded));
    }
    let expiry_secs = pkt
        .session_expiry_interval_secs
        .min(limits.session_expiry_secs);
    let will = match &pkt.last_will {
        Some(w) => {
            if broker.check_topic(&w.topic).is_err() {
                broker.metrics().reject("will_topic_invalid");
                return Ok(c.failed(ConnectAckReason::TopicNameInvalid));
            }
            let mut msg = broker.message(
                w.topic.clone(),
                w.message.clone(),
                w.qos.into(),
                w.retain,
                Arc::from(client_id.as_str()),
            );
            msg.expiry = w
                .message_expiry_interval
                .map(|s| Duration::from_secs(u64::from(s)));
            msg.set_properties(Properties {
                user: w.user_properties.clone(),
                content_type: w.content_type.clone(),
                response_topic: w.response_topic.clone(),
                correlation_data: w.correlation_data.clone(),
                utf8_payload: w.is_utf8_payload.unwrap_or(false),
            });
            Some(Will {
                msg: Arc::new(msg),
                delay: Duration::from_secs(u64::from(w.will_delay_interval_sec.unwrap_or(0))),
            })
        }
        None => None,
    };
    let clean = pkt.clean_start;
    let requested_expiry = pkt.session_expiry_interval_secs;
    let keep_alive = pkt.keep_alive;
    let client_max_packet = pkt.max_packet_size;
    let client_alias_max = pkt.topic_alias_max.min(limits.topic_alias_maximum);
    broker.await_current(&client_id).await;
    let attached = broker.attach(
        &client_id,
        clean,
        Duration::from_secs(u64::from(expiry_secs)),
    );
    let present = attached.present;
    tracing::debug!(
        client_id,
        clean,
        present,
        expiry_secs,
        "MQTT 5 connection accepted"
    );
    let conn = Rc::new(Connection::new(
        broker.clone(),
        attached,
        identity,
        expiry_secs > 0,
        will,
        ip,
        Origin {
            protocol: "MQTT 5",
            clean,
        },
    ));
    super::install_tokens(&conn, tokens);
    super::resend_releases(c.io(), &conn.session);
    conn.start_pump(V5Sink {
        sink: c.sink(),
        max_packet: client_max_packet.map(|m| m.get()),
        alias_max: client_alias_max,
        aliases: RefCell::new(HashMap::new()),
    });
    let granted_keep_alive = super::granted_keep_alive(limits, keep_alive);
    let ack = c.ack(conn).max_send(Some(limits.max_inflight)).with(|a| {
        a.session_present = present;
        // Server Keep Alive (3.2.2.3.14): also sent as 0 to a client asking for
        // none, which keeps ntex-mqtt from imposing its own 30 s.
        if granted_keep_alive != keep_alive || keep_alive == 0 {
            a.server_keepalive_sec = Some(granted_keep_alive);
        }
        if requested_expiry != expiry_secs {
            a.session_expiry_interval_secs = Some(expiry_secs);
        }
        if assigned {
            a.assigned_client_id = Some(ByteString::from(client_id.as_str()));
        }
        a.retain_available = true;
        a.wildcard_subscription_available = true;
        a.subscription_identifiers_available = true;
        a.shared_subscription_available = true;
    });
    Ok(ack)
}

/// PUBLISH from the client: refusals become PUBACK/PUBREC reason codes.
pub async fn publish(s: &v5::Session<St>, p: v5::Publish) -> Result<v5::PublishAck> {
    // Boxed for the reason given in `v3::publish` (1 488 bytes here).
    Box::pin(accept_publish(s, p)).await
}

async fn accept_publish(s: &v5::Session<St>, p: v5::Publish) -> Result<v5::PublishAck> {
    // Taken before the payload is awaited (see `order`).
    let ticket = s.arrivals.ticket();
    let payload = p
        .read_all()
        .await
        .map_err(|e| Error::Payload(format!("{e:?}")))?;
    let pkt = p.packet();
    let props = &pkt.properties;
    let mut msg: Message = s.message(pkt.topic.clone(), payload, p.qos().into(), p.retain());
    msg.expiry = props
        .message_expiry_interval
        .map(|secs| Duration::from_secs(u64::from(secs)));
    msg.set_properties(Properties {
        user: props.user_properties.clone(),
        content_type: props.content_type.clone(),
        response_topic: props.response_topic.clone(),
        correlation_data: props.correlation_data.clone(),
        utf8_payload: props.is_utf8_payload,
    });
    let qos = msg.qos;
    // Shared from here (see `v3::publish`).
    let id = p.id();
    match super::publish(
        s,
        Arc::new(msg),
        crate::storage::OnFull::Refuse,
        &ticket,
        id,
    )
    .await
    {
        Ok(()) => Ok(p.ack()),
        // Token refusals: the notice, then the connection closes (A3).
        Err(e) if super::token_notice(&e).is_some() => {
            if let Some(notice) = super::token_notice(&e) {
                send_notice(s.sink(), notice).await;
            }
            Err(e)
        }
        // QoS 0 has no ack to carry a reason: the connection is closed.
        Err(e) if qos == QoS::AtMostOnce => Err(e),
        Err(e) => {
            let code = match &e {
                Error::Publish(PublishError::Topic(_)) => PublishAckReason::TopicNameInvalid,
                Error::NotAuthorized => PublishAckReason::NotAuthorized,
                Error::Publish(
                    PublishError::Storage(StorageError::BufferFull) | PublishError::Persist(_),
                ) => PublishAckReason::QuotaExceeded,
                Error::Sys(crate::sys::SysError::RateLimited(_)) => PublishAckReason::QuotaExceeded,
                Error::Sys(_) => PublishAckReason::PayloadFormatInvalid,
                _ => PublishAckReason::UnspecifiedError,
            };
            Ok(p.ack()
                .reason_code(code)
                .reason(ByteString::from(e.to_string())))
        }
    }
}

/// SUBSCRIBE, UNSUBSCRIBE, AUTH, DISCONNECT, PINGREQ, PUBREL.
pub async fn protocol(
    s: &v5::Session<St>,
    msg: v5::ProtocolMessage,
) -> Result<v5::ProtocolMessageAck> {
    let conn: &Connection = s;
    let broker = &conn.broker;
    match msg {
        v5::ProtocolMessage::Subscribe(mut sub) => {
            let id = sub.packet().id;
            for mut item in sub.iter_mut() {
                let o = *item.options();
                let opts = SubOptions {
                    qos: o.qos.into(),
                    no_local: o.no_local,
                    retain_as_published: o.retain_as_published,
                    id,
                };
                let shared = item.topic().starts_with("$share/");
                if shared && o.no_local {
                    // MQTT-3.8.3-4: No Local on a shared subscription is a protocol error.
                    broker.metrics().reject("subscribe_refused");
                    item.fail(SubscribeAckReason::ImplementationSpecificError);
                    continue;
                }
                if let Err(e) = super::may_subscribe(conn, item.topic()) {
                    if let Some(notice) = super::token_notice(&e) {
                        send_notice(s.sink(), notice).await;
                        return Err(e);
                    }
                    item.fail(SubscribeAckReason::NotAuthorized);
                    continue;
                }
                let retained = match o.retain_handling {
                    RetainHandling::AtSubscribe => SendRetained::Always,
                    RetainHandling::AtSubscribeNew => SendRetained::IfNew,
                    RetainHandling::NoAtSubscribe => SendRetained::Never,
                };
                match broker
                    .subscribe(&conn.session, item.topic(), opts, retained)
                    .await
                {
                    Ok(_) => {
                        conn.trace_subscribe(item.topic(), None);
                        item.confirm(o.qos);
                    }
                    Err(e) => {
                        broker.metrics().reject("subscribe_refused");
                        tracing::info!(client_id = %conn.client_id, filter = %item.topic(), error = %e, "subscription refused");
                        conn.trace_subscribe(item.topic(), Some(&e));
                        item.fail(match e {
                            SubscribeError::Filter(_) => SubscribeAckReason::TopicFilterInvalid,
                            SubscribeError::Quota(_)
                            | SubscribeError::Capacity
                            | SubscribeError::Store => SubscribeAckReason::QuotaExceeded,
                        });
                    }
                }
            }
            Ok(sub.ack())
        }
        v5::ProtocolMessage::Unsubscribe(mut u) => {
            for mut item in u.iter_mut() {
                let topic = item.topic().clone();
                if broker.unsubscribe(&conn.session, &topic) {
                    item.success();
                } else {
                    item.fail(codec::UnsubscribeAckReason::NoSubscriptionExisted);
                }
            }
            Ok(u.ack())
        }
        v5::ProtocolMessage::Disconnect(d) => {
            let code = d.packet().reason_code;
            if code != DisconnectReasonCode::DisconnectWithWillMessage {
                conn.graceful.set(true);
                conn.will.borrow_mut().take();
            }
            if let Some(secs) = d.packet().session_expiry_interval_secs {
                let capped = secs.min(broker.config().limits.session_expiry_secs);
                broker.set_expiry(&conn.session, Duration::from_secs(u64::from(capped)));
            }
            Ok(d.ack())
        }
        v5::ProtocolMessage::Ping(p) => Ok(p.ack()),
        v5::ProtocolMessage::PublishRelease(r) => {
            conn.session.release_qos2(r.packet().packet_id.get());
            Ok(r.ack())
        }
        v5::ProtocolMessage::Auth(a) => {
            // Enhanced authentication is not offered: CONNACK advertises none.
            broker.metrics().reject("auth_unsupported");
            Ok(a.ack(codec::Auth {
                reason_code: codec::AuthReasonCode::ContinueAuth,
                ..Default::default()
            }))
        }
    }
}

/// `$SYS/tokenInvalidNotice`, written before the connection is closed.
async fn send_notice(sink: &v5::MqttSink, body: String) {
    let _ = sink
        .publish(ByteString::from_static(sys::TOKEN_INVALID_NOTICE))
        .send_at_most_once(ntex::util::Bytes::from(body.into_bytes()))
        .await;
    // The connection closes right after; the notice is only in the write
    // buffer, and a close on error does not wait for it to drain.
    ntex::time::sleep(crate::sys::NOTICE_LINGER).await;
}

/// How long a connection that broke the protocol stays open after DISCONNECT.
const PROTOCOL_ERROR_LINGER: Duration = Duration::from_millis(300);

/// Connection events: records why a connection stopped.
pub async fn control(s: &v5::Session<St>, c: Control<Error>) -> Result<Option<codec::Encoded>> {
    if let Control::Stop(reason) = &c {
        super::trace_stop(s, reason);
        if let Reason::Protocol(_) = reason {
            // ntex-mqtt has sent DISCONNECT with the reason code; the client may
            // still be writing packets it queued before reading it, and would
            // get a reset instead of the reason if the socket closed at once.
            ntex::time::sleep(PROTOCOL_ERROR_LINGER).await;
        }
        if let Reason::Error(e) = reason {
            let code = match e.get_ref() {
                Error::Publish(PublishError::Topic(_)) => DisconnectReasonCode::TopicNameInvalid,
                Error::NotAuthorized | Error::Token(..) => DisconnectReasonCode::NotAuthorized,
                Error::Sys(_) => DisconnectReasonCode::PayloadFormatInvalid,
                _ => DisconnectReasonCode::UnspecifiedError,
            };
            return Ok(Some(
                codec::Packet::from(codec::Disconnect {
                    reason_code: code,
                    reason_string: Some(ByteString::from(e.get_ref().to_string())),
                    ..Default::default()
                })
                .into(),
            ));
        }
    }
    Ok(None)
}

/// The v5 sink with what the client told about itself in CONNECT.
pub struct V5Sink {
    sink: v5::MqttSink,
    max_packet: Option<u32>,
    /// Topic aliases the client accepts from us.
    alias_max: u16,
    /// Topics given an alias on this connection; first come, first served.
    aliases: RefCell<HashMap<ByteString, NonZeroU16>>,
}

impl V5Sink {
    /// The topic to send and its alias: an aliased topic goes out empty.
    fn alias(&self, topic: &ByteString) -> (ByteString, Option<NonZeroU16>) {
        if self.alias_max == 0 {
            return (topic.clone(), None);
        }
        let mut aliases = self.aliases.borrow_mut();
        if let Some(alias) = aliases.get(topic) {
            return (ByteString::new(), Some(*alias));
        }
        let next = u16::try_from(aliases.len() + 1)
            .ok()
            .filter(|n| *n <= self.alias_max);
        match next.and_then(NonZeroU16::new) {
            Some(alias) => {
                aliases.insert(topic.clone(), alias);
                (topic.clone(), Some(alias))
            }
            None => (topic.clone(), None),
        }
    }

    fn builder(&self, d: &Delivery, now: Instant) -> v5::PublishBuilder {
        let msg = &d.msg;
        let (topic, alias) = self.alias(&msg.topic);
        self.sink
            .publish(topic)
            .dup(d.dup)
            .retain(d.retain)
            .properties(|p| {
                p.message_expiry_interval = msg.remaining_expiry_secs(now);
                p.user_properties.clone_from(&msg.properties.user);
                p.content_type.clone_from(&msg.properties.content_type);
                p.response_topic.clone_from(&msg.properties.response_topic);
                p.correlation_data
                    .clone_from(&msg.properties.correlation_data);
                p.is_utf8_payload = msg.properties.utf8_payload;
                p.subscription_ids.clone_from(&d.sub_ids);
                p.topic_alias = alias;
            })
    }
}

impl OutSink for V5Sink {
    async fn ready(&self) -> bool {
        self.sink.ready().await
    }

    fn credit(&self) -> usize {
        self.sink.credit()
    }

    async fn send_qos0(&self, d: &Delivery, now: Instant) -> bool {
        self.builder(d, now)
            .send_at_most_once(d.msg.payload.clone())
            .await
            .is_ok()
    }

    fn send_qos1(&self, d: &Delivery, id: NonZeroU16, now: Instant) -> bool {
        self.builder(d, now)
            .packet_id(id.get())
            .send_at_least_once_no_block(d.msg.payload.clone())
            .is_ok()
    }

    fn send_qos2(
        &self,
        d: &Delivery,
        id: NonZeroU16,
        now: Instant,
        received: Box<dyn FnOnce() -> Option<Pending>>,
        completed: Box<dyn FnOnce()>,
    ) -> bool {
        let send = self
            .builder(d, now)
            .packet_id(id.get())
            .send_exactly_once(d.msg.payload.clone());
        let sink = self.sink.clone();
        super::exactly_once(send, move |r| match received() {
            _ if u8::from(r.packet().reason_code) >= 0x80 => {
                // A refusing PUBREC ends the exchange: no PUBREL, the id is free.
                completed();
            }
            stored => {
                super::after_pubrec(stored, r.release(), completed, || sink.force_close());
            }
        })
    }

    fn on_ack(&self, f: Box<dyn Fn(u16)>) {
        self.sink.publish_ack_cb(move |ack, disconnected| {
            if !disconnected {
                f(ack.packet_id.get());
            }
        });
    }

    fn close(&self, reason: CloseReason) {
        let (code, text) = match reason {
            CloseReason::Takeover => (DisconnectReasonCode::SessionTakenOver, "clientId conflict"),
            CloseReason::Kick(KickReason::Administrative) => (
                DisconnectReasonCode::AdministrativeAction,
                "closed by the operator",
            ),
            CloseReason::Kick(KickReason::Shutdown) => (
                DisconnectReasonCode::ServerShuttingDown,
                "server shutting down",
            ),
            CloseReason::Kick(KickReason::Moved) => (
                DisconnectReasonCode::UseAnotherServer,
                "session moved to another node: reconnect",
            ),
        };
        self.sink.close_with_reason(codec::Disconnect {
            reason_code: code,
            reason_string: Some(ByteString::from_static(text)),
            ..Default::default()
        });
    }

    fn max_packet_size(&self) -> Option<u32> {
        self.max_packet
    }
}
