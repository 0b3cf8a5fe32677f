//! What a CONNECT's credential check costs, and who pays it (A1).
//!
//! argon2 takes tens of milliseconds of CPU by design. Run on a connection
//! worker it stalls every client of that worker (200 wrong passwords at once
//! held an established pair's messages for 6 s), so verifications run on a
//! small pool of threads of their own behind a bounded queue: past the queue
//! a CONNECT is refused as "server busy" at once rather than waiting.
//!
//! Around the pool:
//! - a login whose user name or address failed within the window waits in a
//!   queue of its own, behind all others: a storm fills that queue, and the
//!   logins of everyone else still get their turn;
//! - failed logins are counted per user name and per client IP; past the
//!   limit in the window, a CONNECT is refused without a check
//!   (`login_rate_limited`), so a storm cannot keep the pool busy;
//! - successful verifications are remembered for `cache_secs` (a keyed
//!   MAC of user name and password, never the password), so a fleet that
//!   reconnects does not pay argon2 each time; the cache is emptied whenever
//!   the credentials file changes;
//! - refusals are logged with the user name cut short, at most
//!   `LOG_PER_SEC` lines a second, the rest counted in one summary line.

use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordVerifier};
use prometheus::{IntCounter, IntGauge, Registry};

use crate::config::LoginConfig;
use crate::util::FastMap;

/// Errors while starting the pool.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("cannot start a password verification thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("login metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

pub type Result<T> = std::result::Result<T, LoginError>;

/// The pool's queue was full: the CONNECT is refused as "server busy".
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("password verification queue full")]
pub struct Busy;

struct Job {
    hash: Arc<str>,
    password: Vec<u8>,
    done: tokio::sync::oneshot::Sender<bool>,
}

/// Which queue a verification waits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// Neither the user name nor the address failed lately.
    Clean,
    /// The user name or the address failed within the window: a storm's
    /// logins wait here, behind everyone else's, and fill only this queue.
    Suspect,
}

#[derive(Default)]
struct Queues {
    clean: VecDeque<Job>,
    suspect: VecDeque<Job>,
    closed: bool,
}

struct Shared {
    queues: Mutex<Queues>,
    work: Condvar,
    /// Jobs each queue holds at most.
    limit: usize,
}

/// Password verification threads behind two bounded queues.
pub struct Verifier {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    verifications: IntCounter,
    /// Verifications waiting or running.
    queue: IntGauge,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("threads", &self.threads.len())
            .field("pending", &self.queue.get())
            .finish()
    }
}

impl Verifier {
    /// Starts `threads` threads (0: one per core) with room for `queue`
    /// waiting verifications of each priority.
    pub fn start(threads: usize, queue: usize, registry: &Registry) -> Result<Self> {
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, usize::from)
        } else {
            threads
        };
        let verifications = IntCounter::new(
            "password_verifications_total",
            "argon2 password verifications run (real or decoy), off the connection workers",
        )?;
        registry.register(Box::new(verifications.clone()))?;
        let gauge = IntGauge::new(
            "login_queue",
            "CONNECT password verifications waiting or running",
        )?;
        registry.register(Box::new(gauge.clone()))?;
        let shared = Arc::new(Shared {
            queues: Mutex::default(),
            work: Condvar::new(),
            limit: queue,
        });
        let mut v = Self {
            shared,
            threads: Vec::with_capacity(threads),
            verifications,
            queue: gauge,
        };
        for i in 0..threads {
            let (shared, count, gauge) =
                (v.shared.clone(), v.verifications.clone(), v.queue.clone());
            // On an error `v` is dropped, which stops the threads started.
            let h = std::thread::Builder::new()
                .name(format!("login-{i}"))
                .spawn(move || work(&shared, &count, &gauge))
                .map_err(LoginError::Thread)?;
            v.threads.push(h);
        }
        Ok(v)
    }

    /// Whether `password` matches the PHC string `hash`; waits for a pool
    /// thread, or fails at once when the queue of its priority is full.
    pub async fn verify(
        &self,
        hash: Arc<str>,
        password: &[u8],
        priority: Priority,
    ) -> std::result::Result<bool, Busy> {
        let (done, answer) = tokio::sync::oneshot::channel();
        let job = Job {
            hash,
            password: password.to_vec(),
            done,
        };
        {
            let mut q = self.shared.queues.lock().unwrap_or_else(|e| e.into_inner());
            let queue = match priority {
                Priority::Clean => &mut q.clean,
                Priority::Suspect => &mut q.suspect,
            };
            if queue.len() >= self.shared.limit {
                return Err(Busy);
            }
            queue.push_back(job);
        }
        self.queue.inc();
        self.shared.work.notify_one();
        answer.await.map_err(|_| Busy)
    }
}

