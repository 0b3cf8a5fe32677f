//! Test harness: runs the real `ringmq-broker` binary on free loopback ports
//! and drives it with real MQTT clients (rumqttc v4 and v5).

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

pub mod netns;
pub mod raw;

/// Nodes of one cluster on loopback, started one after the other; each is
/// given the addresses of the nodes before it and the older ones dial back.
pub struct Cluster {
    pub nodes: Vec<Broker>,
    /// The node names, in the order of `nodes`.
    pub names: Vec<String>,
    secret: PathBuf,
    _dir: tempfile::TempDir,
    extra: String,
    /// Nodes taken away for good, so that new names do not repeat.
    pub removed: usize,
    /// The address the nodes' cluster ports listen on.
    host: String,
    /// `cluster.failure_timeout_ms` of every node.
    failure_timeout_ms: u64,
}

impl Cluster {
    /// Starts `n` nodes named `n0`, `n1`, … sharing a secret, and waits until
    /// every node sees all of them.
    pub fn start(n: usize, extra: &str) -> Cluster {
        Self::start_on(n, extra, "127.0.0.1")
    }

    /// Like `start`, with the cluster ports on `host`.
    pub fn start_on(n: usize, extra: &str, host: &str) -> Cluster {
        Self::start_with(n, extra, host, 1000)
    }

    /// Like `start`, with another failure timeout (a test that keeps a node
    /// frozen for a while without losing it).
    pub fn start_with_failure_timeout(n: usize, extra: &str, ms: u64) -> Cluster {
        Self::start_with(n, extra, "127.0.0.1", ms)
    }

