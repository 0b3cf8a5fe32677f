//! MQTT 5 behaviour over real sockets (SPEC B3, B4, B7, B8, B12).

mod common;

use std::time::Duration;

use common::Broker;
use common::v5::{
    self, DisconnectReasonCode, PubAckReason, PublishProperties, QoS, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::v5::{Filter, RetainForwardRule, SubscribeProperties};

#[tokio::test]
async fn session_expiry_is_capped_and_enforced() {
    let b = Broker::start("limits:\n  session_expiry_secs: 1\n");
    let mut opts = v5::options("exp", b.tcp);
    opts.set_clean_start(false);
    opts.set_session_expiry_interval(Some(3600));
    let mut c = v5::connect(opts.clone()).await;
    let expiry = c
        .connack
        .properties
        .as_ref()
        .and_then(|p| p.session_expiry_interval);
    assert_eq!(expiry, Some(1), "capped by the instance maximum");
    c.subscribe("exp/#", QoS::AtLeastOnce).await;
    c.disconnect().await;
    let c = v5::connect(opts.clone()).await;
    assert!(c.connack.session_present);
    c.disconnect().await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let c = v5::connect(opts).await;
    assert!(!c.connack.session_present, "the session expired");
}

#[tokio::test]
async fn will_delay_is_cancelled_by_reconnect() {
    let b = Broker::start("");
    let mut watcher = v5::connect(v5::options("watcher", b.tcp)).await;
    watcher.subscribe("will/#", QoS::AtLeastOnce).await;
    let mut opts = v5::options("delayed", b.tcp);
    opts.set_clean_start(false);
    opts.set_session_expiry_interval(Some(60));
    opts.set_last_will(v5::delayed_will("will/delayed", "late", 1));

    // Reconnecting within the delay cancels the will.
    v5::connect(opts.clone()).await.kill();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let c = v5::connect(opts.clone()).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    watcher.no_publish().await;

    // Not reconnecting publishes it after the delay.
    c.kill();
    let p = watcher.next_publish().await;
    assert_eq!(&p.payload[..], b"late");
}

#[tokio::test]
async fn shared_subscription_delivers_each_message_once() {
    let b = Broker::start("");
    let mut m1 = v5::connect(v5::options("m1", b.tcp)).await;
    let mut m2 = v5::connect(v5::options("m2", b.tcp)).await;
    m1.subscribe("$share/g/jobs/+", QoS::AtLeastOnce).await;
    m2.subscribe("$share/g/jobs/+", QoS::AtLeastOnce).await;
    let publisher = v5::connect(v5::options("pub", b.tcp)).await;
    for i in 0..20 {
        publisher
            .publish("jobs/x", QoS::AtLeastOnce, false, format!("{i}"))
            .await;
    }
    let mut got = Vec::new();
    let mut per_member = [0, 0];
    for (n, member) in [&mut m1, &mut m2].into_iter().enumerate() {
        while let Ok(Some(p)) =
            tokio::time::timeout(Duration::from_millis(700), member.rx.recv()).await
        {
            if let v5::Packet::Publish(p) = p {
                got.push(String::from_utf8_lossy(&p.payload).to_string());
                per_member[n] += 1;
            }
        }
    }
    got.sort_by_key(|s| s.parse::<u32>().unwrap_or(u32::MAX));
    let expected: Vec<String> = (0..20).map(|i| i.to_string()).collect();
    assert_eq!(got, expected, "every message once, in the group as a whole");
    assert!(
        per_member.iter().all(|&n| n > 0),
        "both members served: {per_member:?}"
    );
}

#[tokio::test]
async fn no_local_and_retain_handling_options() {
    let b = Broker::start("");
    let publisher = v5::connect(v5::options("retainer", b.tcp)).await;
    publisher
        .publish("opt/r", QoS::AtLeastOnce, true, "old")
        .await;
    let mut c = v5::connect(v5::options("self", b.tcp)).await;
    let filters = [Filter {
        path: "opt/#".into(),
        qos: QoS::AtLeastOnce,
        nolocal: true,
        preserve_retain: true,
        retain_forward_rule: RetainForwardRule::Never,
    }];
    c.client
        .subscribe_many(filters)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        c.suback().await,
        [SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    c.publish("opt/own", QoS::AtLeastOnce, false, "mine").await;
    c.no_publish().await;
    publisher
        .publish("opt/r", QoS::AtLeastOnce, true, "new")
        .await;
    let p = c.next_publish().await;
    assert_eq!(&p.payload[..], b"new");
    assert!(p.retain, "retain as published keeps the flag");
}

#[tokio::test]
async fn properties_travel_with_the_message() {
    let b = Broker::start("");
    let mut sub = v5::connect(v5::options("sub", b.tcp)).await;
    sub.client
        .subscribe_with_properties(
            "props/#",
            QoS::AtLeastOnce,
            SubscribeProperties {
                id: Some(7),
                user_properties: Vec::new(),
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    sub.suback().await;
    let publisher = v5::connect(v5::options("pub", b.tcp)).await;
    let props = PublishProperties {
        message_expiry_interval: Some(120),
        user_properties: vec![("k".into(), "v".into())],
        content_type: Some("text/plain".into()),
        response_topic: Some("props/reply".into()),
        correlation_data: Some("c1".into()),
        payload_format_indicator: Some(1),
        ..Default::default()
    };
    publisher
        .client
        .publish_with_properties("props/a", QoS::AtLeastOnce, false, "p", props)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let p = sub.next_publish().await;
    let got = p.properties.unwrap_or_default();
    assert_eq!(got.user_properties, [("k".to_string(), "v".to_string())]);
    assert_eq!(got.content_type.as_deref(), Some("text/plain"));
    assert_eq!(got.response_topic.as_deref(), Some("props/reply"));
    assert_eq!(got.correlation_data.as_deref(), Some(&b"c1"[..]));
    assert_eq!(got.payload_format_indicator, Some(1));
    assert_eq!(got.subscription_identifiers, [7]);
    assert!(matches!(got.message_expiry_interval, Some(1..=120)));
}

#[tokio::test]
async fn expired_offline_message_is_not_delivered() {
    let b = Broker::start("");
    let mut opts = v5::options("sleeper", b.tcp);
    opts.set_clean_start(false);
    opts.set_session_expiry_interval(Some(60));
    let mut c = v5::connect(opts.clone()).await;
    c.subscribe("exp/#", QoS::AtLeastOnce).await;
    c.disconnect().await;
    let publisher = v5::connect(v5::options("pub", b.tcp)).await;
    let short = PublishProperties {
        message_expiry_interval: Some(1),
        ..Default::default()
    };
    publisher
        .client
        .publish_with_properties("exp/short", QoS::AtLeastOnce, false, "short", short)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    publisher
        .publish("exp/long", QoS::AtLeastOnce, false, "long")
        .await;
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let mut c = v5::connect(opts).await;
    assert_eq!(&c.next_publish().await.payload[..], b"long");
    c.no_publish().await;
}

#[tokio::test]
async fn unacknowledged_message_is_redelivered_with_dup() {
    let b = Broker::start("");
    let mut opts = v5::options("slow", b.tcp);
    opts.set_clean_start(false);
    opts.set_session_expiry_interval(Some(60));
    opts.set_manual_acks(true);
    let mut c = v5::connect(opts.clone()).await;
    c.subscribe("redo/#", QoS::AtLeastOnce).await;
    let publisher = v5::connect(v5::options("pub", b.tcp)).await;
    publisher
        .publish("redo/1", QoS::AtLeastOnce, false, "again")
        .await;
    let first = c.next_publish().await;
    assert!(!first.dup);
    c.kill(); // no PUBACK sent
    let mut c = v5::connect(opts).await;
    assert!(c.connack.session_present);
    let again = c.next_publish().await;
    assert_eq!(&again.payload[..], b"again");
    assert!(again.dup, "a redelivery carries DUP");
    c.client.ack(&again).await.unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test]
async fn takeover_sends_session_taken_over() {
    let b = Broker::start("");
    let mut first = v5::connect(v5::options("twin", b.tcp)).await;
    let _second = v5::connect(v5::options("twin", b.tcp)).await;
    assert_eq!(first.closed().await, DisconnectReasonCode::SessionTakenOver);
}

#[tokio::test]
async fn limits_answer_with_reason_codes() {
    let b = Broker::start("limits:\n  max_subscriptions_per_client: 2\n");
    let mut c = v5::connect(v5::options("limited", b.tcp)).await;
    // Topic longer than 64 characters.
    c.publish(&"t".repeat(65), QoS::AtLeastOnce, false, "x")
        .await;
    assert_eq!(c.next_puback().await.reason, PubAckReason::TopicNameInvalid);
    // Third subscription beyond a limit of two.
    c.subscribe("s/1", QoS::AtMostOnce).await;
    c.subscribe("s/2", QoS::AtMostOnce).await;
    assert_eq!(
        c.subscribe("s/3", QoS::AtMostOnce).await,
        [SubscribeReasonCode::QuotaExceeded]
    );
    // Client ID longer than 128 characters.
    let err = v5::try_connect(v5::options(&"c".repeat(129), b.tcp))
        .await
        .err();
    assert_eq!(err.as_deref(), Some("ClientIdentifierNotValid"));
    assert!(b.metric("ringmq_packets_rejected_total{reason=\"topic_invalid\"}") >= 1.0);
    assert!(b.metric("ringmq_packets_rejected_total{reason=\"subscribe_refused\"}") >= 1.0);
}

#[tokio::test]
async fn connack_advertises_limits_and_features() {
    let b = Broker::start("");
    let c = v5::connect(v5::options("", b.tcp)).await;
    let props = c.connack.properties.clone();
    let props = props.unwrap_or_else(|| panic!("CONNACK without properties"));
    assert_eq!(props.max_packet_size, Some(128 * 1024));
    assert_eq!(props.receive_max, Some(64));
    assert!(
        props.assigned_client_identifier.is_some(),
        "an empty Client ID gets one assigned"
    );
    assert_ne!(
        props.shared_subscription_available,
        Some(0),
        "absent or 1 means available"
    );
}

#[tokio::test]
async fn offline_pull_rate_is_limited() {
    let b = Broker::start("limits:\n  offline_pulls_per_sec: 2\n");
    let mut c = v5::connect(v5::options("pull", b.tcp)).await;
    let req = r#"{"pushOrder":"ASC","maxPushNum":1}"#;
    let mut reasons = Vec::new();
    for _ in 0..3 {
        c.publish("$SYS/getOfflineMsg", QoS::AtLeastOnce, false, req)
            .await;
        reasons.push(c.next_puback().await.reason);
    }
    assert_eq!(
        reasons,
        [
            PubAckReason::Success,
            PubAckReason::Success,
            PubAckReason::QuotaExceeded
        ]
    );
    c.publish("$SYS/getOfflineMsg", QoS::AtLeastOnce, false, "not json")
        .await;
    assert_eq!(
        c.next_puback().await.reason,
        PubAckReason::PayloadFormatInvalid
    );
}

#[tokio::test]
async fn topic_alias_from_the_client_is_resolved() {
    let b = Broker::start("");
    let mut sub = v5::connect(v5::options("sub", b.tcp)).await;
    sub.subscribe("alias/#", QoS::AtLeastOnce).await;
    let publisher = v5::connect(v5::options("pub", b.tcp)).await;
    let with_alias = |alias| PublishProperties {
        topic_alias: Some(alias),
        ..Default::default()
    };
    publisher
        .client
        .publish_with_properties(
            "alias/long/name",
            QoS::AtLeastOnce,
            false,
            "one",
            with_alias(1),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    publisher
        .client
        .publish_with_properties("", QoS::AtLeastOnce, false, "two", with_alias(1))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for payload in ["one", "two"] {
        let p = sub.next_publish().await;
        assert_eq!(
            (&p.topic[..], &p.payload[..]),
            (&b"alias/long/name"[..], payload.as_bytes())
        );
    }
}

#[tokio::test]
async fn ordered_storage_request_is_checked() {
    let b = Broker::start("");
    let mut c = v5::connect(v5::options("GID_order@@@d1", b.tcp)).await;
    c.publish(
        "$SYS/enableOrderMsg",
        QoS::AtLeastOnce,
        false,
        r#"{"order":"true"}"#,
    )
    .await;
    assert_eq!(c.next_puback().await.reason, PubAckReason::Success);
    c.publish(
        "$SYS/enableOrderMsg",
        QoS::AtLeastOnce,
        false,
        r#"{"order":"maybe"}"#,
    )
    .await;
    assert_eq!(
        c.next_puback().await.reason,
        PubAckReason::PayloadFormatInvalid
    );
}

#[tokio::test]
async fn sigterm_tells_clients_and_exits_cleanly() {
    let mut b = Broker::start("");
    let mut c = v5::connect(v5::options("stayer", b.tcp)).await;
    let status = std::process::Command::new("kill")
        .args(["-TERM", &b.pid().to_string()])
        .status()
        .unwrap_or_else(|e| panic!("kill: {e}"));
    assert!(status.success());
    assert_eq!(c.closed().await, DisconnectReasonCode::ServerShuttingDown);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while b.alive() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!b.alive(), "the broker exits after a graceful shutdown");
}

#[tokio::test]
async fn broker_uses_topic_aliases_the_client_accepts() {
    let b = Broker::start("");
    let mut opts = v5::options("aliased", b.tcp);
    opts.set_topic_alias_max(Some(1));
    let mut sub = v5::connect(opts).await;
    sub.subscribe("ta/#", QoS::AtMostOnce).await;
    let publisher = v5::connect(v5::options("pub", b.tcp)).await;
    for topic in ["ta/one", "ta/one", "ta/two"] {
        publisher
            .publish(topic, QoS::AtMostOnce, false, topic)
            .await;
    }
    // The first message sets alias 1, the second uses it with an empty topic,
    // the third gets no alias: the client accepts only one.
    let mut seen = Vec::new();
    for _ in 0..3 {
        let p = sub.next_publish().await;
        let alias = p.properties.as_ref().and_then(|pr| pr.topic_alias);
        seen.push((String::from_utf8_lossy(&p.payload).to_string(), alias));
    }
    assert_eq!(
        seen,
        [
            ("ta/one".to_string(), Some(1)),
            ("ta/one".to_string(), Some(1)),
            ("ta/two".to_string(), None),
        ]
    );
}

/// A subscriber that acknowledges nothing on `prefix/#` (manual acks) and a
/// publisher that sent it 20 QoS 1 messages; returns both and how many
/// PUBACKs the publisher got before things went quiet.
async fn held_publisher(b: &Broker, prefix: &str) -> (v5::Client, v5::Client, usize) {
    let mut opts = v5::options(&format!("{prefix}-sub"), b.tcp);
    opts.set_manual_acks(true);
    let mut slow = v5::connect(opts).await;
    slow.subscribe(&format!("{prefix}/#"), QoS::AtLeastOnce)
        .await;
    let mut publisher = v5::connect(v5::options(&format!("{prefix}-pub"), b.tcp)).await;
    for i in 0..20 {
        publisher
            .publish(
                &format!("{prefix}/x"),
                QoS::AtLeastOnce,
                false,
                format!("{i}"),
            )
            .await;
    }
    let mut acked = 0;
    while let Ok(Some(p)) = tokio::time::timeout(common::QUIET, publisher.rx.recv()).await {
        if let v5::Packet::PubAck(_) = p {
            acked += 1;
        }
    }
    (slow, publisher, acked)
}

#[tokio::test]
async fn publishers_held_by_a_full_queue_go_on_when_its_subscriber_leaves() {
    // The wait for room may last a minute; a subscriber that leaves ends it.
    let b = Broker::start(
        "limits:\n  max_queued_messages: 4\n  max_inflight: 2\n  queue_full_wait_ms: 60000\n",
    );
    let (slow, mut publisher, mut acked) = held_publisher(&b, "leave").await;
    assert!(
        acked < 20,
        "held back while the subscriber is there ({acked} acked)"
    );
    slow.disconnect().await;
    while acked < 20 {
        if let v5::Packet::PubAck(_) = common::recv(&mut publisher.rx, "PUBACK").await {
            acked += 1;
        }
    }
}

#[tokio::test]
async fn slow_subscriber_slows_qos1_publisher_instead_of_losing() {
    let b = Broker::start("limits:\n  max_queued_messages: 4\n  max_inflight: 2\n");
    // Two in flight to the subscriber and four queued: the rest of the
    // publisher's PUBACKs are held back.
    let (mut slow, _publisher, acked) = held_publisher(&b, "bp").await;
    assert!(
        acked < 20,
        "backpressure holds acknowledgements ({acked} acked)"
    );
    // Once the subscriber acknowledges, everything arrives, in order.
    for i in 0..20 {
        let p = slow.next_publish().await;
        assert_eq!(p.payload, format!("{i}").as_bytes());
        slow.client.ack(&p).await.unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(
        b.metric("ringmq_messages_dropped_total{reason=\"queue_full\"}"),
        0.0
    );
}
