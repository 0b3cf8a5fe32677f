//! Kafka topic management (`topics::Rdkafka`) against real Kafka-protocol
//! brokers: nisshi, the one the Kafka flows are tested with (installed by
//! `.ci/run`; `NISSHI` names another binary), and, for growing partitions
//! (Kafka's CreatePartitions, which nisshi does not serve), noida-db from
//! PyPI (`e2e/requirements.txt`; `NOIDA_DB` names another binary).

use std::time::Duration;

use ringmq_operator::topics::{Outcome, Rdkafka, Target, Topics, Wanted};

/// A Kafka-protocol broker process on a free port, killed when dropped.
struct Kafka {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Kafka {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Kafka {
    /// Starts `command(port, dir)` and waits until the port accepts.
    fn start(
        name: &str,
        command: impl FnOnce(u16, &std::path::Path) -> std::process::Command,
    ) -> Kafka {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("{e}"));
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let child = command(port, dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let k = Kafka {
            child,
            port,
            _dir: dir,
        };
        for _ in 0..300 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return k;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{name} did not listen");
    }
}

/// nisshi with SQLite storage in a temporary directory.
fn nisshi() -> Kafka {
    let binary = std::env::var_os("NISSHI")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cargo/bin/nisshi")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| {
            panic!("nisshi is not installed: cargo +nightly install nisshi --version 0.8.1 --no-default-features --features dynostore,libsql --locked")
        });
    Kafka::start("nisshi", |port, dir| {
        let url = format!("tcp://127.0.0.1:{port}");
        let mut c = std::process::Command::new(binary);
        c.args([
            "broker",
            "--storage-engine",
            "sqlite://./kafka.db",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
        ])
        .current_dir(dir)
        .env_remove("LISTENER_URL")
        .env_remove("ADVERTISED_LISTENER_URL")
        .env_remove("STORAGE_ENGINE");
        c
    })
}

/// noida-db serving only its Kafka protocol (`pip install -r
/// e2e/requirements.txt` installs it).
fn noida_db() -> Kafka {
    let binary = std::env::var_os("NOIDA_DB").unwrap_or_else(|| "noida-db".into());
    Kafka::start("noida-db", |port, dir| {
        let mut c = std::process::Command::new(binary);
        c.arg("start")
            .arg("--data-dir")
            .arg(dir)
            .args(["--host", "127.0.0.1", "--only", "kafka", "--kafka-port"])
            .arg(port.to_string());
        c
    })
}

fn wanted(name: &str, partitions: i32) -> Wanted {
    Wanted {
        name: name.to_owned(),
        partitions,
        replication: 1,
    }
}

fn outcome<'a>(outcomes: &'a [(String, Outcome)], name: &str) -> &'a Outcome {
    outcomes
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, o)| o)
        .unwrap_or_else(|| panic!("no outcome for {name}: {outcomes:?}"))
}

#[tokio::test]
async fn topics_are_created_not_shrunk_and_deleted() {
    let kafka = nisshi();
    let target = Target {
        bootstrap: format!("127.0.0.1:{}", kafka.port),
        ..Target::default()
    };
    let t = Rdkafka;
    let first = t
        .ensure(
            target.clone(),
            vec![wanted("telemetry", 3), wanted("orders", 2)],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(outcome(&first, "telemetry"), &Outcome::Created);
    assert_eq!(outcome(&first, "orders"), &Outcome::Created);
    let again = t
        .ensure(
            target.clone(),
            vec![wanted("telemetry", 3), wanted("orders", 2)],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(outcome(&again, "telemetry"), &Outcome::Unchanged);
    let shrink = t
        .ensure(target.clone(), vec![wanted("orders", 1)])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        outcome(&shrink, "orders"),
        &Outcome::CannotShrink { have: 2, want: 1 }
    );
    // Growing needs Kafka's CreatePartitions API, which nisshi does not
    // serve: the operator gets a clear error (the KafkaReady condition
    // carries it) rather than a silent success.
    let refused = t.ensure(target.clone(), vec![wanted("telemetry", 5)]).await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("not supported")),
        "{refused:?}"
    );
    t.delete(target.clone(), vec!["orders".to_owned()])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let recreated = t
        .ensure(target, vec![wanted("orders", 4)])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        outcome(&recreated, "orders"),
        &Outcome::Created,
        "deleted, so created anew"
    );
}

#[tokio::test]
async fn partitions_grow_where_the_broker_serves_create_partitions() {
    let kafka = noida_db();
    let target = Target {
        bootstrap: format!("127.0.0.1:{}", kafka.port),
        ..Target::default()
    };
    let t = Rdkafka;
    let first = t
        .ensure(target.clone(), vec![wanted("telemetry", 3)])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(outcome(&first, "telemetry"), &Outcome::Created);
    let grown = t
        .ensure(target.clone(), vec![wanted("telemetry", 5)])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        outcome(&grown, "telemetry"),
        &Outcome::Grown { from: 3, to: 5 }
    );
    // The broker now reports five partitions: nothing left to do.
    let again = t
        .ensure(target, vec![wanted("telemetry", 5)])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(outcome(&again, "telemetry"), &Outcome::Unchanged);
}
