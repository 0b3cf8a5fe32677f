//! The inter-node protocol: length-prefixed binary frames.
//!
//! ```text
//! frame   = length:u32be kind:u8 body          (length counts kind + body)
//! str     = len:u16be utf8                      bytes = len:u32be octets
//! ```
//!
//! Every link starts with `Hello` both ways (protocol version, node name, a
//! random nonce) and `Auth` both ways (HMAC-SHA256 under the cluster secret of
//! the peer's nonce and the sender's name): a node without the secret cannot
//! join. A node refuses a `Hello` with a version it does not speak. The
//! decoder is fuzzed (`fuzz/fuzz_targets/wire.rs`): any input gives a frame or
//! an error, never a panic; it reserves memory only in small steps, so what
//! it allocates follows what arrives. Before authentication a frame may be
//! at most 4 KiB.

use ntex::util::{Buf, BufMut, ByteString, Bytes, BytesMut};

use crate::codec::{len16, len32, put_bytes, put_opt_str, put_str};
use crate::message::QoS;

/// The protocol version this build speaks.
/// 2: replicated sessions (`Replicate`, `Stream`, `Ack`, `ReplicaSynced`)
/// and acknowledged forwards (`n` of `Publish` and `Direct`); a node of
/// version 1 would not know them, so the two do not link.
/// 3: a session handed over keeps its packet ids (`WireDelivery::packet_id`,
/// `WireSession::qos2_ids` and `released`) and says its epoch; `Load`
/// reports under-replicated sessions.
/// 4: `Ack` names its sequence (replica changes or forwarded publishes).
/// 5: `SessionGone` (tombstones).
/// 6: a session handed over is numbered in the forwards' sequence
/// (`Session::n`) and acknowledged once its receiver keeps it; it may
/// come without its messages, for the receiver's copy (`WireSession::copy`).
pub const VERSION: u16 = 6;

/// Largest frame accepted: an MQTT packet of the largest configurable size
/// plus the frame's own fields.
pub const MAX_FRAME: usize = 268_435_455 + 64 * 1024;

/// Why bytes are not a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame of {0} bytes is larger than the limit")]
    TooLarge(usize),
    #[error("unknown frame kind {0}")]
    Kind(u8),
    #[error("frame truncated")]
    Truncated,
    #[error("string is not UTF-8")]
    Utf8,
    #[error("bad QoS {0}")]
    Qos(u8),
    #[error("{0} bytes left after the frame's fields")]
    Trailing(usize),
    #[error("unknown replica change {0}")]
    Change(u8),
}

pub type Result<T> = std::result::Result<T, WireError>;

/// An application message as it crosses between nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireMessage {
    /// The message ID its first node gave it: traces on every node name it.
    pub id: u64,
    pub topic: ByteString,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub publisher: ByteString,
    pub ts_ms: u64,
    /// Remaining MQTT 5 message expiry, milliseconds.
    pub expiry_ms: Option<u64>,
    pub user: Vec<(ByteString, ByteString)>,
    pub content_type: Option<ByteString>,
    pub response_topic: Option<ByteString>,
    pub correlation_data: Option<Bytes>,
    pub utf8_payload: bool,
}

/// A message waiting for a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireDelivery {
    pub msg: WireMessage,
    pub qos: QoS,
    pub retain: bool,
    pub dup: bool,
    pub sub_ids: Vec<u32>,
    /// The packet id the client may hold it under; 0: none.
    pub packet_id: u16,
}

/// One subscription of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireSub {
    pub filter: String,
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub id: u32,
}

