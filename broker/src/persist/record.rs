//! The node store's keys and values: the project's own format, fuzzed
//! (`fuzz/fuzz_targets/persist_record.rs`).
//!
//! ```text
//! value    = version:u8 kind:u8 body check:u32be   check = xxh3 of the bytes before it (low 32 bits)
//! session  = expiry_ms:u64 disconnected_ms:u64 flags:u8 count:u32 sub*
//!            count:u16 qos2_id:u16* [will]                                 (kind 'S')
//! will     = 1:u8 due_ms:u64 message        (absent: no will waits; older records end before it)
//! sub      = filter:str flags:u8 id:u32
//! delivery = flags:u8 count:u16 sub_id:u32* message                         (kind 'D')
//! retained = message                                                        (kind 'R')
//! message  = id:u64 topic:str payload:bytes flags:u8 publisher:str ts_ms:u64
//!            [expires_at_ms:u64] count:u16 (str str)* opt_str opt_str opt_bytes
//! str      = len:u16be utf8        bytes = len:u32be octets
//! ```
//!
//! A session key is its Client ID; a queued message's key is the Client
//! ID with its length in front, then the session's sequence number (big
//! endian, so a prefix scan reads a session's messages in order); a
//! retained message's key is its topic. Times are wall-clock milliseconds,
//! so that an expiry keeps counting while the node is down. The check makes
//! a damaged value an error rather than a wrong session: recovery drops it
//! and counts it.

use std::num::{NonZeroU16, NonZeroU32};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ntex::util::{BufMut, ByteString, Bytes, BytesMut};

use crate::codec::{len16, len32, put_bytes, put_opt_str, put_str};
use crate::durable::{ArmedWill, Released, SessionRecord, StoredWill};
use crate::message::Delivery;
use crate::message::{Message, MessageId, Properties, QoS};
use crate::router::SubOptions;

const VERSION: u8 = 1;
const SESSION: u8 = b'S';
const DELIVERY: u8 = b'D';
const RETAINED: u8 = b'R';
/// Tags of a session record's optional trailing fields, in this order.
const TAG_WILL: u8 = 1;
const TAG_RELEASED: u8 = 2;
const TAG_REPLAYS: u8 = 3;
/// The queue numbers of the released messages, in the order of their ids
/// (`TAG_RELEASED`); a later field, so that earlier records still read.
const TAG_RELEASED_SEQS: u8 = 4;
/// The session's owner generation (`SessionRecord::epoch`).
const TAG_EPOCH: u8 = 5;
/// The will of the connection attached when the record was written.
const TAG_ARMED_WILL: u8 = 6;

/// Why stored bytes are not a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record truncated")]
    Truncated,
    #[error("record checksum does not match: damaged")]
    Checksum,
    #[error("record version {0} is not one this build reads")]
    Version(u8),
    #[error("record kind {0} where {1} was expected")]
    Kind(u8, u8),
    #[error("string is not UTF-8")]
    Utf8,
    #[error("bad QoS {0}")]
    Qos(u8),
    #[error("{0} bytes left after the record's fields")]
    Trailing(usize),
    #[error("key is not a queued message's key")]
    Key,
    #[error("unknown optional field {0}")]
    Tag(u8),
    #[error("delivery flags {0:#04x} are not ones this build writes")]
    Flags(u8),
}

pub type Result<T> = std::result::Result<T, RecordError>;

