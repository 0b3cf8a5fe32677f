//! The on-disk copy of traces, metering history and alarm records, so that a
//! restarted node still answers for the whole retention window.
//!
//! Recorders hand entries to a bounded channel without waiting; one writer
//! thread appends them as JSON lines to one file per kind and hour
//! (`device-2026112215.jsonl`), flushes when idle, and deletes files older
//! than the retention or beyond the size budget, oldest first. When the
//! channel is full an entry is dropped and counted: the hot path never waits
//! for the disk. At start-up `replay` reads back what is within the
//! retention.

use std::collections::HashMap;
use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::time::Duration;

use prometheus::{IntCounterVec, Opts, Registry};
use serde::{Deserialize, Serialize};

use crate::alarm::{AlarmJournal, AlarmRecord};
use crate::meter::{GroupSample, MeterJournal, MinuteRecord};
use crate::trace::{DeviceEvent, MessageEvent, TraceJournal};

/// Errors while opening the journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("trace.dir {path}: {error}")]
    Dir {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("journal metrics: {0}")]
    Prometheus(#[from] prometheus::Error),
}

pub type Result<T> = std::result::Result<T, JournalError>;

/// What is written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Entry {
    Device(DeviceEvent),
    Message(MessageEvent),
    Minute(MinuteRecord),
    Groups(GroupSample),
    Alarm(AlarmRecord),
}

impl Entry {
    fn kind(&self) -> &'static str {
        match self {
            Entry::Device(_) => "device",
            Entry::Message(_) => "message",
            Entry::Minute(_) => "minute",
            Entry::Groups(_) => "groups",
            Entry::Alarm(_) => "alarm",
        }
    }

    fn ts(&self) -> u64 {
        match self {
            Entry::Device(e) => e.ts,
            Entry::Message(e) => e.ts,
            Entry::Minute(m) => m.start,
            Entry::Groups(g) => g.ts,
            Entry::Alarm(a) => a.end.unwrap_or(a.start),
        }
    }
}

/// Entries waiting for the writer, at most.
const QUEUE: usize = 65_536;
const HOUR_MS: u64 = 3_600_000;

/// The sending side, cloned into every recorder.
#[derive(Debug, Clone)]
pub struct Journal {
    tx: SyncSender<Entry>,
    counted: IntCounterVec,
}

impl Journal {
    /// Hands an entry to the writer; drops (and counts) it when the writer
    /// is behind.
    pub fn record(&self, entry: Entry) {
        match self.tx.try_send(entry) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.counted.with_label_values(&["dropped"]).inc(),
            Err(TrySendError::Disconnected(_)) => {
                self.counted.with_label_values(&["failed"]).inc();
            }
        }
    }
}

// The core's journal ports (traces, metering, alarms), all kept here.
impl TraceJournal for Journal {
    fn device(&self, event: DeviceEvent) {
        self.record(Entry::Device(event));
    }

    fn message(&self, event: MessageEvent) {
        self.record(Entry::Message(event));
    }
}

impl MeterJournal for Journal {
    fn minute(&self, minute: MinuteRecord) {
        self.record(Entry::Minute(minute));
    }

    fn groups(&self, sample: GroupSample) {
        self.record(Entry::Groups(sample));
    }
}

impl AlarmJournal for Journal {
    fn alarm(&self, record: AlarmRecord) {
        self.record(Entry::Alarm(record));
    }
}

/// What `replay` found on disk, oldest first.
#[derive(Debug, Default)]
pub struct Replayed {
    pub devices: Vec<DeviceEvent>,
    pub messages: Vec<MessageEvent>,
    pub minutes: Vec<MinuteRecord>,
    pub groups: Vec<GroupSample>,
    /// The latest version of each alarm record.
    pub alarms: Vec<AlarmRecord>,
}

/// Opens the journal directory: reads back what it holds within the
/// retention, and starts the writer thread.
pub fn open(
    dir: &Path,
    retention_ms: u64,
    max_bytes: u64,
    registry: &Registry,
) -> Result<(Journal, Replayed)> {
    let fail = |error| JournalError::Dir {
        path: dir.to_owned(),
        error,
    };
    std::fs::create_dir_all(dir).map_err(fail)?;
    let counted = IntCounterVec::new(
        Opts::new(
            "journal_entries_total",
            "Trace, metering and alarm entries for trace.dir: written, dropped (writer behind) or failed (disk error)",
        ),
        &["result"],
    )?;
    registry.register(Box::new(counted.clone()))?;
    let now = crate::message::now_ms();
    let replayed = replay(dir, now.saturating_sub(retention_ms));
    let (tx, rx) = sync_channel(QUEUE);
    let writer = Writer {
        dir: dir.to_owned(),
        retention_ms,
        max_bytes,
        open: HashMap::new(),
        counted: counted.clone(),
    };
    std::thread::Builder::new()
        .name("ringmq-journal".into())
        .spawn(move || writer.run(rx))
        .map_err(fail)?;
    Ok((Journal { tx, counted }, replayed))
}