/// A persistent session as it moves between nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireSession {
    pub client_id: String,
    /// Session expiry left, milliseconds.
    pub expiry_ms: u64,
    pub ordered: bool,
    pub subscriptions: Vec<WireSub>,
    /// Sent before and not acknowledged, or queued for the connection: sent
    /// first when the client is back.
    pub resend: Vec<WireDelivery>,
    /// Offline messages (B5).
    pub offline: Vec<WireDelivery>,
    /// Of a copy: what was queued since the sender's restart.
    pub since: Vec<WireDelivery>,
    /// QoS 2 PUBLISHes accepted from the client and not yet released.
    pub qos2_ids: Vec<u16>,
    /// QoS 2 messages to the client waiting for their PUBCOMP.
    pub released: Vec<u16>,
    /// A will waiting, and when it is due (wall clock, ms).
    pub will: Option<(WireMessage, u64)>,
    /// The sender's owner generation of the session.
    pub epoch: u64,
    /// A replica's copy of a lost owner's session (`peers::Handover`).
    pub from_copy: bool,
    /// Sent without its stored messages: the digest of them that the
    /// receiver's replica copy must have (`peers::Handover::copy`).
    pub copy: Option<u64>,
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello {
        version: u16,
        node: String,
        /// Where the sender's cluster port is reached; a node dials back a
        /// peer it did not know, so a peer list may name only some nodes.
        addr: String,
        nonce: [u8; 16],
    },
    Auth {
        mac: [u8; 32],
    },
    /// Sent every heartbeat interval; `leaving` announces a planned leave.
    Heartbeat {
        leaving: bool,
    },
    /// Cluster addresses the sender knows (its own included).
    Members {
        addrs: Vec<String>,
    },
    /// A token was revoked (A3): refused on every node until it expires.
    Revoked {
        id: String,
        exp_ms: u64,
    },
    /// The sender has handed over every session its ring of `members` gives
    /// to other nodes: a joining node waits for this from every member
    /// before it serves its sessions.
    Settled {
        members: Vec<String>,
    },
    /// Every filter the sender's sessions subscribe to (replaces what the
    /// receiver knew of the sender).
    Routes {
        filters: Vec<String>,
    },
    RouteAdd {
        filter: String,
    },
    RouteDel {
        filter: String,
    },
    /// Deliver to the receiver's matching subscriptions; for shared
    /// subscriptions only to the listed `$share/…` groups. `n` (0: none)
    /// numbers it on the sender's stream: the receiver acknowledges it
    /// (`Ack`) once the persistent sessions it reached keep it.
    Publish {
        n: u64,
        msg: WireMessage,
        groups: Vec<String>,
    },
    /// Deliver to one client of the receiver (P2P); `persistent` is the
    /// sender's session flag, which decides offline queueing (B10); `n`
    /// as for `Publish`.
    Direct {
        n: u64,
        client_id: String,
        persistent: bool,
        msg: WireMessage,
    },
    /// Store (or, for an empty payload, clear) a retained message.
    Retain {
        msg: WireMessage,
    },
    /// A persistent session handed to its new owner, number `n` of the
    /// link's forwards (0: not numbered): acknowledged once the receiver
    /// keeps it, so that the sender keeps it until then.
    Session {
        n: u64,
        session: WireSession,
    },
    /// A persistent session of `epoch` ended at the sender, which no
    /// longer owns `client`: the receiver drops older copies of it.
    SessionGone {
        client: String,
        epoch: u64,
        /// How long a copy of it may still surface, milliseconds.
        ttl_ms: u64,
    },
    /// The link carries one client's MQTT bytes from here on: the sender
    /// accepted the client and forwards it to the owner of its session.
    Proxy {
        client_ip: String,
    },
    /// The sender's usage, once a second: the instance-wide capacity budget
    /// and the operations API's per-node table.
    Load {
        connections: u64,
        subscriptions: u64,
        pub_tps: u64,
        sub_tps: u64,
        /// Persistent sessions the sender owns with too few copies.
        under_replicated: u64,
    },
    /// An operations API question for the receiver (JSON), answered by a
    /// `Reply` with the same `id`.
    Query {
        id: u64,
        body: String,
    },
    Reply {
        id: u64,
        body: String,
    },
    /// Change `n` of the sender's replication stream to this peer: a
    /// change of `client`'s session, which the receiver keeps a replica of.
    /// `value` is the record or the message in the store's format
    /// (`persist::record`).
    Replicate {
        n: u64,
        client: String,
        change: ChangeKind,
        seq: u64,
        value: Bytes,
    },
    /// First on every link: the numbered frames that follow are the
    /// sender's run `run` (a process), link `link` (this connection).
    Stream {
        run: u64,
        link: u64,
    },
    /// The sender is through with every numbered frame of run `run`'s
    /// sequence up to `n`: replica changes applied (`forward` false),
    /// publishes kept by the persistent sessions they reached (`forward`
    /// true; the two are numbered apart, so that a replica change is
    /// never held back behind a publish that waits for a replica).
    /// `failed`: frame `n` itself could not be kept (the store refused
    /// it), or was refused (a session sent for a copy the receiver lacks).
    Ack {
        run: u64,
        n: u64,
        failed: bool,
        forward: bool,
    },
    /// Every session the sender owns and the receiver keeps went out whole
    /// on link `link`: the receiver's older copies of the sender's are stale.
    ReplicaSynced {
        link: u64,
    },
}

