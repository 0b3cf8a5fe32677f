//! `client_id`: Client ID and name rules (B8, B12).

use serde::{Deserialize, Serialize};

/// Client ID and name rules (B8, B12).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClientIdConfig {
    /// Refuse Client IDs that are not `GroupID@@@DeviceID`.
    pub require_group_id: bool,
    /// Apply the seeds' character rule (`[0-9A-Za-z-_]`, `/` in topics) to topics
    /// and Device IDs.
    pub strict_names: bool,
}
