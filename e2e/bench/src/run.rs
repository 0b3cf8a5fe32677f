//! Running one scenario against one broker.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, NetworkOptions, Packet, QoS};
use tokio::sync::oneshot;

use crate::payload::{self, Stamp};
use crate::report::Tally;

/// Errors that stop a run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("client {id}: {reason}")]
    Connect { id: String, reason: String },
    #[error("receiver {0} did not get its end-of-run marker within 10 s (its messages lost?)")]
    Lost(String),
}

pub type Result<T> = std::result::Result<T, BenchError>;

/// The traffic shapes of the benchmark issue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// N publishers, each with its own subscriber on its own topic.
    OneToOne { pairs: usize },
    /// N publishers, each sending to one receiver by its Client ID
    /// (`<parent>/p2p/<clientId>`, ringmq's P2P); receivers subscribe to
    /// nothing. Brokers without P2P deliver none of it.
    P2p { pairs: usize },
    /// N publishers, one subscriber on `bench/in/+`.
    FanIn { publishers: usize },
    /// One publisher, N subscribers on the same topic.
    FanOut { subscribers: usize },
    /// N connections that only keep alive.
    Idle { connections: usize },
}

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct Settings {
    pub host: String,
    pub port: u16,
    pub scenario: Scenario,
    /// QoS of each publisher in turn (publisher i uses `qos[i % len]`);
    /// subscribers ask for the highest, so each message keeps its own.
    pub qos: Vec<QoS>,
    pub payload: usize,
    /// Messages per second per publisher; 0 sends as fast as the broker takes them.
    pub rate: u64,
    /// New connections per second; 0 connects them back to back.
    pub ramp: u64,
    pub duration: Duration,
    /// Time given to messages in flight after the publishers stop.
    pub drain: Duration,
    /// Broker process id, to read its resident memory.
    pub broker_pid: Option<u32>,
    /// Prefix of client ids and topics, so runs do not meet.
    pub tag: String,
    /// User name and password of every client of the scenario.
    pub credentials: Option<(String, String)>,
    /// Connections that log in as `storm_user` with a wrong password, again
    /// and again, while the scenario runs (`storm`).
    pub storm: usize,
    pub storm_user: String,
    /// Clients connect with cleanSession=false (persistent sessions).
    pub persistent: bool,
}

/// The outcome of a run.
#[derive(Debug, Default)]
pub struct Outcome {
    pub sent: u64,
    /// Deliveries expected: each message times its subscribers.
    pub expected: u64,
    pub tally: Tally,
    /// Expected deliveries that never arrived.
    pub lost: u64,
    pub connect_secs: f64,
    pub connections: usize,
    pub errors: u64,
    pub run_secs: f64,
    pub rss_before_kib: Option<u64>,
    pub rss_after_kib: Option<u64>,
    /// What the storm's logins were answered (`storm::Answers`).
    pub storm: Arc<crate::storm::Answers>,
}

impl Outcome {
    /// One JSON line for scripts.
    pub fn to_json(&mut self) -> String {
        let opt = |v: Option<u64>| v.map_or("null".to_string(), |v| v.to_string());
        let secs = self.run_secs.max(1e-9);
        let (p50, p99, p999) = (
            self.tally.percentile_us(0.5),
            self.tally.percentile_us(0.99),
            self.tally.percentile_us(0.999),
        );
        format!(
            concat!(
                "{{\"sent\":{},\"expected\":{},\"received\":{},\"lost\":{},\"duplicates\":{},",
                "\"reordered\":{},\"msgs_per_sec\":{:.0},\"p50_us\":{:.0},\"p99_us\":{:.0},",
                "\"p999_us\":{:.0},\"connections\":{},\"connects_per_sec\":{:.0},\"errors\":{},",
                "\"rss_before_kib\":{},\"rss_after_kib\":{},",
                "\"storm_logins\":{},\"storm_refused\":{},\"storm_busy\":{}}}"
            ),
            self.sent,
            self.expected,
            self.tally.received,
            self.lost,
            self.tally.duplicates,
            self.tally.reordered,
            self.tally.received as f64 / secs,
            p50,
            p99,
            p999,
            self.connections,
            self.connections as f64 / self.connect_secs.max(1e-9),
            self.errors,
            opt(self.rss_before_kib),
            opt(self.rss_after_kib),
            self.storm.total(),
            self.storm.get(4) + self.storm.get(5),
            self.storm.get(3),
        )
    }
}