/// What a `Replicate` frame changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// `value` is the session's new record.
    Record = 1,
    /// `value` is the session's record; what was kept of it is replaced.
    Reset = 2,
    /// `value` is message `seq` of its queue.
    Queue = 3,
    /// Message `seq` left its queue (`value` empty).
    Unqueue = 4,
    /// The session ended here (`value` empty).
    Forget = 5,
}

impl ChangeKind {
    fn from_u8(k: u8) -> Result<Self> {
        Ok(match k {
            1 => Self::Record,
            2 => Self::Reset,
            3 => Self::Queue,
            4 => Self::Unqueue,
            5 => Self::Forget,
            other => return Err(WireError::Change(other)),
        })
    }
}

const HELLO: u8 = 1;
const AUTH: u8 = 2;
const HEARTBEAT: u8 = 3;
const ROUTES: u8 = 4;
const ROUTE_ADD: u8 = 5;
const ROUTE_DEL: u8 = 6;
const PUBLISH: u8 = 7;
const DIRECT: u8 = 8;
const RETAIN: u8 = 9;
const PROXY: u8 = 10;
const SESSION: u8 = 11;
const MEMBERS: u8 = 12;
const SETTLED: u8 = 13;
const REVOKED: u8 = 14;
const LOAD: u8 = 15;
const QUERY: u8 = 16;
const REPLY: u8 = 17;
const REPLICATE: u8 = 18;
const STREAM: u8 = 19;
const ACK: u8 = 20;
const REPLICA_SYNCED: u8 = 21;
const SESSION_GONE: u8 = 22;

