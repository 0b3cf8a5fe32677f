//! MQTT 3.1.1 behaviour over real sockets (SPEC B3–B10).

mod common;

use common::Broker;
use common::v4::{self, ConnectReturnCode, LastWill, QoS};

#[tokio::test]
async fn qos_levels_and_downgrade_to_subscription_maximum() {
    let b = Broker::start("");
    let mut sub = v4::connect(v4::options("sub", b.tcp)).await;
    assert_eq!(sub.subscribe("q/2", QoS::ExactlyOnce).await.len(), 1);
    sub.subscribe("q/1", QoS::AtLeastOnce).await;
    let publisher = v4::connect(v4::options("pub", b.tcp)).await;
    for (topic, qos) in [
        ("q/2", QoS::ExactlyOnce),
        ("q/2", QoS::AtLeastOnce),
        ("q/2", QoS::AtMostOnce),
    ] {
        publisher
            .publish(topic, qos, false, format!("{qos:?}"))
            .await;
        let p = sub.next_publish().await;
        assert_eq!(p.qos, qos, "delivered at the publisher's QoS");
        assert_eq!(p.payload, format!("{qos:?}").as_bytes());
    }
    // A QoS 2 publish to a QoS 1 subscription arrives at QoS 1.
    publisher
        .publish("q/1", QoS::ExactlyOnce, false, "down")
        .await;
    let p = sub.next_publish().await;
    assert_eq!((p.topic.as_str(), p.qos), ("q/1", QoS::AtLeastOnce));
    assert!(b.metric("ringmq_messages_received_total{qos=\"2\"}") >= 2.0);
}

#[tokio::test]
async fn wildcards_and_dollar_topics() {
    let b = Broker::start("");
    let mut all = v4::connect(v4::options("all", b.tcp)).await;
    all.subscribe("#", QoS::AtMostOnce).await;
    let mut plus = v4::connect(v4::options("plus", b.tcp)).await;
    plus.subscribe("a/+/c", QoS::AtMostOnce).await;
    let publisher = v4::connect(v4::options("pub", b.tcp)).await;
    publisher
        .publish("$SYS/private", QoS::AtMostOnce, false, "x")
        .await;
    publisher
        .publish("a/b/c", QoS::AtMostOnce, false, "y")
        .await;
    assert_eq!(
        all.next_publish().await.topic,
        "a/b/c",
        "# must not match $ topics"
    );
    assert_eq!(plus.next_publish().await.topic, "a/b/c");
    publisher
        .publish("a/b/c/d", QoS::AtMostOnce, false, "z")
        .await;
    assert_eq!(all.next_publish().await.topic, "a/b/c/d");
    plus.no_publish().await;
}

#[tokio::test]
async fn retained_message_is_replayed_and_cleared() {
    let b = Broker::start("");
    let mut publisher = v4::connect(v4::options("pub", b.tcp)).await;
    publisher
        .publish("r/t", QoS::AtLeastOnce, true, "kept")
        .await;
    // Retained once acknowledged: a subscription before that may see it live.
    publisher.acked(1).await;
    let mut late = v4::connect(v4::options("late", b.tcp)).await;
    late.subscribe("r/#", QoS::AtLeastOnce).await;
    let p = late.next_publish().await;
    assert!(p.retain, "replayed retained messages carry the retain flag");
    assert_eq!(p.payload, "kept".as_bytes());
    // A live message is forwarded without the retain flag (MQTT-3.3.1-9).
    publisher
        .publish("r/t", QoS::AtLeastOnce, true, "live")
        .await;
    assert!(!late.next_publish().await.retain);
    publisher.publish("r/t", QoS::AtLeastOnce, true, "").await;
    late.next_publish().await;
    let mut later = v4::connect(v4::options("later", b.tcp)).await;
    later.subscribe("r/#", QoS::AtLeastOnce).await;
    later.no_publish().await;
}

#[tokio::test]
async fn persistent_session_keeps_subscriptions_and_offline_messages() {
    let b = Broker::start("");
    let mut opts = v4::options("dev1", b.tcp);
    opts.set_clean_session(false);
    let mut c = v4::connect(opts.clone()).await;
    assert!(!c.connack.session_present);
    c.subscribe("off/#", QoS::AtLeastOnce).await;
    c.disconnect().await;

    let publisher = v4::connect(v4::options("pub", b.tcp)).await;
    publisher
        .publish("off/0", QoS::AtMostOnce, false, "qos0 is not kept")
        .await;
    for i in 1..=12 {
        publisher
            .publish("off/1", QoS::AtLeastOnce, false, format!("m{i}"))
            .await;
    }
    publisher.disconnect().await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;

    let mut c = v4::connect(opts).await;
    assert!(c.connack.session_present);
    // At most 10 offline messages, the oldest dropped first (B5).
    for i in 3..=12 {
        let p = c.next_publish().await;
        assert_eq!(p.payload, format!("m{i}").as_bytes());
    }
    c.no_publish().await;
    assert_eq!(b.metric("ringmq_offline_messages_dropped_total"), 2.0);
}

