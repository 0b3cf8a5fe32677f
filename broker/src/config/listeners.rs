//! `listeners`: the addresses the broker listens on.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Addresses the broker listens on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ListenerConfig {
    /// MQTT over TCP. `null` disables it.
    pub tcp: Option<SocketAddr>,
    /// MQTT over WebSocket (path `/mqtt`, subprotocol `mqtt`). `null` disables it.
    pub ws: Option<SocketAddr>,
    /// MQTT over TLS; started only when `tls` is configured.
    pub tls: Option<SocketAddr>,
    /// MQTT over secure WebSocket; started only when `tls` is configured.
    pub wss: Option<SocketAddr>,
    /// Admin HTTP: `/metrics`, `/healthz`, `/readyz`. `null` disables it.
    pub admin: Option<SocketAddr>,
    /// Certificate and key for the TLS and secure WebSocket listeners.
    pub tls_files: Option<TlsFiles>,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        let any = |port| Some(SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, 0], port)));
        Self {
            tcp: any(1883),
            ws: any(8083),
            tls: any(8883),
            wss: any(8084),
            admin: any(8080),
            tls_files: None,
        }
    }
}

/// PEM files of the server certificate chain and its private key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}
