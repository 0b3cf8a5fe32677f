//! The benchmark payload: publisher id, sequence number and send time in the
//! first 24 bytes, then padding up to the configured size.

use std::time::Instant;

/// Bytes the header takes; payloads are at least this long.
pub const HEADER: usize = 24;

/// What a received payload says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub publisher: u64,
    pub seq: u64,
    /// Nanoseconds since the run's start when it was sent.
    pub sent_ns: u64,
}

/// Builds a payload of `size` bytes (at least `HEADER`).
pub fn encode(stamp: Stamp, size: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(size.max(HEADER));
    p.extend_from_slice(&stamp.publisher.to_be_bytes());
    p.extend_from_slice(&stamp.seq.to_be_bytes());
    p.extend_from_slice(&stamp.sent_ns.to_be_bytes());
    p.resize(size.max(HEADER), b'x');
    p
}

/// Reads the header of a payload; `None` for a payload not made by `encode`.
pub fn decode(p: &[u8]) -> Option<Stamp> {
    let word = |i: usize| -> Option<u64> {
        let bytes: [u8; 8] = p.get(i..i + 8)?.try_into().ok()?;
        Some(u64::from_be_bytes(bytes))
    };
    Some(Stamp {
        publisher: word(0)?,
        seq: word(8)?,
        sent_ns: word(16)?,
    })
}

/// Nanoseconds elapsed since `start`, saturating.
pub fn since(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let s = Stamp {
            publisher: 7,
            seq: 42,
            sent_ns: 123_456,
        };
        let p = encode(s, 64);
        assert_eq!(p.len(), 64);
        assert_eq!(decode(&p), Some(s));
        assert_eq!(decode(&p[..10]), None);
    }
}