impl Frame {
    /// Appends the encoded frame to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        let start = out.len();
        out.put_u32(0);
        match self {
            Frame::Hello {
                version,
                node,
                addr,
                nonce,
            } => {
                out.put_u8(HELLO);
                out.put_u16(*version);
                put_str(out, node);
                put_str(out, addr);
                out.put_slice(nonce);
            }
            Frame::Auth { mac } => {
                out.put_u8(AUTH);
                out.put_slice(mac);
            }
            Frame::Heartbeat { leaving } => {
                out.put_u8(HEARTBEAT);
                out.put_u8(u8::from(*leaving));
            }
            Frame::Members { addrs } => {
                out.put_u8(MEMBERS);
                put_strs(out, addrs);
            }
            Frame::Revoked { id, exp_ms } => {
                out.put_u8(REVOKED);
                put_str(out, id);
                out.put_u64(*exp_ms);
            }
            Frame::Settled { members } => {
                out.put_u8(SETTLED);
                put_strs(out, members);
            }
            Frame::Routes { filters } => {
                out.put_u8(ROUTES);
                out.put_u32(len32(filters.len()));
                for f in filters {
                    put_str(out, f);
                }
            }
            Frame::RouteAdd { filter } => {
                out.put_u8(ROUTE_ADD);
                put_str(out, filter);
            }
            Frame::RouteDel { filter } => {
                out.put_u8(ROUTE_DEL);
                put_str(out, filter);
            }
            Frame::Publish { n, msg, groups } => {
                out.put_u8(PUBLISH);
                out.put_u64(*n);
                put_msg(out, msg);
                put_strs(out, groups);
            }
            Frame::Direct {
                n,
                client_id,
                persistent,
                msg,
            } => {
                out.put_u8(DIRECT);
                out.put_u64(*n);
                put_str(out, client_id);
                out.put_u8(u8::from(*persistent));
                put_msg(out, msg);
            }
            Frame::Retain { msg } => {
                out.put_u8(RETAIN);
                put_msg(out, msg);
            }
            Frame::Proxy { client_ip } => {
                out.put_u8(PROXY);
                put_str(out, client_ip);
            }
            Frame::Session { n, session } => {
                out.put_u8(SESSION);
                out.put_u64(*n);
                put_session(out, session);
            }
            Frame::SessionGone {
                client,
                epoch,
                ttl_ms,
            } => {
                out.put_u8(SESSION_GONE);
                put_str(out, client);
                out.put_u64(*epoch);
                out.put_u64(*ttl_ms);
            }
            Frame::Load {
                connections,
                subscriptions,
                pub_tps,
                sub_tps,
                under_replicated,
            } => {
                out.put_u8(LOAD);
                for v in [
                    connections,
                    subscriptions,
                    pub_tps,
                    sub_tps,
                    under_replicated,
                ] {
                    out.put_u64(*v);
                }
            }
            Frame::Query { id, body } => {
                out.put_u8(QUERY);
                out.put_u64(*id);
                put_bytes(out, body.as_bytes());
            }
            Frame::Reply { id, body } => {
                out.put_u8(REPLY);
                out.put_u64(*id);
                put_bytes(out, body.as_bytes());
            }
            Frame::Replicate {
                n,
                client,
                change,
                seq,
                value,
            } => {
                out.put_u8(REPLICATE);
                out.put_u64(*n);
                put_str(out, client);
                out.put_u8(*change as u8);
                out.put_u64(*seq);
                put_bytes(out, value);
            }
            Frame::Stream { run, link } => {
                out.put_u8(STREAM);
                out.put_u64(*run);
                out.put_u64(*link);
            }
            Frame::Ack {
                run,
                n,
                failed,
                forward,
            } => {
                out.put_u8(ACK);
                out.put_u64(*run);
                out.put_u64(*n);
                out.put_u8(u8::from(*failed) | (u8::from(*forward) << 1));
            }
            Frame::ReplicaSynced { link } => {
                out.put_u8(REPLICA_SYNCED);
                out.put_u64(*link);
            }
        }
        let len = len32(out.len() - start - 4);
        out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    }

    /// Takes one frame off the front of `buf`; `Ok(None)` until it is whole.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Frame>> {
        Self::decode_limited(buf, MAX_FRAME)
    }

    /// `decode` with a smaller frame limit (the handshake's).
    pub fn decode_limited(buf: &mut BytesMut, max: usize) -> Result<Option<Frame>> {
        if buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len > max.min(MAX_FRAME) {
            return Err(WireError::TooLarge(len));
        }
        if len == 0 {
            return Err(WireError::Truncated);
        }
        if buf.len() < 4 + len {
            return Ok(None);
        }
        buf.advance(4);
        let mut body = buf.split_to(len);
        let frame = decode_body(&mut body)?;
        if !body.is_empty() {
            return Err(WireError::Trailing(body.len()));
        }
        Ok(Some(frame))
    }
}

