//! `cluster`: the other nodes of the instance (C1–C5).

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::Problems;

/// Cluster membership and links (C1–C5).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// The cluster port: links between nodes, and client connections that
    /// another node forwards to their session's owner.
    pub listen: SocketAddr,
    /// The other nodes' cluster addresses, `host:port` (on Kubernetes the
    /// pods' names under the StatefulSet's headless Service). Names are
    /// resolved again on every connection attempt; this node's own address
    /// may be listed (it is recognised and skipped).
    pub peers: Vec<String>,
    /// Where the other nodes reach this node's cluster port (`host:port`);
    /// `null`: the listen address, or `<node_id>:<port>` when it listens on
    /// every interface.
    pub advertise: Option<String>,
    /// With `advertise` unset, advertise `<node_id>.<advertise_domain>:<port>`
    /// (on Kubernetes: the pod's name under the headless Service, e.g.
    /// `ringmq-nodes.mqtt.svc`), so one configuration serves every pod.
    pub advertise_domain: Option<String>,
    /// File holding the secret every node of the instance shares; a node
    /// that cannot prove it knows the secret is not let in.
    pub secret_file: PathBuf,
    /// Heartbeat interval on every link, milliseconds.
    pub heartbeat_ms: u64,
    /// A node not heard from for this long is taken off the ring, milliseconds.
    pub failure_timeout_ms: u64,
    /// Frames waiting for one peer, at most; beyond it forwarded QoS 0
    /// messages are dropped (counted) and QoS 1/2 publishes wait.
    pub link_queue: usize,
    /// How many nodes keep each persistent session, its owner included
    /// (1 to 3): its owner and the next `replication_factor - 1` nodes of
    /// the ring. A QoS 1/2 message for a persistent session, a SUBSCRIBE
    /// and an UNSUBSCRIBE are acknowledged once every replica with a link
    /// holds them, so a node lost without warning loses no session and no
    /// acknowledged message; 1: sessions live on their owner only.
    pub replication_factor: usize,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, 0], 7946)),
            peers: Vec::new(),
            advertise: None,
            advertise_domain: None,
            secret_file: PathBuf::from("/etc/ringmq/cluster/secret"),
            heartbeat_ms: 500,
            failure_timeout_ms: 3000,
            link_queue: 10_000,
            replication_factor: 2,
        }
    }
}

impl ClusterConfig {
    pub(super) fn check(&self, p: &mut Problems) {
        p.unless(
            self.heartbeat_ms > 0 && self.failure_timeout_ms >= 2 * self.heartbeat_ms,
            "cluster.failure_timeout_ms must be at least twice cluster.heartbeat_ms (> 0)",
        );
        p.unless(self.link_queue > 0, "cluster.link_queue must be at least 1");
        p.unless(
            (1..=3).contains(&self.replication_factor),
            "cluster.replication_factor must be 1, 2 or 3",
        );
    }
}