/// The key of message `seq` of `client`'s queue.
pub fn queue_key(client: &str, seq: u64) -> Vec<u8> {
    let mut k = queue_prefix(client);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// The prefix every queued message of `client` starts with.
pub fn queue_prefix(client: &str) -> Vec<u8> {
    let id = &client.as_bytes()[..client.len().min(usize::from(u16::MAX))];
    let mut k = Vec::with_capacity(id.len() + 10);
    k.extend_from_slice(&len16(id.len()).to_be_bytes());
    k.extend_from_slice(id);
    k
}

/// The Client ID and sequence number of a queued message's key.
pub fn parse_queue_key(key: &[u8]) -> Result<(String, u64)> {
    let (len, rest) = key.split_first_chunk::<2>().ok_or(RecordError::Key)?;
    let n = usize::from(u16::from_be_bytes(*len));
    if rest.len() != n + 8 {
        return Err(RecordError::Key);
    }
    let (id, seq) = rest.split_at(n);
    let id = std::str::from_utf8(id).map_err(|_| RecordError::Key)?;
    let seq = u64::from_be_bytes(seq.try_into().map_err(|_| RecordError::Key)?);
    Ok((id.to_owned(), seq))
}

impl SessionRecord {
    pub fn encode(&self, now: Instant, now_ms: u64) -> Bytes {
        let mut out = start(SESSION);
        out.put_u64(self.expiry_ms);
        out.put_u64(self.disconnected_ms);
        out.put_u8(u8::from(self.ordered));
        out.put_u32(len32(self.subscriptions.len()));
        for (filter, o) in &self.subscriptions {
            put_str(&mut out, filter);
            out.put_u8(
                (o.qos as u8)
                    | (u8::from(o.no_local) << 2)
                    | (u8::from(o.retain_as_published) << 3),
            );
            out.put_u32(o.id.map_or(0, NonZeroU32::get));
        }
        out.put_u16(len16(self.qos2_ids.len()));
        for id in &self.qos2_ids {
            out.put_u16(*id);
        }
        // Optional trailing fields, each behind its tag: records written
        // before a field existed still read.
        if let Some(w) = &self.will {
            out.put_u8(TAG_WILL);
            out.put_u64(w.due_ms);
            put_msg(&mut out, &w.msg, now, now_ms);
        }
        if !self.released.is_empty() {
            out.put_u8(TAG_RELEASED);
            out.put_u16(len16(self.released.len()));
            for r in &self.released {
                out.put_u16(r.id);
            }
        }
        if !self.replays.is_empty() {
            out.put_u8(TAG_REPLAYS);
            out.put_u16(len16(self.replays.len()));
            for (filter, after) in &self.replays {
                put_str(&mut out, filter);
                match after {
                    Some(a) => {
                        out.put_u8(1);
                        put_str(&mut out, a);
                    }
                    None => out.put_u8(0),
                }
            }
        }
        if self.released.iter().any(|r| r.seq != 0) {
            out.put_u8(TAG_RELEASED_SEQS);
            for r in &self.released {
                out.put_u64(r.seq);
            }
        }
        if self.epoch != 0 {
            out.put_u8(TAG_EPOCH);
            out.put_u64(self.epoch);
        }
        if let Some(w) = &self.armed_will {
            out.put_u8(TAG_ARMED_WILL);
            out.put_u64(w.delay_ms);
            put_msg(&mut out, &w.msg, now, now_ms);
        }
        finish(out)
    }

    pub fn decode(value: &[u8], now: Instant, now_ms: u64) -> Result<Self> {
        let mut b = open(value, SESSION)?;
        let expiry_ms = b.u64()?;
        let disconnected_ms = b.u64()?;
        let ordered = b.u8()? & 1 != 0;
        let n = b.u32()? as usize;
        let mut subscriptions = Vec::with_capacity(n.min(64));
        for _ in 0..n {
            let filter = b.str()?.to_string();
            let flags = b.u8()?;
            let opts = SubOptions {
                qos: qos_of(flags & 0b11)?,
                no_local: flags & (1 << 2) != 0,
                retain_as_published: flags & (1 << 3) != 0,
                id: NonZeroU32::new(b.u32()?),
            };
            subscriptions.push((filter, opts));
        }
        let n = usize::from(b.u16()?);
        let mut qos2_ids = Vec::with_capacity(n.min(64));
        for _ in 0..n {
            qos2_ids.push(b.u16()?);
        }
        let (mut will, mut released, mut replays) = (None, Vec::new(), Vec::new());
        let mut epoch = 0;
        let mut armed_will = None;
        let mut last = 0;
        while !b.is_empty() {
            let tag = b.u8()?;
            // In order, each at most once: one encoding per record.
            if tag <= last {
                return Err(RecordError::Tag(tag));
            }
            last = tag;
            match tag {
                TAG_WILL => {
                    let due_ms = b.u64()?;
                    let msg = Arc::new(get_msg(&mut b, now, now_ms)?);
                    will = Some(StoredWill { due_ms, msg });
                }
                TAG_RELEASED => {
                    let n = usize::from(b.u16()?);
                    if n == 0 {
                        return Err(RecordError::Tag(tag));
                    }
                    for _ in 0..n {
                        released.push(Released {
                            id: b.u16()?,
                            seq: 0,
                        });
                    }
                }
                TAG_REPLAYS => {
                    let n = usize::from(b.u16()?);
                    if n == 0 {
                        return Err(RecordError::Tag(tag));
                    }
                    for _ in 0..n {
                        let filter = b.str()?.to_string();
                        let after = b.opt_str()?.map(|s| s.to_string());
                        replays.push((filter, after));
                    }
                }
                TAG_RELEASED_SEQS => {
                    // As many as the ids before them, which cannot be none.
                    if released.is_empty() {
                        return Err(RecordError::Tag(tag));
                    }
                    for r in &mut released {
                        r.seq = b.u64()?;
                    }
                }
                TAG_EPOCH => epoch = b.u64()?,
                TAG_ARMED_WILL => {
                    let delay_ms = b.u64()?;
                    let msg = Arc::new(get_msg(&mut b, now, now_ms)?);
                    armed_will = Some(ArmedWill { delay_ms, msg });
                }
                t => return Err(RecordError::Tag(t)),
            }
        }
        b.end()?;
        Ok(Self {
            expiry_ms,
            disconnected_ms,
            ordered,
            qos2_ids,
            subscriptions,
            will,
            released,
            replays,
            epoch,
            armed_will,
        })
    }
}

/// A message waiting for a persistent session.
pub fn encode_delivery(d: &Delivery, now: Instant, now_ms: u64) -> Bytes {
    let mut out = start(DELIVERY);
    out.put_u8(
        (d.qos as u8)
            | (u8::from(d.retain) << 2)
            | (u8::from(d.dup) << 3)
            | (u8::from(d.sent_as.is_some()) << 4),
    );
    if let Some(id) = d.sent_as {
        out.put_u16(id.get());
    }
    out.put_u16(len16(d.sub_ids.len()));
    for id in &d.sub_ids {
        out.put_u32(id.get());
    }
    put_msg(&mut out, &d.msg, now, now_ms);
    finish(out)
}

/// A stored delivery, its message received `now_ms - ts_ms` ago.
pub fn decode_delivery(value: &[u8], now: Instant, now_ms: u64) -> Result<Delivery> {
    let mut b = open(value, DELIVERY)?;
    let flags = b.u8()?;
    if flags >> 5 != 0 {
        return Err(RecordError::Flags(flags));
    }
    let sent_as = if flags & (1 << 4) != 0 {
        Some(NonZeroU16::new(b.u16()?).ok_or(RecordError::Flags(flags))?)
    } else {
        None
    };
    let n = usize::from(b.u16()?);
    let mut sub_ids = Vec::with_capacity(n.min(8));
    for _ in 0..n {
        sub_ids.extend(NonZeroU32::new(b.u32()?));
    }
    let msg = get_msg(&mut b, now, now_ms)?;
    b.end()?;
    Ok(Delivery {
        msg: Arc::new(msg),
        qos: qos_of(flags & 0b11)?,
        retain: flags & (1 << 2) != 0,
        dup: flags & (1 << 3) != 0,
        sub_ids,
        seq: 0,
        sent_as,
        stored: None,
    })
}

pub fn encode_retained(msg: &Message, now: Instant, now_ms: u64) -> Bytes {
    let mut out = start(RETAINED);
    put_msg(&mut out, msg, now, now_ms);
    finish(out)
}

pub fn decode_retained(value: &[u8], now: Instant, now_ms: u64) -> Result<Message> {
    let mut b = open(value, RETAINED)?;
    let msg = get_msg(&mut b, now, now_ms)?;
    b.end()?;
    Ok(msg)
}

fn start(kind: u8) -> BytesMut {
    let mut out = BytesMut::with_capacity(128);
    out.put_u8(VERSION);
    out.put_u8(kind);
    out
}

fn finish(mut out: BytesMut) -> Bytes {
    let check = checksum(&out);
    out.put_u32(check);
    out.freeze()
}

fn checksum(b: &[u8]) -> u32 {
    // The low half of the hash: truncation is the point.
    (xxhash_rust::xxh3::xxh3_64(b) & u64::from(u32::MAX)) as u32
}

/// Checks the envelope and returns a reader over the body.
fn open(value: &[u8], kind: u8) -> Result<Reader<'_>> {
    let Some((body, check)) = value.split_last_chunk::<4>() else {
        return Err(RecordError::Truncated);
    };
    if body.len() < 2 {
        return Err(RecordError::Truncated);
    }
    if checksum(body) != u32::from_be_bytes(*check) {
        return Err(RecordError::Checksum);
    }
    if body[0] != VERSION {
        return Err(RecordError::Version(body[0]));
    }
    if body[1] != kind {
        return Err(RecordError::Kind(body[1], kind));
    }
    Ok(Reader(&body[2..]))
}

