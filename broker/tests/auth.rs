//! Authentication and authorisation against the real binary (SPEC A1, A2,
//! A4, A5, A6): users with grants, signature mode, Group IDs, refusals,
//! reload, the admin token.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::Broker;
use common::v4::{self, ConnectReturnCode};
use common::v5::{self, PubAckReason, QoS, SubscribeReasonCode};

/// argon2id hashes (cheap parameters, for tests) of "alice-pw" and "bob-pw".
const ALICE: &str =
    "$argon2id$v=19$m=64,t=1,p=1$c2FsdHNhbHRzYWx0$BDTD+uxNsCJEUx4cEZfgrcB2LTbOYBxrj4gB/dXEA4I";
const BOB: &str =
    "$argon2id$v=19$m=64,t=1,p=1$c2FsdHNhbHRzYWx0$LYV0rGS2gjhOcYcQy3sZKA1CHlA8kM72b8JS4wceQS8";

/// Base64(HmacSHA1("XXXX", "GID_AAA")), computed with Python's hmac module.
const SIGNATURE_GID_AAA: &str = "2rJinBsSwnDo+VPfYZyvsRUxaTI=";

struct Creds {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn credentials(yaml: &str) -> Creds {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("credentials.yaml");
    std::fs::write(&path, yaml).unwrap_or_else(|e| panic!("{e}"));
    Creds { _dir: dir, path }
}

fn users_yaml(bob_action: &str) -> String {
    format!(
        "users:\n  - username: alice\n    password_hash: \"{ALICE}\"\n    grants:\n      - {{filter: \"a/#\", action: pubsub}}\n  - username: bob\n    password_hash: \"{BOB}\"\n    grants:\n      - {{filter: \"a/b\", action: {bob_action}}}\naccess_keys:\n  - access_key: AKTEST\n    secret_key: XXXX\ngroup_ids: [GID_AAA, GID_other]\n"
    )
}

fn start(creds: &Path, extra: &str) -> Broker {
    Broker::start(&format!(
        "auth:\n  credentials_file: {}\n{extra}",
        creds.display()
    ))
}

#[tokio::test]
async fn users_passwords_and_connect_refusals() {
    let creds = credentials(&users_yaml("pub"));
    let b = start(&creds.path, "");
    v5::connect(v5::options_as("GID_AAA@@@a1", b.tcp, "alice", "alice-pw")).await;
    let wrong = v5::try_connect(v5::options_as(
        "GID_AAA@@@a2",
        b.tcp,
        "alice",
        "wrong-pw-5731",
    ))
    .await;
    assert_eq!(wrong.err().as_deref(), Some("BadUserNamePassword"));
    let unknown = v5::try_connect(v5::options_as("GID_AAA@@@a3", b.tcp, "mallory", "x")).await;
    assert_eq!(unknown.err().as_deref(), Some("BadUserNamePassword"));
    // Credentials are configured, so anonymous access is off.
    let anon = v5::try_connect(v5::options("GID_AAA@@@a4", b.tcp)).await;
    assert_eq!(anon.err().as_deref(), Some("NotAuthorized"));
    // An undeclared Group ID is refused at CONNECT (A5).
    let group = v5::try_connect(v5::options_as("GID_nope@@@a5", b.tcp, "alice", "alice-pw")).await;
    assert_eq!(group.err().as_deref(), Some("ClientIdentifierNotValid"));
    // MQTT 3.1.1 gets return codes.
    let v3 = v4::try_connect(v4::options_as(
        "GID_AAA@@@a6",
        b.tcp,
        "alice",
        "wrong-pw-5731",
    ))
    .await;
    assert_eq!(
        v3.err().as_deref(),
        Some(format!("{:?}", ConnectReturnCode::BadUserNamePassword).as_str())
    );
    assert!(b.metric("ringmq_packets_rejected_total{reason=\"bad_credentials\"}") >= 3.0);
    assert!(b.metric("ringmq_packets_rejected_total{reason=\"unknown_group_id\"}") >= 1.0);
    // Each refusal is in the device trace (A4, O4).
    for id in [
        "GID_AAA@@@a2",
        "GID_AAA@@@a3",
        "GID_AAA@@@a4",
        "GID_AAA@@@a6",
    ] {
        let trace = b.api(&format!("/api/v1/trace/device?clientId={id}"));
        assert_eq!(trace["events"][0]["action"], "connect", "{trace}");
        assert_eq!(trace["events"][0]["reason"], "not authorized", "{trace}");
    }
    assert!(
        !b.log().contains("alice-pw") && !b.log().contains("wrong-pw-5731"),
        "no secret in logs"
    );
}

#[tokio::test]
async fn grants_decide_publish_and_subscribe() {
    let creds = credentials(&users_yaml("pub"));
    let b = start(&creds.path, "");
    let mut alice = v5::connect(v5::options_as(
        "GID_AAA@@@alice",
        b.tcp,
        "alice",
        "alice-pw",
    ))
    .await;
    assert_eq!(
        alice.subscribe("a/+", QoS::AtLeastOnce).await,
        [SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    let mut bob = v5::connect(v5::options_as("GID_AAA@@@bob", b.tcp, "bob", "bob-pw")).await;
    assert_eq!(
        bob.subscribe("a/b", QoS::AtLeastOnce).await,
        [SubscribeReasonCode::NotAuthorized],
        "bob may only publish"
    );
    bob.publish("a/b", QoS::AtLeastOnce, false, "allowed").await;
    assert_eq!(bob.next_puback().await.reason, PubAckReason::Success);
    assert_eq!(&alice.next_publish().await.payload[..], b"allowed");
    bob.publish("a/c", QoS::AtLeastOnce, false, "refused").await;
    assert_eq!(bob.next_puback().await.reason, PubAckReason::NotAuthorized);
    alice.no_publish().await;
    assert!(b.metric("ringmq_packets_rejected_total{reason=\"topic_auth_failed\"}") >= 2.0);

    // MQTT 3.1.1: the seeds close the connection on an unauthorised publish.
    let mut bob3 = v4::connect(v4::options_as("GID_AAA@@@bob3", b.tcp, "bob", "bob-pw")).await;
    bob3.publish("a/c", v4::QoS::AtLeastOnce, false, "refused")
        .await;
    bob3.closed().await;

    // The device trace names every refusal "topic auth failed" (A4, O4).
    let seen = |id: &str| -> Vec<(String, String, String)> {
        let t = b.api(&format!("/api/v1/trace/device?clientId={id}"));
        t["events"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                let s = |k: &str| e[k].as_str().unwrap_or("").to_owned();
                (s("action"), s("reason"), s("detail"))
            })
            .collect()
    };
    let refused = |a: &str, d: &str| (a.to_owned(), "topic auth failed".to_owned(), d.to_owned());
    let bob_trace = seen("GID_AAA@@@bob");
    assert!(
        bob_trace.contains(&refused("subscribed", "a/b")),
        "{bob_trace:?}"
    );
    assert!(
        bob_trace.contains(&refused("publish", "a/c")),
        "{bob_trace:?}"
    );
    let bob3_trace = seen("GID_AAA@@@bob3");
    assert!(
        bob3_trace.contains(&refused("publish", "a/c")),
        "{bob3_trace:?}"
    );
    assert!(bob3_trace.contains(&refused("close", "")), "{bob3_trace:?}");
}

#[tokio::test]
async fn v3_subscribe_refusal_closes_or_answers_0x80() {
    let creds = credentials(&users_yaml("pub"));
    let closing = start(&creds.path, "");
    let mut c = v4::connect(v4::options_as("GID_AAA@@@s1", closing.tcp, "bob", "bob-pw")).await;
    c.client
        .subscribe("a/b", v4::QoS::AtLeastOnce)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    c.closed().await;

    let answering = start(&creds.path, "  v3_subscribe_refusal: suback\n");
    let mut c = v4::connect(v4::options_as(
        "GID_AAA@@@s2",
        answering.tcp,
        "bob",
        "bob-pw",
    ))
    .await;
    assert_eq!(
        c.subscribe("a/b", v4::QoS::AtLeastOnce).await,
        [rumqttc::SubscribeReasonCode::Failure]
    );
}

#[tokio::test]
async fn signature_mode_signs_the_group_id() {
    let creds = credentials(&users_yaml("pub"));
    let b = start(&creds.path, "");
    // Bare AccessKey as the seeds use it, and the newer Signature|AK|instance form.
    v4::connect(v4::options_as(
        "GID_AAA@@@dev1",
        b.tcp,
        "AKTEST",
        SIGNATURE_GID_AAA,
    ))
    .await;
    v5::connect(v5::options_as(
        "GID_AAA@@@dev2",
        b.tcp,
        "Signature|AKTEST|inst-1",
        SIGNATURE_GID_AAA,
    ))
    .await;
    for (user, password) in [
        ("AKTEST", "2rJinBsSwnDo+VPfYZyvsRUxaTI"), // truncated
        ("AKTEST", "not base64 !!"),
        ("AKTEST", ""),
        ("AKOTHER", SIGNATURE_GID_AAA),
    ] {
        let r = v5::try_connect(v5::options_as("GID_AAA@@@dev3", b.tcp, user, password)).await;
        assert_eq!(
            r.err().as_deref(),
            Some("BadUserNamePassword"),
            "{user} {password}"
        );
    }
    // The signature of one Group ID does not open another.
    let r = v5::try_connect(v5::options_as(
        "GID_other@@@dev4",
        b.tcp,
        "AKTEST",
        SIGNATURE_GID_AAA,
    ))
    .await;
    assert_eq!(r.err().as_deref(), Some("BadUserNamePassword"));
}

#[tokio::test]
async fn hostile_credentials_are_refused_without_harm() {
    let creds = credentials(&users_yaml("pub"));
    let b = start(&creds.path, "");
    let huge = "u".repeat(60_000);
    for (user, password) in [(huge.as_str(), "x"), ("alice", huge.as_str()), ("", "")] {
        let r = v5::try_connect(v5::options_as("GID_AAA@@@h", b.tcp, user, password)).await;
        assert!(r.is_err(), "refused: {}", &user[..user.len().min(10)]);
    }
    for _ in 0..20 {
        let _ = v5::try_connect(v5::options_as("GID_AAA@@@brute", b.tcp, "alice", "guess")).await;
    }
    v5::connect(v5::options_as("GID_AAA@@@ok", b.tcp, "alice", "alice-pw")).await;
}

#[tokio::test]
async fn reloaded_grants_apply_to_connected_clients() {
    let creds = credentials(&users_yaml("pub"));
    let b = start(&creds.path, "");
    let mut bob = v5::connect(v5::options_as("GID_AAA@@@bob", b.tcp, "bob", "bob-pw")).await;
    bob.publish("a/b", QoS::AtLeastOnce, false, "before").await;
    assert_eq!(bob.next_puback().await.reason, PubAckReason::Success);
    // Replaced the way a Secret volume is updated: a new file renamed over it.
    let tmp = creds.path.with_extension("new");
    std::fs::write(&tmp, users_yaml("sub")).unwrap_or_else(|e| panic!("{e}"));
    std::fs::rename(&tmp, &creds.path).unwrap_or_else(|e| panic!("{e}"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        bob.publish("a/b", QoS::AtLeastOnce, false, "after").await;
        let reason = bob.next_puback().await.reason;
        if reason == PubAckReason::NotAuthorized {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "new grants never applied"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A broken file keeps the last good credentials.
    std::fs::write(&creds.path, "users: [").unwrap_or_else(|e| panic!("{e}"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    v5::connect(v5::options_as(
        "GID_AAA@@@alice",
        b.tcp,
        "alice",
        "alice-pw",
    ))
    .await;
    assert!(b.metric("ringmq_packets_rejected_total{reason=\"credentials_reload\"}") >= 1.0);
}

#[tokio::test]
async fn anonymous_grants_with_a_deny_rule() {
    let creds = credentials(
        "anonymous:\n  allow: true\n  grants:\n    - {filter: \"#\", action: pubsub}\n    - {filter: \"test/nosubscribe\", action: deny}\n",
    );
    let b = start(&creds.path, "");
    let mut c = v5::connect(v5::options("anon", b.tcp)).await;
    assert_eq!(
        c.subscribe("test/nosubscribe", QoS::AtLeastOnce).await,
        [SubscribeReasonCode::NotAuthorized]
    );
    assert_eq!(
        c.subscribe("test/other", QoS::AtLeastOnce).await,
        [SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
}

#[tokio::test]
async fn admin_api_needs_the_bearer_token() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let token = dir.path().join("admin-token");
    std::fs::write(&token, "s3cret-token\n").unwrap_or_else(|e| panic!("{e}"));
    let b = Broker::start(&format!(
        "auth:\n  admin_token_file: {}\n  protect_metrics: true\n",
        token.display()
    ));
    assert_eq!(b.http("/healthz").0, 200);
    assert_eq!(b.http("/readyz").0, 200);
    assert_eq!(b.http("/metrics").0, 401);
    let (status, body) = b.http_with("/metrics", &[("Authorization", "Bearer s3cret-token")]);
    assert_eq!(status, 200);
    assert!(body.contains("ringmq_connections"));
    assert_eq!(
        b.http_with("/metrics", &[("Authorization", "Bearer wrong")])
            .0,
        401
    );
}

#[tokio::test]
async fn bad_credentials_file_stops_the_start() {
    let creds = credentials("users:\n  - username: x\n    password_hash: plain-text\n");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringmq-broker"))
        .arg("--config")
        .arg({
            let cfg = creds.path.with_file_name("broker.yaml");
            std::fs::write(
                &cfg,
                format!(
                    "listeners: {{tcp: \"127.0.0.1:0\", ws: null, admin: null}}\nauth:\n  credentials_file: {}\n",
                    creds.path.display()
                ),
            )
            .unwrap_or_else(|e| panic!("{e}"));
            cfg
        })
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("password hash of user \"x\""), "{err}");
    assert!(
        !err.contains("plain-text"),
        "the bad hash is not echoed: {err}"
    );
}