/// Resident memory of a process, from `/proc`.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

fn options(s: &Settings, id: &str) -> MqttOptions {
    let mut o = MqttOptions::new(format!("{}-{id}", s.tag), &s.host, s.port);
    o.set_keep_alive(Duration::from_secs(60));
    o.set_max_packet_size(1 << 20, 1 << 20);
    o.set_inflight(64);
    o.set_clean_session(!s.persistent);
    if let Some((user, password)) = &s.credentials {
        o.set_credentials(user, password);
    }
    o
}

/// Connects a client and drives its event loop; incoming publishes go to
/// `on_publish`. Resolves once CONNACK arrived.
async fn connect(
    s: &Settings,
    id: &str,
    errors: Arc<AtomicU64>,
    mut on_publish: impl FnMut(&[u8]) + Send + 'static,
) -> Result<(AsyncClient, tokio::task::JoinHandle<()>)> {
    let (client, mut el) = AsyncClient::new(options(s, id), 1024);
    // At a fixed rate each packet goes out as it is made, as a device's
    // would: with Nagle's algorithm rumqttc held a small publish for the
    // previous one's ACK and the latencies measured that (p50 about 10 ms
    // at 1 000 msg/s on every broker). At full speed the kernel may
    // coalesce: one segment per publish made the generator, on a machine
    // it shares, the bottleneck (both brokers at the same, lower rate).
    let mut net = NetworkOptions::new();
    net.set_tcp_nodelay(s.rate > 0);
    el.set_network_options(net);
    let (ready_tx, ready_rx) = oneshot::channel();
    let handle = tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(Ok(()));
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => on_publish(&p.payload),
                Ok(_) => {}
                Err(e) => {
                    match ready.take() {
                        Some(tx) => {
                            let _ = tx.send(Err(e.to_string()));
                        }
                        None => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    return;
                }
            }
        }
    });
    match tokio::time::timeout(Duration::from_secs(30), ready_rx).await {
        Ok(Ok(Ok(()))) => Ok((client, handle)),
        Ok(Ok(Err(reason))) => Err(BenchError::Connect {
            id: id.to_owned(),
            reason,
        }),
        _ => Err(BenchError::Connect {
            id: id.to_owned(),
            reason: "no CONNACK".into(),
        }),
    }
}

/// Paces a loop at a steady rate: a publisher's messages, the connection
/// ramp.
struct Pace {
    step: Option<Duration>,
    next: Instant,
}

impl Pace {
    /// `per_sec` turns a second; 0: no pacing.
    fn new(per_sec: u64) -> Pace {
        Pace {
            step: (per_sec > 0).then(|| Duration::from_nanos(1_000_000_000 / per_sec)),
            next: Instant::now(),
        }
    }

    /// Waits for the next turn.
    async fn wait(&mut self) {
        if let Some(step) = self.step {
            tokio::time::sleep_until(self.next.into()).await;
            self.next += step;
        }
    }
}

struct Subscriber {
    client: AsyncClient,
    task: tokio::task::JoinHandle<()>,
    tally: oneshot::Receiver<Tally>,
}

/// Publisher id of the end-of-run marker: a subscriber hands its tally over
/// when the marker arrives.
const MARKER: u64 = u64::MAX;