fn put_msg(out: &mut BytesMut, m: &Message, now: Instant, now_ms: u64) {
    out.put_u64(m.id.0);
    put_str(out, &m.topic);
    put_bytes(out, &m.payload);
    let p = &m.properties;
    out.put_u8(
        (m.qos as u8)
            | (u8::from(m.retain) << 2)
            | (u8::from(p.utf8_payload) << 3)
            | (u8::from(m.expiry.is_some()) << 4),
    );
    put_str(out, &m.publisher);
    out.put_u64(m.ts_ms);
    if let Some(e) = m.expiry {
        let left = e.saturating_sub(now.saturating_duration_since(m.received));
        let left = u64::try_from(left.as_millis()).unwrap_or(u64::MAX);
        out.put_u64(now_ms.saturating_add(left));
    }
    out.put_u16(len16(p.user.len()));
    for (k, v) in &p.user {
        put_str(out, k);
        put_str(out, v);
    }
    put_opt_str(out, p.content_type.as_ref());
    put_opt_str(out, p.response_topic.as_ref());
    match &p.correlation_data {
        Some(c) => {
            out.put_u8(1);
            put_bytes(out, c);
        }
        None => out.put_u8(0),
    }
}

fn get_msg(b: &mut Reader<'_>, now: Instant, now_ms: u64) -> Result<Message> {
    let id = b.u64()?;
    let topic = b.str()?;
    let payload = Bytes::copy_from_slice(b.bytes()?);
    let flags = b.u8()?;
    let qos = qos_of(flags & 0b11)?;
    let publisher: Arc<str> = Arc::from(&*b.str()?);
    let ts_ms = b.u64()?;
    let expires_at = if flags & (1 << 4) != 0 {
        Some(b.u64()?)
    } else {
        None
    };
    let n = usize::from(b.u16()?);
    let mut user = Vec::with_capacity(n.min(16));
    for _ in 0..n {
        user.push((b.str()?, b.str()?));
    }
    let content_type = b.opt_str()?;
    let response_topic = b.opt_str()?;
    let correlation_data = match b.u8()? {
        0 => None,
        _ => Some(Bytes::copy_from_slice(b.bytes()?)),
    };
    let mut msg = Message::new(
        MessageId(id),
        topic,
        payload,
        qos,
        flags & (1 << 2) != 0,
        publisher,
    );
    msg.ts_ms = ts_ms;
    // Its age counts from when it was received, also across the restart:
    // the offline TTL and `max_age` see the time the node was down.
    let age = Duration::from_millis(now_ms.saturating_sub(ts_ms));
    msg.received = now.checked_sub(age).unwrap_or(now);
    msg.expiry = expires_at.map(|at| {
        let left = Duration::from_millis(at.saturating_sub(now_ms));
        now.saturating_duration_since(msg.received) + left
    });
    msg.set_properties(Properties {
        user,
        content_type,
        response_topic,
        correlation_data,
        utf8_payload: flags & (1 << 3) != 0,
    });
    Ok(msg)
}