/// `<kind>-<YYYYMMDDHH>.jsonl` for an hour since the epoch.
fn file_name(kind: &str, hour: u64) -> String {
    let secs = hour * 3600;
    let (y, m, d) = civil(secs / 86_400);
    format!("{kind}-{y:04}{m:02}{d:02}{:02}.jsonl", secs % 86_400 / 3600)
}

/// The hour since the epoch a journal file covers, from its name.
fn hour_of(name: &str) -> Option<u64> {
    let stamp = name.strip_suffix(".jsonl")?.rsplit('-').next()?;
    if stamp.len() != 10 || !stamp.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n = |r: std::ops::Range<usize>| stamp[r].parse::<u64>().ok();
    let days = days_from_civil(n(0..4)?, n(4..6)?, n(6..8)?)?;
    Some(days * 24 + n(8..10)?)
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + u64::from(m <= 2), m, d)
}

fn days_from_civil(y: u64, m: u64, d: u64) -> Option<u64> {
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || y < 1970 {
        return None;
    }
    let y = if m <= 2 { y - 1 } else { y };
    let era = y / 400;
    let yoe = y % 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe).checked_sub(719_468)
}

/// Journal files of `dir` with the hour each covers, oldest first.
fn files(dir: &Path) -> Vec<(u64, PathBuf, u64)> {
    let mut out: Vec<(u64, PathBuf, u64)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let hour = hour_of(&name)?;
            let size = e.metadata().ok()?.len();
            Some((hour, e.path(), size))
        })
        .collect();
    out.sort();
    out
}

/// Reads back the entries at or after `oldest`; lines that do not parse
/// (a torn last line after a crash) are skipped.
fn replay(dir: &Path, oldest: u64) -> Replayed {
    let mut r = Replayed::default();
    let mut alarms: HashMap<String, AlarmRecord> = HashMap::new();
    for (hour, path, _) in files(dir) {
        if (hour + 1) * HOUR_MS < oldest {
            continue;
        }
        let Ok(file) = std::fs::File::open(&path) else {
            continue;
        };
        for line in std::io::BufReader::new(file).lines().map_while(|l| l.ok()) {
            let Ok(entry) = serde_json::from_str::<Entry>(&line) else {
                continue;
            };
            if entry.ts() < oldest && !matches!(entry, Entry::Alarm(_)) {
                continue;
            }
            match entry {
                Entry::Device(e) => r.devices.push(e),
                Entry::Message(e) => r.messages.push(e),
                Entry::Minute(m) => r.minutes.push(m),
                Entry::Groups(g) => r.groups.push(g),
                Entry::Alarm(a) => {
                    alarms.insert(a.id.clone(), a);
                }
            }
        }
    }
    r.alarms = alarms.into_values().collect();
    r.alarms.sort_by_key(|a| a.start);
    r.devices.sort_by_key(|e| e.ts);
    r.messages.sort_by_key(|e| e.ts);
    r.minutes.sort_by_key(|m| m.start);
    r.groups.sort_by_key(|g| g.ts);
    r
}

struct Writer {
    dir: PathBuf,
    retention_ms: u64,
    max_bytes: u64,
    /// The open file of each kind, with the hour it covers.
    open: HashMap<&'static str, (u64, BufWriter<std::fs::File>)>,
    counted: IntCounterVec,
}

impl Writer {
    fn run(mut self, rx: Receiver<Entry>) {
        let mut last_cleanup = 0;
        loop {
            match rx.recv_timeout(Duration::from_millis(500)) {
                Ok(entry) => self.write(&entry),
                Err(RecvTimeoutError::Timeout) => self.flush(),
                Err(RecvTimeoutError::Disconnected) => {
                    self.flush();
                    return;
                }
            }
            let now = crate::message::now_ms();
            if now - last_cleanup.min(now) > 60_000 {
                self.cleanup(now);
                last_cleanup = now;
            }
        }
    }

