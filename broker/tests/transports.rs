//! MQTT over TLS, WebSocket and secure WebSocket (SPEC B2), with a
//! certificate generated at test time, and one message crossing all four
//! listeners.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use common::Broker;
use common::v4::{self, MqttOptions, QoS};
use rumqttc::{TlsConfiguration, Transport};

struct Pki {
    _dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
    client: Arc<rustls::ClientConfig>,
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap_or_else(|e| panic!("certificate: {e}"));
    let cert = dir.path().join("tls.crt");
    let key = dir.path().join("tls.key");
    std::fs::write(&cert, ck.cert.pem()).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap_or_else(|e| panic!("{e}"));
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(ck.cert.der().clone())
        .unwrap_or_else(|e| panic!("root: {e}"));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|e| panic!("{e}"))
        .with_root_certificates(roots)
        .with_no_client_auth();
    Pki {
        _dir: dir,
        cert,
        key,
        client: Arc::new(client),
    }
}

fn tls_options(id: &str, port: u16, client: &Arc<rustls::ClientConfig>) -> MqttOptions {
    let mut o = MqttOptions::new(id, "localhost", port);
    o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        client.clone(),
    )));
    o
}

fn ws_options(id: &str, scheme: &str, port: u16) -> MqttOptions {
    MqttOptions::new(id, format!("{scheme}://localhost:{port}/mqtt"), port)
}

#[tokio::test]
async fn one_message_crosses_every_listener() {
    let pki = pki();
    let b = Broker::start_tls("", &pki.cert, &pki.key);

    let mut over_tls = v4::connect(tls_options("tls", b.tls, &pki.client)).await;
    let mut o = ws_options("ws", "ws", b.ws);
    o.set_transport(Transport::ws());
    let mut over_ws = v4::connect(o).await;
    let mut o = ws_options("wss", "wss", b.wss);
    o.set_transport(Transport::wss_with_config(TlsConfiguration::Rustls(
        pki.client.clone(),
    )));
    let mut over_wss = v4::connect(o).await;
    let mut over_tcp = v4::connect(v4::options("tcp", b.tcp)).await;

    for c in [&mut over_tls, &mut over_ws, &mut over_wss, &mut over_tcp] {
        c.subscribe("x/#", QoS::AtLeastOnce).await;
    }
    over_wss
        .publish("x/1", QoS::AtLeastOnce, false, "hello")
        .await;
    for c in [&mut over_tls, &mut over_ws, &mut over_wss, &mut over_tcp] {
        assert_eq!(&c.next_publish().await.payload[..], b"hello");
    }
}

#[tokio::test]
async fn tls_refuses_an_untrusted_server_certificate() {
    let trusted = pki();
    let other = pki();
    let b = Broker::start_tls("", &trusted.cert, &trusted.key);
    let err = v4::try_connect(tls_options("x", b.tls, &other.client)).await;
    assert!(
        err.is_err(),
        "a client trusting another CA must not connect"
    );
    // Plain MQTT on the TLS port fails too, and the broker stays up.
    assert!(v4::try_connect(v4::options("plain", b.tls)).await.is_err());
    v4::connect(tls_options("ok", b.tls, &trusted.client)).await;
}

#[tokio::test]
async fn tls_listeners_stay_off_without_a_certificate() {
    let b = Broker::start("");
    // The broker names every listener it opens.
    assert_eq!((b.tls, b.wss), (0, 0), "{}", b.log());
}

#[tokio::test]
async fn websocket_answers_only_on_the_mqtt_path() {
    let b = Broker::start("");
    let mut o = MqttOptions::new("wrong", format!("ws://localhost:{}/other", b.ws), b.ws);
    o.set_transport(Transport::ws());
    assert!(v4::try_connect(o).await.is_err());
}

#[tokio::test]
async fn default_style_listener_serves_ipv6_and_ipv4() {
    let b = Broker::start_dual_stack();
    let mut v6 = v4::connect(MqttOptions::new("v6", "::1", b.tcp)).await;
    v6.subscribe("ip/#", QoS::AtLeastOnce).await;
    let v4_client = v4::connect(v4::options("v4", b.tcp)).await;
    v4_client
        .publish("ip/x", QoS::AtLeastOnce, false, "both")
        .await;
    assert_eq!(&v6.next_publish().await.payload[..], b"both");
}
