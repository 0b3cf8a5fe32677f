//! `trace`: what the operations API remembers (O3–O6) and where.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::Problems;

/// What the node remembers for the operations API. Everything is held in
/// memory, bounded by count and by age; a restarted node starts empty.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TraceConfig {
    /// Device trace events (connect, subscribed, …) kept, at most.
    pub device_events: usize,
    /// Message trace events kept, at most; 0 turns message tracing off.
    pub message_events: usize,
    /// Age after which trace events and metering history are dropped,
    /// seconds; at least one day, the longest trace query.
    pub retention_secs: u64,
    /// Group ID online counts are kept for this long, seconds (the query
    /// window is two days).
    pub group_history_secs: u64,
    /// Parent topic / subtopic pairs metered per minute, at most; the rest
    /// are counted under the subtopic `(other)`.
    pub report_keys: usize,
    /// Group IDs whose online count history is kept, at most.
    pub groups: usize,
    /// Seconds between two samples of the Group ID online counts.
    pub group_sample_secs: u64,
    /// Directory where traces, metering history and alarm records are also
    /// written (JSON lines, one file per kind and hour), so that a restarted
    /// node still answers for the retention window. `null`: memory only.
    pub dir: Option<PathBuf>,
    /// Most bytes the files in `dir` take; the oldest go first.
    pub disk_bytes: u64,
}

impl Default for TraceConfig {
    fn default() -> Self {
        Self {
            device_events: 200_000,
            message_events: 500_000,
            retention_secs: 25 * 3600,
            group_history_secs: 49 * 3600,
            report_keys: 10_000,
            groups: 1_000,
            group_sample_secs: 60,
            dir: None,
            disk_bytes: 1 << 30,
        }
    }
}

impl TraceConfig {
    pub(super) fn check(&self, p: &mut Problems) {
        p.unless(
            self.retention_secs >= 24 * 3600 && self.group_history_secs >= 48 * 3600,
            "trace.retention_secs must be at least 86400 and trace.group_history_secs at least 172800: the API's query windows are one and two days",
        );
        p.unless(
            self.group_sample_secs > 0,
            "trace.group_sample_secs must be at least 1",
        );
    }
}
