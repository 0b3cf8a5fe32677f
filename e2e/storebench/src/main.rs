//! `ringmq-storebench`: how fast each candidate engine for the durable node
//! (issue "Durable node") takes the broker's write pattern with nothing
//! acknowledged before it is on disk. Writers stand for connections: each
//! stores a message (its session and sequence as the key), waits until it is
//! durable (as a PUBACK would), and deletes the message it stored `window`
//! messages before (the subscriber's acknowledgement). One committer thread
//! takes whatever is waiting, applies it in one batch or transaction and
//! syncs it to disk once (group commit), then releases its writers. One
//! JSON line out.

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

const USAGE: &str = "usage: ringmq-storebench --engine fjall|redb --dir DIR
       [--writers 16] [--messages 20000] [--value 200] [--window 32] [--inflight 1]
       [--sync batch|off]

--messages per writer; --inflight: stores a writer has waiting at once (an
MQTT client's in-flight window: its PUBACKs may wait while it sends on);
--sync off skips the fsync (fjall: flushed to the OS at each commit; redb:
Durability::None).";

struct Settings {
    engine: String,
    dir: PathBuf,
    writers: usize,
    messages: u64,
    value: usize,
    window: u64,
    inflight: u64,
    sync: bool,
}

/// One change a writer waits for.
enum Op {
    Put(Vec<u8>),
    Delete(Vec<u8>),
}

struct Request {
    ops: Vec<Op>,
    done: mpsc::SyncSender<()>,
}

/// Applies batches durably.
trait Engine: Send {
    fn commit(&mut self, ops: &[Op], value: &[u8]) -> anyhow::Result<()>;
}

struct Fjall {
    db: fjall::Database,
    messages: fjall::Keyspace,
    sync: bool,
}

impl Engine for Fjall {
    fn commit(&mut self, ops: &[Op], value: &[u8]) -> anyhow::Result<()> {
        let mut batch = self.db.batch();
        for op in ops {
            match op {
                Op::Put(k) => batch.insert(&self.messages, k.clone(), value.to_vec()),
                Op::Delete(k) => batch.remove(&self.messages, k.clone()),
            }
        }
        batch.commit()?;
        if self.sync {
            self.db.persist(fjall::PersistMode::SyncData)?;
        }
        Ok(())
    }
}

const TABLE: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("messages");

struct Redb {
    db: redb::Database,
    sync: bool,
}

impl Engine for Redb {
    fn commit(&mut self, ops: &[Op], value: &[u8]) -> anyhow::Result<()> {
        let mut txn = self.db.begin_write()?;
        if !self.sync {
            txn.set_durability(redb::Durability::None)?;
        }
        {
            let mut t = txn.open_table(TABLE)?;
            for op in ops {
                match op {
                    Op::Put(k) => {
                        t.insert(k.as_slice(), value)?;
                    }
                    Op::Delete(k) => {
                        t.remove(k.as_slice())?;
                    }
                }
            }
        }
        txn.commit()?;
        Ok(())
    }
}

fn open(s: &Settings) -> anyhow::Result<Box<dyn Engine>> {
    std::fs::create_dir_all(&s.dir).with_context(|| format!("{}", s.dir.display()))?;
    Ok(match s.engine.as_str() {
        "fjall" => {
            let db = fjall::Database::builder(s.dir.join("fjall")).open()?;
            let messages = db.keyspace("messages", fjall::KeyspaceCreateOptions::default)?;
            Box::new(Fjall {
                db,
                messages,
                sync: s.sync,
            })
        }
        "redb" => Box::new(Redb {
            db: redb::Database::create(s.dir.join("store.redb"))?,
            sync: s.sync,
        }),
        other => bail!("unknown engine {other:?}\n{USAGE}"),
    })
}

fn key(writer: usize, seq: u64) -> Vec<u8> {
    let mut k = (writer as u32).to_be_bytes().to_vec();
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn run(s: &Settings) -> anyhow::Result<String> {
    let mut engine = open(s)?;
    let (tx, rx) = mpsc::channel::<Request>();
    let value = vec![0x5a; s.value];
    let committer = std::thread::spawn(move || -> anyhow::Result<(u64, Vec<Duration>)> {
        let mut commits = 0;
        let mut times = Vec::new();
        while let Ok(first) = rx.recv() {
            let mut waiting = vec![first];
            waiting.extend(rx.try_iter());
            let ops: Vec<Op> = waiting
                .iter_mut()
                .flat_map(|r| std::mem::take(&mut r.ops))
                .collect();
            let t = Instant::now();
            engine.commit(&ops, &value)?;
            times.push(t.elapsed());
            commits += 1;
            for r in waiting {
                let _ = r.done.send(());
            }
        }
        Ok((commits, times))
    });
    let started = Instant::now();
    let writers: Vec<_> = (0..s.writers)
        .map(|w| {
            let (tx, messages, window) = (tx.clone(), s.messages, s.window);
            let inflight = s.inflight.max(1);
            std::thread::spawn(move || -> anyhow::Result<()> {
                // The committer answers a writer's requests in order, so
                // counting answers tells which stores are durable.
                let (done_tx, done_rx) = mpsc::sync_channel(usize::try_from(inflight)?);
                let mut waiting = 0;
                for seq in 0..messages {
                    if waiting == inflight {
                        done_rx.recv().context("committer gone")?;
                        waiting -= 1;
                    }
                    let mut ops = vec![Op::Put(key(w, seq))];
                    if seq >= window {
                        ops.push(Op::Delete(key(w, seq - window)));
                    }
                    tx.send(Request {
                        ops,
                        done: done_tx.clone(),
                    })
                    .context("committer gone")?;
                    waiting += 1;
                }
                for _ in 0..waiting {
                    done_rx.recv().context("committer gone")?;
                }
                Ok(())
            })
        })
        .collect();
    drop(tx);
    for w in writers {
        w.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (commits, mut times) = committer
        .join()
        .map_err(|_| anyhow::anyhow!("committer panicked"))??;
    times.sort();
    let pct = |p: f64| {
        times
            .get(((times.len() as f64 * p) as usize).min(times.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    let total = s.messages * s.writers as u64;
    Ok(format!(
        "{{\"engine\":\"{}\",\"sync\":{},\"inflight\":{},\"writers\":{},\"messages\":{},\"msgs_per_sec\":{:.0},\"commits\":{},\"msgs_per_commit\":{:.1},\"commit_p50_us\":{:.0},\"commit_p99_us\":{:.0},\"disk_bytes\":{}}}",
        s.engine,
        s.sync,
        s.inflight,
        s.writers,
        total,
        total as f64 / elapsed,
        commits,
        total as f64 / commits.max(1) as f64,
        pct(0.5),
        pct(0.99),
        ringmq_broker::persist::dir_size(&s.dir)
    ))
}

fn parse(mut args: impl Iterator<Item = String>) -> anyhow::Result<Settings> {
    let mut s = Settings {
        engine: String::new(),
        dir: PathBuf::new(),
        writers: 16,
        messages: 20_000,
        value: 200,
        window: 32,
        inflight: 1,
        sync: true,
    };
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--engine" => s.engine = value()?,
            "--dir" => s.dir = PathBuf::from(value()?),
            "--writers" => s.writers = value()?.parse()?,
            "--messages" => s.messages = value()?.parse()?,
            "--value" => s.value = value()?.parse()?,
            "--window" => s.window = value()?.parse()?,
            "--inflight" => s.inflight = value()?.parse()?,
            "--sync" => {
                s.sync = match value()?.as_str() {
                    "batch" => true,
                    "off" => false,
                    other => bail!("--sync batch|off, not {other:?}"),
                }
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if s.engine.is_empty() || s.dir.as_os_str().is_empty() {
        bail!("--engine and --dir are required\n{USAGE}");
    }
    Ok(s)
}

fn main() -> anyhow::Result<()> {
    let s = parse(std::env::args().skip(1))?;
    println!("{}", run(&s)?);
    Ok(())
}