/// Connects a receiver; `filter` is what it subscribes to (none for P2P).
async fn subscriber(
    s: &Settings,
    id: &str,
    filter: Option<&str>,
    markers: usize,
    start: Instant,
    errors: Arc<AtomicU64>,
) -> Result<Subscriber> {
    let (tx, rx) = oneshot::channel();
    let mut tally = Tally::default();
    let mut tx = Some(tx);
    let mut markers_left = markers;
    let (client, task) = connect(s, id, errors, move |p| match payload::decode(p) {
        Some(stamp) if stamp.publisher == MARKER => {
            markers_left = markers_left.saturating_sub(1);
            if markers_left == 0
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(std::mem::take(&mut tally));
            }
        }
        Some(stamp) => tally.record(stamp, p.len(), payload::since(start)),
        None => {}
    })
    .await?;
    if let Some(filter) = filter {
        let highest = s
            .qos
            .iter()
            .copied()
            .fold(QoS::AtMostOnce, |a, b| if b > a { b } else { a });
        client
            .subscribe(filter, highest)
            .await
            .map_err(|e| BenchError::Connect {
                id: id.to_owned(),
                reason: e.to_string(),
            })?;
    }
    Ok(Subscriber {
        client,
        task,
        tally: rx,
    })
}

/// Publishes until `until`, at `rate` per second (0: as fast as accepted).
async fn publish_loop(
    client: AsyncClient,
    topic: String,
    publisher: u64,
    qos: QoS,
    s: Settings,
    start: Instant,
    until: Instant,
) -> u64 {
    let mut seq = 0;
    let mut pace = Pace::new(s.rate);
    while Instant::now() < until {
        pace.wait().await;
        let stamp = Stamp {
            publisher,
            seq,
            sent_ns: payload::since(start),
        };
        if client
            .publish(&topic, qos, false, payload::encode(stamp, s.payload))
            .await
            .is_err()
        {
            break;
        }
        seq += 1;
    }
    seq
}

