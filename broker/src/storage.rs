//! The storage hook of the publish path.
//!
//! A QoS 1/2 PUBLISH is acknowledged only after `Storage::store` completed
//! (K3). Without Kafka configured the broker uses `NoStorage`, which stores
//! nothing and answers at once; the Kafka module implements this trait.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::message::Message;

/// Why a message could not be stored.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StorageError {
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    #[error("storage buffer full")]
    BufferFull,
}

pub type Result<T> = std::result::Result<T, StorageError>;

/// A future returned by `Storage::store`.
pub type StoreFuture = Pin<Box<dyn Future<Output = Result<()>> + Send>>;

/// Durable storage of uplink messages.
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Whether messages of this parent topic are stored.
    fn stores(&self, parent_topic: &str) -> bool;
    /// Stores one message; resolves once it is durable.
    fn store(&self, msg: Arc<Message>) -> StoreFuture;
}

/// The embedded default: no parent topic is stored.
#[derive(Debug, Default)]
pub struct NoStorage;

impl Storage for NoStorage {
    fn stores(&self, _parent_topic: &str) -> bool {
        false
    }

    fn store(&self, _msg: Arc<Message>) -> StoreFuture {
        Box::pin(async { Ok(()) })
    }
}