#[tokio::test]
async fn clean_session_discards_state() {
    let b = Broker::start("");
    let mut opts = v4::options("dev2", b.tcp);
    opts.set_clean_session(false);
    let mut c = v4::connect(opts.clone()).await;
    c.subscribe("gone/#", QoS::AtLeastOnce).await;
    c.disconnect().await;
    opts.set_clean_session(true);
    let mut c = v4::connect(opts).await;
    assert!(!c.connack.session_present);
    let publisher = v4::connect(v4::options("pub", b.tcp)).await;
    publisher
        .publish("gone/x", QoS::AtLeastOnce, false, "x")
        .await;
    c.no_publish().await;
}

#[tokio::test]
async fn will_is_published_on_abrupt_close_only() {
    let b = Broker::start("");
    let mut watcher = v4::connect(v4::options("watcher", b.tcp)).await;
    watcher.subscribe("will/#", QoS::AtLeastOnce).await;

    let mut opts = v4::options("dying", b.tcp);
    opts.set_last_will(LastWill::new("will/dying", "gone", QoS::AtLeastOnce, false));
    let c = v4::connect(opts.clone()).await;
    c.kill();
    let p = watcher.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("will/dying", &b"gone"[..])
    );

    let c = v4::connect(opts).await;
    c.disconnect().await;
    watcher.no_publish().await;
}

#[tokio::test]
async fn duplicate_client_id_takes_over() {
    let b = Broker::start("");
    let mut first = v4::connect(v4::options("GID_dup@@@d1", b.tcp)).await;
    let mut second = v4::connect(v4::options("GID_dup@@@d1", b.tcp)).await;
    first.closed().await;
    second.subscribe("still/alive", QoS::AtMostOnce).await;
    assert_eq!(b.metric("ringmq_clientid_takeovers_total"), 1.0);
}

#[tokio::test]
async fn p2p_reaches_the_target_without_subscription() {
    let b = Broker::start("");
    let mut target = v4::connect(v4::options("GID_ptp@@@target", b.tcp)).await;
    let mut other = v4::connect(v4::options("GID_ptp@@@other", b.tcp)).await;
    other.subscribe("#", QoS::AtLeastOnce).await;
    let sender = v4::connect(v4::options("GID_ptp@@@sender", b.tcp)).await;
    sender
        .publish(
            "topic1/p2p/GID_ptp@@@target",
            QoS::AtLeastOnce,
            false,
            "direct",
        )
        .await;
    let p = target.next_publish().await;
    assert_eq!(p.payload, "direct".as_bytes());
    other.no_publish().await;
}

#[tokio::test]
async fn offline_pull_switches_off_automatic_push() {
    let b = Broker::start("limits:\n  offline_batch: 2\n  offline_batch_interval_secs: 60\n");
    let mut opts = v4::options("puller", b.tcp);
    opts.set_clean_session(false);
    let mut c = v4::connect(opts.clone()).await;
    c.subscribe("pull/#", QoS::AtLeastOnce).await;
    c.disconnect().await;
    let publisher = v4::connect(v4::options("pub", b.tcp)).await;
    for i in 1..=5 {
        publisher
            .publish("pull/x", QoS::AtLeastOnce, false, format!("m{i}"))
            .await;
    }
    publisher.disconnect().await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;

    let mut c = v4::connect(opts).await;
    // The first automatic batch arrives after CONNECT; the next one is a minute away.
    for i in 1..=2 {
        assert_eq!(c.next_publish().await.payload, format!("m{i}").as_bytes());
    }
    c.publish(
        "$SYS/getOfflineMsg",
        QoS::AtLeastOnce,
        false,
        r#"{"pushOrder":"DESC","maxPushNum":2}"#,
    )
    .await;
    for i in [5, 4] {
        assert_eq!(c.next_publish().await.payload, format!("m{i}").as_bytes());
    }
    c.no_publish().await;
    c.publish(
        "$SYS/getOfflineMsg",
        QoS::AtLeastOnce,
        false,
        r#"{"pushOrder":"ASC","maxPushNum":30}"#,
    )
    .await;
    assert_eq!(c.next_publish().await.payload, "m3".as_bytes());
    c.no_publish().await;
}

