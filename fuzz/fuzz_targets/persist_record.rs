//! The node store's record decoders (`persist::record`), from arbitrary
//! bytes: a record or an error, never a panic; a decoded record encodes
//! back to one that decodes to the same thing.
#![no_main]

use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use ringmq_broker::durable::SessionRecord;
use ringmq_broker::persist::record;

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let now_ms = 1_800_000_000_000;
    let _ = record::parse_queue_key(data);
    if let Ok(s) = SessionRecord::decode(data, now, now_ms) {
        assert_eq!(SessionRecord::decode(&s.encode(now, now_ms), now, now_ms), Ok(s));
    }
    if let Ok(d) = record::decode_delivery(data, now, now_ms) {
        let again = record::decode_delivery(&record::encode_delivery(&d, now, now_ms), now, now_ms);
        let again = again.map(|a| (a.qos, a.retain, a.dup, a.sub_ids, a.msg.topic.clone(), a.msg.payload.clone()));
        assert_eq!(again, Ok((d.qos, d.retain, d.dup, d.sub_ids, d.msg.topic.clone(), d.msg.payload.clone())));
    }
    if let Ok(m) = record::decode_retained(data, now, now_ms) {
        let again = record::decode_retained(&record::encode_retained(&m, now, now_ms), now, now_ms);
        assert_eq!(again.map(|a| (a.id, a.topic, a.payload)), Ok((m.id, m.topic.clone(), m.payload.clone())));
    }
});
