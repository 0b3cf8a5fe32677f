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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use fjall::config::FilterPolicy;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use ntex::util::Bytes;

use super::recover::{self, RecoveryMetrics};
use super::{Change, Op, PersistError, Result, StoreMetrics, record};
use crate::config::{Fsync, PersistenceConfig};
use crate::durable::{Mailbox, Recovered};

/// fjall's smallest journal bound: the journal is what a restart replays,
/// and what the disk holds besides the tables (the default is 512 MiB).
const MAX_JOURNAL: u64 = 64 * 1024 * 1024;

/// The open database and its keyspaces.
pub(super) struct Store {
    db: Database,
    pub(super) sessions: Keyspace,
    pub(super) queue: Keyspace,
    pub(super) retained: Keyspace,
}

impl Store {
    pub(super) fn db(&self) -> &Database {
        &self.db
    }

    pub(super) fn open(dir: &Path) -> Result<Self> {
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
        Ok(Self {
            sessions: ks("sessions").map_err(err)?,
            queue: ks("queue").map_err(err)?,
            retained: ks("retained").map_err(err)?,
            db,
        })
    }
}

/// Which keyspace a change goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
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
        let Some(store) = &self.store else {
            return false;
        };
        let changes = fold(store, ops);
        let mode = if self.fsync == Fsync::Batch {
            PersistMode::SyncData
        } else {
            PersistMode::Buffer
        };
        let mut batch = store.db.batch().durability(Some(mode));
        for ((space, key), value) in changes {
            let ks = match space {
                Space::Sessions => &store.sessions,
                Space::Queue => &store.queue,
                Space::Retained => &store.retained,
            };
            match value {
                Write::Put { value, .. } => batch.insert(ks, key, value.as_ref()),
                Write::Delete => batch.remove(ks, key),
            }
        }
        if let Err(e) = batch.commit() {
            self.fail("write", &e);
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
        if let Some(store) = &self.store {
            match store.db.persist(PersistMode::SyncData) {
                Ok(()) => self.metrics.syncs.inc(),
                Err(e) => self.fail("sync", &e),
            }
        }
    }

    /// A failed write poisoned the database: drop it, reopen later.
    fn fail(&mut self, step: &str, e: &fjall::Error) {
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
            Ok(s) => {
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
    /// Stores the value; `over_delete`: an earlier change of this batch
    /// deleted the key, whose older value may be on disk.
    Put {
        value: Bytes,
        over_delete: bool,
    },
    Delete,
}

type Batch = BTreeMap<(Space, Vec<u8>), Write>;

/// The batch's changes, one per key, in key order. A queued message
/// acknowledged within the same batch is not written at all (its key is
/// new: sequence numbers only grow while the store holds a session's
/// messages), which spares the disk most messages to online subscribers.
/// A `Forget` removes the session's record, what earlier changes of this
/// batch queued for it, and what the store holds for it. The changes' keys
/// and values move into the batch (the ops keep only who waits for them).
fn fold(store: &Store, ops: &mut [Op]) -> Batch {
    let mut out = Batch::new();
    let put = |out: &mut Batch, key: (Space, Vec<u8>), value: Bytes| {
        let over_delete = matches!(
            out.get(&key),
            Some(
                Write::Delete
                    | Write::Put {
                        over_delete: true,
                        ..
                    }
            )
        );
        out.insert(key, Write::Put { value, over_delete });
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
                let batched: Vec<_> = out
                    .range((Space::Queue, prefix.clone())..)
                    .take_while(|((s, k), _)| *s == Space::Queue && k.starts_with(&prefix))
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in batched {
                    out.remove(&k);
                }
                for key in store.queue.prefix(&prefix).filter_map(|g| g.key().ok()) {
                    out.insert((Space::Queue, key.to_vec()), Write::Delete);
                }
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
                let key = (Space::Queue, std::mem::take(key));
                match out.get(&key) {
                    Some(Write::Put {
                        over_delete: false, ..
                    }) => {
                        out.remove(&key);
                    }
                    _ => {
                        out.insert(key, Write::Delete);
                    }
                }
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
    out
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
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = Store::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        let client: Arc<str> = Arc::from("c");
        let old = record::queue_key(&client, 1);
        store
            .queue
            .insert(old.clone(), b"old".as_slice())
            .unwrap_or_else(|e| panic!("{e}"));
        let value = Bytes::from_static(b"new");
        let new = record::queue_key(&client, 2);
        let batch = fold(
            &store,
            &mut [
                // Stored and acknowledged in one batch: nothing to write.
                op(Change::Queue {
                    key: new.clone(),
                    value: value.clone(),
                }),
                op(Change::Unqueue { key: new.clone() }),
                // The session ends and starts over, numbering from 1 again:
                // its message 1, acknowledged at once, still deletes the
                // old message 1 on disk.
                op(Change::Forget {
                    client: client.clone(),
                }),
                op(Change::Queue {
                    key: old.clone(),
                    value: value.clone(),
                }),
                op(Change::Unqueue { key: old.clone() }),
            ],
        );
        let queue: Vec<_> = batch
            .iter()
            .filter(|((s, _), _)| *s == Space::Queue)
            .collect();
        assert_eq!(queue, [(&(Space::Queue, old), &Write::Delete)]);
        assert_eq!(
            batch.get(&(Space::Sessions, b"c".to_vec())),
            Some(&Write::Delete)
        );
    }
}