    fn start_with(n: usize, extra: &str, host: &str, failure_timeout_ms: u64) -> Cluster {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "cluster-secret-for-tests")
            .unwrap_or_else(|e| panic!("secret: {e}"));
        let mut c = Cluster {
            nodes: Vec::new(),
            names: Vec::new(),
            secret,
            _dir: dir,
            extra: extra.to_owned(),
            removed: 0,
            host: host.to_owned(),
            failure_timeout_ms,
        };
        for _ in 0..n {
            c.add();
        }
        c.wait_ring(n);
        c
    }

    /// Starts one more node (named after its position) that knows the others.
    pub fn add(&mut self) -> &Broker {
        let name = format!("n{}", self.nodes.len() + self.removed);
        let secret = self.secret.clone();
        self.add_named(&name, &secret)
    }

    /// Starts a node with a given name and secret file.
    pub fn add_named(&mut self, name: &str, secret: &Path) -> &Broker {
        let config = self.node_config(name, secret, &self.host);
        let b = Broker::start(&config);
        self.nodes.push(b);
        self.names.push(name.to_owned());
        let last = self.nodes.len() - 1;
        &self.nodes[last]
    }

    /// Starts a node inside a network namespace: its cluster port on
    /// `cluster_ip`, its MQTT and admin ports on `client_ip`.
    pub fn add_in_netns(
        &mut self,
        name: &str,
        netns: &str,
        cluster_ip: &str,
        client_ip: &str,
    ) -> &Broker {
        // The test reads this node's metrics from its own namespace, as a
        // Prometheus without a token would.
        let config = format!(
            "{}\nauth:\n  protect_metrics: false\n",
            self.node_config(name, &self.secret, cluster_ip)
        );
        let b = Broker::start_in_netns(&config, netns, client_ip);
        self.nodes.push(b);
        self.names.push(name.to_owned());
        let last = self.nodes.len() - 1;
        &self.nodes[last]
    }

    /// Kills node `i` with SIGKILL and starts it again under its name, on
    /// its directory (its store as the crash left it), knowing the other
    /// nodes; returns once it listens (it becomes ready once it rejoined).
    pub fn crash_restart(&mut self, i: usize) {
        self.nodes[i].kill();
        let config = self.node_config_skipping(&self.names[i], &self.secret, &self.host, Some(i));
        self.nodes[i].set_extra(&config);
        self.nodes[i].restart_unready();
    }

    fn node_config(&self, name: &str, secret: &Path, host: &str) -> String {
        self.node_config_skipping(name, secret, host, None)
    }

    fn node_config_skipping(
        &self,
        name: &str,
        secret: &Path,
        host: &str,
        skip: Option<usize>,
    ) -> String {
        let peers: Vec<String> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != skip)
            .map(|(_, b)| format!("\"{}:{}\"", self.host, b.cluster))
            .collect();
        format!(
            "node_id: {name}\ncluster:\n  listen: \"{host}:0\"\n  peers: [{}]\n  secret_file: {}\n  heartbeat_ms: 100\n  failure_timeout_ms: {}\n{}",
            peers.join(", "),
            secret.display(),
            self.failure_timeout_ms,
            self.extra
        )
    }

    /// Takes node `i` out of the cluster's list (dropping it kills it).
    pub fn take(&mut self, i: usize) -> Broker {
        self.names.remove(i);
        self.removed += 1;
        self.nodes.remove(i)
    }

    /// MQTT/TCP ports of the running nodes.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|b| b.tcp).collect()
    }

    /// Stops node `i` with SIGTERM (a planned leave) and replaces it with a
    /// new process of the same name that knows the other nodes (a rolling
    /// restart step); returns the new node's index.
    pub fn restart(&mut self, i: usize) -> usize {
        let mut old = self.nodes.remove(i);
        assert_eq!(old.terminate(), Some(0), "clean exit:\n{}", old.log());
        let name = self.names.remove(i);
        let secret = self.secret.clone();
        self.add_named(&name, &secret);
        self.nodes.len() - 1
    }

    /// Waits until every running node's ring has `n` nodes.
    pub fn wait_ring(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let sizes: Vec<f64> = self
                .nodes
                .iter()
                .map(|b| b.metric("ringmq_cluster_nodes"))
                .collect();
            if sizes.iter().all(|s| *s == n as f64) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "rings did not converge to {n}: {sizes:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A Client ID whose session the ring puts on `node` among `nodes`.
pub fn owned_by(node: &str, nodes: &[String], prefix: &str) -> String {
    let ring = ringmq_broker::ring::Ring::new(nodes);
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .find(|id| ring.owner(id).is_some_and(|o| &**o == node))
        .unwrap_or_default()
}

/// How long a test waits for something that should happen.
pub const WAIT: Duration = Duration::from_secs(5);
/// How long a test waits to be sure that something does not happen.
pub const QUIET: Duration = Duration::from_millis(700);

/// What the broker binary is started under.
#[derive(Clone, Copy)]
enum Wrap<'a> {
    None,
    Netns(&'a str),
    Nofile(u32),
}

/// A broker process; killed with SIGKILL when dropped.
pub struct Broker {
    child: Child,
    pub tcp: u16,
    pub ws: u16,
    pub tls: u16,
    pub wss: u16,
    pub admin: u16,
    /// The cluster port, when the configuration has a `cluster` section.
    pub cluster: u16,
    /// The address the test reaches the MQTT/TCP and admin ports at.
    pub host: String,
    pub dir: tempfile::TempDir,
    /// How many times the process was started (`restart` starts it again).
    starts: u32,
}

impl Broker {
    /// Starts a broker with the default configuration plus `extra` YAML
    /// (top-level keys other than `listeners`).
    pub fn start(extra: &str) -> Broker {
        Self::start_with(extra, None, "127.0.0.1")
    }

    /// Starts a broker whose MQTT/TCP listener is bound to `[::]`, as the
    /// embedded defaults are (IPv6 and IPv4 on one socket).
    pub fn start_dual_stack() -> Broker {
        Self::start_with("", None, "[::]")
    }

    /// Starts a broker with TLS listeners from the given PEM files.
    pub fn start_tls(extra: &str, cert: &Path, key: &Path) -> Broker {
        Self::start_with(
            extra,
            Some((cert.to_path_buf(), key.to_path_buf())),
            "127.0.0.1",
        )
    }

    fn start_with(extra: &str, tls: Option<(PathBuf, PathBuf)>, tcp_host: &str) -> Broker {
        Self::spawn(extra, tls, tcp_host, "127.0.0.1", Wrap::None)
    }

    /// Starts a broker inside a network namespace, its MQTT/TCP and admin
    /// ports on `host` (an address of the namespace the test can reach).
    pub fn start_in_netns(extra: &str, netns: &str, host: &str) -> Broker {
        Self::spawn(extra, None, host, host, Wrap::Netns(netns))
    }

    /// Starts a broker whose open-file limit is `nofile` (`prlimit`).
    pub fn start_with_nofile(extra: &str, nofile: u32) -> Broker {
        Self::spawn(extra, None, "127.0.0.1", "127.0.0.1", Wrap::Nofile(nofile))
    }

    fn spawn(
        extra: &str,
        tls: Option<(PathBuf, PathBuf)>,
        tcp_host: &str,
        admin_host: &str,
        wrap: Wrap<'_>,
    ) -> Broker {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let tls_files = match &tls {
            Some((c, k)) => format!(
                "\n  tls_files:\n    cert: {}\n    key: {}",
                c.display(),
                k.display()
            ),
            None => String::new(),
        };
        // Port 0 everywhere: the broker binds free ports itself and logs them,
        // so parallel tests never race for a port.
        let config = format!(
            "listeners:\n  tcp: \"{tcp_host}:0\"\n  ws: \"127.0.0.1:0\"\n  tls: \"127.0.0.1:0\"\n  wss: \"127.0.0.1:0\"\n  admin: \"{admin_host}:0\"{tls_files}\nworkers: 2\nshutdown_timeout_secs: 2\n{extra}\n"
        );
        let path = dir.path().join("broker.yaml");
        std::fs::write(&path, config).unwrap_or_else(|e| panic!("write config: {e}"));
        let child = Self::launch(dir.path(), wrap);
        let mut broker = Broker {
            child,
            tcp: 0,
            ws: 0,
            tls: 0,
            wss: 0,
            admin: 0,
            cluster: 0,
            host: admin_host.to_owned(),
            dir,
            starts: 1,
        };
        broker.read_ports(tls.is_some());
        broker.wait_ready();
        broker
    }

    /// Starts the binary on `dir/broker.yaml`, in `dir` as its working
    /// directory: the embedded default store (`data`, relative) is the
    /// test's own, as a user's would be where they run the broker.
    fn launch(dir: &Path, wrap: Wrap<'_>) -> Child {
        let path = dir.join("broker.yaml");
        let log = std::fs::File::create(dir.join("broker.log"))
            .unwrap_or_else(|e| panic!("log file: {e}"));
        let binary = env!("CARGO_BIN_EXE_ringmq-broker");
        // `ip netns exec` and `prlimit` exec the broker: the child's pid is
        // the broker's.
        let mut command = match wrap {
            Wrap::Netns(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, binary]);
                c
            }
            Wrap::Nofile(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg("--").arg(binary);
                c
            }
            Wrap::None => Command::new(binary),
        };
        command
            .arg("--config")
            .arg(&path)
            .current_dir(dir)
            .env("RUST_LOG", "warn,ringmq_broker=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn broker: {e}"))
    }

    /// Starts the process again after it ended (`kill`, `terminate`), with
    /// the same configuration and directory (new ports); the previous log
    /// is kept as `broker.log.<n>`.
    pub fn restart(&mut self) {
        self.restart_unready();
        self.wait_ready();
    }

    /// As `restart`, without waiting for `/readyz`: for a node that is
    /// expected to stay unready for a while.
    pub fn restart_unready(&mut self) {
        assert!(!self.alive(), "restart of a running broker");
        let dir = self.dir.path().to_owned();
        let _ = std::fs::rename(
            dir.join("broker.log"),
            dir.join(format!("broker.log.{}", self.starts)),
        );
        self.starts += 1;
        self.child = Self::launch(&dir, Wrap::None);
        self.read_ports(self.tls != 0);
    }

    /// Replaces what the configuration holds after the listeners (`extra`
    /// of `start`), for the next `restart`.
    pub fn set_extra(&self, extra: &str) {
        let path = self.dir.path().join("broker.yaml");
        let config = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read config: {e}"));
        let head = "shutdown_timeout_secs: 2\n";
        let end = config.find(head).map_or(config.len(), |i| i + head.len());
        std::fs::write(&path, format!("{}{extra}\n", &config[..end]))
            .unwrap_or_else(|e| panic!("write config: {e}"));
    }

    /// The store's directory under the embedded defaults.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Reads the bound ports from the broker's "listening" log lines.
    fn read_ports(&mut self, tls: bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = self.log();
            let port = |name: &str| -> u16 {
                log.lines()
                    .find(|l| {
                        l.contains("listening") && l.contains(&format!("listener=\"{name}\""))
                    })
                    .and_then(|l| l.rsplit(':').next())
                    .and_then(|p| p.trim().parse().ok())
                    .unwrap_or(0)
            };
            (self.tcp, self.ws, self.admin) = (port("mqtt-tcp"), port("mqtt-ws"), port("admin"));
            (self.tls, self.wss) = (port("mqtt-tls"), port("mqtt-wss"));
            self.cluster = port("cluster");
            let all = self.tcp != 0 && self.ws != 0 && self.admin != 0;
            if all && (!tls || (self.tls != 0 && self.wss != 0)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "broker did not log its ports:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (20 s at most) until `/readyz` answers 200.
    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some((200, _)) = self.try_http("/readyz", &[]) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("broker did not become ready:\n{}", self.log());
    }

    /// The broker's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("broker.log")).unwrap_or_default()
    }

    fn try_http(&self, path: &str, headers: &[(&str, &str)]) -> Option<(u16, String)> {
        self.try_request("GET", path, headers)
    }

    /// POST without a body on the admin port: (status, body).
    pub fn post(&self, path: &str) -> (u16, String) {
        self.try_request("POST", path, &[("Content-Length", "0")])
            .unwrap_or_else(|| panic!("POST {path} failed"))
    }

    fn try_request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Option<(u16, String)> {
        self.try_send(method, path, headers, "")
    }

    fn try_send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Option<(u16, String)> {
        let mut s = TcpStream::connect((self.host.as_str(), self.admin)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        let extra: String = headers
            .iter()
            .map(|(k, v)| format!("{k}: {v}\r\n"))
            .collect();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n{body}"
        )
        .ok()?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).ok()?;
        let status = buf.split_whitespace().nth(1)?.parse().ok()?;
        let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
        Some((status, body))
    }

    /// An operations API call with a JSON body: (status, body).
    pub fn api_send(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        let len = body.len().to_string();
        let headers = [
            ("Content-Type", "application/json"),
            ("Content-Length", len.as_str()),
        ];
        self.try_send(method, path, &headers, body)
            .unwrap_or_else(|| panic!("{method} {path} failed"))
    }

    /// A request with extra headers and a body: (status, body).
    pub fn send_with(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, String) {
        let len = body.len().to_string();
        let mut all = vec![("Content-Length", len.as_str())];
        all.extend_from_slice(headers);
        self.try_send(method, path, &all, body)
            .unwrap_or_else(|| panic!("{method} {path} failed"))
    }

    /// GET an operations API path that must answer 200; its JSON.
    pub fn api(&self, path: &str) -> serde_json::Value {
        let (status, body) = self.http(path);
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
    }

    /// POST a JSON body to an operations API path that must answer 200.
    pub fn api_post(&self, path: &str, body: &str) -> serde_json::Value {
        let (status, answer) = self.api_send("POST", path, body);
        assert_eq!(status, 200, "POST {path}: {answer}");
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("POST {path}: {e}: {answer}"))
    }

    /// GET on the admin port: (status, body).
    pub fn http(&self, path: &str) -> (u16, String) {
        self.http_with(path, &[])
    }

    /// GET with extra request headers.
    pub fn http_with(&self, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
        self.try_http(path, headers)
            .unwrap_or_else(|| panic!("admin HTTP {path} failed"))
    }

    /// The value of one metric line (name with labels, as exposed).
    pub fn metric(&self, series: &str) -> f64 {
        self.metric_with(series, &[])
    }

    /// The same from a broker whose `/metrics` needs the bearer `token`.
    pub fn metric_as(&self, series: &str, token: &str) -> f64 {
        let bearer = format!("Bearer {token}");
        self.metric_with(series, &[("Authorization", bearer.as_str())])
    }

    fn metric_with(&self, series: &str, headers: &[(&str, &str)]) -> f64 {
        let (_, body) = self.http_with("/metrics", headers);
        body.lines()
            .find_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                (name == series).then(|| value.parse().ok())?
            })
            .unwrap_or(0.0)
    }

    /// SIGKILL, and waits for the process to go.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.tcp))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process's resident memory, KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_else(|e| panic!("broker status: {e}"));
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no VmRSS in {status}"))
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Stops the process (SIGSTOP) until the returned guard is dropped
    /// (SIGCONT): a node that is there but does nothing.
    pub fn freeze(&self) -> Frozen {
        let pid = self.pid().to_string();
        let stopped = Command::new("kill").args(["-STOP", &pid]).status();
        assert!(stopped.is_ok_and(|s| s.success()), "SIGSTOP {pid}");
        Frozen(pid)
    }

    /// Sends SIGTERM and waits for the process to exit; returns its status code.
    pub fn terminate(&mut self) -> Option<i32> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("broker did not exit after SIGTERM:\n{}", self.log());
    }
}