fn decode_body(b: &mut Bytes) -> Result<Frame> {
    let kind = get_u8(b)?;
    Ok(match kind {
        HELLO => {
            let version = get_u16(b)?;
            let node = get_str(b)?.to_string();
            let addr = get_str(b)?.to_string();
            let mut nonce = [0u8; 16];
            take(b, 16)?.copy_to_slice(&mut nonce);
            Frame::Hello {
                version,
                node,
                addr,
                nonce,
            }
        }
        AUTH => {
            let mut mac = [0u8; 32];
            take(b, 32)?.copy_to_slice(&mut mac);
            Frame::Auth { mac }
        }
        HEARTBEAT => Frame::Heartbeat {
            leaving: get_u8(b)? != 0,
        },
        MEMBERS => Frame::Members {
            addrs: get_strs(b)?,
        },
        REVOKED => Frame::Revoked {
            id: get_str(b)?.to_string(),
            exp_ms: get_u64(b)?,
        },
        SETTLED => Frame::Settled {
            members: get_strs(b)?,
        },
        ROUTES => {
            let n = get_u32(b)? as usize;
            // Each filter takes at least its two length bytes.
            if n > b.len() / 2 {
                return Err(WireError::Truncated);
            }
            let mut filters = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                filters.push(get_str(b)?.to_string());
            }
            Frame::Routes { filters }
        }
        ROUTE_ADD => Frame::RouteAdd {
            filter: get_str(b)?.to_string(),
        },
        ROUTE_DEL => Frame::RouteDel {
            filter: get_str(b)?.to_string(),
        },
        PUBLISH => Frame::Publish {
            n: get_u64(b)?,
            msg: get_msg(b)?,
            groups: get_strs(b)?,
        },
        DIRECT => {
            let n = get_u64(b)?;
            let client_id = get_str(b)?.to_string();
            let persistent = get_u8(b)? != 0;
            Frame::Direct {
                n,
                client_id,
                persistent,
                msg: get_msg(b)?,
            }
        }
        RETAIN => Frame::Retain { msg: get_msg(b)? },
        PROXY => Frame::Proxy {
            client_ip: get_str(b)?.to_string(),
        },
        SESSION => Frame::Session {
            n: get_u64(b)?,
            session: get_session(b)?,
        },
        SESSION_GONE => Frame::SessionGone {
            client: get_str(b)?.to_string(),
            epoch: get_u64(b)?,
            ttl_ms: get_u64(b)?,
        },
        LOAD => Frame::Load {
            connections: get_u64(b)?,
            subscriptions: get_u64(b)?,
            pub_tps: get_u64(b)?,
            sub_tps: get_u64(b)?,
            under_replicated: get_u64(b)?,
        },
        QUERY | REPLY => {
            let id = get_u64(b)?;
            let body = String::from_utf8(get_bytes(b)?.to_vec()).map_err(|_| WireError::Utf8)?;
            if kind == QUERY {
                Frame::Query { id, body }
            } else {
                Frame::Reply { id, body }
            }
        }
        REPLICATE => Frame::Replicate {
            n: get_u64(b)?,
            client: get_str(b)?.to_string(),
            change: ChangeKind::from_u8(get_u8(b)?)?,
            seq: get_u64(b)?,
            value: get_bytes(b)?,
        },
        STREAM => Frame::Stream {
            run: get_u64(b)?,
            link: get_u64(b)?,
        },
        ACK => {
            let (run, n, flags) = (get_u64(b)?, get_u64(b)?, get_u8(b)?);
            Frame::Ack {
                run,
                n,
                failed: flags & 1 != 0,
                forward: flags & 2 != 0,
            }
        }
        REPLICA_SYNCED => Frame::ReplicaSynced { link: get_u64(b)? },
        other => return Err(WireError::Kind(other)),
    })
}

/// A list of at most 65 535 strings.
fn put_strs(out: &mut BytesMut, list: &[String]) {
    out.put_u16(len16(list.len()));
    for s in list {
        put_str(out, s);
    }
}

fn put_msg(out: &mut BytesMut, m: &WireMessage) {
    out.put_u64(m.id);
    put_str(out, &m.topic);
    put_bytes(out, &m.payload);
    let flags = (m.qos as u8)
        | (u8::from(m.retain) << 2)
        | (u8::from(m.utf8_payload) << 3)
        | (u8::from(m.expiry_ms.is_some()) << 4);
    out.put_u8(flags);
    put_str(out, &m.publisher);
    out.put_u64(m.ts_ms);
    if let Some(e) = m.expiry_ms {
        out.put_u64(e);
    }
    out.put_u16(len16(m.user.len()));
    for (k, v) in &m.user {
        put_str(out, k);
        put_str(out, v);
    }
    put_opt_str(out, m.content_type.as_ref());
    put_opt_str(out, m.response_topic.as_ref());
    match &m.correlation_data {
        Some(c) => {
            out.put_u8(1);
            put_bytes(out, c);
        }
        None => out.put_u8(0),
    }
}

fn qos_of(q: u8) -> Result<QoS> {
    match q {
        0 => Ok(QoS::AtMostOnce),
        1 => Ok(QoS::AtLeastOnce),
        2 => Ok(QoS::ExactlyOnce),
        q => Err(WireError::Qos(q)),
    }
}

fn put_deliveries(out: &mut BytesMut, ds: &[WireDelivery]) {
    out.put_u32(len32(ds.len()));
    for d in ds {
        put_msg(out, &d.msg);
        out.put_u8((d.qos as u8) | (u8::from(d.retain) << 2) | (u8::from(d.dup) << 3));
        out.put_u16(len16(d.sub_ids.len()));
        for id in &d.sub_ids {
            out.put_u32(*id);
        }
        out.put_u16(d.packet_id);
    }
}

