//! The node's durable store: persistent sessions, the QoS 1/2 messages
//! queued for them (offline, queued for the connection, in flight) and
//! retained messages survive a restart and a crash (SPEC B4, B5, K3).
//!
//! The in-memory state (`session`, `retain`) stays the truth the node
//! works from; this module keeps a copy on disk and reads it back at
//! start-up (`recover`). Every change is an `Op` sent, in the order the
//! state changed (under the session's lock), to one writer thread
//! (`writer`), which applies whatever is waiting as one batch of an
//! embedded LSM store (fjall) and forces it to disk by the `fsync` policy:
//! a group commit, one write and at most one fsync for many messages. A
//! QoS 1/2 PUBLISH and a SUBSCRIBE wait for their batch (`Commit`) before
//! they are acknowledged; acknowledgements from clients and expiries only
//! delete, and nobody waits for them (lost, they cost a duplicate after a
//! crash, never a loss). `record` is the format of keys and values.
//!
//! Without a directory (`persistence.dir: null`) every method is a no-op
//! and the node keeps everything in memory only.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ntex::util::Bytes;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use crate::config::PersistenceConfig;
use crate::durable::{Commit, Pending, Recovered, SessionRecord, Store};
use crate::message::{Delivery, Message, now_ms};

pub mod qlog;
pub mod record;
mod recover;
mod writer;

use recover::RecoveryMetrics;
pub use writer::dir_size;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error(
        "cannot open the store in {dir}: {source}. Check that the directory is writable by the broker's user (on Kubernetes: the volume is mounted read-write and the pod's fsGroup owns it) and that the disk has room; if the store is damaged beyond repair, move the directory aside (the node then starts empty) and keep it for analysis"
    )]
    Open {
        dir: PathBuf,
        #[source]
        source: fjall::Error,
    },
    #[error("cannot read the store in {dir}: {source}")]
    Read {
        dir: PathBuf,
        #[source]
        source: fjall::Error,
    },
    #[error(
        "cannot open the queue log in {dir}: {source}. Check that the directory is writable by the broker's user and that the disk has room"
    )]
    Log {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the store writer thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("store metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

pub type Result<T> = std::result::Result<T, PersistError>;

/// What the store held at start-up, for the node to restore before it serves.
#[derive(Debug)]
pub enum Recovery {
    /// Read back at once.
    Done(Recovered),
    /// The store could not be opened at start-up: what it holds arrives
    /// when it first opens (the sender is dropped if the node stops first).
    Later(tokio::sync::oneshot::Receiver<Recovered>),
}

/// One change to the store.
#[derive(Debug)]
enum Change {
    /// A session's record (its subscriptions, expiry, flags).
    Session {
        client: Arc<str>,
        value: Bytes,
    },
    /// A session ends: its record and every queued message go.
    Forget {
        client: Arc<str>,
    },
    Queue {
        key: Vec<u8>,
        value: Bytes,
    },
    Unqueue {
        key: Vec<u8>,
    },
    Retain {
        topic: Bytes,
        value: Option<Bytes>,
    },
}

/// A change and who waits for it.
#[derive(Debug)]
struct Op {
    change: Change,
    commit: Option<Arc<Commit>>,
}

/// The store's metrics.
#[derive(Debug, Clone)]
struct StoreMetrics {
    batches: IntCounter,
    changes: IntCounter,
    syncs: IntCounter,
    failures: IntCounterVec,
    healthy: IntGauge,
    disk_bytes: IntGauge,
    batch_seconds: Histogram,
}

impl StoreMetrics {
    fn new(registry: &Registry) -> Result<Self> {
        let counter = |name: &str, help: &str| -> Result<IntCounter> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let gauge = |name: &str, help: &str| -> Result<IntGauge> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let failures = IntCounterVec::new(
            Opts::new(
                "store_failures_total",
                "Store failures, by step (open at start-up, write, sync, reopen)",
            ),
            &["step"],
        )?;
        registry.register(Box::new(failures.clone()))?;
        let batch_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "store_batch_seconds",
                "Time to write (and sync) one batch of the store",
            )
            .buckets(vec![
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5,
            ]),
        )?;
        registry.register(Box::new(batch_seconds.clone()))?;
        Ok(Self {
            batches: counter("store_batches_total", "Batches the store wrote")?,
            changes: counter("store_changes_total", "Changes the store wrote")?,
            syncs: counter("store_syncs_total", "fsyncs of the store's journal")?,
            failures,
            healthy: gauge(
                "store_healthy",
                "1 while the store writes, 0 while it fails (disk full, read-only)",
            )?,
            disk_bytes: gauge("store_disk_bytes", "Bytes the store takes on disk")?,
            batch_seconds,
        })
    }
}

