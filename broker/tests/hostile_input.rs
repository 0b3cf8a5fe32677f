//! Malformed and hostile input over raw sockets: the broker answers with a
//! reason code or closes that one connection, counts it, and keeps serving
//! everyone else.

mod common;

use std::io::Write;
use std::time::Duration;

use common::Broker;
use common::raw::{Raw, connect, packet, publish_qos1, string, subscribe};
use common::v4::{self, QoS};

/// A real client still gets service.
async fn still_serving(b: &Broker) {
    let mut c = v4::connect(v4::options("healthy", b.tcp)).await;
    c.subscribe("ok/#", QoS::AtLeastOnce).await;
    c.publish("ok/1", QoS::AtLeastOnce, false, "fine").await;
    assert_eq!(&c.next_publish().await.payload[..], b"fine");
    c.disconnect().await;
}

#[tokio::test]
async fn garbage_and_truncated_packets_close_only_that_connection() {
    let mut b = Broker::start("");
    let mut bystander = v4::connect(v4::options("bystander", b.tcp)).await;
    bystander.subscribe("by/#", QoS::AtLeastOnce).await;

    for bytes in [
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        vec![0xff; 64],
        vec![0x10, 0xff, 0xff, 0xff, 0xff, 0x7f], // remaining length over 4 bytes
        connect(4, "trunc")[..9].to_vec(),        // truncated, then closed
        packet(0x10, &[0, 4, b'M', b'Q', b'T', b'T', 9, 2, 0, 60]), // unknown level
    ] {
        let mut r = Raw::open(&b);
        r.send(&bytes);
        let _ = r.0.shutdown(std::net::Shutdown::Write);
        r.until_closed();
    }
    assert!(b.alive());
    let publisher = v4::connect(v4::options("publisher", b.tcp)).await;
    publisher
        .publish("by/x", QoS::AtLeastOnce, false, "after")
        .await;
    assert_eq!(&bystander.next_publish().await.payload[..], b"after");
}

#[tokio::test]
async fn oversized_remaining_length_after_connect_is_refused() {
    let mut b = Broker::start("");
    let mut r = Raw::connected(&b, 5, "big");
    // A PUBLISH announcing 200 KiB, above the 128 KiB limit.
    r.send(&publish_qos1(5, b"big/x", &vec![0u8; 200 * 1024]));
    let packets = r.until_closed();
    let disconnect = packets.iter().find(|(k, _)| *k == 0xe0);
    assert_eq!(
        disconnect.and_then(|(_, body)| body.first().copied()),
        Some(0x95),
        "DISCONNECT with Packet Too Large: {packets:?}"
    );
    assert!(b.alive());
    still_serving(&b).await;
}

#[tokio::test]
async fn invalid_utf8_topic_closes_the_connection() {
    let mut b = Broker::start("");
    let mut r = Raw::connected(&b, 4, "utf8");
    r.send(&publish_qos1(4, &[b'a', 0xff, 0xfe], b"x"));
    let packets = r.until_closed();
    assert!(
        packets.iter().all(|(k, _)| *k != 0x40),
        "no PUBACK for it: {packets:?}"
    );
    assert!(b.alive());
    still_serving(&b).await;
}

#[tokio::test]
async fn invalid_filters_get_failure_codes() {
    let b = Broker::start("");
    // 3.1.1: a malformed filter is a malformed packet; the connection closes
    // (MQTT-4.8.0-1) without any SUBACK granting it.
    let mut r = Raw::connected(&b, 4, "f3");
    r.send(&subscribe(4, b"a/#/b"));
    let packets = r.until_closed();
    assert!(
        packets.iter().all(|(_, body)| body.last() != Some(&1)),
        "{packets:?}"
    );

    // 5: the same malformed packet ends with a DISCONNECT carrying an error reason.
    let mut r = Raw::connected(&b, 5, "f5");
    r.send(&subscribe(5, b"a/b+"));
    let (kind, body) = r.read().unwrap_or_else(|| panic!("no DISCONNECT"));
    assert_eq!(kind, 0xe0);
    assert!(body.first().is_some_and(|&code| code >= 0x80), "{body:?}");
    assert!(b.metric("ringmq_packets_rejected_total{reason=\"protocol_error\"}") >= 1.0);
}

