//! The inter-node frame decoder and the CONNECT peek of the cluster gate,
//! from arbitrary bytes: frames or errors, never a panic; a decoded frame
//! encodes back to the bytes it came from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ntex::util::BytesMut;
use ringmq_broker::cluster::{gate, wire::Frame};

fuzz_target!(|data: &[u8]| {
    let _ = gate::peek_connect(data, 1 << 20);
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = Frame::decode(&mut buf) {
        let mut again = BytesMut::new();
        frame.encode(&mut again);
        assert_eq!(Frame::decode(&mut again), Ok(Some(frame)));
    }
});
