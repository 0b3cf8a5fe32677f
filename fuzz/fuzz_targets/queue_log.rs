//! The queue log's segment reader (`persist::qlog`), from arbitrary bytes:
//! records or where reading stopped, never a panic; every record read
//! encodes back to exactly the bytes it was read from, nothing is read
//! past a reported tear, and reading ends untorn only at the end or where
//! nothing but zeros (the space written ahead) follows.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringmq_broker::persist::qlog;

fuzz_target!(|data: &[u8]| {
    // Half the inputs get a valid header, so the fuzzer reaches the records.
    let mut seg = Vec::with_capacity(data.len() + 8);
    if data.first().is_some_and(|b| b & 1 == 0) {
        seg.extend_from_slice(qlog::MAGIC);
        seg.extend_from_slice(&data[1..]);
    } else {
        seg.extend_from_slice(data);
    }
    let (records, torn) = qlog::read_segment(&seg);
    let mut end = qlog::MAGIC.len().min(seg.len());
    for (at, entry) in &records {
        assert_eq!(*at, end);
        let mut again = Vec::new();
        qlog::encode(&mut again, entry);
        assert_eq!(&seg[*at..*at + again.len()], again.as_slice());
        end = at + again.len();
    }
    match torn {
        Some(t) => assert!(t.at == end || (t.at == 0 && records.is_empty())),
        None => assert!(seg[end..].iter().all(|&b| b == 0)),
    }
});