/// A stopped broker process, continued when dropped.
pub struct Frozen(String);

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-CONT", &self.0]).status();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for a value from a channel, failing the test after `WAIT`.
pub async fn recv<T>(rx: &mut mpsc::UnboundedReceiver<T>, what: &str) -> T {
    match tokio::time::timeout(WAIT, rx.recv()).await {
        Ok(Some(v)) => v,
        Ok(None) => panic!("{what}: channel closed"),
        Err(_) => panic!("{what}: nothing within {WAIT:?}"),
    }
}

/// Asserts that nothing arrives for `QUIET`.
pub async fn quiet<T: std::fmt::Debug>(rx: &mut mpsc::UnboundedReceiver<T>, what: &str) {
    if let Ok(Some(v)) = tokio::time::timeout(QUIET, rx.recv()).await {
        panic!("{what}: unexpected {v:?}");
    }
}

pub mod v4 {
    //! MQTT 3.1.1 clients.
    use super::*;
    #[allow(unused_imports)]
    pub use rumqttc::{
        AsyncClient, ConnAck, ConnectReturnCode, Event, LastWill, MqttOptions, Packet, Publish, QoS,
    };

    /// A connected client and the packets it receives.
    pub struct Client {
        pub client: AsyncClient,
        pub rx: mpsc::UnboundedReceiver<Packet>,
        pub connack: ConnAck,
        task: tokio::task::JoinHandle<()>,
    }

