//! `auth`: credentials, the admin tokens and how logins are checked (A1–A6).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::Problems;

/// Authentication settings (A1–A6). Secrets themselves live in files that
/// Kubernetes mounts from Secrets, never in this configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// YAML file with users (password hashes and grants), AccessKey/SecretKey
    /// pairs, declared Group IDs and anonymous access; reloaded when it
    /// changes. Without it every client may connect and use every topic.
    pub credentials_file: Option<PathBuf>,
    /// How an MQTT 3.1.1 SUBSCRIBE to a topic the client may not read is
    /// refused: `close` the connection (the seeds' behaviour) or answer with
    /// the SUBACK failure code 0x80.
    pub v3_subscribe_refusal: V3SubscribeRefusal,
    /// File holding the bearer token that the admin HTTP API requires.
    /// `/healthz` and `/readyz` never need it; `/metrics` only when
    /// `protect_metrics` is set. Without it the operations API and
    /// `/cluster/drain` answer requests from loopback only.
    pub admin_token_file: Option<PathBuf>,
    /// File holding a read-only token: GET requests of the operations API
    /// and a protected `/metrics`, for dashboards; no change.
    pub admin_read_token_file: Option<PathBuf>,
    /// `/metrics` answers only callers the operations API answers (a
    /// token, or loopback without one), as everything but the MQTT ports
    /// and the health probes is closed by default (S1). `false` opens it to
    /// everyone, for a Prometheus that scrapes without a token (the
    /// operator renders that, on the instance's pod network).
    pub protect_metrics: bool,
    /// File holding the key that signs tokens (token mode, A3); the same key
    /// on every node lets any node verify any token. Without it the token
    /// service is off.
    pub token_signing_key_file: Option<PathBuf>,
    /// Shortest lifetime of a token the service issues, seconds (the seeds:
    /// 60; lower only for tests).
    pub token_min_lifetime_secs: u64,
    /// How CONNECT credentials are checked: the password pool, failure
    /// limits, the cache of successful checks.
    pub login: LoginConfig,
}

/// Password checks of CONNECT (A1). argon2 runs on threads of its own, never
/// on a connection worker.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LoginConfig {
    /// Threads verifying passwords; 0 means one per CPU core.
    pub verify_threads: usize,
    /// CONNECTs waiting for a password check at most; past it a CONNECT is
    /// refused at once as "server busy" (MQTT 5 0x89, 3.1.1 return code 3).
    pub verify_queue: usize,
    /// Failed logins of one user name within `failure_window_secs` after which
    /// its CONNECTs are refused without a check (MQTT 5 0x9F, 3.1.1 return
    /// code 5) until the window ends, except a user name and password that
    /// passed a check within `cache_secs`; 0 turns it off. Lenient by
    /// default: a fleet often shares one user name, and the limit is a lever
    /// to lock all of it out.
    pub failures_per_user: u32,
    /// The same for one client IP address (IPv6: its /64).
    pub failures_per_ip: u32,
    /// Length of the failure window, seconds.
    pub failure_window_secs: u64,
    /// Milliseconds a CONNECT refused for too many failures waits before its
    /// CONNACK: a client that retries at once would otherwise make a storm
    /// of cheap refusals, each a TCP connection to accept and close (6 000
    /// a second in the benchmark). 0 answers at once.
    pub limited_delay_ms: u64,
    /// Seconds a successful password check is remembered, so that a client
    /// reconnecting with the same user name and password skips argon2; 0
    /// turns it off. Emptied whenever the credentials file changes.
    pub cache_secs: u64,
}

impl Default for LoginConfig {
    fn default() -> Self {
        Self {
            verify_threads: 0,
            verify_queue: 256,
            failures_per_user: 50,
            failures_per_ip: 100,
            failure_window_secs: 60,
            limited_delay_ms: 1000,
            cache_secs: 300,
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            credentials_file: None,
            v3_subscribe_refusal: V3SubscribeRefusal::Close,
            admin_token_file: None,
            admin_read_token_file: None,
            protect_metrics: true,
            token_signing_key_file: None,
            token_min_lifetime_secs: 60,
            login: LoginConfig::default(),
        }
    }
}

/// See `AuthConfig::v3_subscribe_refusal`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum V3SubscribeRefusal {
    #[default]
    Close,
    Suback,
}

impl AuthConfig {
    pub(super) fn check(&self, p: &mut Problems) {
        p.unless(
            self.login.verify_queue > 0 && self.login.failure_window_secs > 0,
            "auth.login.verify_queue and auth.login.failure_window_secs must be at least 1",
        );
    }
}