#[tokio::test]
async fn strict_names_refuse_well_formed_but_unwanted_filters() {
    let b = Broker::start("client_id:\n  strict_names: true\n");
    let mut r = Raw::connected(&b, 5, "strict");
    r.send(&subscribe(5, b"a b/c"));
    let (kind, body) = r.read().unwrap_or_else(|| panic!("no SUBACK"));
    assert_eq!(
        (kind, body.last().copied()),
        (0x90, Some(0x8f)),
        "Topic Filter Invalid"
    );
    assert!(b.metric("ringmq_packets_rejected_total{reason=\"subscribe_refused\"}") >= 1.0);
}

#[tokio::test]
async fn a_flood_of_connections_leaves_the_broker_serving() {
    let mut b = Broker::start("");
    let mut socks = Vec::new();
    for i in 0..300 {
        let mut s = Raw::open(&b);
        if i % 2 == 0 {
            s.send(&connect(4, &format!("flood-{i}")));
        }
        socks.push(s);
    }
    still_serving(&b).await;
    drop(socks);
    assert!(b.alive());
    // Every connection is accounted for once the sockets are gone.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while b.metric("ringmq_connections") > 0.0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(b.metric("ringmq_connections"), 0.0);
}

#[tokio::test]
async fn silent_client_is_closed_after_one_and_a_half_keep_alives() {
    let b = Broker::start("");
    let mut r = Raw::open(&b);
    let mut body = string(b"MQTT");
    body.extend_from_slice(&[4, 0x02, 0, 1]); // keep-alive 1 s
    body.extend(string(b"silent"));
    r.send(&packet(0x10, &body));
    assert_eq!(r.read().map(|(k, _)| k), Some(0x20));
    let start = std::time::Instant::now();
    // No PINGREQ: the broker closes the connection ("no heart").
    r.until_closed();
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "closed too early: {waited:?}"
    );
    assert!(b.metric("ringmq_packets_rejected_total{reason=\"no_heart\"}") >= 1.0);
}