impl Drop for Verifier {
    /// Each thread ends after its current job; waiting CONNECTs are answered
    /// "busy" (their senders drop).
    fn drop(&mut self) {
        self.shared
            .queues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .closed = true;
        self.shared.work.notify_all();
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

fn work(shared: &Shared, count: &IntCounter, gauge: &IntGauge) {
    loop {
        let job = {
            let mut q = shared.queues.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if q.closed {
                    return;
                }
                if let Some(job) = q.clean.pop_front().or_else(|| q.suspect.pop_front()) {
                    break job;
                }
                q = shared.work.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        };
        let ok = PasswordHash::new(&job.hash).is_ok_and(|h| {
            argon2::Argon2::default()
                .verify_password(&job.password, &h)
                .is_ok()
        });
        count.inc();
        gauge.dec();
        // The CONNECT may have gone meanwhile; nobody to tell then.
        let _ = job.done.send(ok);
    }
}

/// Failed logins per key (user name or client IP) in a fixed window.
#[derive(Debug)]
struct Failures {
    limit: u32,
    window: Duration,
    /// Keyed by a seeded hash of the key: a 64 KiB user name costs 8 bytes.
    counts: Mutex<FastMap<u64, (Instant, u32)>>,
    hasher: foldhash::fast::RandomState,
}

/// Keys tracked at most per limiter; beyond, expired windows are dropped
/// first and new keys go untracked (the other limiter still applies).
const MAX_TRACKED: usize = 100_000;

impl Failures {
    fn new(limit: u32, window: Duration) -> Self {
        Self {
            limit,
            window,
            counts: Mutex::default(),
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    fn key(&self, k: &[u8]) -> u64 {
        self.hasher.hash_one(k)
    }

    /// Failures of `k` in the current window.
    fn count(&self, k: &[u8], now: Instant) -> u32 {
        let key = self.key(k);
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts
            .get(&key)
            .filter(|(start, _)| now.duration_since(*start) < self.window)
            .map_or(0, |(_, n)| *n)
    }

    /// Whether `count` failures reach the limit.
    fn over(&self, count: u32) -> bool {
        self.limit > 0 && count >= self.limit
    }

    #[cfg(test)]
    fn limited(&self, k: &[u8], now: Instant) -> bool {
        self.over(self.count(k, now))
    }

    /// Counts a failure; kept with the limit off too, for the priority.
    fn failed(&self, k: &[u8], now: Instant) {
        let key = self.key(k);
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if counts.len() >= MAX_TRACKED && !counts.contains_key(&key) {
            counts.retain(|_, (start, _)| now.duration_since(*start) < self.window);
            if counts.len() >= MAX_TRACKED {
                return;
            }
        }
        let entry = counts.entry(key).or_insert((now, 0));
        if now.duration_since(entry.0) >= self.window {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }

    fn forget(&self, k: &[u8]) {
        let key = self.key(k);
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key);
    }
}

/// Successful verifications, by a keyed MAC of user name and password.
#[derive(Debug)]
struct Cache {
    ttl: Duration,
    key: ring::hmac::Key,
    /// The credentials generation the entries were verified against.
    entries: Mutex<(u64, FastMap<[u8; 32], Instant>)>,
}

impl Cache {
    fn new(ttl: Duration) -> Self {
        let rng = ring::rand::SystemRandom::new();
        // Without a random key the cache is off: a fixed key would make the
        // MACs a fast, offline-checkable copy of the passwords.
        let key = ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng).ok();
        Self {
            ttl: if key.is_some() { ttl } else { Duration::ZERO },
            key: key.unwrap_or_else(|| ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &[0; 32])),
            entries: Mutex::default(),
        }
    }

    fn tag(&self, user: &str, password: &[u8]) -> [u8; 32] {
        let mut ctx = ring::hmac::Context::with_key(&self.key);
        ctx.update(&(user.len() as u64).to_be_bytes());
        ctx.update(user.as_bytes());
        ctx.update(password);
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.sign().as_ref());
        out
    }

    fn hit(&self, generation: u64, user: &str, password: &[u8], now: Instant) -> bool {
        if self.ttl.is_zero() {
            return false;
        }
        let tag = self.tag(user, password);
        let mut e = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if e.0 != generation {
            *e = (generation, FastMap::default());
            return false;
        }
        match e.1.get(&tag) {
            Some(until) if *until > now => true,
            Some(_) => {
                e.1.remove(&tag);
                false
            }
            None => false,
        }
    }

    fn insert(&self, generation: u64, user: &str, password: &[u8], now: Instant) {
        if self.ttl.is_zero() {
            return;
        }
        let tag = self.tag(user, password);
        let mut e = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if e.0 != generation {
            *e = (generation, FastMap::default());
        }
        if e.1.len() >= MAX_TRACKED {
            e.1.retain(|_, until| *until > now);
            if e.1.len() >= MAX_TRACKED {
                return;
            }
        }
        e.1.insert(tag, now + self.ttl);
    }
}

/// Refusal log lines allowed per second; the rest are counted.
const LOG_PER_SEC: u64 = 20;
/// Characters of a refused user name that the log shows.
const LOG_USER_CHARS: usize = 64;

/// Rate limit of the refusal log.
#[derive(Debug, Default)]
struct LogBudget {
    /// Second (since `start`) of the current window, and lines logged in it.
    second: AtomicU64,
    logged: AtomicU64,
    suppressed: AtomicU64,
}

impl LogBudget {
    /// Whether a line may be logged now; at the start of a new second, the
    /// lines suppressed in the last are reported.
    fn take(&self, now_sec: u64) -> bool {
        let current = self.second.load(Ordering::Relaxed);
        if now_sec != current
            && self
                .second
                .compare_exchange(current, now_sec, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.logged.store(0, Ordering::Relaxed);
            let n = self.suppressed.swap(0, Ordering::Relaxed);
            if n > 0 {
                tracing::info!(
                    suppressed = n,
                    "more CONNECT refusals were not logged (at most {LOG_PER_SEC} a second)"
                );
            }
        }
        if self.logged.fetch_add(1, Ordering::Relaxed) < LOG_PER_SEC {
            true
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            false
        }
    }
}

/// A user name as the log shows it: at most `LOG_USER_CHARS` characters.
pub fn shown_user(user: &str) -> String {
    match user.char_indices().nth(LOG_USER_CHARS) {
        Some((i, _)) => format!("{}… ({} bytes)", &user[..i], user.len()),
        None => user.to_owned(),
    }
}

/// The login checks of one node: the pool, the failure limits, the cache
/// and the refusal log.
#[derive(Debug)]
pub struct Login {
    verifier: Verifier,
    by_user: Failures,
    by_ip: Failures,
    cache: Cache,
    log: LogBudget,
    started: Instant,
}

impl Login {
    pub fn new(config: &LoginConfig, registry: &Registry) -> Result<Self> {
        let window = Duration::from_secs(config.failure_window_secs);
        Ok(Self {
            verifier: Verifier::start(config.verify_threads, config.verify_queue, registry)?,
            by_user: Failures::new(config.failures_per_user, window),
            by_ip: Failures::new(config.failures_per_ip, window),
            cache: Cache::new(Duration::from_secs(config.cache_secs)),
            log: LogBudget::default(),
            started: Instant::now(),
        })
    }