    pub fn options(id: &str, port: u16) -> MqttOptions {
        options_at(id, "127.0.0.1", port)
    }

    pub fn options_at(id: &str, host: &str, port: u16) -> MqttOptions {
        let mut o = MqttOptions::new(id, host, port);
        o.set_keep_alive(Duration::from_secs(30));
        o
    }

    /// Options that log in as `user` with `password`.
    pub fn options_as(id: &str, port: u16, user: &str, password: &str) -> MqttOptions {
        let mut o = options(id, port);
        o.set_credentials(user, password);
        o
    }

    /// Connects with a persistent session (cleanSession=false).
    pub async fn persistent(id: &str, port: u16) -> Client {
        let mut opts = options(id, port);
        opts.set_clean_session(false);
        connect(opts).await
    }

    /// Connects and waits for a successful CONNACK.
    pub async fn connect(opts: MqttOptions) -> Client {
        match try_connect(opts).await {
            Ok(c) => c,
            Err(e) => panic!("connect failed: {e}"),
        }
    }

    /// Connects; the error names the CONNACK refusal or connection failure.
    pub async fn try_connect(opts: MqttOptions) -> Result<Client, String> {
        let (client, mut el) = AsyncClient::new(opts, 100);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(p)) => {
                        if tx.send(p).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Outgoing(_)) => {}
                    Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
                        let _ = tx.send(Packet::ConnAck(ConnAck {
                            session_present: false,
                            code,
                        }));
                        return;
                    }
                    Err(e) => {
                        eprintln!("v4 event loop ended: {e:?}");
                        let _ = tx.send(Packet::Disconnect);
                        return;
                    }
                }
            }
        });
        let first = tokio::time::timeout(WAIT, rx.recv())
            .await
            .map_err(|_| "no CONNACK".to_string())?;
        match first {
            Some(Packet::ConnAck(ack)) if ack.code == ConnectReturnCode::Success => Ok(Client {
                client,
                rx,
                connack: ack,
                task,
            }),
            Some(Packet::ConnAck(ack)) => {
                task.abort();
                Err(format!("{:?}", ack.code))
            }
            other => {
                task.abort();
                Err(format!("connection failed: {other:?}"))
            }
        }
    }

    impl Client {
        pub async fn subscribe(
            &mut self,
            filter: &str,
            qos: QoS,
        ) -> Vec<rumqttc::SubscribeReasonCode> {
            self.client
                .subscribe(filter, qos)
                .await
                .unwrap_or_else(|e| panic!("subscribe: {e}"));
            loop {
                match recv(&mut self.rx, "SUBACK").await {
                    Packet::SubAck(ack) => return ack.return_codes,
                    Packet::Disconnect => panic!("disconnected while subscribing"),
                    _ => {}
                }
            }
        }

        pub async fn publish(
            &self,
            topic: &str,
            qos: QoS,
            retain: bool,
            payload: impl Into<Vec<u8>>,
        ) {
            self.client
                .publish(topic, qos, retain, payload.into())
                .await
                .unwrap_or_else(|e| panic!("publish: {e}"));
        }

        /// The next PUBLISH received (other packets are skipped).
        pub async fn next_publish(&mut self) -> Publish {
            loop {
                match recv(&mut self.rx, "PUBLISH").await {
                    Packet::Publish(p) => return p,
                    Packet::Disconnect => panic!("disconnected while waiting for a PUBLISH"),
                    _ => {}
                }
            }
        }

        /// Asserts that no PUBLISH arrives for a while.
        pub async fn no_publish(&mut self) {
            let deadline = tokio::time::Instant::now() + QUIET;
            while let Ok(Some(p)) = tokio::time::timeout_at(deadline, self.rx.recv()).await {
                if let Packet::Publish(p) = p {
                    panic!("unexpected PUBLISH {p:?}");
                }
            }
        }

        /// Waits until the broker completed `n` QoS 1/2 publishes (PUBACK or PUBCOMP).
        pub async fn acked(&mut self, n: usize) {
            let mut seen = 0;
            while seen < n {
                match recv(&mut self.rx, "PUBACK or PUBCOMP").await {
                    Packet::PubAck(_) | Packet::PubComp(_) => seen += 1,
                    Packet::Disconnect => panic!("disconnected while waiting for acknowledgements"),
                    _ => {}
                }
            }
        }

        /// Waits until the connection is closed by the broker.
        pub async fn closed(&mut self) {
            loop {
                if let Packet::Disconnect = recv(&mut self.rx, "connection close").await {
                    return;
                }
            }
        }

        /// Sends DISCONNECT and waits for the event loop to end.
        pub async fn disconnect(self) {
            let _ = self.client.disconnect().await;
            let _ = tokio::time::timeout(WAIT, self.task).await;
        }

        /// Drops the TCP connection without DISCONNECT.
        pub fn kill(self) {
            self.task.abort();
        }
    }
}

