//! The scale step: a scale-down drains the highest pod first, one pod at a
//! time (P4, C4); a rollout stuck on a broken revision is unstuck.

use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams};
use kube::runtime::events::EventType;

use super::{Context, Result, event, now};
use crate::crd::{Draining, MqttInstance, MqttInstanceStatus};
use crate::names::Names;

/// Where a scale step leaves the instance.
pub(super) struct Scaling {
    /// The replica count to apply now.
    pub replicas: i32,
    /// The pod being drained, if one is.
    pub draining: Option<Draining>,
    /// Why a drain has not started yet.
    pub waiting: Option<String>,
}

/// One scale step towards `desired` replicas from the StatefulSet's
/// `existing` state.
pub(super) async fn step(
    ctx: &Context,
    obj: &MqttInstance,
    names: &Names,
    existing: Option<&StatefulSet>,
    desired: i32,
    old_status: &MqttInstanceStatus,
    admin_token: &str,
) -> Result<Scaling> {
    let ns = &names.namespace;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let current = existing.and_then(|s| s.spec.replicas);
    let rolling = existing
        .and_then(|s| s.status.as_ref())
        .is_some_and(|s| s.current_revision != s.update_revision);
    let mut scaling = Scaling {
        replicas: desired,
        draining: None,
        waiting: None,
    };
    if let Some(cur) = current
        && cur > desired
    {
        let victim = cur - 1;
        let pod = names.pod(victim);
        let since = old_status
            .draining
            .as_ref()
            .filter(|d| d.pod == pod)
            .map(|d| d.since.clone());
        scaling.replicas = cur;
        if since.is_none() && rolling {
            // A rollout restarts pods from the highest ordinal down: the
            // pod drained next could come back un-drained mid-way.
            scaling.waiting = Some("waiting for the rollout to finish before draining".to_owned());
            return Ok(scaling);
        }
        // Asked again on every pass: a lost call, or a pod restarted
        // since, would leave the pod serving its sessions.
        if let Err(e) = ctx.brokers.drain(names, victim, admin_token).await {
            tracing::warn!(pod, error = %e, "drain call failed; trying again next pass");
        }
        if since.is_none() {
            event(
                ctx,
                obj,
                EventType::Normal,
                "Draining",
                format!("{pod}: handing its sessions to the other pods"),
            )
            .await;
        }
        let left = sessions_of(ctx, names, victim, admin_token).await;
        let gone = broker_gone(&pods, &pod).await?;
        let timed_out = since
            .as_deref()
            .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
            .is_some_and(|t| {
                k8s_openapi::jiff::Timestamp::now()
                    .duration_since(t)
                    .as_secs()
                    >= DRAIN_TIMEOUT.as_secs() as i64
            });
        if left == Some(0) || gone || timed_out {
            if left != Some(0) && !gone {
                event(
                    ctx,
                    obj,
                    EventType::Warning,
                    "DrainTimedOut",
                    format!(
                        "{pod} still held {} sessions after {} s; removed anyway (its clients reconnect to the other pods)",
                        left.map_or_else(|| "an unknown number of".to_owned(), |n| n.to_string()),
                        DRAIN_TIMEOUT.as_secs()
                    ),
                )
                .await;
            }
            scaling.replicas = victim;
            event(
                ctx,
                obj,
                EventType::Normal,
                "ScaledDown",
                format!("{pod} drained; replicas {cur} -> {victim}"),
            )
            .await;
        } else {
            scaling.draining = Some(Draining {
                pod,
                sessions: left.unwrap_or(-1),
                since: since.unwrap_or_else(|| now().0.to_string()),
            });
        }
    } else if let Some(d) = &old_status.draining {
        // The scale-down was called off: the pod has left the ring and
        // would stay off it; a restart brings it back as a member.
        match pods.delete(&d.pod, &DeleteParams::default()).await {
            Ok(_) => {
                event(
                    ctx,
                    obj,
                    EventType::Normal,
                    "DrainAbandoned",
                    format!("{}: scale-down called off; restarted to rejoin", d.pod),
                )
                .await;
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(scaling)
}

/// How long a pod of an older revision may stay unready before the
/// operator recreates it.
const STUCK_AFTER: Duration = Duration::from_secs(60);

/// A rollout stuck on a broken revision: Kubernetes does not replace a pod
/// that never became ready, even after the spec is fixed ("forced
/// rollback"). Pods of an older revision than the StatefulSet's current one
/// that have not been ready for a minute are deleted, one per pass, so that
/// the StatefulSet recreates them from the current template. Returns the
/// deleted pod's name.
pub(super) async fn unstick(
    client: &kube::Client,
    ns: &str,
    names: &Names,
    sts: &StatefulSet,
) -> Result<Option<String>> {
    let Some(update) = sts.status.as_ref().and_then(|s| s.update_revision.clone()) else {
        return Ok(None);
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let list = pods
        .list(&ListParams::default().labels(&names.selector_string()))
        .await?;
    let now = k8s_openapi::jiff::Timestamp::now();
    for pod in list {
        let revision = pod.labels().get("controller-revision-hash").cloned();
        // Unready for a minute by the Ready condition's own clock: a pod
        // of a healthy revision is briefly unready whenever a member
        // joins, and must not be taken for a stuck one.
        let unready_long = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
            .is_some_and(|c| {
                c.status != "True"
                    && c.last_transition_time.as_ref().is_some_and(|t| {
                        now.duration_since(t.0).as_secs() >= STUCK_AFTER.as_secs() as i64
                    })
            });
        if revision.is_some_and(|r| r != update) && unready_long {
            // One pod a pass: the StatefulSet recreates it before the next.
            let name = pod.name_any();
            pods.delete(&name, &DeleteParams::default()).await?;
            return Ok(Some(name));
        }
    }
    Ok(None)
}

/// How long a drain may take before the pod is removed anyway.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(600);

/// Whether the pod is gone or its broker is not running (so it holds no
/// session any more).
async fn broker_gone(pods: &Api<Pod>, name: &str) -> Result<bool> {
    let Some(pod) = pods.get_opt(name).await? else {
        return Ok(true);
    };
    let running = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .is_some_and(|c| {
            c.iter().any(|c| {
                c.name == "broker" && c.state.as_ref().is_some_and(|s| s.running.is_some())
            })
        });
    Ok(!running)
}

/// Sessions pod `ordinal` still holds, from its own operations API; `None`
/// when it does not answer (gone already).
async fn sessions_of(ctx: &Context, names: &Names, ordinal: i32, token: &str) -> Option<i64> {
    let v = ctx
        .brokers
        .get(names, ordinal, "instance", token)
        .await
        .ok()?;
    let pod = names.pod(ordinal);
    v["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["name"] == pod.as_str())
        .and_then(|n| n["sessions"].as_i64())
}