fn put_ids(out: &mut BytesMut, ids: &[u16]) {
    out.put_u32(len32(ids.len()));
    for id in ids {
        out.put_u16(*id);
    }
}

fn get_ids(b: &mut Bytes) -> Result<Vec<u16>> {
    let n = get_u32(b)? as usize;
    let mut out = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        out.push(get_u16(b)?);
    }
    Ok(out)
}

fn get_deliveries(b: &mut Bytes) -> Result<Vec<WireDelivery>> {
    let n = get_u32(b)? as usize;
    let mut out = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        let msg = get_msg(b)?;
        let flags = get_u8(b)?;
        let k = usize::from(get_u16(b)?);
        let mut sub_ids = Vec::with_capacity(k.min(8));
        for _ in 0..k {
            sub_ids.push(get_u32(b)?);
        }
        out.push(WireDelivery {
            msg,
            qos: qos_of(flags & 0b11)?,
            retain: flags & (1 << 2) != 0,
            dup: flags & (1 << 3) != 0,
            sub_ids,
            packet_id: get_u16(b)?,
        });
    }
    Ok(out)
}

fn put_session(out: &mut BytesMut, s: &WireSession) {
    put_str(out, &s.client_id);
    out.put_u64(s.expiry_ms);
    out.put_u8(u8::from(s.ordered));
    out.put_u32(len32(s.subscriptions.len()));
    for sub in &s.subscriptions {
        put_str(out, &sub.filter);
        out.put_u8(
            (sub.qos as u8)
                | (u8::from(sub.no_local) << 2)
                | (u8::from(sub.retain_as_published) << 3),
        );
        out.put_u32(sub.id);
    }
    put_deliveries(out, &s.resend);
    put_deliveries(out, &s.offline);
    put_deliveries(out, &s.since);
    put_ids(out, &s.qos2_ids);
    put_ids(out, &s.released);
    match &s.will {
        Some((msg, due_ms)) => {
            out.put_u8(1);
            put_msg(out, msg);
            out.put_u64(*due_ms);
        }
        None => out.put_u8(0),
    }
    out.put_u64(s.epoch);
    out.put_u8(u8::from(s.from_copy));
    match s.copy {
        Some(digest) => {
            out.put_u8(1);
            out.put_u64(digest);
        }
        None => out.put_u8(0),
    }
}

fn get_session(b: &mut Bytes) -> Result<WireSession> {
    let client_id = get_str(b)?.to_string();
    let expiry_ms = get_u64(b)?;
    let ordered = get_u8(b)? != 0;
    let n = get_u32(b)? as usize;
    let mut subscriptions = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        let filter = get_str(b)?.to_string();
        let flags = get_u8(b)?;
        subscriptions.push(WireSub {
            filter,
            qos: qos_of(flags & 0b11)?,
            no_local: flags & (1 << 2) != 0,
            retain_as_published: flags & (1 << 3) != 0,
            id: get_u32(b)?,
        });
    }
    Ok(WireSession {
        client_id,
        expiry_ms,
        ordered,
        subscriptions,
        resend: get_deliveries(b)?,
        offline: get_deliveries(b)?,
        since: get_deliveries(b)?,
        qos2_ids: get_ids(b)?,
        released: get_ids(b)?,
        will: match get_u8(b)? {
            0 => None,
            _ => Some((get_msg(b)?, get_u64(b)?)),
        },
        epoch: get_u64(b)?,
        from_copy: get_u8(b)? != 0,
        copy: match get_u8(b)? {
            0 => None,
            _ => Some(get_u64(b)?),
        },
    })
}

fn take(b: &mut Bytes, n: usize) -> Result<Bytes> {
    if b.len() < n {
        return Err(WireError::Truncated);
    }
    Ok(b.split_to(n))
}

fn get_u8(b: &mut Bytes) -> Result<u8> {
    Ok(take(b, 1)?[0])
}

fn get_u16(b: &mut Bytes) -> Result<u16> {
    let t = take(b, 2)?;
    Ok(u16::from_be_bytes([t[0], t[1]]))
}

