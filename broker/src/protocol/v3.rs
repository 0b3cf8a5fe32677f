//! MQTT 3.1.1 handlers. 3.1.1 has no reason codes: a refused CONNECT gets a
//! CONNACK return code, a refused PUBLISH closes the connection (as the seeds
//! describe), a refused subscription gets the SUBACK failure code 0x80.

use std::num::NonZeroU16;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ntex::time::Seconds;
use ntex_mqtt::{Control, v3};

use super::{Error, Result};
use ntex::util::{ByteString, Bytes};

use crate::auth::Refusal;
use crate::broker::{Broker, SendRetained};
use crate::config::V3SubscribeRefusal;
use crate::connection::{CloseReason, Connection, Origin, OutSink, Will};
use crate::durable::Pending;
use crate::message::QoS;
use crate::router::SubOptions;
use crate::session::Delivery;
use crate::sys;
use crate::trace::DeviceReason;

pub type St = Rc<Connection>;

/// CONNECT: validate the Client ID and will, attach the session.
pub async fn connect(broker: &Arc<Broker>, c: v3::Connect) -> Result<v3::ConnectAck<St>> {
    let pkt = c.packet();
    let limits = &broker.config().limits;
    let clean = pkt.clean_session;
    let keep_alive = pkt.keep_alive;
    if !super::store_open(broker) {
        return Ok(c.service_unavailable());
    }
    if pkt.client_id.is_empty() && !clean {
        // MQTT-3.1.3-8: an empty Client ID needs a clean session.
        return Ok(refuse(broker, c, "client_id_empty"));
    }
    let Ok(client_id) = broker.client_id(&pkt.client_id) else {
        super::refused(broker, &pkt.client_id, DeviceReason::Invalid);
        return Ok(c.identifier_rejected());
    };
    let password = pkt.password.as_deref();
    let ip = super::peer_ip(c.io());
    let verdict =
        super::authenticate(broker, &client_id, pkt.username.as_deref(), password, ip).await;
    let (identity, tokens) = match verdict {
        Ok(v) => v,
        Err(Refusal::BadCredentials) => return Ok(c.bad_username_or_pwd()),
        Err(Refusal::NotAuthorized | Refusal::TooManyFailures) => return Ok(c.not_authorized()),
        Err(Refusal::UnknownGroup) => return Ok(c.identifier_rejected()),
        Err(Refusal::Busy) => return Ok(c.service_unavailable()),
    };
    if !super::admit(broker, &client_id) {
        return Ok(c.service_unavailable());
    }
    let will = match &pkt.last_will {
        Some(w) => {
            if broker.check_topic(&w.topic).is_err() {
                return Ok(refuse(broker, c, "will_topic_invalid"));
            }
            Some(Will {
                msg: Arc::new(broker.message(
                    w.topic.clone(),
                    w.message.clone(),
                    w.qos.into(),
                    w.retain,
                    Arc::from(client_id.as_str()),
                )),
                delay: Duration::ZERO,
            })
        }
        None => None,
    };
    let expiry = if clean {
        Duration::ZERO
    } else {
        Duration::from_secs(u64::from(limits.session_expiry_secs))
    };
    broker.await_current(&client_id).await;
    let attached = broker.attach(&client_id, clean, expiry);
    let present = attached.present;
    tracing::debug!(client_id, clean, present, "MQTT 3.1.1 connection accepted");
    let conn = Rc::new(Connection::new(
        broker.clone(),
        attached,
        identity,
        !clean,
        will,
        ip,
        Origin {
            protocol: "MQTT 3.1.1",
            clean,
        },
    ));
    super::install_tokens(&conn, tokens);
    super::resend_releases(c.io(), &conn.session);
    conn.start_pump(c.sink());
    let ack = c.ack(conn, present).max_send(Some(limits.max_inflight));
    let granted = super::granted_keep_alive(limits, keep_alive);
    // A keep-alive of 0 turns the mechanism off (MQTT-3.1.2-24) unless the
    // operator imposes one; ntex-mqtt would otherwise close idle clients after 30 s.
    Ok(if granted != keep_alive || keep_alive == 0 {
        ack.idle_timeout(Seconds(granted.saturating_add(granted.div_ceil(2))))
    } else {
        ack
    })
}

fn refuse(broker: &Broker, c: v3::Connect, reason: &str) -> v3::ConnectAck<St> {
    broker.metrics().reject(reason);
    c.identifier_rejected()
}

/// PUBLISH from the client.
pub async fn publish(s: &v3::Session<St>, p: v3::Publish) -> Result<()> {
    // ntex moves the handler's future several times per packet (through its
    // service chain, into its boxed pipeline call): boxed here, what it
    // moves is a pointer, not the whole publish path (728 bytes).
    Box::pin(accept_publish(s, p)).await
}

async fn accept_publish(s: &v3::Session<St>, p: v3::Publish) -> Result<()> {
    // Taken before the payload is awaited (see `order`).
    let ticket = s.arrivals.ticket();
    let payload = p
        .read_all()
        .await
        .map_err(|e| Error::Payload(format!("{e:?}")))?;
    let msg = s.message(
        p.packet().topic.clone(),
        payload,
        p.qos().into(),
        p.retain(),
    );
    // Shared from here: the handler's future holds a pointer, not the
    // message.
    let result = super::publish(
        s,
        Arc::new(msg),
        crate::storage::OnFull::Wait,
        &ticket,
        p.id(),
    )
    .await;
    if let Err(e) = &result
        && let Some(notice) = super::token_notice(e)
    {
        send_notice(s.sink(), notice).await;
    }
    result
}

