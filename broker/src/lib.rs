//! ringmq broker node: MQTT 3.1.1 and 5 on ntex-mqtt, with the session
//! semantics of a managed "MQTT message queue" service.
//!
//! See `ARCHITECTURE.md` at the repository root for how the pieces fit.

pub mod admin;
pub mod auth;
pub mod broker;
pub mod config;
pub mod connection;
pub mod listener;
pub mod message;
pub mod metrics;
pub mod protocol;
pub mod retain;
pub mod router;
pub mod session;
pub mod storage;
pub mod sys;
pub mod tls;
pub mod token;
pub mod token_api;
pub mod topic;

use std::sync::Arc;
use std::time::{Duration, Instant};

pub use broker::Broker;
pub use config::Config;

/// Errors that stop the node.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Listener(#[from] listener::ListenerError),
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    #[error("cannot read the token signing key file {path}: {error}")]
    SigningKey {
        path: std::path::PathBuf,
        error: std::io::Error,
    },
    #[error("cannot read the admin token file {path}: {error}")]
    AdminToken {
        path: std::path::PathBuf,
        error: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

/// Runs one broker node until `shutdown` resolves. Must be called inside an
/// ntex runtime (`ntex::rt::System`).
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<()> {
    let bound = listener::Bound::bind(&config)?;
    for (name, addr) in bound.addrs() {
        tracing::info!(listener = name, %addr, "listening");
    }
    let metrics = metrics::Metrics::new()?;
    let auth = match &config.auth.credentials_file {
        Some(path) => auth::Auth::from_file(path)?,
        None => auth::Auth::open(),
    };
    let admin_token = match &config.auth.admin_token_file {
        Some(path) => Some(
            admin::AdminToken::read(path).map_err(|error| Error::AdminToken {
                path: path.clone(),
                error,
            })?,
        ),
        None => None,
    };
    let tokens = match &config.auth.token_signing_key_file {
        Some(path) => {
            let key = std::fs::read(path).map_err(|error| Error::SigningKey {
                path: path.clone(),
                error,
            })?;
            Some(token::TokenService::new(key.trim_ascii()))
        }
        None => None,
    };
    let broker = Broker::new(config, metrics, auth, tokens, Arc::new(storage::NoStorage));
    listener::serve(broker, bound, admin_token, shutdown).await?;
    Ok(())
}

/// Periodic work: session expiry, credentials reload.
async fn housekeeping(broker: Arc<Broker>) {
    loop {
        ntex::time::sleep(Duration::from_secs(1)).await;
        broker.expire_sessions(Instant::now());
        match broker.auth.reload_if_changed() {
            Ok(true) => tracing::info!("credentials reloaded"),
            Ok(false) => {}
            Err(e) => {
                broker.metrics.reject("credentials_reload");
                tracing::warn!(error = %e, "credentials file not reloaded; the previous one stays in force");
            }
        }
    }
}
