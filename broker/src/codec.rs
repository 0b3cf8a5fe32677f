//! Writers shared by the project's binary formats: the inter-node frames
//! (`cluster::wire`) and the store's records (`persist::record`). Both
//! spell a string `len:u16be utf8` and bytes `len:u32be octets`; each has
//! its own reader, over what it decodes from.

use ntex::util::{BufMut, ByteString, BytesMut};

pub(crate) fn len16(n: usize) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

pub(crate) fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// An MQTT string (at most 65 535 bytes; longer ones cannot reach here, as
/// the MQTT decoder refuses them, and would be cut at a character boundary).
pub(crate) fn put_str(out: &mut BytesMut, s: &str) {
    let mut end = s.len().min(usize::from(u16::MAX));
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out.put_u16(len16(end));
    out.put_slice(&s.as_bytes()[..end]);
}

pub(crate) fn put_bytes(out: &mut BytesMut, b: &[u8]) {
    out.put_u32(len32(b.len()));
    out.put_slice(b);
}

pub(crate) fn put_opt_str(out: &mut BytesMut, s: Option<&ByteString>) {
    match s {
        Some(s) => {
            out.put_u8(1);
            put_str(out, s);
        }
        None => out.put_u8(0),
    }
}
