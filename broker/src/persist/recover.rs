//! Start-up: what the store holds, read back before the node serves.
//!
//! Sessions whose expiry passed while the node was down, messages whose
//! session is gone and damaged records are deleted here (a damaged record is
//! counted and logged with its key, never a reason not to start); the rest
//! becomes the node's sessions, their queues and the retained messages.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use ntex::util::Bytes;
use prometheus::{Gauge, IntCounter, IntGauge, Registry};

use super::qlog::Messages;
use super::record;
use super::writer::Store;
use super::{PersistError, Result};
use crate::durable::{Recovered, RecoveredSession, SessionRecord};
use crate::message::now_ms;

/// What the read-back reports, registered once: a store that could not be
/// opened at start-up is read back later, by the writer.
#[derive(Debug, Clone)]
pub(super) struct RecoveryMetrics {
    discarded: IntCounter,
    seconds: Gauge,
    sessions: IntGauge,
    messages: IntGauge,
}

impl RecoveryMetrics {
    pub(super) fn new(registry: &Registry) -> Result<Self> {
        let discarded = IntCounter::new(
            "store_discarded_records_total",
            "Damaged records the store dropped at start-up",
        )?;
        registry.register(Box::new(discarded.clone()))?;
        let seconds = Gauge::new(
            "store_recovery_seconds",
            "How long opening the store and reading it back took",
        )?;
        registry.register(Box::new(seconds.clone()))?;
        let gauge = |name: &str, help: &str| -> Result<IntGauge> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        Ok(Self {
            discarded,
            seconds,
            sessions: gauge(
                "store_recovered_sessions",
                "Persistent sessions read back at start-up",
            )?,
            messages: gauge(
                "store_recovered_messages",
                "Queued messages read back at start-up",
            )?,
        })
    }
}

/// Opens the store in `dir` and reads it back.
pub(super) fn open(dir: &Path, metrics: &RecoveryMetrics) -> Result<(Store, Recovered)> {
    let started = Instant::now();
    let (mut store, logged, torn) = Store::open(dir)?;
    metrics.discarded.inc_by(torn);
    let recovered = read(
        &mut store,
        logged,
        dir,
        metrics,
        started,
        Instant::now(),
        now_ms(),
    )?;
    Ok((store, recovered))
}

/// Where a queued message was read from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    Log,
    /// The tree, where stores written before the queue log kept them.
    Tree,
}

