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
use kube::{Api, Client};
use ringmq_operator::brokers::{Http, PodDns};
use ringmq_operator::crd::MqttInstance;
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
    // The namespace to watch: all when unset (the Helm chart sets it for a
    // namespaced install, whose Role covers that namespace only).
    let namespace = std::env::var("WATCH_NAMESPACE")
        .ok()
        .filter(|ns| !ns.is_empty());
    let instances: Api<MqttInstance> = scoped(&client, namespace.as_deref());
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let monitoring = crds
        .get_opt("servicemonitors.monitoring.coreos.com")
        .await
        .ok()
        .flatten()
        .is_some()
        && crds
            .get_opt("prometheusrules.monitoring.coreos.com")
            .await
            .ok()
            .flatten()
            .is_some();
    tracing::info!(monitoring, "prometheus operator API");
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
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => tracing::debug!(instance = %obj.name, "reconciled"),
                Err(e) => tracing::warn!(error = %e, "reconcile error"),
            }
        })
        .await;
    tracing::info!("controller stopped");
    Ok(())
}