    /// The queue a login from `ip` as `user` waits in, or `None` when the
    /// name or the address failed too often lately: one look at each count.
    pub fn admit(&self, user: &str, ip: Option<IpAddr>) -> Option<Priority> {
        let now = Instant::now();
        let by_user = self.by_user.count(user.as_bytes(), now);
        let by_ip = ip.map_or(0, |ip| self.by_ip.count(ip_key(ip).as_slice(), now));
        if self.by_user.over(by_user) || self.by_ip.over(by_ip) {
            None
        } else if by_user > 0 || by_ip > 0 {
            Some(Priority::Suspect)
        } else {
            Some(Priority::Clean)
        }
    }

    /// Counts a failed login.
    pub fn failed(&self, user: &str, ip: Option<IpAddr>) {
        let now = Instant::now();
        self.by_user.failed(user.as_bytes(), now);
        if let Some(ip) = ip {
            self.by_ip.failed(ip_key(ip).as_slice(), now);
        }
    }

    /// A successful login clears its user name's failures.
    pub fn succeeded(&self, user: &str) {
        self.by_user.forget(user.as_bytes());
    }

    /// Whether this user name and password passed a check lately (against
    /// the credentials of `generation`).
    pub fn remembered(&self, generation: u64, user: &str, password: &[u8]) -> bool {
        self.cache.hit(generation, user, password, Instant::now())
    }

