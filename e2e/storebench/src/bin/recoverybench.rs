//! `ringmq-recoverybench`: how long a node takes to read its store back.
//! Writes SESSIONS persistent sessions (one subscription each) with
//! MESSAGES queued QoS 1 messages each through the node's own store
//! (`ringmq_broker::persist`, group commit), closes it, then opens it again
//! the way a starting node does and times the read-back. One JSON line out;
//! the directory is left for `ringmq-broker` to start on (its readiness
//! time includes the sessions' routes).

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use ringmq_broker::config::PersistenceConfig;
use ringmq_broker::durable::{SessionRecord, Store};
use ringmq_broker::message::{Message, MessageId, QoS, now_ms};
use ringmq_broker::persist::{Persist, dir_size};
use ringmq_broker::router::SubOptions;
use ringmq_broker::session::Delivery;

const USAGE: &str =
    "usage: ringmq-recoverybench --dir DIR [--sessions 100000] [--messages 10] [--payload 64]";

fn main() -> anyhow::Result<()> {
    let (mut dir, mut sessions, mut messages, mut payload) = (None, 100_000u64, 10u64, 64usize);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--dir" => dir = Some(PathBuf::from(value()?)),
            "--sessions" => sessions = value()?.parse()?,
            "--messages" => messages = value()?.parse()?,
            "--payload" => payload = value()?.parse()?,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    let Some(dir) = dir else {
        bail!("--dir is required\n{USAGE}");
    };
    let config = PersistenceConfig {
        dir: Some(dir.clone()),
        ..PersistenceConfig::default()
    };
    let started = Instant::now();
    let (persist, _) = Persist::open(&config, &prometheus::Registry::new())?;
    let body = ntex::util::Bytes::from(vec![b'x'; payload]);
    for s in 0..sessions {
        let client: Arc<str> = Arc::from(format!("GID_bench@@@device-{s:07}"));
        let rec = SessionRecord {
            expiry_ms: 7_200_000,
            disconnected_ms: now_ms(),
            ordered: false,
            qos2_ids: Vec::new(),
            subscriptions: vec![(
                format!("devices/{s}/cmd"),
                SubOptions {
                    id: NonZeroU32::new(1),
                    ..SubOptions::at(QoS::AtLeastOnce)
                },
            )],
            will: None,
            epoch: 0,
            armed_will: None,
            released: Vec::new(),
            replays: Vec::new(),
        };
        persist.session(&client, &rec, None);
        for m in 1..=messages {
            let msg = Message::new(
                MessageId(s * messages + m),
                format!("devices/{s}/cmd").into(),
                body.clone(),
                QoS::AtLeastOnce,
                false,
                Arc::from("backend"),
            );
            let d = Delivery::new(Arc::new(msg), QoS::AtLeastOnce);
            persist.queue(&client, m, &d, None);
        }
    }
    persist.close();
    let write_secs = started.elapsed().as_secs_f64();
    let size = dir_size(&dir);
    let started = Instant::now();
    let (again, recovered) = Persist::open(&config, &prometheus::Registry::new())?;
    let read_secs = started.elapsed().as_secs_f64();
    let read_messages: usize = recovered.sessions.iter().map(|s| s.messages.len()).sum();
    again.close();
    println!(
        "{{\"sessions\":{},\"messages\":{read_messages},\"write_secs\":{write_secs:.2},\"read_secs\":{read_secs:.2},\"disk_bytes\":{size}}}",
        recovered.sessions.len()
    );
    Ok(())
}