/// The handle every part of the node writes through. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Persist(Option<Arc<Inner>>);

#[derive(Debug)]
struct Inner {
    /// `None` asks the writer to end (after what was sent before it).
    tx: std::sync::mpsc::Sender<Option<Op>>,
    metrics: StoreMetrics,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    dir: PathBuf,
}

impl Persist {
    /// No store: everything stays in memory.
    pub fn memory() -> Self {
        Self(None)
    }

    /// Opens (or creates) the store in `config.dir` and reads it back; an
    /// error if it cannot.
    pub fn open(config: &PersistenceConfig, registry: &Registry) -> Result<(Self, Recovered)> {
        let Some(dir) = &config.dir else {
            return Ok((Self::memory(), Recovered::default()));
        };
        let metrics = StoreMetrics::new(registry)?;
        let (store, recovered) = recover::open(dir, &RecoveryMetrics::new(registry)?)?;
        Ok((
            Self::launch(dir, config, metrics, Some(store), None)?,
            recovered,
        ))
    }

    /// As `open`, for a node: a store that cannot be opened or read now
    /// (read-only directory, full disk, I/O error) is not a reason to stop.
    /// The error is logged, the writer tries again every second, and what
    /// the store holds arrives through `Recovery::Later` once it opens.
    pub fn start(config: &PersistenceConfig, registry: &Registry) -> Result<(Self, Recovery)> {
        let Some(dir) = &config.dir else {
            return Ok((Self::memory(), Recovery::Done(Recovered::default())));
        };
        let metrics = StoreMetrics::new(registry)?;
        let recovery_metrics = RecoveryMetrics::new(registry)?;
        match recover::open(dir, &recovery_metrics) {
            Ok((store, recovered)) => Ok((
                Self::launch(dir, config, metrics, Some(store), None)?,
                Recovery::Done(recovered),
            )),
            Err(
                e @ (PersistError::Open { .. }
                | PersistError::Read { .. }
                | PersistError::Log { .. }),
            ) => {
                tracing::error!(error = %e, "MQTT connections are refused and the node is not ready until the store opens; trying again every second");
                metrics.failures.with_label_values(&["open"]).inc();
                let (tx, rx) = tokio::sync::oneshot::channel();
                let late = writer::Late {
                    tx,
                    metrics: recovery_metrics,
                };
                let persist = Self::launch(dir, config, metrics, None, Some(late))?;
                Ok((persist, Recovery::Later(rx)))
            }
            Err(e) => Err(e),
        }
    }

    fn launch(
        dir: &std::path::Path,
        config: &PersistenceConfig,
        metrics: StoreMetrics,
        store: Option<writer::Store>,
        late: Option<writer::Late>,
    ) -> Result<Self> {
        metrics.healthy.set(i64::from(store.is_some()));
        let (tx, rx) = std::sync::mpsc::channel();
        let w = writer::Writer::new(store, late, dir.to_owned(), config, metrics.clone());
        let handle = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || w.run(rx))
            .map_err(PersistError::Thread)?;
        Ok(Self(Some(Arc::new(Inner {
            tx,
            metrics,
            writer: Mutex::new(Some(handle)),
            dir: dir.to_owned(),
        }))))
    }

    fn send(&self, change: Change, commit: Option<Arc<Commit>>) {
        let Some(inner) = &self.0 else {
            return;
        };
        // The writer is gone (shutting down): whoever waits is refused.
        if let Err(std::sync::mpsc::SendError(Some(op))) =
            inner.tx.send(Some(Op { change, commit }))
            && let Some(c) = op.commit
            && let Some(m) = c.written(false)
        {
            m.ring();
        }
    }

    /// Ends the writer after it wrote what was sent (shutdown): later
    /// changes are refused.
    pub fn close(&self) {
        let Some(inner) = &self.0 else {
            return;
        };
        let _ = inner.tx.send(None);
        let handle = inner.writer.lock().ok().and_then(|mut h| h.take());
        if let Some(h) = handle
            && h.join().is_err()
        {
            tracing::error!("store writer panicked");
        }
    }
}

