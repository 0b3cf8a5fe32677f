//! Starts a node and owns its shutdown: binds the listeners, builds the
//! broker from its parts, starts every background task with the one
//! shutdown signal, serves until asked to stop, then stops the tasks and
//! waits for them (`shutdown`), stops the Kafka consumer and flushes the
//! producer.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::shutdown::{Shutdown, Trigger};
use crate::{
    Config, Error, Result, admin, alarm, auth, broker, capacity, cluster, journal, kafka, listener,
    message, meter, metrics, ops, persist, secret_file, storage, token, trace,
};

/// Runs one broker node until `stop` resolves. Must be called inside an
/// ntex runtime (`ntex::rt::System`).
pub async fn run(config: Config, stop: impl Future<Output = ()>) -> Result<()> {
    let (trigger, shutdown) = Trigger::new();
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
    let usage = usage(&config, &metrics)?;
    // Read back before anything is served: a client that connects finds
    // its session (the listeners are bound; connections wait in the backlog).
    let (persist, recovery) = persist::Persist::start(&config.persistence, metrics.registry())?;
    // The cluster after the store: a node waits `failure_timeout_ms` from
    // here to meet its peers before it takes Client IDs for its own
    // (`Cluster::is_settled`), and a slow read-back (a second in the chaos
    // test) used that wait up before any link was made, so the node served
    // its peers' sessions on a ring of one: empty, or its stale copies.
    let cluster = match &config.cluster {
        Some(c) => Some(cluster::Cluster::new(
            c,
            &config.node_name(),
            bound.cluster.as_ref().and_then(|l| l.local_addr().ok()),
            shutdown.clone(),
            crate::ops::answer_json,
        )?),
        None => None,
    };
    // With replicated sessions, what the store is given goes to each
    // session's replicas too (`replica`).
    let replication = cluster
        .as_ref()
        .filter(|c| c.config.replication_factor > 1)
        .map(|c| {
            let peers: Arc<dyn crate::peers::Peers> = c.clone();
            crate::replica::Replication::new(peers, c.config.replication_factor)
        });
    let local: Arc<dyn crate::durable::Store> = Arc::new(persist.clone());
    let store: Arc<dyn crate::durable::Store> = match &replication {
        Some(r) => Arc::new(crate::replica::Replicated::new(local, r.clone())),
        None => local,
    };
    let broker = broker::Broker::new(
        config,
        broker::Parts {
            metrics,
            auth,
            tokens,
            storage,
            peers: cluster.clone().map(|c| c as Arc<dyn crate::peers::Peers>),
            usage,
            persist: store,
            replication,
        },
    );
    match recovery {
        persist::Recovery::Done(recovered) => broker.restore(recovered),
        // The store could not be opened: the node serves the admin port and
        // refuses CONNECTs until it opens (see `Broker::is_restored`).
        persist::Recovery::Later(rx) => {
            let (broker, shutdown) = (broker.clone(), shutdown.clone());
            ntex::rt::spawn(async move {
                let _guard = shutdown.guard();
                let read =
                    ntex::util::select(std::pin::pin!(rx), std::pin::pin!(shutdown.wait())).await;
                if let ntex::util::Either::Left(Ok(recovered)) = read {
                    broker.restore(recovered);
                    tracing::info!("stored sessions restored; MQTT connections are accepted");
                }
            });
        }
    }
    ntex::rt::spawn(ops::tick(broker.clone(), shutdown.clone()));
    let admin = Arc::new(admin::Admin::new(
        broker.clone(),
        admin_tokens,
        kafka.clone(),
    ));
    ntex::rt::spawn(housekeeping(
        broker.clone(),
        admin.clone(),
        shutdown.clone(),
    ));
    if let Some(c) = &cluster {
        for addr in &c.config.peers {
            ntex::rt::spawn(cluster::link::outbound(
                c.clone(),
                broker.clone(),
                addr.clone(),
            ));
        }
        ntex::rt::spawn(cluster::watch(c.clone(), broker.clone(), shutdown.clone()));
    }
    let downlink = match &kafka {
        Some(k) => {
            let topics_ready = Arc::new(AtomicBool::new(!k.creates_topics()));
            if k.creates_topics() {
                let (k, ready, shutdown) = (k.clone(), topics_ready.clone(), shutdown.clone());
                ntex::rt::spawn(async move {
                    let _guard = shutdown.guard();
                    let made = ntex::util::select(
                        std::pin::pin!(k.ensure_topics()),
                        std::pin::pin!(shutdown.wait()),
                    )
                    .await;
                    if let ntex::util::Either::Left(()) = made {
                        ready.store(true, Ordering::Release);
                    }
                });
            }
            Some(kafka::Downlink::start(k, broker.clone(), topics_ready)?)
        }
        None => None,
    };
    let served = listener::serve(broker, cluster, admin, bound, stop).await;
    trigger.fire();
    let left = trigger.join(Duration::from_secs(5)).await;
    if left > 0 {
        tracing::warn!(
            tasks = left,
            "background tasks still running after 5 s; exiting without them"
        );
    } else {
        tracing::info!(tasks = trigger.started(), "background tasks ended");
    }
    // The downlink stops first: the offsets of what it delivered are
    // stored once the store has written it.
    if let Some(d) = downlink {
        d.stop();
    }
    // Every connection and the downlink are gone: what they changed is in
    // the writer's queue.
    persist.close();
    served?;
    if let Some(k) = kafka {
        k.flush(flush_timeout);
    }
    Ok(())
}

