//! The operations API, capacity, metering and alarms against the real binary
//! (SPEC L1–L4, O1–O8): real clients make the traffic, the API must report
//! it.

mod common;

use std::io::Write;
use std::time::Duration;

use common::{Broker, Cluster, QUIET, v4, v5};
use serde_json::Value;

fn events(v: &Value) -> Vec<(String, String)> {
    v["events"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    (
                        e["action"].as_str().unwrap_or("").to_owned(),
                        e["reason"].as_str().unwrap_or("").to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn has(events: &[(String, String)], action: &str, reason: &str) -> bool {
    events.iter().any(|(a, r)| a == action && r == reason)
}

/// Polls `f` until it holds (the broker's ticker runs once a second).
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..100 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for: {what}");
}

#[tokio::test]
async fn instance_and_client_queries_report_the_real_traffic() {
    let b = Broker::start(
        "instance:\n  name: demo\n  endpoints: {tcp: \"mqtt.example.com:1883\"}\ncapacity:\n  connections: 100\n  subscriptions: 50\n  tps: 1000",
    );
    let mut sub = v5::connect(v5::options("GID_fleet@@@sub", b.tcp)).await;
    sub.subscribe("sensors/+/temp", v5::QoS::AtLeastOnce).await;
    sub.subscribe("alerts/#", v5::QoS::AtMostOnce).await;
    let mut opts = v4::options("GID_fleet@@@pub", b.tcp);
    opts.set_clean_session(false);
    let publisher = v4::connect(opts).await;
    for i in 0..5 {
        publisher
            .publish(
                "sensors/d1/temp",
                v4::QoS::AtLeastOnce,
                false,
                format!("{i}"),
            )
            .await;
        sub.next_publish().await;
    }

    let inst = b.api("/api/v1/instance");
    assert_eq!(inst["name"], "demo");
    assert_eq!(inst["endpoints"]["tcp"], "mqtt.example.com:1883");
    assert_eq!(inst["capacity"]["connections"], 100);
    assert_eq!(inst["totals"]["connections"], 2);
    assert_eq!(inst["totals"]["subscriptions"], 2);
    assert_eq!(inst["totals"]["topics"], 2);
    assert_eq!(inst["utilization"]["connections"], 2.0);
    assert_eq!(inst["alarmThresholds"]["connections"], 70);
    // Any persistent session left with too few copies alarms (D2).
    assert_eq!(inst["alarmThresholds"]["under_replicated_sessions"], 1);
    assert_eq!(inst["underReplicatedSessions"], 0);
    let nodes = inst["nodes"].as_array().cloned().unwrap_or_default();
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0]["state"], "running");
    assert_eq!(nodes[0]["maxConnections"], 2);
    assert_eq!(nodes[0]["subscribers"], 1);

    let c = b.api("/api/v1/clients/GID_fleet@@@sub");
    assert_eq!(c["online"], true);
    assert_eq!(c["protocol"], "MQTT 5");
    assert_eq!(c["ip"], "127.0.0.1");
    assert_eq!(c["cleanSession"], true);
    assert_eq!(c["subscriptionCount"], 2);
    assert_eq!(c["messagesSent"], 5);
    assert_eq!(c["messagesReceived"], 0);
    let subs = c["subscriptions"].as_array().cloned().unwrap_or_default();
    assert_eq!(subs[0]["filter"], "alerts/#");
    assert_eq!(subs[0]["qos"], 0);
    assert_eq!(subs[1]["filter"], "sensors/+/temp");
    assert_eq!(subs[1]["qos"], 1);
    let p = b.api("/api/v1/clients/GID_fleet@@@pub");
    assert_eq!(p["protocol"], "MQTT 3.1.1");
    assert_eq!(p["cleanSession"], false);
    assert_eq!(p["messagesReceived"], 5);

    // Online by topic and by Group ID (O3), batch online status (O2).
    let t = b.api("/api/v1/online/topic?topic=sensors/x/temp");
    assert_eq!(t["online"], 1);
    let t = b.api("/api/v1/online/topic?topic=other");
    assert_eq!(t["online"], 0);
    let g = b.api("/api/v1/online/groups");
    assert_eq!(g["now"]["GID_fleet"], 2);
    let o = b.api_post(
        "/api/v1/online/clients",
        r#"{"clientIds": ["GID_fleet@@@sub", "GID_fleet@@@nobody"]}"#,
    );
    assert_eq!(o["online"]["GID_fleet@@@sub"], true);
    assert_eq!(o["online"]["GID_fleet@@@nobody"], false);

    // Unsubscribe one filter, then kick: the client sees both.
    let u = b.api_post(
        "/api/v1/clients/GID_fleet@@@sub/unsubscribe",
        r#"{"filter": "sensors/+/temp"}"#,
    );
    assert_eq!(u["unsubscribed"], true);
    publisher
        .publish("sensors/d1/temp", v4::QoS::AtLeastOnce, false, "after")
        .await;
    sub.no_publish().await;
    let k = b.api_post("/api/v1/clients/GID_fleet@@@sub/kick", "");
    assert_eq!(k["kicked"], true);
    sub.closed().await;
    let c = b.api("/api/v1/clients/GID_fleet@@@pub");
    assert_eq!(c["online"], true);
    let trace = b.api("/api/v1/trace/device?clientId=GID_fleet@@@sub");
    let ev = events(&trace);
    assert_eq!(ev[0], ("connect".into(), "accepted".into()), "{ev:?}");
    assert!(has(&ev, "subscribed", "accepted"), "{ev:?}");
    assert!(has(&ev, "close", "kicked"), "{ev:?}");
    let (status, _) = b.api_send("POST", "/api/v1/clients/GID_fleet@@@sub/kick", "");
    assert_eq!(status, 404, "a client that is not online cannot be kicked");
}