impl Store for Persist {
    /// Whether changes are kept on disk.
    fn is_durable(&self) -> bool {
        self.0.is_some()
    }

    /// False while the store cannot write (disk full, read-only).
    fn is_healthy(&self) -> bool {
        self.0.as_ref().is_none_or(|i| i.metrics.healthy.get() == 1)
    }

    /// Stores a session's record; `pending` (if any) waits for it.
    fn session(&self, client: &Arc<str>, rec: &SessionRecord, pending: Option<&mut Pending>) {
        if self.is_durable() {
            let change = Change::Session {
                client: client.clone(),
                value: rec.encode(Instant::now(), now_ms()),
            };
            self.send(change, pending.and_then(Pending::join));
        }
    }

    /// Drops a session and every message queued for it.
    fn forget(&self, client: &Arc<str>) {
        self.send(
            Change::Forget {
                client: client.clone(),
            },
            None,
        );
    }

    /// Stores message `seq` of a session's queue.
    fn queue(&self, client: &str, seq: u64, d: &Delivery, pending: Option<&mut Pending>) {
        if self.is_durable() {
            let change = Change::Queue {
                key: record::queue_key(client, seq),
                value: record::encode_delivery(d, Instant::now(), now_ms()),
            };
            self.send(change, pending.and_then(Pending::join));
        }
    }

    /// Deletes message `seq` of a session's queue: acknowledged, dropped or expired.
    fn unqueue(&self, client: &str, seq: u64) {
        if self.is_durable() && seq != 0 {
            let key = record::queue_key(client, seq);
            self.send(Change::Unqueue { key }, None);
        }
    }

    /// Stores (or, for an empty payload, deletes) the retained message of a topic.
    fn retain(&self, msg: &Message, pending: Option<&mut Pending>) {
        if self.is_durable() {
            let topic = Bytes::copy_from_slice(msg.topic.as_bytes());
            let value = (!msg.payload.is_empty())
                .then(|| record::encode_retained(msg, Instant::now(), now_ms()));
            self.send(
                Change::Retain { topic, value },
                pending.and_then(Pending::join),
            );
        }
    }

    fn measure(&self) {
        if let Some(inner) = &self.0 {
            let bytes = writer::dir_size(&inner.dir);
            inner
                .metrics
                .disk_bytes
                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use proptest::prelude::*;

    use super::*;
    use crate::message::{MessageId, QoS};
    use crate::router::SubOptions;

    /// A session as compared: its filters, sorted, and its (sequence,
    /// payload) messages in order.
    type Kept = (Vec<String>, Vec<(u64, u8)>);

    /// One step of a client's life as the store sees it.
    #[derive(Debug, Clone)]
    enum Step {
        Subscribe(usize),
        Queue(usize, u8),
        /// The nth oldest message of the client is acknowledged.
        Ack(usize, usize),
        /// The nth oldest message of the client is stored again, with its
        /// DUP flag (its client left while it was in flight).
        Again(usize, usize),
        Forget(usize),
        Retain(u8, bool),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0..3usize).prop_map(Step::Subscribe),
            (0..3usize, any::<u8>()).prop_map(|(c, b)| Step::Queue(c, b)),
            (0..3usize, 0..4usize).prop_map(|(c, n)| Step::Ack(c, n)),
            (0..3usize, 0..4usize).prop_map(|(c, n)| Step::Again(c, n)),
            (0..3usize).prop_map(Step::Forget),
            (0..4u8, any::<bool>()).prop_map(|(t, keep)| Step::Retain(t, keep)),
        ]
    }

