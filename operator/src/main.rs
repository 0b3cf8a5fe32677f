//! `ringmq-operator`: runs the MqttInstance controller until SIGTERM.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::runtime::events::Recorder;
use kube::runtime::{Controller, Predicate, WatchStreamExt, predicates, reflector, watcher};
use kube::{Api, Client, ResourceExt};
use ringmq_operator::brokers::{Http, PodDns};
use ringmq_operator::crd::MqttInstance;
use ringmq_operator::lease::{self, Elector};
use ringmq_operator::metrics::ReconcileMetrics;
use ringmq_operator::reconcile::{Context, error_policy, reconcile};
use ringmq_operator::resources::DEFAULT_IMAGE;
use ringmq_operator::topics::Rdkafka;

/// The label selector of every object the operator creates.
const MANAGED: &str = "app.kubernetes.io/managed-by=ringmq-operator";

/// An API over one namespace, or all of them.
fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn")),
        )
        .init();
    let client = Client::try_default()
        .await
        .context("no Kubernetes API (in-cluster service account or kubeconfig)")?;
    // The metrics endpoint answers from the start (also while this replica
    // waits for the lease) and is stopped and joined at every way out.
    let metrics = ReconcileMetrics::new()?;
    let addr: std::net::SocketAddr = std::env::var("METRICS_ADDR")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "0.0.0.0:8080".to_owned())
        .parse()
        .context("METRICS_ADDR is not an address")?;
    let listener = ringmq_operator::metrics::bind(addr).await?;
    tracing::info!(%addr, "metrics on /metrics, health on /healthz");
    let (stop_endpoint, endpoint_stopped) = tokio::sync::oneshot::channel::<()>();
    let endpoint = tokio::spawn(ringmq_operator::metrics::serve(
        listener,
        metrics.clone(),
        async move {
            let _ = endpoint_stopped.await;
        },
    ));
    let result = control(client, metrics).await;
    let _ = stop_endpoint.send(());
    let _ = endpoint.await;
    result
}

/// Waits for the lease, then runs the controller until shutdown.
async fn control(client: Client, metrics: ReconcileMetrics) -> anyhow::Result<()> {
    // The namespace to watch: all when unset (the Helm chart sets it for a
    // namespaced install, whose Role covers that namespace only).
    let namespace = std::env::var("WATCH_NAMESPACE")
        .ok()
        .filter(|ns| !ns.is_empty());
    let instances: Api<MqttInstance> = scoped(&client, namespace.as_deref());
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut monitoring = true;
    for name in [
        "servicemonitors.monitoring.coreos.com",
        "prometheusrules.monitoring.coreos.com",
    ] {
        match crds.get_opt(name).await {
            Ok(found) => monitoring &= found.is_some(),
            Err(e) => {
                tracing::warn!(crd = name, error = %e, "cannot tell whether the Prometheus Operator is installed; assuming not");
                monitoring = false;
            }
        }
    }
    tracing::info!(monitoring, "prometheus operator API");
    // One replica reconciles at a time (see `lease`).
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let lease_namespace = env("POD_NAMESPACE")
        .or_else(|| namespace.clone())
        .unwrap_or_else(|| "default".to_owned());
    let mut elector = Elector::new(
        Api::namespaced(client.clone(), &lease_namespace),
        lease::Config {
            name: env("LEASE_NAME").unwrap_or_else(|| "ringmq-operator".to_owned()),
            identity: env("POD_NAME")
                .unwrap_or_else(|| format!("ringmq-operator-{}", std::process::id())),
            duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
        },
    );
    tracing::info!(namespace = %lease_namespace, "waiting for the leader lease");
    tokio::select! {
        () = elector.acquire() => {}
        () = shutdown_signal() => return Ok(()),
    }
    tracing::info!("leading");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let leadership = tokio::spawn(async move {
        let lost = tokio::select! {
            () = elector.hold() => true,
            () = shutdown_signal() => false,
        };
        let _ = stop.send(());
        (lost, elector)
    });
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), "ringmq-operator".into()),
        client: client.clone(),
        brokers: Arc::new(Http { locate: PodDns }),
        topics: Arc::new(Rdkafka),
        image: std::env::var("RINGMQ_BROKER_IMAGE").unwrap_or_else(|_| DEFAULT_IMAGE.to_owned()),
        monitoring,
        resync: Duration::from_secs(30),
    });
    // Status patches do not change the generation: without this filter
    // every status write (live totals, TPS) would start another pass at
    // once. Live numbers are refreshed by the resync instead.
    let (reader, writer) = reflector::store();
    let triggers = watcher(instances, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(
            predicates::generation
                .combine(predicates::finalizers)
                .combine(predicates::annotations),
            Default::default(),
        );
    // Owned objects: in the watched namespace only (a namespaced install's
    // Role covers nothing else), and only those this operator manages.
    let owned = || watcher::Config::default().labels(MANAGED);
    Controller::for_stream(triggers, reader)
        .owns(
            scoped::<StatefulSet>(&client, namespace.as_deref()),
            owned(),
        )
        .owns(scoped::<ConfigMap>(&client, namespace.as_deref()), owned())
        .owns(scoped::<Service>(&client, namespace.as_deref()), owned())
        .graceful_shutdown_on(async move {
            let _ = stopped.await;
        })
        .run(
            move |obj, ctx| {
                let metrics = metrics.clone();
                async move {
                    let instance = obj.name_any();
                    metrics.count(&instance, reconcile(obj, ctx)).await
                }
            },
            error_policy,
            ctx,
        )
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => tracing::debug!(instance = %obj.name, "reconciled"),
                Err(e) => tracing::warn!(error = %e, "reconcile error"),
            }
        })
        .await;
    tracing::info!("controller stopped");
    if !leadership.is_finished() {
        leadership.abort();
        anyhow::bail!("the controller stopped on its own");
    }
    let (lost, mut elector) = leadership.await.context("leader election task")?;
    if lost {
        anyhow::bail!("lost the leader lease; exiting so that the pod restarts as a follower");
    }
    if let Err(e) = elector.release().await {
        tracing::warn!(error = %e, "leader lease not released; another replica takes over when it expires");
    }
    Ok(())
}

/// SIGTERM (a pod being stopped) or Ctrl-C.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "no SIGTERM handler; Ctrl-C only");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}
