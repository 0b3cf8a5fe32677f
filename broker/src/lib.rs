//! ringmq broker node: MQTT 3.1.1 and 5 on ntex-mqtt, with the session
//! semantics of a managed "MQTT message queue" service.
//!
//! See `ARCHITECTURE.md` at the repository root for how the pieces fit.

pub mod admin;
pub mod alarm;
pub mod auth;
pub mod broker;
pub mod capacity;
pub mod cluster;
mod codec;
pub mod config;
pub mod connection;
pub mod console;
#[cfg(test)]
mod core_tests;
pub mod descriptors;
pub mod durable;
pub mod journal;
pub mod kafka;
pub mod listener;
pub mod login;
pub mod message;
pub mod meter;
pub mod metrics;
pub mod node;
pub mod ops;
pub mod order;
pub mod peers;
pub mod persist;
pub mod protocol;
pub mod pubrel;
pub mod replica;
pub mod retain;
pub mod ring;
pub mod router;
pub mod secret_file;
pub mod session;
pub mod shutdown;
pub mod storage;
pub mod sys;
pub mod tls;
pub mod token;
pub mod token_api;
pub mod tombstone;
pub mod topic;
pub mod trace;
pub mod util;

pub use broker::Broker;
pub use node::run;

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
    #[error(transparent)]
    Kafka(#[from] kafka::KafkaSetupError),
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
    #[error(transparent)]
    Capacity(#[from] capacity::CapacityError),
    #[error(transparent)]
    Alarm(#[from] alarm::AlarmError),
    #[error(transparent)]
    Journal(#[from] journal::JournalError),
    #[error(transparent)]
    Persist(#[from] persist::PersistError),
    #[error("cannot read the {what} file {path}: {error}")]
    SecretFile {
        what: &'static str,
        path: std::path::PathBuf,
        error: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;
