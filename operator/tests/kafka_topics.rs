//! Kafka topic management (`topics::Rdkafka`) against real Kafka-protocol
//! brokers: nisshi, the one the Kafka flows are tested with (installed by
//! `.ci/run`; `NISSHI` names another binary), and, for growing partitions
//! (Kafka's CreatePartitions, which nisshi does not serve), noida-db from
//! PyPI (`e2e/requirements.txt`; `NOIDA_DB` names another binary).

use std::time::Duration;

use ringmq_operator::topics::{Outcome, Rdkafka, Target, Topics, Wanted};

/// nisshi on a free port with in-memory storage, killed when dropped.
struct Nisshi {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Nisshi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nisshi() -> Nisshi {
    let binary = std::env::var_os("NISSHI")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cargo/bin/nisshi")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| {
            panic!("nisshi is not installed: cargo +nightly install nisshi --version 0.8.1 --no-default-features --features dynostore,libsql --locked")
        });
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let url = format!("tcp://127.0.0.1:{port}");
    let child = std::process::Command::new(binary)
        .args([
            "broker",
            "--storage-engine",
            "sqlite://./kafka.db",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
        ])
        .current_dir(dir.path())
        .env_remove("LISTENER_URL")
        .env_remove("ADVERTISED_LISTENER_URL")
        .env_remove("STORAGE_ENGINE")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("nisshi: {e}"));
    let n = Nisshi {
        child,
        port,
        _dir: dir,
    };
    for _ in 0..300 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return n;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nisshi did not listen");
}

/// noida-db serving only its Kafka protocol on a free port, stopped when
/// dropped.
struct NoidaDb {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for NoidaDb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn noida_db() -> NoidaDb {
    let binary = std::env::var_os("NOIDA_DB").unwrap_or_else(|| "noida-db".into());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let child = std::process::Command::new(&binary)
        .arg("start")
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--host", "127.0.0.1", "--only", "kafka", "--kafka-port"])
        .arg(port.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("{binary:?}: {e} (pip install -r e2e/requirements.txt installs noida-db)")
        });
    let n = NoidaDb {
        child,
        port,
        _dir: dir,
    };
    for _ in 0..300 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return n;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("noida-db did not listen");
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