    fn message(topic: String, body: u8) -> Message {
        Message::new(
            MessageId(u64::from(body)),
            topic.into(),
            vec![body].into(),
            QoS::AtLeastOnce,
            true,
            Arc::from("p"),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Whatever sequence of changes was acknowledged, reopening the
        /// store reads back exactly the sessions, queues and retained
        /// messages a model of them holds.
        #[test]
        fn what_was_written_is_read_back(steps in proptest::collection::vec(step(), 1..60)) {
            let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
            let config = PersistenceConfig {
                dir: Some(dir.path().join("store")),
                ..PersistenceConfig::default()
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap_or_else(|e| panic!("{e}"));
            let (persist, _) = Persist::open(&config, &Registry::new()).unwrap_or_else(|e| panic!("{e}"));
            let mut sessions: HashMap<usize, Vec<String>> = HashMap::new();
            let mut queues: HashMap<usize, BTreeMap<u64, u8>> = HashMap::new();
            let mut retained: BTreeMap<String, u8> = BTreeMap::new();
            // Per client, starting over when its session is forgotten, as a
            // session made anew numbers its messages from 1 again.
            let mut seqs: HashMap<usize, u64> = HashMap::new();
            let name = |c: usize| -> Arc<str> { Arc::from(format!("client-{c}")) };
            for (i, s) in steps.into_iter().enumerate() {
                let mut pending = Pending::default();
                match s {
                    Step::Subscribe(c) => {
                        let subs = sessions.entry(c).or_default();
                        subs.push(format!("t/{}", subs.len()));
                        let rec = SessionRecord {
                            expiry_ms: 3_600_000,
                            disconnected_ms: now_ms(),
                            ordered: false,
                            qos2_ids: vec![7],
                            subscriptions: subs.iter().map(|f| (f.clone(), SubOptions::at(QoS::AtLeastOnce))).collect(),
                            will: None,
                            released: Vec::new(),
                            replays: Vec::new(),
                            epoch: 0,
                            armed_will: None,
                        };
                        persist.session(&name(c), &rec, Some(&mut pending));
                    }
                    Step::Queue(c, body) => {
                        let seq = seqs.entry(c).or_default();
                        *seq += 1;
                        let seq = *seq;
                        let d = Delivery::new(Arc::new(message("q".into(), body)), QoS::AtLeastOnce);
                        persist.queue(&name(c), seq, &d, Some(&mut pending));
                        queues.entry(c).or_default().insert(seq, body);
                    }
                    Step::Ack(c, n) => {
                        let q = queues.entry(c).or_default();
                        if let Some(&k) = q.keys().nth(n) {
                            q.remove(&k);
                            persist.unqueue(&name(c), k);
                        }
                    }
                    Step::Again(c, n) => {
                        let q = queues.entry(c).or_default();
                        if let Some((&k, &body)) = q.iter().nth(n) {
                            let mut d = Delivery::new(Arc::new(message("q".into(), body)), QoS::AtLeastOnce);
                            d.dup = true;
                            persist.queue(&name(c), k, &d, None);
                        }
                    }
                    Step::Forget(c) => {
                        seqs.remove(&c);
                        sessions.remove(&c);
                        queues.remove(&c);
                        persist.forget(&name(c));
                    }
                    Step::Retain(t, keep) => {
                        let topic = format!("r/{t}");
                        let mut m = message(topic.clone(), t);
                        if keep {
                            retained.insert(topic, t);
                        } else {
                            m.payload = ntex::util::Bytes::new();
                            retained.remove(&topic);
                        }
                        persist.retain(&m, Some(&mut pending));
                    }
                }
                // Most steps go on without waiting, so that changes to one key
                // share a batch (a message stored and acknowledged at once).
                if i % 4 == 0 {
                    prop_assert!(rt.block_on(pending.wait()).is_ok());
                }
            }
            persist.close();
            let (again, back) = Persist::open(&config, &Registry::new()).unwrap_or_else(|e| panic!("{e}"));
            again.close();
            let mut got: HashMap<String, Kept> = HashMap::new();
            for s in back.sessions {
                let mut subs: Vec<String> = s.record.subscriptions.into_iter().map(|(f, _)| f).collect();
                subs.sort();
                let msgs = s.messages.iter().map(|d| (d.seq, d.msg.payload[0])).collect();
                got.insert(s.client.to_string(), (subs, msgs));
            }
            let mut want: HashMap<String, Kept> = HashMap::new();
            for (c, subs) in &sessions {
                let mut subs = subs.clone();
                subs.sort();
                // Messages of a client without a record are dropped at start-up.
                let msgs = queues.get(c).map(|q| q.iter().map(|(k, v)| (*k, *v)).collect()).unwrap_or_default();
                want.insert(name(*c).to_string(), (subs, msgs));
            }
            prop_assert_eq!(got, want);
            let back_retained: BTreeMap<String, u8> = back
                .retained
                .iter()
                .map(|m| (m.topic.to_string(), m.payload[0]))
                .collect();
            prop_assert_eq!(back_retained, retained);
        }
    }
}

/// A store written before the queue log kept queued messages in the tree:
/// they are read back and moved into the log, once.
#[cfg(test)]
mod migration_tests {
    use prometheus::Registry;

    use super::*;
    use crate::message::{MessageId, QoS};
    use crate::router::SubOptions;

    #[test]
    fn messages_queued_in_the_tree_move_into_the_log() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("store");
        let now = Instant::now();
        let rec = SessionRecord {
            expiry_ms: 3_600_000,
            disconnected_ms: now_ms(),
            ordered: false,
            qos2_ids: Vec::new(),
            subscriptions: vec![("t".into(), SubOptions::at(QoS::AtLeastOnce))],
            will: None,
            released: Vec::new(),
            replays: Vec::new(),
            epoch: 0,
            armed_will: None,
        };
        {
            // What an earlier version wrote: the session and its messages
            // in the tree.
            let (store, _, _) = writer::Store::open(&path).unwrap_or_else(|e| panic!("{e}"));
            let mut batch = store.db().batch();
            batch.insert(&store.sessions, "old", rec.encode(now, now_ms()).as_ref());
            for seq in 1..=3u64 {
                let msg = Arc::new(Message::new(
                    MessageId(seq),
                    "t".into(),
                    vec![seq as u8].into(),
                    QoS::AtLeastOnce,
                    false,
                    Arc::from("p"),
                ));
                let d = Delivery::new(msg, QoS::AtLeastOnce);
                batch.insert(
                    &store.queue,
                    record::queue_key("old", seq),
                    record::encode_delivery(&d, now, now_ms()).as_ref(),
                );
            }
            batch.commit().unwrap_or_else(|e| panic!("{e}"));
            store
                .db()
                .persist(fjall::PersistMode::SyncAll)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let config = PersistenceConfig {
            dir: Some(path.clone()),
            ..PersistenceConfig::default()
        };
        let payloads = |r: &Recovered| -> Vec<u8> {
            r.sessions
                .iter()
                .flat_map(|s| s.messages.iter().map(|d| d.msg.payload[0]))
                .collect()
        };
        for opening in 0..2 {
            let (persist, back) =
                Persist::open(&config, &Registry::new()).unwrap_or_else(|e| panic!("{e}"));
            persist.close();
            assert_eq!(payloads(&back), [1, 2, 3], "opening {opening}");
        }
        let (store, logged, _) = writer::Store::open(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            store.queue.iter().count(),
            0,
            "the tree keeps no queued message"
        );
        assert_eq!(logged.len(), 3);
    }
}

/// The store waking acknowledgements through a worker's mailbox
/// (`durable::wake`), with a real writer thread.
#[cfg(test)]
mod mailbox_tests {
    use std::time::Duration;

    use prometheus::Registry;

    use super::*;
    use crate::durable::{attach_worker, current_mailbox};
    use crate::message::{MessageId, QoS};

    /// Acknowledgements waiting on a worker with a mailbox are woken by it,
    /// batch after batch, and a failed write still reaches them.
    #[ntex::test]
    async fn a_worker_with_a_mailbox_gets_every_acknowledgement() {
        attach_worker();
        assert!(current_mailbox().is_some());
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let config = PersistenceConfig {
            dir: Some(dir.path().join("store")),
            ..PersistenceConfig::default()
        };
        let (persist, _) =
            Persist::open(&config, &Registry::new()).unwrap_or_else(|e| panic!("{e}"));
        let msg = Arc::new(Message::new(
            MessageId(1),
            "t".into(),
            vec![1].into(),
            QoS::AtLeastOnce,
            false,
            Arc::from("p"),
        ));
        for round in 0..3u64 {
            let mut waits = Vec::new();
            for i in 0..200 {
                let mut p = Pending::default();
                let d = Delivery::new(msg.clone(), QoS::AtLeastOnce);
                persist.queue("c", round * 1000 + i + 1, &d, Some(&mut p));
                waits.push(p.wait());
            }
            for w in waits {
                let r = ntex::time::timeout(Duration::from_secs(10), w).await;
                assert!(matches!(r, Ok(Ok(()))), "round {round}: {r:?}");
            }
        }
        // The writer is gone: what is sent now is refused, and the waiter
        // hears of it rather than sleeping on.
        persist.close();
        let mut p = Pending::default();
        persist.queue(
            "c",
            9999,
            &Delivery::new(msg, QoS::AtLeastOnce),
            Some(&mut p),
        );
        let r = ntex::time::timeout(Duration::from_secs(10), p.wait()).await;
        assert!(matches!(r, Ok(Err(_))), "{r:?}");
    }
}
