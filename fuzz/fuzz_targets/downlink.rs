//! The downlink header reader from arbitrary Kafka headers: a `Downlink` or
//! a named error, never a panic; an accepted record always names a topic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringmq_broker::kafka::record;

/// Splits the input into headers: a length byte, the key, a length byte,
/// the value (a length of 255 stands for a header without value).
fn headers(mut data: &[u8]) -> Vec<(&str, Option<&[u8]>)> {
    let mut out = Vec::new();
    while let (Some(Some(k)), Some(v)) = (take(&mut data), take(&mut data)) {
        match std::str::from_utf8(k) {
            Ok(k) => out.push((k, v)),
            Err(_) => out.push(("mqttTopic", v)),
        }
    }
    out
}

fn take<'a>(data: &mut &'a [u8]) -> Option<Option<&'a [u8]>> {
    let (&n, rest) = data.split_first()?;
    if n == 255 {
        *data = rest;
        return Some(None);
    }
    let n = usize::from(n).min(rest.len());
    let (v, rest) = rest.split_at(n);
    *data = rest;
    Some(Some(v))
}

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = record::downlink(headers(data)) {
        assert!(!d.topic.is_empty());
    }
});
