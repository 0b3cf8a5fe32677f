//! `instance`: how the operations API names the instance (O1).

use serde::{Deserialize, Serialize};

/// The instance as its users see it; the operator fills this in.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct InstanceConfig {
    /// The instance's name (the `MqttInstance` resource's name).
    pub name: String,
    /// Addresses devices and applications use, by kind (`tcp`, `tls`, `ws`,
    /// `wss`, `tcp_ipv6`, …), as the operator publishes them; reported by
    /// the operations API as they are.
    pub endpoints: std::collections::BTreeMap<String, String>,
}

impl Default for InstanceConfig {
    fn default() -> Self {
        Self {
            name: "ringmq".to_owned(),
            endpoints: std::collections::BTreeMap::new(),
        }
    }
}