pub mod v5 {
    //! MQTT 5 clients.
    use super::*;
    pub use rumqttc::v5::mqttbytes::QoS;
    #[allow(unused_imports)]
    pub use rumqttc::v5::mqttbytes::v5::{
        ConnAck, ConnectReturnCode, Disconnect, DisconnectReasonCode, LastWill, LastWillProperties,
        Packet, PubAck, PubAckReason, Publish, PublishProperties, SubscribeReasonCode,
    };
    pub use rumqttc::v5::{AsyncClient, Event, MqttOptions};

    /// A QoS 1 will on `topic`, published `delay` s after its client went
    /// without DISCONNECT (MQTT 5 will delay).
    pub fn delayed_will(topic: &str, payload: &str, delay: u32) -> LastWill {
        let props = LastWillProperties {
            delay_interval: Some(delay),
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: None,
            response_topic: None,
            correlation_data: None,
            user_properties: Vec::new(),
        };
        LastWill::new(
            topic.to_owned(),
            payload.to_owned(),
            QoS::AtLeastOnce,
            false,
            Some(props),
        )
    }

    pub struct Client {
        pub client: AsyncClient,
        pub rx: mpsc::UnboundedReceiver<Packet>,
        pub connack: ConnAck,
        task: tokio::task::JoinHandle<()>,
    }