    fn write(&mut self, entry: &Entry) {
        let kind = entry.kind();
        let hour = entry.ts() / HOUR_MS;
        let result = (|| -> std::io::Result<()> {
            let current = self.open.get(kind).map(|(h, _)| *h);
            if current != Some(hour) {
                if let Some((_, mut w)) = self.open.remove(kind) {
                    w.flush()?;
                }
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.join(file_name(kind, hour)))?;
                self.open.insert(kind, (hour, BufWriter::new(file)));
            }
            if let Some((_, w)) = self.open.get_mut(kind) {
                serde_json::to_writer(&mut *w, entry)?;
                w.write_all(b"\n")?;
            }
            Ok(())
        })();
        let label = match result {
            Ok(()) => "written",
            Err(e) => {
                tracing::warn!(error = %e, dir = %self.dir.display(), "journal entry not written");
                "failed"
            }
        };
        self.counted.with_label_values(&[label]).inc();
    }

    fn flush(&mut self) {
        for (_, w) in self.open.values_mut() {
            if let Err(e) = w.flush() {
                tracing::warn!(error = %e, "journal flush failed");
            }
        }
    }

    /// Deletes files past the retention, then the oldest beyond the size
    /// budget (never a file being written).
    fn cleanup(&mut self, now: u64) {
        self.flush();
        let oldest_hour = now.saturating_sub(self.retention_ms) / HOUR_MS;
        let in_use: Vec<u64> = self.open.values().map(|(h, _)| *h).collect();
        let mut kept = Vec::new();
        for (hour, path, size) in files(&self.dir) {
            if hour < oldest_hour && !in_use.contains(&hour) {
                let _ = std::fs::remove_file(&path);
            } else {
                kept.push((hour, path, size));
            }
        }
        let mut total: u64 = kept.iter().map(|(_, _, s)| s).sum();
        for (hour, path, size) in kept {
            if total <= self.max_bytes {
                break;
            }
            if in_use.contains(&hour) {
                continue;
            }
            if std::fs::remove_file(&path).is_ok() {
                total -= size;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_round_trip_to_their_hour() {
        for hour in [0, 1, 24 * 365 * 56 + 13, 500_000] {
            let name = file_name("device", hour);
            assert_eq!(hour_of(&name), Some(hour), "{name}");
        }
        assert_eq!(file_name("alarm", 0), "alarm-1970010100.jsonl");
        assert_eq!(hour_of("device-2026132200.jsonl"), None);
        assert_eq!(hour_of("notes.txt"), None);
    }

    #[test]
    fn replay_keeps_the_window_and_the_latest_alarm_version() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let now = 1_795_305_600_000;
        let device = |ts| {
            Entry::Device(DeviceEvent {
                ts,
                client_id: "c".into(),
                channel_id: "n-1".into(),
                action: crate::trace::DeviceAction::Connect,
                reason: crate::trace::DeviceReason::Accepted,
                detail: None,
            })
        };
        let mut w = Writer {
            dir: dir.path().to_owned(),
            retention_ms: 2 * HOUR_MS,
            max_bytes: u64::MAX,
            open: HashMap::new(),
            counted: IntCounterVec::new(Opts::new("x", "x"), &["result"])
                .unwrap_or_else(|e| panic!("{e}")),
        };
        w.write(&device(now - 5 * HOUR_MS));
        w.write(&device(now - HOUR_MS));
        w.write(&device(now));
        let alarm = |state, end| {
            Entry::Alarm(AlarmRecord {
                id: "n-0".into(),
                metric: crate::alarm::Metric::Tps,
                value: 1,
                peak: 1,
                threshold: 1,
                state,
                acknowledged: false,
                start: now - 10 * HOUR_MS,
                end,
                duration_secs: 0,
                node: "n".into(),
            })
        };
        w.write(&alarm(crate::alarm::AlarmState::Firing, None));
        w.write(&alarm(crate::alarm::AlarmState::Resolved, Some(now)));
        w.flush();
        let r = replay(dir.path(), now - 2 * HOUR_MS);
        assert_eq!(r.devices.len(), 2);
        assert_eq!(r.alarms.len(), 1);
        assert_eq!(r.alarms[0].state, crate::alarm::AlarmState::Resolved);
        // Cleanup deletes the hour past the retention.
        w.open.clear();
        w.cleanup(now);
        assert_eq!(files(dir.path()).len(), 3, "{:?}", files(dir.path()));
        // A size budget of one byte leaves nothing but what is being written.
        w.max_bytes = 1;
        w.cleanup(now);
        assert!(files(dir.path()).is_empty());
    }
}
