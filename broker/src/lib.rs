//! ringmq broker node: MQTT 3.1.1 and 5 on ntex-mqtt, with the session
//! semantics of a managed "MQTT message queue" service.
//!
//! See `ARCHITECTURE.md` at the repository root for how the pieces fit.

pub mod admin;
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
    let broker = Broker::new(config, metrics, Arc::new(storage::NoStorage));
    listener::serve(broker, bound, shutdown).await?;
    Ok(())
}

/// Periodic work: session expiry.
async fn housekeeping(broker: Arc<Broker>) {
    loop {
        ntex::time::sleep(Duration::from_secs(1)).await;
        broker.expire_sessions(Instant::now());
    }
}