#[tokio::test]
async fn device_trace_names_each_way_a_connection_ends() {
    let b = Broker::start("");
    // Takeover: the old connection is closed for a Client ID conflict, the
    // new one resumes the session and took it over.
    let mut o = v4::options("dev", b.tcp);
    o.set_clean_session(false);
    let mut first = v4::connect(o.clone()).await;
    first.subscribe("x", v4::QoS::AtLeastOnce).await;
    let second = v4::connect(o).await;
    first.closed().await;
    second.disconnect().await;
    // No DISCONNECT: the TCP connection just goes.
    let killed = v4::connect(v4::options("dev", b.tcp)).await;
    killed.kill();
    let trace = || events(&b.api("/api/v1/trace/device?clientId=dev"));
    eventually("closed by client", || {
        has(&trace(), "close", "closed by client")
    })
    .await;
    // Keep-alive of 1 s and then silence: "no heart".
    let mut raw = std::net::TcpStream::connect(b.addr()).unwrap_or_else(|e| panic!("{e}"));
    // CONNECT, MQTT 3.1.1, clean session, keep-alive 1 s, Client ID "dev".
    let connect = [
        0x10, 15, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 1, 0, 3, b'd', b'e', b'v',
    ];
    raw.write_all(&connect).unwrap_or_else(|e| panic!("{e}"));
    eventually("no heart", || has(&trace(), "close", "no heart")).await;
    let ev = trace();
    for (action, reason) in [
        ("connect", "accepted"),
        ("subscribed", "accepted"),
        ("close", "clientId conflict"),
        ("takeovered", "accepted"),
        ("resumed", "accepted"),
        ("disconnect", "disconnected by client"),
        ("discarded", "accepted"),
        ("close", "closed by client"),
        ("close", "no heart"),
    ] {
        assert!(
            has(&ev, action, reason),
            "{action}/{reason} missing: {ev:?}"
        );
    }
    // Each event names its connection.
    let t = b.api("/api/v1/trace/device?clientId=dev");
    let channels: std::collections::HashSet<&str> = t["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["channelId"].as_str())
        .collect();
    assert_eq!(channels.len(), 4, "{t}");
    drop(raw);
}

#[tokio::test]
async fn message_trace_follows_one_message_id_everywhere() {
    let b = Broker::start("");
    let mut sub = v5::connect(v5::options("reader", b.tcp)).await;
    sub.subscribe("m/#", v5::QoS::AtLeastOnce).await;
    let mut offline = v4::options("sleeper", b.tcp);
    offline.set_clean_session(false);
    let mut sleeper = v4::connect(offline.clone()).await;
    sleeper.subscribe("m/#", v4::QoS::AtLeastOnce).await;
    sleeper.disconnect().await;
    let writer = v5::connect(v5::options("writer", b.tcp)).await;
    writer
        .publish("m/1", v5::QoS::AtLeastOnce, false, "hello")
        .await;
    sub.next_publish().await;
    let mut sleeper = v4::connect(offline).await;
    sleeper.next_publish().await;

    let by_client = b.api("/api/v1/trace/message?clientId=writer");
    let published = &by_client["events"][0];
    assert_eq!(published["action"], "published");
    assert_eq!(published["topic"], "m/1");
    let id = published["messageId"].as_str().unwrap_or("").to_owned();
    assert_eq!(id.len(), 16);
    let by_id = b.api(&format!("/api/v1/trace/message?messageId={id}"));
    let mut seen: Vec<(String, String)> = by_id["events"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["clientId"].as_str().unwrap_or("").to_owned(),
                e["action"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("reader".to_owned(), "pushed".to_owned()),
            ("sleeper".to_owned(), "offline_pushed".to_owned()),
            ("writer".to_owned(), "published".to_owned()),
        ]
    );
    let both = b.api(&format!(
        "/api/v1/trace/message?messageId={id}&clientId=reader"
    ));
    assert_eq!(events(&both).len(), 1);

    // O8: a test message from the API carries its own Message ID.
    let sent = b.api_post(
        "/api/v1/messages",
        r#"{"topic": "m/api", "payload": "aGk=", "payloadEncoding": "base64", "qos": 1}"#,
    );
    assert_eq!(sent["reached"], 2);
    let got = sub.next_publish().await;
    assert_eq!(&got.payload[..], b"hi");
    let mid = sent["messageId"].as_str().unwrap_or("");
    let t = b.api(&format!("/api/v1/trace/message?messageId={mid}"));
    assert!(
        t["events"].as_array().is_some_and(|e| e
            .iter()
            .any(|e| e["clientId"] == "reader" && e["action"] == "pushed")),
        "{t}"
    );
}

#[tokio::test]
async fn tps_is_weighted_by_qos_and_the_report_counts_every_message() {
    let b = Broker::start("alarms:\n  tps_window_secs: 3");
    let mut sub = v5::connect(v5::options("s", b.tcp)).await;
    sub.subscribe("plant/#", v5::QoS::ExactlyOnce).await;
    let p = v5::connect(v5::options("p", b.tcp)).await;
    // 40 QoS 1 messages a second for four seconds; each counts 2 in, 2 out.
    let mut tick = tokio::time::interval(Duration::from_millis(25));
    let mut measured = Vec::new();
    for i in 0..160 {
        tick.tick().await;
        p.publish("plant/line1/temp", v5::QoS::AtLeastOnce, false, "1")
            .await;
        if i >= 120 && i % 10 == 0 {
            let inst = b.api("/api/v1/instance");
            measured.push((
                inst["totals"]["pubTps"].as_f64().unwrap_or(0.0),
                inst["totals"]["subTps"].as_f64().unwrap_or(0.0),
            ));
        }
    }
    for _ in 0..160 {
        sub.next_publish().await;
    }
    p.publish("plant/line2", v5::QoS::ExactlyOnce, false, "x")
        .await;
    p.publish("other", v5::QoS::AtMostOnce, false, "x").await;
    sub.next_publish().await;
    // The rate was 80 weighted messages per second each way; the generator's
    // own jitter and the one-second sampling stay within 30 %.
    let best = measured
        .iter()
        .copied()
        .min_by(|a, b| (a.0 - 80.0).abs().total_cmp(&(b.0 - 80.0).abs()))
        .unwrap_or_default();
    assert!((56.0..=104.0).contains(&best.0), "pub TPS {measured:?}");
    assert!((56.0..=104.0).contains(&best.1), "sub TPS {measured:?}");

    tokio::time::sleep(Duration::from_millis(1200)).await;
    let r = b.api("/api/v1/report?range=1h");
    let rows = r["rows"].as_array().cloned().unwrap_or_default();
    let row = |parent: &str, subtopic: &str, qos: u64| {
        rows.iter()
            .find(|x| x["parentTopic"] == parent && x["subtopic"] == subtopic && x["qos"] == qos)
            .cloned()
            .unwrap_or(Value::Null)
    };
    assert_eq!(row("plant", "line1", 1)["produced"], 160, "{r}");
    assert_eq!(row("plant", "line1", 1)["consumed"], 160, "{r}");
    assert_eq!(row("plant", "line2", 2)["produced"], 1, "{r}");
    assert_eq!(row("plant", "line2", 2)["consumed"], 1, "{r}");
    assert_eq!(row("other", "", 0)["produced"], 1, "{r}");
    assert_eq!(row("other", "", 0)["consumed"], 0, "{r}");
    assert_eq!(r["totals"]["produced"], 162);
    let only = b.api("/api/v1/report?range=3h&parentTopic=other");
    assert_eq!(only["rows"].as_array().map(Vec::len), Some(1));
    // The same counts for Prometheus (O9).
    let series = |s: &str| b.metric(&format!("ringmq_topic_messages_total{{{s}}}"));
    assert_eq!(
        series("direction=\"produced\",parent_topic=\"plant\",qos=\"1\""),
        160.0
    );
    assert_eq!(
        series("direction=\"consumed\",parent_topic=\"plant\",qos=\"2\""),
        1.0
    );
    assert_eq!(
        b.metric("ringmq_messages_weighted_total{direction=\"pub\"}"),
        160.0 * 2.0 + 10.0 + 1.0
    );
}

#[tokio::test]
async fn capacity_refuses_connections_and_subscriptions_and_throttles_publishers() {
    let b = Broker::start(
        "capacity:\n  connections: 3\n  subscriptions: 2\n  tps: 50\nalarms:\n  hold_secs: 0",
    );
    let mut a = v5::connect(v5::options("a", b.tcp)).await;
    let _b2 = v4::connect(v4::options("b", b.tcp)).await;
    let c = v5::connect(v5::options("c", b.tcp)).await;
    assert_eq!(
        v5::try_connect(v5::options("d", b.tcp))
            .await
            .err()
            .as_deref(),
        Some("QuotaExceeded")
    );
    assert_eq!(
        v4::try_connect(v4::options("e", b.tcp))
            .await
            .err()
            .as_deref(),
        Some("ServiceUnavailable")
    );
    // A client taking over its own connection adds none.
    let c2 = v5::connect(v5::options("c", b.tcp)).await;
    drop(c);
    assert_eq!(
        a.subscribe("s/1", v5::QoS::AtMostOnce).await,
        [v5::SubscribeReasonCode::Success(v5::QoS::AtMostOnce)]
    );
    a.subscribe("s/2", v5::QoS::AtMostOnce).await;
    assert_eq!(
        a.subscribe("s/3", v5::QoS::AtMostOnce).await,
        [v5::SubscribeReasonCode::QuotaExceeded]
    );
    let trace = events(&b.api("/api/v1/trace/device?clientId=d"));
    assert_eq!(trace, [("connect".to_owned(), "quota exceeded".to_owned())]);
    let trace = events(&b.api("/api/v1/trace/device?clientId=a"));
    assert!(has(&trace, "subscribed", "quota exceeded"), "{trace:?}");

    // 200 QoS 0 messages at once, each counting 1 in and 1 out: well over a
    // share of 50 a second, so the publisher is made to wait, and every
    // message still arrives.
    for i in 0..200 {
        c2.publish("s/1", v5::QoS::AtMostOnce, false, format!("{i}"))
            .await;
    }
    for _ in 0..200 {
        a.next_publish().await;
    }
    assert!(
        b.metric("ringmq_capacity_exceeded_total{outcome=\"throttled\",resource=\"tps\"}") >= 1.0
    );
    assert_eq!(
        b.metric("ringmq_capacity_exceeded_total{outcome=\"refused\",resource=\"connections\"}"),
        2.0
    );
    assert_eq!(
        b.metric("ringmq_capacity_exceeded_total{outcome=\"refused\",resource=\"subscriptions\"}"),
        1.0
    );
    // 3 connections of 3: beyond 70 %, the alarm fires.
    eventually("connections alarm", || {
        b.api("/api/v1/alarms")["alarms"]
            .as_array()
            .is_some_and(|a| {
                a.iter()
                    .any(|a| a["metric"] == "connections" && a["state"] == "firing")
            })
    })
    .await;
    assert_eq!(b.metric("ringmq_alarm_firing{metric=\"connections\"}"), 1.0);
    assert_eq!(
        b.metric("ringmq_alarm_threshold{metric=\"connections\"}"),
        3.0
    );
    assert_eq!(b.metric("ringmq_capacity_limit{resource=\"tps\"}"), 50.0);
}

#[tokio::test]
async fn alarm_only_mode_lets_everything_in_and_the_alarm_fires_acks_and_resolves() {
    let b = Broker::start(
        "capacity:\n  connections: 2\n  mode: alarm_only\nalarms:\n  hold_secs: 0\n  connections: {enabled: true, percent: 100}",
    );
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(v5::connect(v5::options(&format!("c{i}"), b.tcp)).await);
    }
    assert_eq!(
        b.metric("ringmq_capacity_exceeded_total{outcome=\"allowed\",resource=\"connections\"}"),
        1.0
    );
    let firing = || -> Option<Value> {
        b.api("/api/v1/alarms")["alarms"]
            .as_array()?
            .iter()
            .find(|a| a["metric"] == "connections")
            .cloned()
    };
    eventually("alarm fires", || firing().is_some()).await;
    let alarm = firing().unwrap_or(Value::Null);
    assert_eq!(alarm["threshold"], 2);
    assert_eq!(alarm["state"], "firing");
    assert!(alarm["value"].as_u64() >= Some(2));
    assert_eq!(b.api("/api/v1/instance")["activeAlarms"], 1);
    let id = alarm["id"].as_str().unwrap_or("").to_owned();
    let ack = b.api_post(&format!("/api/v1/alarms/{id}/ack"), "");
    assert_eq!(ack["acknowledged"], true);
    assert_eq!(firing().unwrap_or(Value::Null)["state"], "acknowledged");
    let (status, _) = b.api_send("POST", "/api/v1/alarms/nope/ack", "");
    assert_eq!(status, 404);
    for c in clients {
        c.disconnect().await;
    }
    eventually("alarm resolves", || {
        firing().is_some_and(|a| a["state"] == "resolved" && a["end"].is_u64())
    })
    .await;
    let resolved = firing().unwrap_or(Value::Null);
    assert_eq!(resolved["acknowledged"], true);
    assert_eq!(resolved["peak"], 3);
    assert_eq!(b.api("/api/v1/instance")["activeAlarms"], 0);
}

