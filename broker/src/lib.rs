//! ringmq broker node: MQTT 3.1.1 and 5 on ntex-mqtt, with the session
//! semantics of a managed "MQTT message queue" service.
//!
//! See `ARCHITECTURE.md` at the repository root for how the pieces fit.

pub mod admin;
pub mod alarm;
pub mod auth;
pub mod broker;
pub mod capacity;
pub mod cluster;
pub mod config;
pub mod connection;
pub mod descriptors;
pub mod journal;
pub mod kafka;
pub mod listener;
pub mod login;
pub mod message;
pub mod meter;
pub mod metrics;
pub mod ops;
pub mod protocol;
pub mod retain;
pub mod ring;
pub mod router;
pub mod secret_file;
pub mod session;
pub mod storage;
pub mod sys;
pub mod tls;
pub mod token;
pub mod token_api;
pub mod topic;
pub mod trace;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub use broker::Broker;

/// A map on the message path, keyed by what clients send (topic levels,
/// Client IDs). SipHash, std's default, showed as 3 % of a QoS 1 profile;
/// foldhash is several times faster and still randomly seeded per map.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
pub use config::Config;

/// Errors that stop the node.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Listener(#[from] listener::ListenerError),
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    #[error(transparent)]
    Kafka(#[from] kafka::KafkaSetupError),
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
    #[error(transparent)]
    Capacity(#[from] capacity::CapacityError),
    #[error(transparent)]
    Alarm(#[from] alarm::AlarmError),
    #[error(transparent)]
    Journal(#[from] journal::JournalError),
    #[error("cannot read the {what} file {path}: {error}")]
    SecretFile {
        what: &'static str,
        path: std::path::PathBuf,
        error: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

/// Runs one broker node until `shutdown` resolves. Must be called inside an
/// ntex runtime (`ntex::rt::System`).
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<()> {
    let bound = listener::Bound::bind(&config)?;
    for (name, addr) in bound.addrs() {
        tracing::info!(listener = name, %addr, "listening");
    }
    let metrics = metrics::Metrics::new()?;
    let login = &config.auth.login;
    let auth = match &config.auth.credentials_file {
        Some(path) => auth::Auth::from_file(path, login, metrics.registry())?,
        None => auth::Auth::open(login, metrics.registry())?,
    };
    let secret = |path: &std::path::PathBuf, what: &'static str| {
        secret_file::SecretFile::load(path).map_err(|error| Error::SecretFile {
            what,
            path: path.clone(),
            error,
        })
    };
    let tokens = match &config.auth.token_signing_key_file {
        Some(path) => Some(token::TokenService::new(secret(path, "token signing key")?)),
        None => None,
    };
    let admin_tokens = admin::AdminTokens::new(
        match &config.auth.admin_token_file {
            Some(path) => Some(secret(path, "admin token")?),
            None => None,
        },
        match &config.auth.admin_read_token_file {
            Some(path) => Some(secret(path, "read-only admin token")?),
            None => None,
        },
    );
    let kafka = match &config.kafka {
        Some(k) => Some(kafka::Kafka::new(
            k,
            &config.node_name(),
            metrics.registry(),
        )?),
        None => None,
    };
    let storage: Arc<dyn storage::Storage> = match &kafka {
        Some(k) => k.clone(),
        None => Arc::new(storage::NoStorage),
    };
    let flush_timeout = Duration::from_secs(config.shutdown_timeout_secs);
    let cluster = match &config.cluster {
        Some(c) => Some(cluster::Cluster::new(
            c,
            &config.node_name(),
            bound.cluster.as_ref().and_then(|l| l.local_addr().ok()),
        )?),
        None => None,
    };
    let usage = usage(&config, &metrics)?;
    let broker = Broker::new(
        config,
        broker::Parts {
            metrics,
            auth,
            tokens,
            admin_tokens,
            storage,
            kafka: kafka.clone(),
            cluster: cluster.clone(),
            usage,
        },
    );
    ntex::rt::spawn(ops::tick(broker.clone()));
    if let Some(c) = &cluster {
        for addr in &c.config.peers {
            ntex::rt::spawn(cluster::link::outbound(
                c.clone(),
                broker.clone(),
                addr.clone(),
            ));
        }
        ntex::rt::spawn(cluster::watch(c.clone(), broker.clone()));
    }
    let downlink = match &kafka {
        Some(k) => {
            let topics_ready = Arc::new(AtomicBool::new(!k.creates_topics()));
            if k.creates_topics() {
                let (k, ready) = (k.clone(), topics_ready.clone());
                ntex::rt::spawn(async move {
                    k.ensure_topics().await;
                    ready.store(true, Ordering::Release);
                });
            }
            Some(kafka::Downlink::start(k, broker.clone(), topics_ready)?)
        }
        None => None,
    };
    listener::serve(broker, bound, shutdown).await?;
    if let Some(d) = downlink {
        d.stop();
    }
    if let Some(k) = kafka {
        k.flush(flush_timeout);
    }
    Ok(())
}

/// Metering, traces, capacity and alarms, with what the journal kept from
/// before a restart.
fn usage(config: &Config, metrics: &metrics::Metrics) -> Result<broker::Usage> {
    let trace = &config.trace;
    let (journal, replayed) = match &trace.dir {
        Some(dir) => {
            let (j, r) = journal::open(
                dir,
                trace.retention_secs.saturating_mul(1000),
                trace.disk_bytes,
                metrics.registry(),
            )?;
            tracing::info!(
                dir = %dir.display(),
                device_events = r.devices.len(),
                message_events = r.messages.len(),
                minutes = r.minutes.len(),
                alarms = r.alarms.len(),
                "journal read back"
            );
            (Some(j), r)
        }
        None => (None, journal::Replayed::default()),
    };
    let usage = broker::Usage {
        meter: meter::Meter::new(trace, config.alarms.tps_window_secs, journal.clone()),
        traces: trace::Traces::new(trace, journal.clone()),
        capacity: capacity::Capacity::new(&config.capacity, metrics.registry())?,
        alarms: alarm::Alarms::new(
            &config.alarms,
            &config.capacity,
            &config.node_name(),
            metrics.registry(),
            journal,
        )?,
    };
    usage.traces.restore(replayed.devices, replayed.messages);
    usage.meter.restore(replayed.minutes, replayed.groups);
    usage.alarms.restore(replayed.alarms, message::now_ms());
    Ok(usage)
}

/// Periodic work: session expiry, credentials reload.
async fn housekeeping(broker: Arc<Broker>) {
    loop {
        ntex::time::sleep(Duration::from_secs(1)).await;
        broker.expire_sessions(Instant::now());
        let secrets = broker
            .tokens
            .as_ref()
            .map(|t| t.key_file())
            .into_iter()
            .chain(broker.admin_tokens.files());
        for file in secrets {
            match file.reload_if_changed() {
                Ok(true) => tracing::info!(path = %file.path().display(), "secret reloaded"),
                Ok(false) => {}
                Err(e) => {
                    broker.metrics.reject("secret_reload");
                    tracing::warn!(path = %file.path().display(), error = %e, "secret not reloaded; the previous one stays in force");
                }
            }
        }
        match broker.auth.reload_if_changed() {
            Ok(true) => tracing::info!("credentials reloaded"),
            Ok(false) => {}
            Err(e) => {
                broker.metrics.reject("credentials_reload");
                tracing::warn!(error = %e, "credentials file not reloaded; the previous one stays in force");
            }
        }
    }
}