fn get_u32(b: &mut Bytes) -> Result<u32> {
    let t = take(b, 4)?;
    Ok(u32::from_be_bytes([t[0], t[1], t[2], t[3]]))
}

fn get_u64(b: &mut Bytes) -> Result<u64> {
    let t = take(b, 8)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(&t);
    Ok(u64::from_be_bytes(a))
}

fn get_str(b: &mut Bytes) -> Result<ByteString> {
    let n = usize::from(get_u16(b)?);
    ByteString::try_from(take(b, n)?).map_err(|_| WireError::Utf8)
}

fn get_strs(b: &mut Bytes) -> Result<Vec<String>> {
    let n = usize::from(get_u16(b)?);
    let mut out = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        out.push(get_str(b)?.to_string());
    }
    Ok(out)
}

fn get_bytes(b: &mut Bytes) -> Result<Bytes> {
    let n = get_u32(b)? as usize;
    take(b, n)
}

fn get_opt_str(b: &mut Bytes) -> Result<Option<ByteString>> {
    Ok(match get_u8(b)? {
        0 => None,
        _ => Some(get_str(b)?),
    })
}

fn get_msg(b: &mut Bytes) -> Result<WireMessage> {
    let id = get_u64(b)?;
    let topic = get_str(b)?;
    let payload = get_bytes(b)?;
    let flags = get_u8(b)?;
    let qos = qos_of(flags & 0b11)?;
    let publisher = get_str(b)?;
    let ts_ms = get_u64(b)?;
    let expiry_ms = if flags & (1 << 4) != 0 {
        Some(get_u64(b)?)
    } else {
        None
    };
    let n = usize::from(get_u16(b)?);
    let mut user = Vec::with_capacity(n.min(16));
    for _ in 0..n {
        user.push((get_str(b)?, get_str(b)?));
    }
    let content_type = get_opt_str(b)?;
    let response_topic = get_opt_str(b)?;
    let correlation_data = match get_u8(b)? {
        0 => None,
        _ => Some(get_bytes(b)?),
    };
    Ok(WireMessage {
        id,
        topic,
        payload,
        qos,
        retain: flags & (1 << 2) != 0,
        publisher,
        ts_ms,
        expiry_ms,
        user,
        content_type,
        response_topic,
        correlation_data,
        utf8_payload: flags & (1 << 3) != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg() -> WireMessage {
        WireMessage {
            id: 0x0123_4567_89ab_cdef,
            topic: "a/b".into(),
            payload: Bytes::from_static(b"\x00\xffpayload"),
            qos: QoS::ExactlyOnce,
            retain: true,
            publisher: "GID_test@@@d".into(),
            ts_ms: 1_795_353_358_454,
            expiry_ms: Some(5000),
            user: vec![("k".into(), "v".into())],
            content_type: Some("text/plain".into()),
            response_topic: None,
            correlation_data: Some(Bytes::from_static(b"c")),
            utf8_payload: false,
        }
    }

    fn all() -> Vec<Frame> {
        vec![
            Frame::Hello {
                version: VERSION,
                node: "ringmq-0".into(),
                addr: "ringmq-0.ringmq-nodes:7946".into(),
                nonce: [7; 16],
            },
            Frame::Auth { mac: [9; 32] },
            Frame::Heartbeat { leaving: true },
            Frame::Members {
                addrs: vec!["a:1".into(), "b:2".into()],
            },
            Frame::Settled {
                members: vec!["n0".into(), "n1".into()],
            },
            Frame::Revoked {
                id: "tok-1".into(),
                exp_ms: 1_795_353_358_454,
            },
            Frame::Routes {
                filters: vec!["a/#".into(), "$share/g/b/+".into()],
            },
            Frame::RouteAdd { filter: "x".into() },
            Frame::RouteDel { filter: "x".into() },
            Frame::Publish {
                n: 0,
                msg: msg(),
                groups: vec!["$share/g/a/+".into()],
            },
            Frame::Direct {
                n: 17,
                client_id: "c1".into(),
                persistent: true,
                msg: WireMessage {
                    expiry_ms: None,
                    ..msg()
                },
            },
            Frame::Retain { msg: msg() },
            Frame::Proxy {
                client_ip: "::1".into(),
            },
            Frame::Load {
                connections: 1,
                subscriptions: 2,
                pub_tps: 3,
                sub_tps: u64::MAX,
                under_replicated: 4,
            },
            Frame::Query {
                id: 9,
                body: "{\"q\":\"node\"}".into(),
            },
            Frame::Reply {
                id: 9,
                body: String::new(),
            },
            Frame::Replicate {
                n: 1,
                client: "GID_test@@@d".into(),
                change: ChangeKind::Queue,
                seq: 42,
                value: Bytes::from_static(b"\x01stored"),
            },
            Frame::Replicate {
                n: u64::MAX,
                client: "c".into(),
                change: ChangeKind::Forget,
                seq: 0,
                value: Bytes::new(),
            },
            Frame::Stream { run: 7, link: 8 },
            Frame::Ack {
                run: 7,
                n: 3,
                failed: true,
                forward: true,
            },
            Frame::Ack {
                run: 7,
                n: 9,
                failed: false,
                forward: false,
            },
            Frame::ReplicaSynced { link: 8 },
            Frame::SessionGone {
                client: "GID_test@@@gone".into(),
                epoch: 3,
                ttl_ms: 7_200_000,
            },
            Frame::Session {
                n: 12,
                session: WireSession {
                    client_id: "GID_test@@@d".into(),
                    expiry_ms: 7_200_000,
                    ordered: true,
                    subscriptions: vec![WireSub {
                        filter: "$share/g/a/#".into(),
                        qos: QoS::AtLeastOnce,
                        no_local: true,
                        retain_as_published: false,
                        id: 7,
                    }],
                    resend: vec![WireDelivery {
                        msg: msg(),
                        qos: QoS::AtLeastOnce,
                        retain: false,
                        dup: true,
                        sub_ids: vec![7, 9],
                        packet_id: 65_535,
                    }],
                    offline: Vec::new(),
                    since: Vec::new(),
                    qos2_ids: vec![1, 2],
                    released: vec![3],
                    will: Some((msg(), 1_800_000_000_000)),
                    epoch: u64::MAX,
                    from_copy: true,
                    copy: Some(0x5eed),
                },
            },
        ]
    }

    #[test]
    fn every_frame_round_trips_even_byte_by_byte() {
        let mut wire = BytesMut::new();
        for f in all() {
            f.encode(&mut wire);
        }
        // Fed one byte at a time, the decoder waits, then yields each frame.
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in wire.iter() {
            buf.put_u8(*b);
            while let Ok(Some(f)) = Frame::decode(&mut buf) {
                got.push(f);
            }
        }
        assert_eq!(got, all());
        assert!(buf.is_empty());
    }

    #[test]
    fn malformed_frames_are_errors() {
        let mut b = BytesMut::from(&[0xff, 0xff, 0xff, 0xff][..]);
        assert!(matches!(Frame::decode(&mut b), Err(WireError::TooLarge(_))));
        let mut b = BytesMut::from(&[0, 0, 0, 1, 99][..]);
        assert_eq!(Frame::decode(&mut b), Err(WireError::Kind(99)));
        let mut b = BytesMut::from(&[0, 0, 0, 2, HEARTBEAT][..]);
        assert_eq!(Frame::decode(&mut b), Ok(None));
        let mut b = BytesMut::from(&[0, 0, 0, 3, HEARTBEAT, 0, 0][..]);
        assert_eq!(Frame::decode(&mut b), Err(WireError::Trailing(1)));
        let mut b = BytesMut::from(&[0, 0, 0, 5, ROUTE_ADD, 0, 2, 0xff, 0xfe][..]);
        assert_eq!(Frame::decode(&mut b), Err(WireError::Utf8));
        // A replica change of a kind this build does not know.
        let mut out = BytesMut::new();
        Frame::Replicate {
            n: 1,
            client: "c".into(),
            change: ChangeKind::Forget,
            seq: 0,
            value: Bytes::new(),
        }
        .encode(&mut out);
        // kind:u8 n:u64 then client "c" (2 + 1 bytes): the change follows.
        out[4 + 1 + 8 + 3] = 9;
        assert_eq!(Frame::decode(&mut out), Err(WireError::Change(9)));
    }
}