    pub fn options(id: &str, port: u16) -> MqttOptions {
        options_at(id, "127.0.0.1", port)
    }

    pub fn options_at(id: &str, host: &str, port: u16) -> MqttOptions {
        let mut o = MqttOptions::new(id, host, port);
        o.set_keep_alive(Duration::from_secs(30));
        o
    }

    /// Options that log in as `user` with `password`.
    pub fn options_as(id: &str, port: u16, user: &str, password: &str) -> MqttOptions {
        let mut o = options(id, port);
        o.set_credentials(user, password);
        o
    }

    pub async fn connect(opts: MqttOptions) -> Client {
        match try_connect(opts).await {
            Ok(c) => c,
            Err(e) => panic!("connect failed: {e}"),
        }
    }

    pub async fn try_connect(opts: MqttOptions) -> Result<Client, String> {
        let (client, mut el) = AsyncClient::new(opts, 100);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(p)) => {
                        if tx.send(p).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Outgoing(_)) => {}
                    Err(e) => {
                        eprintln!("v5 event loop ended: {e:?}");
                        let reason = match e {
                            rumqttc::v5::ConnectionError::MqttState(
                                rumqttc::v5::StateError::ServerDisconnect { reason_code, .. },
                            ) => Packet::Disconnect(Disconnect::new(reason_code)),
                            rumqttc::v5::ConnectionError::ConnectionRefused(code) => {
                                Packet::ConnAck(ConnAck {
                                    session_present: false,
                                    code,
                                    properties: None,
                                })
                            }
                            _ => Packet::Disconnect(Disconnect::new(
                                DisconnectReasonCode::UnspecifiedError,
                            )),
                        };
                        let _ = tx.send(reason);
                        return;
                    }
                }
            }
        });
        let first = tokio::time::timeout(WAIT, rx.recv())
            .await
            .map_err(|_| "no CONNACK".to_string())?;
        match first {
            Some(Packet::ConnAck(ack)) if ack.code == ConnectReturnCode::Success => Ok(Client {
                client,
                rx,
                connack: ack,
                task,
            }),
            Some(Packet::ConnAck(ack)) => {
                task.abort();
                Err(format!("{:?}", ack.code))
            }
            other => {
                task.abort();
                Err(format!("connection failed: {other:?}"))
            }
        }
    }

    impl Client {
        pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> Vec<SubscribeReasonCode> {
            self.client
                .subscribe(filter, qos)
                .await
                .unwrap_or_else(|e| panic!("subscribe: {e}"));
            self.suback().await
        }

        pub async fn suback(&mut self) -> Vec<SubscribeReasonCode> {
            loop {
                match recv(&mut self.rx, "SUBACK").await {
                    Packet::SubAck(ack) => return ack.return_codes,
                    Packet::Disconnect(d) => panic!("disconnected while subscribing: {d:?}"),
                    _ => {}
                }
            }
        }

        pub async fn publish(
            &self,
            topic: &str,
            qos: QoS,
            retain: bool,
            payload: impl Into<Vec<u8>>,
        ) {
            self.client
                .publish(topic, qos, retain, payload.into())
                .await
                .unwrap_or_else(|e| panic!("publish: {e}"));
        }

        pub async fn next_publish(&mut self) -> Publish {
            loop {
                match recv(&mut self.rx, "PUBLISH").await {
                    Packet::Publish(p) => return p,
                    Packet::Disconnect(d) => {
                        panic!("disconnected while waiting for a PUBLISH: {d:?}")
                    }
                    _ => {}
                }
            }
        }

        /// The next PUBACK received.
        pub async fn next_puback(&mut self) -> PubAck {
            loop {
                match recv(&mut self.rx, "PUBACK").await {
                    Packet::PubAck(a) => return a,
                    Packet::Disconnect(d) => {
                        panic!("disconnected while waiting for a PUBACK: {d:?}")
                    }
                    _ => {}
                }
            }
        }

        pub async fn no_publish(&mut self) {
            let deadline = tokio::time::Instant::now() + QUIET;
            while let Ok(Some(p)) = tokio::time::timeout_at(deadline, self.rx.recv()).await {
                if let Packet::Publish(p) = p {
                    panic!("unexpected PUBLISH {p:?}");
                }
            }
        }

        /// Waits for the broker's DISCONNECT (or the connection to end) and
        /// returns its reason code.
        pub async fn closed(&mut self) -> DisconnectReasonCode {
            loop {
                if let Packet::Disconnect(d) = recv(&mut self.rx, "DISCONNECT").await {
                    return d.reason_code;
                }
            }
        }

        pub async fn disconnect(self) {
            let _ = self.client.disconnect().await;
            let _ = tokio::time::timeout(WAIT, self.task).await;
        }

        pub fn kill(self) {
            self.task.abort();
        }
    }
}
