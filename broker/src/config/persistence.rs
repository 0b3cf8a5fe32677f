//! `persistence`: where a node keeps what must survive a restart or a crash.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::Problems;

/// When the store forces its writes to the disk. Every policy survives a
/// crash of the process (a batch is handed to the operating system before
/// anything waiting for it is acknowledged); they differ in what a power
/// loss or a kernel crash costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fsync {
    /// Each batch is synced before what it holds is acknowledged: nothing
    /// acknowledged is lost, also on power loss; one fsync per batch (many
    /// messages share one, group commit).
    Batch,
    /// Synced every `fsync_interval_ms`: a power loss loses what was
    /// acknowledged in the last interval.
    Interval,
    /// Never synced by the broker (the kernel writes back, typically within
    /// 30 s): a power loss may lose that much.
    Off,
}

/// The node's durable store: persistent sessions, their queued QoS 1/2
/// messages and retained messages (SPEC B4, B5).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PersistenceConfig {
    /// Directory of the store; a relative path is relative to the working
    /// directory. `null`: memory only, a restart loses every persistent
    /// session, queued and retained message.
    pub dir: Option<PathBuf>,
    /// When writes are forced to the disk.
    pub fsync: Fsync,
    /// Milliseconds between syncs with `fsync: interval`.
    pub fsync_interval_ms: u64,
    /// Changes written in one batch at most.
    pub max_batch: usize,
}

impl Default for PersistenceConfig {
    fn default() -> Self {
        Self {
            dir: Some(PathBuf::from("data")),
            fsync: Fsync::Batch,
            fsync_interval_ms: 100,
            max_batch: 4096,
        }
    }
}

impl PersistenceConfig {
    pub(super) fn check(&self, p: &mut Problems) {
        p.unless(
            self.max_batch > 0,
            "persistence.max_batch must be at least 1",
        );
        p.unless(
            self.fsync != Fsync::Interval || self.fsync_interval_ms > 0,
            "persistence.fsync_interval_ms must be at least 1 with fsync: interval",
        );
        p.unless(
            self.dir.as_ref().is_none_or(|d| !d.as_os_str().is_empty()),
            "persistence.dir must not be empty (null keeps everything in memory)",
        );
    }
}