fn qos_of(q: u8) -> Result<QoS> {
    match q {
        0 => Ok(QoS::AtMostOnce),
        1 => Ok(QoS::AtLeastOnce),
        2 => Ok(QoS::ExactlyOnce),
        q => Err(RecordError::Qos(q)),
    }
}

/// Reads a body front to back; every read checks the length first.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(RecordError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16> {
        let t = self.take(2)?;
        Ok(u16::from_be_bytes([t[0], t[1]]))
    }

    fn u32(&mut self) -> Result<u32> {
        let t = self.take(4)?;
        Ok(u32::from_be_bytes([t[0], t[1], t[2], t[3]]))
    }

    fn u64(&mut self) -> Result<u64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(a))
    }

    fn str(&mut self) -> Result<ByteString> {
        let n = usize::from(self.u16()?);
        let s = std::str::from_utf8(self.take(n)?).map_err(|_| RecordError::Utf8)?;
        Ok(ByteString::from(s))
    }

    fn opt_str(&mut self) -> Result<Option<ByteString>> {
        Ok(match self.u8()? {
            0 => None,
            _ => Some(self.str()?),
        })
    }

    fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn end(&self) -> Result<()> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(RecordError::Trailing(self.0.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(now: Instant) -> Message {
        let mut m = Message::new(
            MessageId(0x0123_4567_89ab_cdef),
            "a/b".into(),
            Bytes::from_static(b"\x00\xffpayload"),
            QoS::ExactlyOnce,
            true,
            Arc::from("GID_x@@@d"),
        );
        m.received = now;
        m.expiry = Some(Duration::from_secs(60));
        m.set_properties(Properties {
            user: vec![("k".into(), "v".into())],
            content_type: Some("text/plain".into()),
            response_topic: Some("r/t".into()),
            correlation_data: Some(Bytes::from_static(b"cd")),
            utf8_payload: true,
        });
        m
    }

    #[test]
    fn records_round_trip_and_keep_counting_expiry_across_a_restart() {
        let now = Instant::now();
        let now_ms = 1_800_000_000_000;
        let msg = Arc::new(message(now));
        let d = Delivery {
            retain: true,
            dup: true,
            sub_ids: vec![NonZeroU32::MIN, NonZeroU32::MAX],
            sent_as: NonZeroU16::new(7),
            ..Delivery::new(msg.clone(), QoS::AtLeastOnce)
        };
        let bytes = encode_delivery(&d, now, now_ms);
        // Read back 10 s later: 50 s of the minute are left.
        let later = now + Duration::from_secs(10);
        let back = decode_delivery(&bytes, later, now_ms + 10_000).map_err(|e| e.to_string());
        let back = back.as_ref().map(|b| {
            (
                b.qos,
                b.retain,
                b.dup,
                b.sent_as,
                b.sub_ids.clone(),
                b.msg.topic.clone(),
                b.msg.payload.clone(),
                b.msg.properties.clone(),
                b.msg.remaining_expiry_secs(later),
            )
        });
        assert_eq!(
            back,
            Ok((
                QoS::AtLeastOnce,
                true,
                true,
                NonZeroU16::new(7),
                d.sub_ids.clone(),
                msg.topic.clone(),
                msg.payload.clone(),
                msg.properties.clone(),
                Some(50),
            ))
        );
        let r = decode_retained(&encode_retained(&msg, now, now_ms), now, now_ms);
        assert_eq!(r.map(|m| m.id), Ok(msg.id));
        let s = SessionRecord {
            expiry_ms: 7_200_000,
            disconnected_ms: now_ms,
            ordered: true,
            qos2_ids: vec![1, 65_535],
            subscriptions: vec![("a/#".into(), SubOptions::at(QoS::ExactlyOnce))],
            will: Some(StoredWill {
                due_ms: now_ms + 30_000,
                msg: msg.clone(),
            }),
            released: vec![Released { id: 9, seq: 40 }, Released { id: 3, seq: 0 }],
            epoch: 12,
            armed_will: Some(ArmedWill {
                delay_ms: 5_000,
                msg: msg.clone(),
            }),
            replays: vec![("r/#".into(), Some("r/5".into())), ("q/+".into(), None)],
        };
        let back = SessionRecord::decode(&s.encode(now, now_ms), later, now_ms + 10_000);
        assert_eq!(back.as_ref(), Ok(&s));
        // The will's own expiry kept counting too.
        let will = back.ok().and_then(|b| b.will);
        assert_eq!(
            will.and_then(|w| w.msg.remaining_expiry_secs(later)),
            Some(50)
        );
        // Each trailing field may be missing (records of earlier builds).
        let no_will = SessionRecord { will: None, ..s };
        assert_eq!(
            SessionRecord::decode(&no_will.encode(now, now_ms), now, now_ms).as_ref(),
            Ok(&no_will)
        );
        let plain = SessionRecord {
            released: Vec::new(),
            replays: Vec::new(),
            epoch: 0,
            armed_will: None,
            ..no_will
        };
        assert_eq!(
            SessionRecord::decode(&plain.encode(now, now_ms), now, now_ms).as_ref(),
            Ok(&plain)
        );
        // Out of order or twice: not an encoding of ours.
        let mut twice = plain.encode(now, now_ms).to_vec();
        let _ = twice.split_off(twice.len() - 4);
        twice.extend_from_slice(&[TAG_RELEASED, 0, 1, 0, 5, TAG_RELEASED, 0, 1, 0, 6]);
        assert!(SessionRecord::decode(&finish(BytesMut::from(&twice[..])), now, now_ms).is_err());
    }

    #[test]
    fn every_truncation_and_every_flipped_bit_is_an_error() {
        let now = Instant::now();
        let bytes = encode_retained(&message(now), now, 1);
        for n in 0..bytes.len() {
            assert!(decode_retained(&bytes[..n], now, 1).is_err(), "cut at {n}");
        }
        for i in 0..bytes.len() * 8 {
            let mut v = bytes.to_vec();
            v[i / 8] ^= 1 << (i % 8);
            assert!(decode_retained(&v, now, 1).is_err(), "bit {i}");
        }
        assert_eq!(
            SessionRecord::decode(&bytes, now, 1).err(),
            Some(RecordError::Kind(RETAINED, SESSION))
        );
    }

    #[test]
    fn queue_keys_sort_by_sequence_within_a_client() {
        let a = queue_key("c", 2);
        let b = queue_key("c", 256);
        assert!(a < b && a.starts_with(&queue_prefix("c")));
        assert!(!queue_key("cd", 1).starts_with(&queue_prefix("c")));
        assert_eq!(parse_queue_key(&b), Ok(("c".to_owned(), 256)));
        assert_eq!(parse_queue_key(&b[..b.len() - 1]), Err(RecordError::Key));
    }
}