fn read(
    store: &mut Store,
    logged: Messages,
    dir: &Path,
    metrics: &RecoveryMetrics,
    started: Instant,
    now: Instant,
    now_ms: u64,
) -> Result<Recovered> {
    let read_err = |source| PersistError::Read {
        dir: dir.to_owned(),
        source,
    };
    let discarded = &metrics.discarded;
    let damaged_before = discarded.get();
    let damaged = |key: &[u8], what: &str, e: &dyn std::fmt::Display| {
        discarded.inc();
        tracing::warn!(key = %String::from_utf8_lossy(key), what, error = %e, "damaged store record dropped");
    };
    // Deleted from the tree at the end: (keyspace is sessions, key).
    let mut drop_keys: Vec<(bool, Vec<u8>)> = Vec::new();
    let mut sessions: HashMap<String, RecoveredSession> = HashMap::new();
    let mut expired = 0u64;
    let mut wills = Vec::new();
    for kv in store.sessions.iter() {
        let (key, value) = kv.into_inner().map_err(read_err)?;
        let client = match std::str::from_utf8(&key) {
            Ok(c) => c.to_owned(),
            Err(e) => {
                damaged(&key, "session", &e);
                drop_keys.push((true, key.to_vec()));
                continue;
            }
        };
        match SessionRecord::decode(&value, now, now_ms) {
            Ok(rec) => {
                // Connected when the node stopped: the expiry counts from now.
                let gone = rec.disconnected_ms != 0
                    && now_ms.saturating_sub(rec.disconnected_ms) >= rec.expiry_ms;
                if gone {
                    expired += 1;
                    wills.extend(rec.will.map(|w| (w.msg, rec.ordered)));
                    drop_keys.push((true, key.to_vec()));
                    continue;
                }
                let client_arc: Arc<str> = Arc::from(client.as_str());
                sessions.insert(
                    client,
                    RecoveredSession {
                        client: client_arc,
                        record: rec,
                        messages: Vec::new(),
                    },
                );
            }
            Err(e) => {
                damaged(&key, "session", &e);
                drop_keys.push((true, key.to_vec()));
            }
        }
    }
    // The log's messages, then those a store of an earlier version kept in
    // the tree (a crash in the middle of moving them may have left one in
    // both: the log's copy is the same message).
    let mut queued: BTreeMap<Vec<u8>, (Bytes, Source)> = logged
        .into_iter()
        .map(|(k, v)| (k, (v, Source::Log)))
        .collect();
    let mut legacy = Vec::new();
    for kv in store.queue.iter() {
        let (key, value) = kv.into_inner().map_err(read_err)?;
        legacy.push(key.to_vec());
        queued
            .entry(key.to_vec())
            .or_insert_with(|| (Bytes::copy_from_slice(&value), Source::Tree));
    }
    let mut log_puts = Vec::new();
    let mut log_dels = Vec::new();
    let mut messages = 0u64;
    for (key, (value, from)) in queued {
        let (client, seq) = match record::parse_queue_key(&key) {
            Ok(k) => k,
            Err(e) => {
                damaged(&key, "queued message", &e);
                log_dels.push((key, None));
                continue;
            }
        };
        let Some(s) = sessions.get_mut(&client) else {
            // Its session expired or was never written: nobody will ask.
            log_dels.push((key, None));
            continue;
        };
        match record::decode_delivery(&value, now, now_ms) {
            Ok(mut d) => {
                d.seq = seq;
                s.messages.push(d);
                messages += 1;
                if from == Source::Tree {
                    log_puts.push((key, Some(value)));
                }
            }
            Err(e) => {
                damaged(&key, "queued message", &e);
                log_dels.push((key, None));
            }
        }
    }
    let mut retained = Vec::new();
    for kv in store.retained.iter() {
        let (key, value) = kv.into_inner().map_err(read_err)?;
        match record::decode_retained(&value, now, now_ms) {
            Ok(m) => retained.push(m),
            Err(e) => {
                damaged(&key, "retained message", &e);
                drop_keys.push((false, key.to_vec()));
            }
        }
    }
    // Into the log first, out of the tree after: a crash in between reads
    // them from both.
    log_puts.extend(log_dels);
    store
        .log
        .append(&[], &log_puts, true)
        .map_err(|source| PersistError::Log {
            dir: dir.to_owned(),
            source,
        })?;
    if !drop_keys.is_empty() || !legacy.is_empty() {
        let mut batch = store.db().batch();
        for (is_session, key) in drop_keys {
            let ks = if is_session {
                &store.sessions
            } else {
                &store.retained
            };
            batch.remove(ks, key);
        }
        for key in legacy {
            batch.remove(&store.queue, key);
        }
        batch.commit().map_err(read_err)?;
    }
    let took = started.elapsed();
    metrics.seconds.set(took.as_secs_f64());
    metrics
        .sessions
        .set(i64::try_from(sessions.len()).unwrap_or(i64::MAX));
    metrics
        .messages
        .set(i64::try_from(messages).unwrap_or(i64::MAX));
    tracing::info!(
        dir = %dir.display(),
        sessions = sessions.len(),
        messages,
        retained = retained.len(),
        expired,
        damaged = discarded.get() - damaged_before,
        took_ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
        "store read back"
    );
    Ok(Recovered {
        sessions: sessions.into_values().collect(),
        retained,
        wills,
    })
}