    /// Verifies a password on the pool; a match is remembered.
    pub async fn verify(
        &self,
        generation: u64,
        user: &str,
        hash: Arc<str>,
        password: &[u8],
        priority: Priority,
    ) -> std::result::Result<bool, Busy> {
        let ok = self.verifier.verify(hash, password, priority).await?;
        if ok {
            self.cache
                .insert(generation, user, password, Instant::now());
        }
        Ok(ok)
    }

    /// A verification whose answer is thrown away: what a refusal costs when
    /// there is no real hash to check, so that it takes as long as one.
    pub async fn decoy(
        &self,
        hash: Arc<str>,
        password: &[u8],
        priority: Priority,
    ) -> std::result::Result<(), Busy> {
        self.verifier
            .verify(hash, password, priority)
            .await
            .map(|_| ())
    }

    /// Whether a refusal may be logged now.
    pub fn may_log(&self) -> bool {
        self.log.take(self.started.elapsed().as_secs())
    }
}

/// IPv6 clients are limited by their /64: one host usually has the whole
/// prefix.
fn ip_key(ip: IpAddr) -> Vec<u8> {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets()[..8].to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_limit_within_their_window_and_reset_after_it() {
        let f = Failures::new(3, Duration::from_secs(60));
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(!f.limited(b"alice", t0));
            f.failed(b"alice", t0);
        }
        assert!(f.limited(b"alice", t0));
        assert!(!f.limited(b"bob", t0));
        assert!(!f.limited(b"alice", t0 + Duration::from_secs(61)));
        f.failed(b"alice", t0 + Duration::from_secs(61));
        assert!(!f.limited(b"alice", t0 + Duration::from_secs(61)));
        f.forget(b"alice");
        assert!(!f.limited(b"alice", t0));
    }

    #[test]
    fn a_zero_limit_turns_limiting_off_but_failures_still_count() {
        let f = Failures::new(0, Duration::from_secs(60));
        let t0 = Instant::now();
        for _ in 0..100 {
            f.failed(b"alice", t0);
        }
        assert!(!f.limited(b"alice", t0));
        assert_eq!(f.count(b"alice", t0), 100);
        assert_eq!(f.count(b"alice", t0 + Duration::from_secs(60)), 0);
    }

    #[test]
    fn the_cache_forgets_on_expiry_and_on_a_new_generation() {
        let c = Cache::new(Duration::from_secs(10));
        let t0 = Instant::now();
        c.insert(1, "alice", b"pw", t0);
        assert!(c.hit(1, "alice", b"pw", t0));
        assert!(!c.hit(1, "alice", b"other", t0));
        assert!(
            !c.hit(1, "alic", b"epw", t0),
            "user and password are kept apart"
        );
        assert!(!c.hit(1, "alice", b"pw", t0 + Duration::from_secs(11)));
        c.insert(1, "alice", b"pw", t0);
        assert!(!c.hit(2, "alice", b"pw", t0), "a reload empties the cache");
        assert!(!c.hit(1, "alice", b"pw", t0));
    }

    #[test]
    fn log_budget_allows_a_few_lines_a_second() {
        let b = LogBudget::default();
        let allowed = (0..1000).filter(|_| b.take(5)).count();
        assert_eq!(allowed as u64, LOG_PER_SEC);
        assert!(b.take(6));
    }

    #[test]
    fn long_user_names_are_cut_in_the_log() {
        let long = "x".repeat(70_000);
        let shown = shown_user(&long);
        assert!(shown.len() < 100, "{shown}");
        assert!(shown.contains("70000 bytes"));
        assert_eq!(shown_user("alice"), "alice");
    }

    #[test]
    fn ipv6_clients_share_their_prefix() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap_or(IpAddr::V4(0.into()));
        let b: IpAddr = "2001:db8:1:2::ffff".parse().unwrap_or(IpAddr::V4(0.into()));
        assert_eq!(ip_key(a), ip_key(b));
    }
}
