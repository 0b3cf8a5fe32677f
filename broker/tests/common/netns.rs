//! Network namespaces for tests that need addresses other than loopback:
//! partitions, and requests from elsewhere than the broker's own host.

use std::sync::atomic::{AtomicU32, Ordering};

/// A network namespace joined to the test's namespace by two veth pairs:
/// one carries the cluster links and can be cut (both directions) and joined
/// again, the other lets the test's clients reach the node inside.
pub struct Netns {
    pub name: String,
    pub host_if: String,
    pub host_ip: String,
    pub ns_ip: String,
    pub client_if: String,
    /// The node's client-facing address (on the pair that is never cut).
    pub client_ip: String,
}

impl Netns {
    /// `None` (with the reason on stderr) where namespaces cannot be made.
    pub fn create() -> Option<Netns> {
        // Unique per test process and per namespace it makes.
        static MADE: AtomicU32 = AtomicU32::new(0);
        let tag = (std::process::id() % 1_000) * 10 + MADE.fetch_add(1, Ordering::Relaxed) % 10;
        let n = Netns {
            name: format!("rmq{tag}"),
            host_if: format!("rmqh{tag}"),
            host_ip: format!("10.213.{}.1", tag % 250),
            ns_ip: format!("10.213.{}.2", tag % 250),
            client_if: format!("rmqc{tag}"),
            client_ip: format!("10.214.{}.2", tag % 250),
        };
        let ns_if = format!("rmqn{tag}");
        let nc_if = format!("rmqd{tag}");
        let host_cidr = format!("{}/24", n.host_ip);
        let ns_cidr = format!("{}/24", n.ns_ip);
        let client_host_cidr = format!("10.214.{}.1/24", tag % 250);
        let client_cidr = format!("{}/24", n.client_ip);
        let steps: [Vec<&str>; 14] = [
            vec!["netns", "add", &n.name],
            vec![
                "link", "add", &n.host_if, "type", "veth", "peer", "name", &ns_if,
            ],
            vec!["link", "set", &ns_if, "netns", &n.name],
            vec!["addr", "add", &host_cidr, "dev", &n.host_if],
            vec!["link", "set", &n.host_if, "up"],
            vec!["-n", &n.name, "addr", "add", &ns_cidr, "dev", &ns_if],
            vec!["-n", &n.name, "link", "set", &ns_if, "up"],
            vec!["-n", &n.name, "link", "set", "lo", "up"],
            vec![
                "link",
                "add",
                &n.client_if,
                "type",
                "veth",
                "peer",
                "name",
                &nc_if,
            ],
            vec!["link", "set", &nc_if, "netns", &n.name],
            vec!["addr", "add", &client_host_cidr, "dev", &n.client_if],
            vec!["link", "set", &n.client_if, "up"],
            vec!["-n", &n.name, "addr", "add", &client_cidr, "dev", &nc_if],
            vec!["-n", &n.name, "link", "set", &nc_if, "up"],
        ];
        for step in steps {
            let ok = std::process::Command::new("ip")
                .args(&step)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                eprintln!(
                    "network namespaces unavailable (`ip {}` failed)",
                    step.join(" ")
                );
                return None;
            }
        }
        Some(n)
    }

    pub fn set(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        let ok = std::process::Command::new("ip")
            .args(["link", "set", &self.host_if, state])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "ip link set {} {state}", self.host_if);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for link in [&self.host_if, &self.client_if] {
            let _ = std::process::Command::new("ip")
                .args(["link", "del", link])
                .status();
        }
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
