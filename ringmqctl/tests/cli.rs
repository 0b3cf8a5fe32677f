//! `ringmqctl` as a process against a stand-in admin port that answers one
//! request with a canned answer: what it asks, what it prints, how it fails.
//! (Against a real broker: `broker/tests/ops.rs`.)

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::thread::JoinHandle;

use ringmq_api as api;

/// Serves one request with `status` and `body`; the thread returns the
/// request line and body it read.
fn serve_once(status: u16, body: String) -> (u16, JoinHandle<(String, String)>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("bind: {e}"));
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    let handle = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap_or_else(|e| panic!("accept: {e}"));
        let mut reader = BufReader::new(stream);
        let mut request_line = String::new();
        let _ = reader.read_line(&mut request_line);
        let mut length = 0;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        let mut request_body = vec![0; length];
        let _ = reader.read_exact(&mut request_body);
        let answer = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = reader.get_mut().write_all(answer.as_bytes());
        (
            request_line.trim().to_owned(),
            String::from_utf8_lossy(&request_body).into_owned(),
        )
    });
    (port, handle)
}

fn ctl(port: u16, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ringmqctl"))
        .arg("--server")
        .arg(format!("http://127.0.0.1:{port}"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("ringmqctl: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json<T: serde::Serialize>(t: &T) -> String {
    serde_json::to_string(t).unwrap_or_default()
}

#[test]
fn an_instance_answer_is_printed_as_a_block_and_a_node_table() {
    let node = |name: &str, connections| api::NodeInfo {
        name: name.into(),
        state: "running".into(),
        connections,
        max_connections: 9,
        subscriptions: 2,
        subscribers: 1,
        sessions: 1,
        topics: 2,
        pub_tps: 1.25,
        sub_tps: 0.0,
        under_replicated_sessions: 0,
        replica_sessions: 1,
        alarm_evaluator: name == "n0",
    };
    let answer = api::Instance {
        name: "demo".into(),
        capacity: api::Capacity {
            connections: 10,
            tps: 0,
            subscriptions: 100,
            topics: 100,
            mode: "enforce".into(),
        },
        endpoints: [("tcp".to_owned(), "mqtt.example:1883".to_owned())].into(),
        totals: api::Totals {
            connections: 3,
            subscriptions: 4,
            topics: 2,
            pub_tps: 1.25,
            sub_tps: 0.0,
            tps: 1.25,
        },
        utilization: api::Utilization {
            connections: Some(30.0),
            subscriptions: Some(4.0),
            topics: Some(2.0),
            tps: None,
        },
        alarm_thresholds: [("connections".to_owned(), Some(7))].into(),
        active_alarms: 0,
        under_replicated_sessions: 3,
        nodes: vec![node("n0", 1), node("n1", 2)],
        missing_nodes: vec!["n2".into()],
    };
    let (port, server) = serve_once(200, json(&answer));
    let (ok, out, err) = ctl(port, &["instance"]);
    let (request, _) = server.join().unwrap_or_default();
    assert!(ok, "{err}");
    assert_eq!(request, "GET /api/v1/instance HTTP/1.1");
    assert!(out.contains("warning: no answer from n2"), "{out}");
    assert!(out.contains("connections:   3 of 10 (30.0 %)"), "{out}");
    assert!(out.contains("tps:           1.2 (no limit)"), "{out}");
    assert!(
        out.contains("replication:   3 persistent sessions under-replicated"),
        "{out}"
    );
    assert!(
        out.contains("endpoints:     tcp=mqtt.example:1883"),
        "{out}"
    );
    let n1 = out
        .lines()
        .find(|l| l.starts_with("n1"))
        .unwrap_or_default();
    assert_eq!(
        n1.split_whitespace().collect::<Vec<_>>(),
        ["n1", "running", "2", "9", "2", "1", "1.2", "0.0"],
        "{out}"
    );
}

#[test]
fn a_send_posts_the_typed_request_and_prints_the_message_id() {
    let answer = api::Sent {
        message_id: "00000000000000ab".into(),
        topic: "t/1".into(),
        reached: 2,
    };
    let (port, server) = serve_once(200, json(&answer));
    let (ok, out, err) = ctl(port, &["send", "t/1", "hello", "--qos", "1", "--retain"]);
    let (request, body) = server.join().unwrap_or_default();
    assert!(ok, "{err}");
    assert_eq!(request, "POST /api/v1/messages HTTP/1.1");
    let sent: api::SendRequest =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(
        (
            sent.topic.as_str(),
            sent.payload.as_str(),
            sent.qos,
            sent.retain
        ),
        ("t/1", "hello", 1, true)
    );
    assert_eq!(out, "sent 00000000000000ab to t/1 (2 sessions reached)\n");
}

#[test]
fn refusals_and_unexpected_answers_are_clear_errors() {
    let refusal = api::ApiError {
        error: "no session for Client ID ghost".into(),
    };
    let (port, server) = serve_once(404, json(&refusal));
    let (ok, _, err) = ctl(port, &["client", "ghost"]);
    let (request, _) = server.join().unwrap_or_default();
    assert!(!ok);
    assert_eq!(request, "GET /api/v1/clients/ghost HTTP/1.1");
    assert!(err.contains("404: no session for Client ID ghost"), "{err}");

    // A server of another version whose answer lacks a field.
    let (port, server) = serve_once(200, r#"{"alarms": []}"#.into());
    let (ok, _, err) = ctl(port, &["alarms"]);
    let _ = server.join();
    assert!(!ok);
    assert!(err.contains("not what this ringmqctl expects"), "{err}");
}

#[test]
fn an_unreachable_server_is_named() {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(1);
    let (ok, _, err) = ctl(port, &["alarms"]);
    assert!(!ok);
    assert!(
        err.contains(&format!("cannot reach 127.0.0.1:{port}")),
        "{err}"
    );
}
