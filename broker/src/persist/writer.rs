//! The store's writer thread: group commit over fjall.
//!
//! It takes whatever changes are waiting (up to `max_batch`), folds them
//! into one fjall batch (the last change of a key wins; a `Forget` also
//! removes what the batch had queued for the session), commits it, syncs by
//! the policy, and only then tells the waiting acknowledgements. A failed
//! write poisons a fjall database: the writer drops it, refuses what comes
//! meanwhile, and opens the directory again (at most once a second), which
//! replays the journal up to the last whole batch — so the node recovers by
//! itself when the disk has room again. A store that could not be opened at
//! start-up (read-only directory, full disk) is opened the same way; its
//! first successful opening also reads it back (`Late`) and hands what it
//! holds to the node, and every batch before that is refused.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use fjall::config::FilterPolicy;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use ntex::util::Bytes;

use super::qlog::{Messages, QueueLog};
use super::recover::{self, RecoveryMetrics};
use super::{Change, Op, PersistError, Result, StoreMetrics, record};
use crate::config::{Fsync, PersistenceConfig};
use crate::durable::{Mailbox, Recovered};
use crate::util::FastMap;

/// How long the writer lets a busy batch gather more changes: while the
/// previous batch held at least `BUSY_BATCH` changes, the next one waits
/// this long after its first change. Fewer, larger batches wake the writer
/// and every worker less often (QoS 1 to persistent sessions at full speed:
/// +5 % msg/s at 300 µs, -5 % at 1 ms, where the wait outlasts what it
/// saves); a quiet node never waits.
const GATHER: Duration = Duration::from_micros(300);
const BUSY_BATCH: usize = 256;

/// fjall's smallest journal bound: the journal is what a restart replays,
/// and what the disk holds besides the tables (the default is 512 MiB).
const MAX_JOURNAL: u64 = 64 * 1024 * 1024;

/// The open database and its keyspaces, and the queue log.
pub(super) struct Store {
    db: Database,
    pub(super) sessions: Keyspace,
    /// Queued messages of stores written before the queue log: read back
    /// once at start-up, moved into the log, then empty.
    pub(super) queue: Keyspace,
    pub(super) retained: Keyspace,
    pub(super) log: QueueLog,
}

/// The directory of the queue log inside the store's (fjall reads only its
/// own folders).
const QUEUE_LOG: &str = "queue-log";

impl Store {
    pub(super) fn db(&self) -> &Database {
        &self.db
    }

    /// Opens the database and the queue log; also returns what the log holds
    /// (the queued messages) and how many records it dropped as damaged.
    pub(super) fn open(dir: &Path) -> Result<(Self, Messages, u64)> {
        let err = |source| PersistError::Open {
            dir: dir.to_owned(),
            source,
        };
        let db = Database::builder(dir)
            .max_journaling_size(MAX_JOURNAL)
            .open()
            .map_err(err)?;
        // Nothing reads a key by itself (start-up iterates, a session's end
        // scans its prefix), so bloom filters would only be built at every
        // flush and compaction, never asked. Applies to keyspaces this creates.
        let options = || KeyspaceCreateOptions::default().filter_policy(FilterPolicy::disabled());
        let ks = |name: &str| db.keyspace(name, options);
        let sessions = ks("sessions").map_err(err)?;
        let queue = ks("queue").map_err(err)?;
        let retained = ks("retained").map_err(err)?;
        let opened = QueueLog::open(&dir.join(QUEUE_LOG)).map_err(|source| PersistError::Log {
            dir: dir.join(QUEUE_LOG),
            source,
        })?;
        Ok((
            Self {
                db,
                sessions,
                queue,
                retained,
                log: opened.log,
            },
            opened.messages,
            opened.discarded,
        ))
    }
}

/// Which keyspace a change goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Space {
    Sessions,
    Queue,
    Retained,
}

/// The read-back still owed to the node: the store was not open at start-up.
pub(super) struct Late {
    pub(super) tx: tokio::sync::oneshot::Sender<Recovered>,
    pub(super) metrics: RecoveryMetrics,
}