/// Runs the scenario and reports.
pub async fn run(s: Settings) -> Result<Outcome> {
    let start = Instant::now();
    let errors = Arc::new(AtomicU64::new(0));
    let mut out = Outcome {
        rss_before_kib: s.broker_pid.and_then(rss_kib),
        ..Outcome::default()
    };
    let tag = s.tag.clone();
    // Publisher topics, each receiver's subscription, receivers per message.
    type Shape = (Vec<String>, Vec<Option<String>>, u64);
    let (topics, filters, fan): Shape = match s.scenario {
        Scenario::OneToOne { pairs } => {
            let t: Vec<String> = (0..pairs).map(|i| format!("{tag}/p/{i}")).collect();
            (t.clone(), t.into_iter().map(Some).collect(), 1)
        }
        Scenario::P2p { pairs } => (
            // The receivers' Client IDs (see `options`).
            (0..pairs)
                .map(|i| format!("{tag}/p2p/{tag}-sub-{i}"))
                .collect(),
            vec![None; pairs],
            1,
        ),
        Scenario::FanIn { publishers } => (
            (0..publishers).map(|i| format!("{tag}/in/{i}")).collect(),
            vec![Some(format!("{tag}/in/+"))],
            1,
        ),
        Scenario::FanOut { subscribers } => (
            vec![format!("{tag}/out")],
            vec![Some(format!("{tag}/out")); subscribers],
            subscribers as u64,
        ),
        Scenario::Idle { connections } => {
            let connect_start = Instant::now();
            let mut ramp = Pace::new(s.ramp);
            let mut held = Vec::with_capacity(connections);
            for i in 0..connections {
                ramp.wait().await;
                held.push(connect(&s, &format!("idle-{i}"), errors.clone(), |_| {}).await?);
            }
            out.connect_secs = connect_start.elapsed().as_secs_f64();
            out.connections = connections;
            tokio::time::sleep(s.duration).await;
            out.rss_after_kib = s.broker_pid.and_then(rss_kib);
            out.run_secs = s.duration.as_secs_f64();
            out.errors = errors.load(Ordering::Relaxed);
            for (c, task) in held {
                let _ = c.disconnect().await;
                task.abort();
            }
            return Ok(out);
        }
    };
    let connect_start = Instant::now();
    let mut ramp = Pace::new(s.ramp);
    let mut subs = Vec::with_capacity(filters.len());
    for (i, f) in filters.iter().enumerate() {
        let markers = match s.scenario {
            Scenario::FanIn { publishers } => publishers,
            _ => 1,
        };
        ramp.wait().await;
        let id = format!("sub-{i}");
        subs.push(subscriber(&s, &id, f.as_deref(), markers, start, errors.clone()).await?);
    }
    let mut pubs = Vec::with_capacity(topics.len());
    for i in 0..topics.len() {
        ramp.wait().await;
        pubs.push(connect(&s, &format!("pub-{i}"), errors.clone(), |_| {}).await?);
    }
    out.connect_secs = connect_start.elapsed().as_secs_f64();
    out.connections = subs.len() + pubs.len();
    // Let SUBACKs land before traffic starts.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let stop_storm = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let storm = crate::storm::start(
        &s.host,
        s.port,
        &tag,
        s.storm,
        &s.storm_user,
        stop_storm.clone(),
        out.storm.clone(),
    );
    let run_start = Instant::now();
    let run_start_ns = payload::since(start);
    let until = run_start + s.duration;
    let loops: Vec<_> = pubs
        .iter()
        .zip(&topics)
        .enumerate()
        .map(|(i, ((client, _), topic))| {
            let qos = s.qos.get(i % s.qos.len().max(1)).copied();
            let qos = qos.unwrap_or(QoS::AtMostOnce);
            tokio::spawn(publish_loop(
                client.clone(),
                topic.clone(),
                i as u64,
                qos,
                s.clone(),
                start,
                until,
            ))
        })
        .collect();
    let mut per_publisher = Vec::with_capacity(loops.len());
    for l in loops {
        per_publisher.push(l.await.unwrap_or(0));
    }
    stop_storm.store(true, Ordering::Relaxed);
    for t in storm {
        let _ = t.await;
    }
    out.sent = per_publisher.iter().sum();
    out.expected = out.sent * fan;
    tokio::time::sleep(s.drain).await;
    out.rss_after_kib = s.broker_pid.and_then(rss_kib);
    // Connections that failed during the run; the teardown below ends them all.
    out.errors = errors.load(Ordering::Relaxed);

    // One marker per topic, at QoS 1 after everything else from the same
    // client on that topic: each subscriber has seen all it will see.
    for ((client, _), t) in pubs.iter().zip(&topics) {
        let stamp = Stamp {
            publisher: MARKER,
            seq: 0,
            sent_ns: payload::since(start),
        };
        let _ = client
            .publish(
                t,
                QoS::AtLeastOnce,
                false,
                payload::encode(stamp, payload::HEADER),
            )
            .await;
    }
    let mut total = Tally::default();
    for (i, sub) in subs.into_iter().enumerate() {
        let tally = match tokio::time::timeout(Duration::from_secs(10), sub.tally).await {
            Ok(Ok(t)) => t,
            _ => return Err(BenchError::Lost(format!("sub-{i}"))),
        };
        let unique: u64 = (0..per_publisher.len() as u64)
            .map(|p| tally.unique_from(p))
            .sum();
        let expected_here = match s.scenario {
            Scenario::OneToOne { .. } | Scenario::P2p { .. } => {
                per_publisher.get(i).copied().unwrap_or(0)
            }
            _ => out.sent,
        };
        out.lost += expected_here.saturating_sub(unique);
        total.merge(tally);
        let _ = sub.client.disconnect().await;
        sub.task.abort();
    }
    for (c, task) in pubs {
        let _ = c.disconnect().await;
        task.abort();
    }
    // Delivered per second from the first publish to the last delivery: a
    // broker that takes messages faster than it delivers them (buffering
    // without a bound) is charged the time its backlog took to arrive.
    out.run_secs = total.last_ns.saturating_sub(run_start_ns) as f64 / 1e9;
    out.tally = total;
    Ok(out)
}