/// Metering, traces, capacity and alarms, with what the journal kept from
/// before a restart.
pub(crate) fn usage(config: &Config, metrics: &metrics::Metrics) -> Result<broker::Usage> {
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
            (Some(Arc::new(j)), r)
        }
        None => (None, journal::Replayed::default()),
    };
    let usage = broker::Usage::new(
        meter::Meter::new(
            trace,
            config.alarms.tps_window_secs,
            journal.clone().map(|j| j as Arc<dyn meter::MeterJournal>),
        ),
        trace::Traces::new(
            trace,
            journal.clone().map(|j| j as Arc<dyn trace::TraceJournal>),
        ),
        capacity::Capacity::new(&config.capacity, metrics.registry())?,
        alarm::Alarms::new(
            &config.alarms,
            &config.capacity,
            &config.node_name(),
            metrics.registry(),
            journal.map(|j| j as Arc<dyn alarm::AlarmJournal>),
        )?,
    );
    usage.traces().restore(replayed.devices, replayed.messages);
    usage.meter().restore(replayed.minutes, replayed.groups);
    usage.alarms().restore(replayed.alarms, message::now_ms());
    Ok(usage)
}

/// Periodic work: session expiry, credentials reload.
async fn housekeeping(broker: Arc<broker::Broker>, admin: Arc<admin::Admin>, shutdown: Shutdown) {
    let _guard = shutdown.guard();
    let mut ticks = 0u64;
    while shutdown.sleep(Duration::from_secs(1)).await {
        broker.expire_sessions(Instant::now());
        ticks += 1;
        if ticks % 10 == 1 {
            broker.measure_store();
        }
        let secrets = broker
            .tokens()
            .as_ref()
            .map(|t| t.key_file())
            .into_iter()
            .chain(admin.tokens().files());
        for file in secrets {
            match file.reload_if_changed() {
                Ok(true) => tracing::info!(path = %file.path().display(), "secret reloaded"),
                Ok(false) => {}
                Err(e) => {
                    broker.metrics().reject("secret_reload");
                    tracing::warn!(path = %file.path().display(), error = %e, "secret not reloaded; the previous one stays in force");
                }
            }
        }
        match broker.auth().reload_if_changed() {
            Ok(true) => tracing::info!("credentials reloaded"),
            Ok(false) => {}
            Err(e) => {
                broker.metrics().reject("credentials_reload");
                tracing::warn!(error = %e, "credentials file not reloaded; the previous one stays in force");
            }
        }
    }
}