pub(super) struct Writer {
    store: Option<Store>,
    late: Option<Late>,
    dir: PathBuf,
    fsync: Fsync,
    interval: Duration,
    max_batch: usize,
    metrics: StoreMetrics,
    /// Written to the OS but not synced (`fsync: interval`).
    unsynced: bool,
    last_sync: Instant,
    last_open: Instant,
}

impl Writer {
    /// `store` is `None` when it could not be opened at start-up; `late`
    /// then says where its read-back goes.
    pub(super) fn new(
        store: Option<Store>,
        late: Option<Late>,
        dir: PathBuf,
        config: &PersistenceConfig,
        metrics: StoreMetrics,
    ) -> Self {
        Self {
            store,
            late,
            dir,
            fsync: config.fsync,
            interval: Duration::from_millis(config.fsync_interval_ms),
            max_batch: config.max_batch,
            metrics,
            unsynced: false,
            last_sync: Instant::now(),
            last_open: Instant::now(),
        }
    }

    /// Writes batches until told to end (or every sender is gone).
    pub(super) fn run(mut self, rx: Receiver<Option<Op>>) {
        let mut ops = Vec::with_capacity(self.max_batch);
        let mut busy = false;
        loop {
            let first = if self.unsynced {
                let left = self.interval.saturating_sub(self.last_sync.elapsed());
                match rx.recv_timeout(left) {
                    Ok(op) => op,
                    Err(RecvTimeoutError::Timeout) => {
                        self.sync();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => None,
                }
            } else if self.store.is_none() {
                // Failed: try the disk again every second by itself, so
                // the node reports healthy once there is room, traffic or not.
                match rx.recv_timeout(Duration::from_secs(1)) {
                    Ok(op) => op,
                    Err(RecvTimeoutError::Timeout) => {
                        self.reopen();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => None,
                }
            } else {
                rx.recv().ok().flatten()
            };
            let Some(first) = first else {
                break;
            };
            ops.push(first);
            if busy {
                std::thread::sleep(GATHER);
            }
            let mut closing = false;
            while ops.len() < self.max_batch {
                match rx.try_recv() {
                    Ok(Some(op)) => ops.push(op),
                    Ok(None) => {
                        closing = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
            busy = ops.len() >= BUSY_BATCH;
            let ok = self.write(&mut ops);
            // Each worker is woken once for the batch (see `wake`).
            let mut ring: Vec<Arc<Mailbox>> = Vec::new();
            for op in ops.drain(..) {
                if let Some(m) = op.commit.and_then(|c| c.written(ok))
                    && !ring.iter().any(|r| Arc::ptr_eq(r, &m))
                {
                    ring.push(m);
                }
            }
            for m in ring {
                m.ring();
            }
            if closing {
                break;
            }
        }
        if self.unsynced {
            self.sync();
        }
    }

    /// Applies one batch; false if it did not reach the disk as the policy says.
    fn write(&mut self, ops: &mut [Op]) -> bool {
        let started = Instant::now();
        // Not read back yet: these changes were made by a node that has
        // not seen what the store holds, so they are refused even when this
        // opening (at most once a second) succeeds.
        if self.late.is_some() {
            self.reopen();
            return false;
        }
        if self.store.is_none() && !self.reopen() {
            return false;
        }
        let Some(store) = &mut self.store else {
            return false;
        };
        let (changes, forgets) = fold(ops);
        let sync = self.fsync == Fsync::Batch;
        let mode = if sync {
            PersistMode::SyncData
        } else {
            PersistMode::Buffer
        };
        // Sessions and retained messages first: a record that says a QoS 2
        // message was released reaches the disk before the message's delete
        // in the log (a crash in between sends both again, never neither).
        let mut batch = store.db.batch().durability(Some(mode));
        let mut queue = Vec::new();
        for ((space, key), value) in changes {
            let ks = match space {
                Space::Sessions => &store.sessions,
                Space::Queue => {
                    queue.push((key, value.into_value()));
                    continue;
                }
                Space::Retained => &store.retained,
            };
            match value {
                Write::Put { value } => batch.insert(ks, key, value.as_ref()),
                Write::Delete => batch.remove(ks, key),
            }
        }
        let written = if batch.is_empty() {
            Ok(())
        } else {
            batch.commit()
        };
        if let Err(e) = written {
            self.fail("write", &e.to_string());
            return false;
        }
        if let Err(e) = store.log.append(&forgets, &queue, sync) {
            self.fail("write", &e.to_string());
            return false;
        }
        self.metrics.batches.inc();
        self.metrics.changes.inc_by(ops.len() as u64);
        match self.fsync {
            Fsync::Batch => self.metrics.syncs.inc(),
            Fsync::Interval => {
                self.unsynced = true;
                if self.last_sync.elapsed() >= self.interval {
                    self.sync();
                }
            }
            Fsync::Off => {}
        }
        self.metrics
            .batch_seconds
            .observe(started.elapsed().as_secs_f64());
        self.store.is_some()
    }

    fn sync(&mut self) {
        self.unsynced = false;
        self.last_sync = Instant::now();
        if let Some(store) = &mut self.store {
            let synced = store
                .db
                .persist(PersistMode::SyncData)
                .map_err(|e| e.to_string())
                .and_then(|()| store.log.sync().map_err(|e| e.to_string()));
            match synced {
                Ok(()) => self.metrics.syncs.inc(),
                Err(e) => self.fail("sync", &e),
            }
        }
    }

    /// A failed write poisoned the database: drop it, reopen later.
    fn fail(&mut self, step: &str, e: &str) {
        self.metrics.failures.with_label_values(&[step]).inc();
        self.metrics.healthy.set(0);
        tracing::error!(dir = %self.dir.display(), step, error = %e, "store write failed; QoS 1/2 work for persistent sessions is refused until the store writes again");
        self.store = None;
        self.last_open = Instant::now();
    }

    /// Opens the store again, at most once a second.
    fn reopen(&mut self) -> bool {
        if self.last_open.elapsed() < Duration::from_secs(1) {
            return false;
        }
        self.last_open = Instant::now();
        if let Some(late) = self.late.take() {
            return self.open_late(late);
        }
        match Store::open(&self.dir) {
            Ok((s, _, _)) => {
                self.store = Some(s);
                self.metrics.healthy.set(1);
                tracing::info!(dir = %self.dir.display(), "store writes again");
                true
            }
            Err(e) => {
                self.metrics.failures.with_label_values(&["reopen"]).inc();
                tracing::warn!(error = %e, "store not reopened yet");
                false
            }
        }
    }
}

impl Writer {
    /// The first opening of a store that was not open at start-up: reads
    /// it back for the node (which serves only then).
    fn open_late(&mut self, late: Late) -> bool {
        match recover::open(&self.dir, &late.metrics) {
            Ok((store, recovered)) => {
                self.store = Some(store);
                self.metrics.healthy.set(1);
                tracing::info!(dir = %self.dir.display(), "store opened; the node serves once it has restored what the store holds");
                // The node is gone (shutting down) when nobody takes it.
                let _ = late.tx.send(recovered);
                true
            }
            Err(e) => {
                self.metrics.failures.with_label_values(&["reopen"]).inc();
                tracing::warn!(error = %e, "store still cannot be opened; MQTT connections are refused");
                self.late = Some(late);
                false
            }
        }
    }
}

/// What the batch does to one key.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Write {
    /// Stores the value.
    Put {
        value: Bytes,
    },
    Delete,
}

/// One change per key. A hash map: the batch's order does not matter (the
/// tree sorts, the log applies each key's last change), and a sorted map's
/// key comparisons were a tenth of the writer's time.
type Batch = FastMap<(Space, Vec<u8>), Write>;

impl Write {
    /// The value to store, `None` for a delete.
    fn into_value(self) -> Option<Bytes> {
        match self {
            Write::Put { value } => Some(value),
            Write::Delete => None,
        }
    }
}

/// The batch's changes, one per key, and the queue prefixes
/// of the sessions it forgets (applied before its queue changes). A queued
/// message acknowledged within the same batch becomes a delete, which the
/// log does not write when it does not hold the message (`QueueLog::append`):
/// most messages to online subscribers never reach the disk. A `Forget` removes the session's record, what earlier
/// changes of this batch queued for it, and (in the log) what the store
/// holds for it. The changes' keys and values move into the batch (the ops
/// keep only who waits for them).
fn fold(ops: &mut [Op]) -> (Batch, Vec<Vec<u8>>) {
    let mut out = Batch::default();
    let mut forgets = Vec::new();
    let put = |out: &mut Batch, key: (Space, Vec<u8>), value: Bytes| {
        out.insert(key, Write::Put { value });
    };
    for op in ops {
        match &mut op.change {
            Change::Session { client, value } => {
                put(
                    &mut out,
                    (Space::Sessions, client.as_bytes().to_vec()),
                    std::mem::take(value),
                );
            }
            Change::Forget { client } => {
                let prefix = record::queue_prefix(client);
                out.retain(|(s, k), _| !(*s == Space::Queue && k.starts_with(&prefix)));
                forgets.push(prefix);
                out.insert((Space::Sessions, client.as_bytes().to_vec()), Write::Delete);
            }
            Change::Queue { key, value } => {
                put(
                    &mut out,
                    (Space::Queue, std::mem::take(key)),
                    std::mem::take(value),
                );
            }
            Change::Unqueue { key } => {
                // A delete even after a put of this batch: the key may be
                // on disk from an earlier batch (a message stored again,
                // with its DUP flag, when its client left). Dropping both
                // left that older copy to be read back after a crash, and
                // a QoS 2 message its client had completed came again.
                // The log writes no delete of a message it does not hold.
                out.insert((Space::Queue, std::mem::take(key)), Write::Delete);
            }
            Change::Retain { topic, value } => {
                let key = (Space::Retained, topic.to_vec());
                match value.take() {
                    Some(v) => put(&mut out, key, v),
                    None => {
                        out.insert(key, Write::Delete);
                    }
                }
            }
        }
    }
    (out, forgets)
}

/// Bytes the files under `dir` take.
pub fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(change: Change) -> Op {
        Op {
            change,
            commit: None,
        }
    }

    #[test]
    fn a_batch_writes_only_what_outlives_it() {
        let client: Arc<str> = Arc::from("c");
        let old = record::queue_key(&client, 1);
        let value = Bytes::from_static(b"new");
        let new = record::queue_key(&client, 2);
        let (batch, forgets) = fold(&mut [
            // Stored and acknowledged in one batch: a delete (which the log
            // writes only if it holds the message from an earlier batch),
            // gone here with the session forgotten next.
            op(Change::Queue {
                key: new.clone(),
                value: value.clone(),
            }),
            op(Change::Unqueue { key: new.clone() }),
            // The session ends and starts over, numbering from 1 again: its
            // message 1, acknowledged at once, is a delete; the old message
            // 1 on disk goes with the forgotten session.
            op(Change::Forget {
                client: client.clone(),
            }),
            op(Change::Queue {
                key: old.clone(),
                value: value.clone(),
            }),
            op(Change::Unqueue { key: old.clone() }),
            // Queued after the end: written, after the log forgets the old.
            op(Change::Queue {
                key: record::queue_key(&client, 3),
                value: value.clone(),
            }),
        ]);
        let mut queue: Vec<_> = batch
            .iter()
            .filter(|((s, _), _)| *s == Space::Queue)
            .map(|((_, k), w)| (k.clone(), w.clone()))
            .collect();
        queue.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            queue,
            [
                (old, Write::Delete),
                (record::queue_key(&client, 3), Write::Put { value }),
            ],
            "message 2 went with the forgotten session"
        );
        assert_eq!(forgets, [record::queue_prefix(&client)]);
        assert_eq!(
            batch.get(&(Space::Sessions, b"c".to_vec())),
            Some(&Write::Delete)
        );
    }
}