#[tokio::test]
async fn bad_requests_get_clear_client_errors() {
    let b = Broker::start("");
    let cases = [
        ("GET", "/api/v1/clients/nobody", "", 404),
        ("GET", "/api/v1/trace/device", "", 400),
        (
            "GET",
            "/api/v1/trace/device?clientId=x&from=0&to=172800000",
            "",
            400,
        ),
        (
            "GET",
            "/api/v1/trace/device?clientId=x&from=9&to=1",
            "",
            400,
        ),
        ("GET", "/api/v1/trace/device?clientId=x&limit=0", "", 400),
        (
            "GET",
            "/api/v1/trace/device?clientId=x&limit=10001",
            "",
            400,
        ),
        (
            "GET",
            "/api/v1/trace/device?clientId=x&from=yesterday",
            "",
            400,
        ),
        ("GET", "/api/v1/trace/message", "", 400),
        ("GET", "/api/v1/trace/message?messageId=+12", "", 400),
        ("GET", "/api/v1/online/groups?from=0&to=259200000", "", 400),
        ("GET", "/api/v1/online/topic", "", 400),
        ("GET", "/api/v1/online/topic?topic=a/%23", "", 400),
        ("GET", "/api/v1/report?range=2w", "", 400),
        ("POST", "/api/v1/online/clients", "{not json", 400),
        ("POST", "/api/v1/online/clients", r#"{"clientIds": 5}"#, 400),
        (
            "POST",
            "/api/v1/messages",
            r#"{"topic": "a", "payload": "x", "qos": 3}"#,
            400,
        ),
        (
            "POST",
            "/api/v1/messages",
            r#"{"topic": "a/#", "payload": "x"}"#,
            400,
        ),
        (
            "POST",
            "/api/v1/messages",
            r#"{"topic": "a", "payload": "!!", "payloadEncoding": "base64"}"#,
            400,
        ),
        (
            "POST",
            "/api/v1/messages",
            r#"{"topic": "a", "payload": "x", "extra": 1}"#,
            400,
        ),
        ("DELETE", "/api/v1/instance", "", 405),
        ("GET", "/api/v1/nothing", "", 404),
    ];
    for (method, path, body, want) in cases {
        let (status, answer) = b.api_send(method, path, body);
        assert_eq!(status, want, "{method} {path} {body}: {answer}");
        let v: Value = serde_json::from_str(&answer).unwrap_or(Value::Null);
        assert!(v["error"].is_string(), "{method} {path}: {answer}");
    }
    let doc = b.api("/api/v1/openapi.json");
    assert_eq!(doc["openapi"], "3.0.3");
    assert!(doc["paths"]["/api/v1/trace/device"]["get"].is_object());
}

#[tokio::test]
async fn the_admin_token_guards_the_api_but_not_its_description() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let token = dir.path().join("admin-token");
    std::fs::write(&token, "s3cret-admin").unwrap_or_else(|e| panic!("{e}"));
    let b = Broker::start(&format!("auth:\n  admin_token_file: {}", token.display()));
    assert_eq!(b.http("/api/v1/instance").0, 401);
    assert_eq!(b.http("/api/v1/openapi.json").0, 200);
    let (status, body) = b.http_with(
        "/api/v1/instance",
        &[("Authorization", "Bearer s3cret-admin")],
    );
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn every_node_answers_for_the_whole_cluster() {
    let c = Cluster::start(
        2,
        "capacity:\n  connections: 3\ntrace:\n  group_sample_secs: 1",
    );
    let (n0, n1) = (&c.nodes[0], &c.nodes[1]);
    let mut s = v5::connect(v5::options("GID_xxx@@@s", n0.tcp)).await;
    s.subscribe("t/#", v5::QoS::AtLeastOnce).await;
    let p = v5::connect(v5::options("GID_xxx@@@p", n1.tcp)).await;
    let _third = v5::connect(v5::options("GID_yyy@@@3", n1.tcp)).await;
    tokio::time::sleep(QUIET).await;
    p.publish("t/1", v5::QoS::AtLeastOnce, false, "x").await;
    s.next_publish().await;
    // The instance-wide budget: three connections on two nodes, a fourth is
    // refused on either node once the load reports have gone round.
    eventually("load reports", || {
        n0.api("/api/v1/instance")["totals"]["connections"] == 3
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for n in [n0, n1] {
        assert_eq!(
            v5::try_connect(v5::options("GID_yyy@@@4", n.tcp))
                .await
                .err()
                .as_deref(),
            Some("QuotaExceeded")
        );
    }
    for n in [n0, n1] {
        let inst = n.api("/api/v1/instance");
        assert_eq!(inst["totals"]["connections"], 3, "{inst}");
        assert_eq!(inst["nodes"].as_array().map(Vec::len), Some(2), "{inst}");
        assert_eq!(inst["missingNodes"], serde_json::json!([]));
        let detail = n.api("/api/v1/clients/GID_xxx@@@s");
        assert_eq!(detail["online"], true);
        assert_eq!(detail["subscriptionCount"], 1);
        let trace = n.api("/api/v1/trace/device?clientId=GID_xxx@@@s");
        assert!(has(&events(&trace), "subscribed", "accepted"), "{trace}");
        let g = n.api("/api/v1/online/groups");
        assert_eq!(g["now"]["GID_xxx"], 2, "{g}");
        assert_eq!(g["now"]["GID_yyy"], 1, "{g}");
        assert_eq!(n.api("/api/v1/online/topic?topic=t/9")["online"], 1);
    }
    // The message's ID is the same on the publisher's and the subscriber's
    // node, so one query finds both events.
    let published = n1.api("/api/v1/trace/message?clientId=GID_xxx@@@p");
    let id = published["events"][0]["messageId"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    let t = n0.api(&format!("/api/v1/trace/message?messageId={id}"));
    assert_eq!(events(&t).len(), 2, "{t}");
    // The resource report sums the nodes: the publish counted where it was
    // received, the delivery where it was pushed.
    eventually("report from both nodes", || {
        let r = n0.api("/api/v1/report?range=1h&parentTopic=t");
        r["totals"]["produced"] == 1 && r["totals"]["consumed"] == 1
    })
    .await;
    // Exactly one node evaluates the alarms.
    let inst = n1.api("/api/v1/instance");
    let evaluators = inst["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["alarmEvaluator"] == true)
        .count();
    assert_eq!(evaluators, 1, "{inst}");
    let history = n0.api("/api/v1/online/groups?groupId=GID_yyy");
    eventually("group history", || {
        n0.api("/api/v1/online/groups?groupId=GID_yyy")["history"]
            .as_array()
            .is_some_and(|h| h.iter().any(|s| s["groups"]["GID_yyy"] == 1))
    })
    .await;
    assert!(history["now"].get("GID_xxx").is_none(), "{history}");
    // Kick through the node that does not hold the session.
    let elsewhere = if n0.api("/api/v1/clients/GID_xxx@@@s")["node"] == c.names[0] {
        n1
    } else {
        n0
    };
    assert_eq!(
        elsewhere.api_post("/api/v1/clients/GID_xxx@@@s/kick", "")["kicked"],
        true
    );
    s.closed().await;
}

/// The `ringmqctl` binary (its own crate): next to the broker's, built by
/// `cargo build --workspace` or `cargo test --workspace`.
fn ringmqctl() -> std::path::PathBuf {
    let path =
        std::path::Path::new(env!("CARGO_BIN_EXE_ringmq-broker")).with_file_name("ringmqctl");
    assert!(
        path.exists(),
        "{} is not built: cargo build -p ringmqctl",
        path.display()
    );
    path
}

/// Runs `ringmqctl` against a broker: (success, stdout, stderr).
fn ctl(b: &Broker, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(ringmqctl())
        .arg("--server")
        .arg(format!("http://127.0.0.1:{}", b.admin))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("ringmqctl: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn ringmqctl_prints_tables_of_the_same_answers() {
    let b = Broker::start("capacity:\n  connections: 10");
    let mut s = v5::connect(v5::options("GID_cli@@@dev 1", b.tcp)).await;
    s.subscribe("cli/+/x", v5::QoS::AtLeastOnce).await;

    let (ok, out, err) = ctl(&b, &["instance"]);
    assert!(ok, "{err}");
    assert!(out.contains("connections:   1 of 10 (10.0 %)"), "{out}");
    let node_row = out
        .lines()
        .find(|l| l.contains("running"))
        .unwrap_or_default();
    assert_eq!(
        node_row.split_whitespace().nth(2),
        Some("1"),
        "connections column: {out}"
    );

    let (ok, out, err) = ctl(&b, &["client", "GID_cli@@@dev 1"]);
    assert!(ok, "{err}");
    assert!(out.contains("protocol:"), "{out}");
    assert!(out.contains("MQTT 5"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("cli/+/x") && l.ends_with('1')),
        "{out}"
    );

    let (ok, out, _) = ctl(&b, &["device-trace", "GID_cli@@@dev 1"]);
    assert!(ok);
    assert!(
        out.lines()
            .any(|l| l.contains("connect") && l.contains("accepted")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.contains("subscribed") && l.contains("cli/+/x")),
        "{out}"
    );

    let (ok, out, _) = ctl(&b, &["send", "cli/a/x", "hello", "--qos", "1"]);
    assert!(ok);
    assert!(out.contains("1 sessions reached"), "{out}");
    assert_eq!(&s.next_publish().await.payload[..], b"hello");

    let (ok, out, _) = ctl(&b, &["--json", "online", "GID_cli@@@dev 1", "nobody"]);
    assert!(ok);
    let v: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
    assert_eq!(v["online"]["GID_cli@@@dev 1"], true);
    assert_eq!(v["online"]["nobody"], false);

    let (ok, _, err) = ctl(&b, &["client", "nobody"]);
    assert!(!ok);
    assert!(err.contains("404") && err.contains("no session"), "{err}");
    let (ok, _, err) = ctl(&b, &["report", "--last", "2w"]);
    assert!(!ok);
    assert!(err.contains("400"), "{err}");
}

#[tokio::test]
async fn traces_history_and_alarms_survive_a_restart_with_a_journal() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let extra = format!(
        "trace:\n  dir: {}\ncapacity:\n  connections: 2\n  mode: alarm_only\nalarms:\n  hold_secs: 0",
        dir.path().display()
    );
    let mut b = Broker::start(&extra);
    let mut s = v5::connect(v5::options("keeper", b.tcp)).await;
    s.subscribe("j/#", v5::QoS::AtLeastOnce).await;
    let p = v5::connect(v5::options("writer", b.tcp)).await;
    p.publish("j/1", v5::QoS::AtLeastOnce, false, "x").await;
    s.next_publish().await;
    eventually("connections alarm", || {
        b.api("/api/v1/alarms")["alarms"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
    })
    .await;
    let before = b.api("/api/v1/trace/message?clientId=writer");
    let id = before["events"][0]["messageId"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    // The writer thread flushes when idle; give it a moment, then stop hard.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    b.kill();
    drop((s, p));

    let b = Broker::start(&extra);
    let trace = events(&b.api("/api/v1/trace/device?clientId=keeper"));
    assert!(has(&trace, "connect", "accepted"), "{trace:?}");
    assert!(has(&trace, "subscribed", "accepted"), "{trace:?}");
    let t = b.api(&format!("/api/v1/trace/message?messageId={id}"));
    assert_eq!(events(&t).len(), 2, "published and pushed: {t}");
    let alarms = b.api("/api/v1/alarms");
    let a = &alarms["alarms"][0];
    assert_eq!(a["metric"], "connections", "{alarms}");
    assert_eq!(a["state"], "resolved", "closed at the restart: {alarms}");
    assert!(a["end"].is_u64());
    let files = std::fs::read_dir(dir.path())
        .map(Iterator::count)
        .unwrap_or(0);
    assert!(files >= 3, "device, message and alarm files: {files}");
}

/// The CPUs a process or thread may run on, from its `/proc` status file.
fn cpus_allowed(status: &std::path::Path) -> Option<String> {
    std::fs::read_to_string(status).ok()?.lines().find_map(|l| {
        l.strip_prefix("Cpus_allowed_list:")
            .map(|cpus| cpus.trim().to_owned())
    })
}

/// The CPU list each thread of a process may run on.
fn thread_cpus(pid: u32) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| cpus_allowed(&t.path().join("status")))
        .collect()
}

#[tokio::test]
async fn worker_threads_are_pinned_only_when_configured() {
    let all = cpus_allowed("/proc/self/status".as_ref()).unwrap_or_default();
    if !all.contains([',', '-']) {
        eprintln!("skipped: this process may use one CPU ({all}), nothing to pin apart");
        return;
    }
    // A pod limited by CPU quota may use every core of its node: workers
    // pinned by default would all sit on the node's first cores. The
    // harness runs two workers.
    let b = Broker::start("");
    let cpus = thread_cpus(b.pid());
    assert!(cpus.len() > 2, "threads: {cpus:?}");
    assert!(cpus.iter().all(|c| *c == all), "by default: {cpus:?}");
    let b = Broker::start("pin_workers: true\n");
    let cpus = thread_cpus(b.pid());
    assert!(
        cpus.iter().filter(|c| **c != all).count() >= 2,
        "pin_workers: {cpus:?} (process: {all})"
    );
}