#[tokio::test]
async fn exceeding_receive_maximum_gets_its_reason_code() {
    let b = Broker::start("limits:\n  receive_maximum: 8\n");
    let mut r = Raw::connected(&b, 5, "flood-qos2");
    // Nine QoS 2 publishes without PUBREL: one more than the receive maximum.
    let mut burst = Vec::new();
    for id in 1..=9u16 {
        let mut body = string(b"rm/x");
        body.extend_from_slice(&id.to_be_bytes());
        body.push(0);
        body.extend_from_slice(b"p");
        burst.extend(packet(0x34, &body));
    }
    r.send(&burst);
    // Like a real client (Paho's flow-control test), answer each PUBREC with
    // PUBREL before reading on; those writes must not fail with a broken pipe
    // before the client could read why it is being disconnected.
    let mut packets = Vec::new();
    let mut failed_writes = 0;
    while let Some((kind, body)) = r.read() {
        if kind == 0x50 {
            if r.0.write_all(&packet(0x62, &body[..2])).is_err() {
                failed_writes += 1;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        packets.push((kind, body));
    }
    assert_eq!(
        failed_writes, 0,
        "the broker closed before the client read its DISCONNECT"
    );
    let disconnect = packets.iter().find(|(k, _)| *k == 0xe0);
    assert_eq!(
        disconnect.and_then(|(_, body)| body.first().copied()),
        Some(0x93),
        "DISCONNECT Receive Maximum exceeded: {packets:?}"
    );
}

/// QoS 0 PUBLISH to `topic` carrying `seq` (8 bytes) and padding.
fn publish_qos0(level: u8, topic: &[u8], seq: u64) -> Vec<u8> {
    let mut body = string(topic);
    if level == 5 {
        body.push(0);
    }
    body.extend_from_slice(&seq.to_be_bytes());
    body.extend_from_slice(&[b'x'; 56]);
    packet(0x30, &body)
}

#[tokio::test]
async fn publishes_split_across_reads_keep_their_order() {
    // A fast client's packets straddle the broker's read buffers: a PUBLISH
    // whose payload is still arriving must not be overtaken by the next one.
    let b = Broker::start("limits:\n  max_queued_messages: 100000\n");
    const N: u64 = 50_000;
    for level in [4u8, 5] {
        let filter = format!("order{level}/#");
        let mut sub = Raw::connected(&b, level, &format!("order-sub-{level}"));
        sub.send(&subscribe(level, filter.as_bytes()));
        let (kind, _) = sub.read().unwrap_or_else(|| panic!("no SUBACK"));
        assert_eq!(kind, 0x90);
        let reader = std::thread::spawn(move || {
            let mut seqs = Vec::new();
            while (seqs.len() as u64) < N {
                let Some((kind, body)) = sub.read() else {
                    break;
                };
                if kind & 0xf0 != 0x30 {
                    continue;
                }
                let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
                let mut at = 2 + topic_len;
                if level == 5 {
                    at += 1 + usize::from(body[at]);
                }
                let mut seq = [0u8; 8];
                seq.copy_from_slice(&body[at..at + 8]);
                seqs.push(u64::from_be_bytes(seq));
            }
            seqs
        });
        let mut publisher = Raw::connected(&b, level, &format!("order-pub-{level}"));
        let topic = format!("order{level}/stream");
        let burst: Vec<u8> = (0..N)
            .flat_map(|seq| publish_qos0(level, topic.as_bytes(), seq))
            .collect();
        publisher.send(&burst);
        let seqs = reader.join().unwrap_or_else(|_| panic!("reader"));
        assert_eq!(seqs.len() as u64, N, "MQTT level {level}: every message");
        let overtaken: Vec<(u64, u64)> = seqs
            .windows(2)
            .filter(|w| w[1] <= w[0])
            .map(|w| (w[0], w[1]))
            .take(5)
            .collect();
        assert!(
            overtaken.is_empty(),
            "MQTT level {level}: out of order: {overtaken:?}"
        );
    }
}

#[tokio::test]
async fn retained_messages_do_not_keep_their_read_pages() {
    // Each retained message arrives between 60 KB of other traffic. Kept as
    // a slice of the buffer it was read into, it would keep that whole page
    // (up to 64 KiB) alive as long as it stays retained.
    let b = Broker::start("");
    const ROUNDS: usize = 1000;
    let mut filler_body = string(b"pages/filler");
    filler_body.extend_from_slice(&[b'f'; 1000]);
    let filler: Vec<u8> = (0..60).flat_map(|_| packet(0x30, &filler_body)).collect();
    let mut publisher = Raw::connected(&b, 4, "pages");
    publisher
        .0
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap_or_else(|e| panic!("{e}"));
    let before = b.rss_kib();
    for i in 0..ROUNDS {
        let mut body = string(format!("pages/retained/{i}").as_bytes());
        body.extend_from_slice(&[b'r'; 200]);
        publisher.send(&packet(0x31, &body));
        publisher.send(&filler);
    }
    // PINGREQ: answered once everything sent before it has been read.
    publisher.send(&[0xc0, 0]);
    let (kind, _) = publisher.read().unwrap_or_else(|| panic!("no PINGRESP"));
    assert_eq!(kind, 0xd0);
    assert_eq!(b.metric("ringmq_retained_messages"), ROUNDS as f64);
    let grown = b.rss_kib().saturating_sub(before);
    // About 1.6 KiB each when copied out; about 140 KiB each when not.
    assert!(
        grown < 30 * 1024,
        "{grown} KiB more resident memory for {ROUNDS} retained messages"
    );
}