/// `$SYS/tokenInvalidNotice`, written before the connection is closed.
async fn send_notice(sink: &v3::MqttSink, body: String) {
    let _ = sink
        .publish(ByteString::from_static(sys::TOKEN_INVALID_NOTICE))
        .send_at_most_once(Bytes::from(body.into_bytes()))
        .await;
    // The connection closes right after; the notice is only in the write
    // buffer, and a close on error does not wait for it to drain.
    ntex::time::sleep(crate::sys::NOTICE_LINGER).await;
}

/// SUBSCRIBE, UNSUBSCRIBE, DISCONNECT, PINGREQ, PUBREL.
pub async fn protocol(
    s: &v3::Session<St>,
    msg: v3::ProtocolMessage,
) -> Result<v3::ProtocolMessageAck> {
    let conn: &Connection = s;
    let broker = &conn.broker;
    match msg {
        v3::ProtocolMessage::Subscribe(mut sub) => {
            for mut item in sub.iter_mut() {
                let qos = QoS::from(item.qos());
                let opts = SubOptions::at(qos);
                if let Err(e) = super::may_subscribe(conn, item.topic()) {
                    if let Some(notice) = super::token_notice(&e) {
                        send_notice(s.sink(), notice).await;
                        return Err(e);
                    }
                    match broker.config().auth.v3_subscribe_refusal {
                        V3SubscribeRefusal::Suback => {
                            item.fail();
                            continue;
                        }
                        // The seeds' behaviour: the connection is closed.
                        V3SubscribeRefusal::Close => return Err(e),
                    }
                }
                match broker
                    .subscribe(&conn.session, item.topic(), opts, SendRetained::Always)
                    .await
                {
                    Ok(_) => {
                        conn.trace_subscribe(item.topic(), None);
                        item.confirm(qos.into());
                    }
                    Err(e) => {
                        broker.metrics().reject("subscribe_refused");
                        tracing::info!(client_id = %conn.client_id, filter = %item.topic(), error = %e, "subscription refused");
                        conn.trace_subscribe(item.topic(), Some(&e));
                        item.fail();
                    }
                }
            }
            Ok(sub.ack())
        }
        v3::ProtocolMessage::Unsubscribe(u) => {
            for f in u.iter() {
                broker.unsubscribe(&conn.session, f);
            }
            Ok(u.ack())
        }
        v3::ProtocolMessage::Disconnect(d) => {
            conn.graceful.set(true);
            conn.will.borrow_mut().take();
            Ok(d.ack())
        }
        v3::ProtocolMessage::Ping(p) => Ok(p.ack()),
        v3::ProtocolMessage::PublishRelease(r) => {
            conn.session.release_qos2(r.id().get());
            Ok(r.ack())
        }
    }
}

/// Connection events: records why a connection stopped.
pub async fn control(s: &v3::Session<St>, c: Control<Error>) -> Result<Option<v3::codec::Encoded>> {
    if let Control::Stop(reason) = &c {
        super::trace_stop(s, reason);
    }
    Ok(None)
}

impl OutSink for v3::MqttSink {
    async fn ready(&self) -> bool {
        v3::MqttSink::ready(self).await
    }

    fn credit(&self) -> usize {
        v3::MqttSink::credit(self)
    }

    async fn send_qos0(&self, d: &Delivery, _now: Instant) -> bool {
        builder(self, d)
            .send_at_most_once(d.msg.payload.clone())
            .await
            .is_ok()
    }

    fn send_qos1(&self, d: &Delivery, id: NonZeroU16, _now: Instant) -> bool {
        builder(self, d)
            .packet_id(id.get())
            .send_at_least_once_no_block(d.msg.payload.clone())
            .is_ok()
    }

    fn send_qos2(
        &self,
        d: &Delivery,
        id: NonZeroU16,
        _now: Instant,
        received: Box<dyn FnOnce() -> Option<Pending>>,
        completed: Box<dyn FnOnce()>,
    ) -> bool {
        let send = builder(self, d)
            .packet_id(id.get())
            .send_exactly_once(d.msg.payload.clone());
        let sink = self.clone();
        super::exactly_once(send, move |r| {
            super::after_pubrec(received(), r.release(), completed, || sink.force_close());
        })
    }

    fn on_ack(&self, f: Box<dyn Fn(u16)>) {
        self.publish_ack_cb(move |id, disconnected| {
            if !disconnected {
                f(id.get());
            }
        });
    }

    fn close(&self, reason: CloseReason) {
        tracing::debug!(?reason, "closing MQTT 3.1.1 connection");
        v3::MqttSink::close(self);
    }

    fn max_packet_size(&self) -> Option<u32> {
        None
    }
}

fn builder(sink: &v3::MqttSink, d: &Delivery) -> v3::PublishBuilder {
    let b = sink.publish(d.msg.topic.clone()).dup(d.dup);
    if d.retain { b.retain() } else { b }
}