#[tokio::test]
async fn refused_connects_get_return_codes() {
    let b = Broker::start("client_id:\n  require_group_id: true\n");
    let err = v4::try_connect(v4::options("no-group", b.tcp)).await.err();
    assert_eq!(
        err.as_deref(),
        Some(format!("{:?}", ConnectReturnCode::BadClientId).as_str())
    );
    let err = v4::try_connect(v4::options("GID_x@@@d", b.tcp)).await.err();
    assert!(
        err.is_some(),
        "Group ID shorter than 7 characters is refused"
    );
    v4::connect(v4::options("GID_valid@@@dev-1", b.tcp)).await;
    assert!(b.metric("ringmq_packets_rejected_total{reason=\"client_id_invalid\"}") >= 2.0);
}

#[tokio::test]
async fn unacknowledged_messages_come_back_in_order_across_the_packet_id_wrap() {
    // Packet ids wrap after 65 535: a client that leaves with messages in
    // flight on both sides of the wrap gets them again in the order sent.
    let b = Broker::start("limits:\n  max_inflight: 16\n");
    let mut opts = v4::options("wrap", b.tcp);
    opts.set_clean_session(false);
    opts.set_manual_acks(true);
    let mut sub = v4::connect(opts.clone()).await;
    sub.subscribe("wrap/#", QoS::AtLeastOnce).await;
    const ACKED: u32 = 65_530;
    const TOTAL: u32 = ACKED + 16;
    let publisher = v4::connect(v4::options("wrap-pub", b.tcp)).await;
    let feeder = tokio::spawn(async move {
        for i in 0..TOTAL {
            publisher
                .publish("wrap/x", QoS::AtLeastOnce, false, i.to_be_bytes().to_vec())
                .await;
        }
        publisher
    });
    let index = |p: &rumqttc::Publish| {
        let b: [u8; 4] = p.payload[..4]
            .try_into()
            .unwrap_or_else(|e| panic!("payload: {e}"));
        u32::from_be_bytes(b)
    };
    let mut unacked = Vec::new();
    for expected in 0..TOTAL {
        let p = sub.next_publish().await;
        assert_eq!(index(&p), expected);
        if expected < ACKED {
            sub.client.ack(&p).await.unwrap_or_else(|e| panic!("{e}"));
        } else {
            unacked.push((expected, p.pkid));
        }
    }
    assert!(
        unacked.iter().any(|&(_, id)| id > 65_000) && unacked.iter().any(|&(_, id)| id < 100),
        "in flight on both sides of the wrap: {unacked:?}"
    );
    sub.kill();
    let _publisher = feeder.await.unwrap_or_else(|e| panic!("{e}"));
    let mut sub = v4::connect(opts).await;
    assert!(sub.connack.session_present);
    for &(expected, _) in &unacked {
        let p = sub.next_publish().await;
        assert_eq!(index(&p), expected, "resent in the order sent");
        assert!(p.dup);
    }
}

/// QoS 2 deliveries overlap up to the client's credit, as QoS 1 ones do: a
/// subscriber that has not answered the first PUBLISH yet gets the next
/// ones. (The broker used to wait for each PUBREC in turn: one QoS 2
/// message per round trip and subscriber.)
#[tokio::test]
async fn qos2_deliveries_do_not_wait_for_each_pubrec() {
    let b = Broker::start("");
    let mut opts = v4::options("slow2", b.tcp);
    opts.set_manual_acks(true);
    let mut sub = v4::connect(opts).await;
    sub.subscribe("slow/#", QoS::ExactlyOnce).await;
    let publisher = v4::connect(v4::options("slow2-pub", b.tcp)).await;
    for i in 0..5 {
        publisher
            .publish("slow/x", QoS::ExactlyOnce, false, format!("m{i}"))
            .await;
    }
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(sub.next_publish().await);
    }
    let payloads: Vec<&[u8]> = got.iter().map(|p| &p.payload[..]).collect();
    assert_eq!(payloads, [&b"m0"[..], b"m1", b"m2", b"m3", b"m4"]);
    let ids: std::collections::HashSet<u16> = got.iter().map(|p| p.pkid).collect();
    assert_eq!(ids.len(), 5, "each in flight under its own id");
    for p in &got {
        sub.client.ack(p).await.unwrap_or_else(|e| panic!("{e}"));
    }
    publisher
        .publish("slow/x", QoS::ExactlyOnce, false, "after")
        .await;
    let p = sub.next_publish().await;
    assert_eq!(p.payload, b"after"[..]);
}
