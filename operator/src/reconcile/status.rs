//! The status step: what the StatefulSet and the brokers report, the
//! conditions drawn from it, alarm Events, and the status patch (P3).

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use super::inputs::Blocked;
use super::scale::{Scaling, unstick};
use super::{Context, Error, MANAGER, Result, event, now, rfc3339_ms};
use crate::crd::{AlarmStatus, MqttInstance, MqttInstanceStatus, NodeStatus, Totals};
use crate::names::Names;

/// A pass that cannot go on: Degraded and not Ready, with the reason.
pub(super) async fn report_blocked(
    ctx: &Context,
    obj: &MqttInstance,
    old_status: &MqttInstanceStatus,
    b: Blocked,
) -> Result<()> {
    event(ctx, obj, EventType::Warning, b.reason, b.message.clone()).await;
    let mut status = old_status.clone();
    set_condition(
        &mut status.conditions,
        "Degraded",
        true,
        b.reason,
        &b.message,
    );
    set_condition(&mut status.conditions, "Ready", false, b.reason, &b.message);
    status.observed_generation = obj.metadata.generation;
    write_status(ctx, obj, old_status, status).await
}

/// Fills `status` from the StatefulSet and the brokers after `scaling`
/// towards `desired` replicas; true when the instance is settled.
#[allow(clippy::too_many_arguments)] // the facts of one pass, drawn together here
pub(super) async fn observe_into(
    ctx: &Context,
    obj: &MqttInstance,
    names: &Names,
    scaling: &Scaling,
    desired: i32,
    admin_token: &str,
    status: &mut MqttInstanceStatus,
) -> Result<bool> {
    let spec = &obj.spec;
    let ns = &names.namespace;
    let sts_api: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), ns);
    let sts = sts_api.get_opt(&names.main()).await?;
    if let Some(sts) = &sts
        && let Some(pod) = unstick(&ctx.client, ns, names, sts).await?
    {
        event(
            ctx,
            obj,
            EventType::Normal,
            "RestartedStuckPod",
            format!(
                "{pod} never became ready on the previous revision; recreated from the current spec"
            ),
        )
        .await;
    }
    let replicas = scaling.replicas;
    let sts_status = sts.as_ref().and_then(|s| s.status.as_ref());
    let ready = sts_status.and_then(|s| s.ready_replicas).unwrap_or(0);
    let updated = sts_status.is_some_and(|s| {
        s.updated_replicas.unwrap_or(0) >= replicas && s.current_revision == s.update_revision
    });
    // The pods that exist, as the scale subresource reports them.
    status.replicas = sts_status.map_or(0, |s| s.replicas);
    status.ready_replicas = ready;
    status.selector = names.selector_string();
    status.endpoints = names.endpoints(spec);
    status.draining = scaling.draining.clone();
    status.observed_generation = obj.metadata.generation;
    let observed = observe(ctx, names, replicas, admin_token).await;
    let degraded = match &observed {
        Some(o) => {
            status.totals = Some(o.totals.clone());
            status.nodes = o.nodes.clone();
            status.alarms = o.alarms.clone();
            status.peak_utilization = o.peak.clone();
            status.under_replicated_sessions = o.under_replicated;
            replication_condition(status);
            None
        }
        None if ready > 0 => Some("no broker pod answered the operations API"),
        None => None,
    };
    let settled = ready == replicas && updated && scaling.draining.is_none() && replicas == desired;
    rollout_conditions(status, scaling, ready, settled);
    match degraded {
        Some(m) => set_condition(
            &mut status.conditions,
            "Degraded",
            true,
            "BrokersUnreachable",
            m,
        ),
        None => set_condition(
            &mut status.conditions,
            "Degraded",
            false,
            "Healthy",
            "the brokers answer",
        ),
    }
    capacity_condition(status);
    Ok(settled)
}

/// `Ready` and `Progressing`.
fn rollout_conditions(
    status: &mut MqttInstanceStatus,
    scaling: &Scaling,
    ready: i32,
    settled: bool,
) {
    let replicas = scaling.replicas;
    if settled {
        set_condition(
            &mut status.conditions,
            "Ready",
            true,
            "AllPodsReady",
            &format!("{ready} of {replicas} broker pods ready"),
        );
        set_condition(
            &mut status.conditions,
            "Progressing",
            false,
            "Settled",
            "the instance matches its spec",
        );
        return;
    }
    let why = match (&scaling.draining, &scaling.waiting) {
        (Some(d), _) => format!("draining {} ({} sessions left)", d.pod, d.sessions),
        (None, Some(w)) => w.clone(),
        (None, None) => format!("{ready} of {replicas} broker pods ready"),
    };
    set_condition(
        &mut status.conditions,
        "Ready",
        ready > 0 && ready == replicas,
        "PodsNotReady",
        &why,
    );
    set_condition(
        &mut status.conditions,
        "Progressing",
        true,
        if scaling.draining.is_some() {
            "Draining"
        } else {
            "RollingOut"
        },
        &why,
    );
}

/// `Replicated`: whether every persistent session has the copies the
/// replication factor asks for (D2).
fn replication_condition(status: &mut MqttInstanceStatus) {
    match status.under_replicated_sessions {
        Some(0) => set_condition(
            &mut status.conditions,
            "Replicated",
            true,
            "AllSessionsReplicated",
            "every persistent session has its copies",
        ),
        Some(n) => set_condition(
            &mut status.conditions,
            "Replicated",
            false,
            "UnderReplicated",
            &format!("{n} persistent sessions have fewer copies than the replication factor asks"),
        ),
        None => {}
    }
}

/// `CapacityWarning`: whether an alarm fires (L4).
fn capacity_condition(status: &mut MqttInstanceStatus) {
    let firing: Vec<&AlarmStatus> = status
        .alarms
        .iter()
        .filter(|a| a.state != "resolved")
        .collect();
    if firing.is_empty() {
        set_condition(
            &mut status.conditions,
            "CapacityWarning",
            false,
            "BelowThresholds",
            "no alarm is firing",
        );
    } else {
        let m = firing
            .iter()
            .map(|a| format!("{} {} >= {}", a.metric, a.value, a.threshold))
            .collect::<Vec<_>>()
            .join(", ");
        set_condition(
            &mut status.conditions,
            "CapacityWarning",
            true,
            "AlarmFiring",
            &m,
        );
    }
}

/// What the brokers report about the whole instance.
struct Observed {
    totals: Totals,
    nodes: Vec<NodeStatus>,
    alarms: Vec<AlarmStatus>,
    peak: Option<String>,
    /// `None` from brokers that do not report it.
    under_replicated: Option<i64>,
}

/// Recent resolved alarms kept in the status.
const RECENT_ALARMS: usize = 10;

/// Asks the pods in turn until one answers for the instance.
async fn observe(ctx: &Context, names: &Names, replicas: i32, token: &str) -> Option<Observed> {
    for ordinal in 0..replicas.max(1) {
        let Ok(inst) = ctx.brokers.get(names, ordinal, "instance", token).await else {
            continue;
        };
        let alarms = ctx
            .brokers
            .get(names, ordinal, "alarms", token)
            .await
            .unwrap_or(Value::Null);
        let i = |v: &Value| v.as_i64().unwrap_or(0);
        let t = &inst["totals"];
        let totals = Totals {
            connections: i(&t["connections"]),
            subscriptions: i(&t["subscriptions"]),
            topics: i(&t["topics"]),
            pub_tps: t["pubTps"].as_f64().unwrap_or(0.0),
            sub_tps: t["subTps"].as_f64().unwrap_or(0.0),
        };
        let nodes = inst["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|n| NodeStatus {
                name: n["name"].as_str().unwrap_or_default().to_owned(),
                state: n["state"].as_str().unwrap_or_default().to_owned(),
                connections: i(&n["connections"]),
                max_connections: i(&n["maxConnections"]),
                subscriptions: i(&n["subscriptions"]),
                subscribers: i(&n["subscribers"]),
                under_replicated_sessions: i(&n["underReplicatedSessions"]),
            })
            .collect();
        let peak = inst["utilization"].as_object().and_then(|u| {
            u.iter()
                .filter_map(|(k, v)| v.as_f64().map(|p| (k, p)))
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .map(|(k, p)| format!("{p:.0}% {k}"))
        });
        let mut active = Vec::new();
        let mut resolved = Vec::new();
        for a in alarms["alarms"].as_array().into_iter().flatten() {
            let s = AlarmStatus {
                id: a["id"].as_str().unwrap_or_default().to_owned(),
                metric: a["metric"].as_str().unwrap_or_default().to_owned(),
                value: i(&a["value"]),
                threshold: i(&a["threshold"]),
                state: a["state"].as_str().unwrap_or_default().to_owned(),
                start: rfc3339_ms(a["start"].as_u64().unwrap_or(0)),
                end: a["end"].as_u64().map(rfc3339_ms),
            };
            if s.state == "resolved" {
                resolved.push(s);
            } else {
                active.push(s);
            }
        }
        resolved.truncate(RECENT_ALARMS);
        active.extend(resolved);
        return Some(Observed {
            totals,
            nodes,
            alarms: active,
            peak,
            under_replicated: inst["underReplicatedSessions"].as_i64(),
        });
    }
    None
}

/// Kubernetes Events for alarms that fired or resolved since the last pass
/// (L4, O9).
pub(super) async fn alarm_events(
    ctx: &Context,
    obj: &MqttInstance,
    before: &[AlarmStatus],
    now: &[AlarmStatus],
) {
    for a in now {
        let was = before.iter().find(|b| b.id == a.id);
        let firing = a.state != "resolved";
        let was_firing = was.is_some_and(|b| b.state != "resolved");
        if firing && !was_firing {
            event(
                ctx,
                obj,
                EventType::Warning,
                "AlarmFiring",
                format!("{} at {} (threshold {})", a.metric, a.value, a.threshold),
            )
            .await;
        } else if !firing && was_firing {
            event(
                ctx,
                obj,
                EventType::Normal,
                "AlarmResolved",
                format!(
                    "{} back to {} (threshold {})",
                    a.metric, a.value, a.threshold
                ),
            )
            .await;
        }
    }
}

/// Sets a condition, keeping its transition time when its status stays.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
) {
    let status = if status { "True" } else { "False" }.to_owned();
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            if c.status != status {
                c.last_transition_time = now();
            }
            c.status = status;
            c.reason = reason.to_owned();
            c.message = message.to_owned();
        }
        None => conditions.push(Condition {
            type_: type_.to_owned(),
            status,
            reason: reason.to_owned(),
            message: message.to_owned(),
            last_transition_time: now(),
            observed_generation: None,
        }),
    }
}

/// Drops a condition that no longer applies.
pub(super) fn remove_condition(conditions: &mut Vec<Condition>, type_: &str) {
    conditions.retain(|c| c.type_ != type_);
}

/// Patches the status only when it changed (P3).
pub(super) async fn write_status(
    ctx: &Context,
    obj: &MqttInstance,
    old: &MqttInstanceStatus,
    new: MqttInstanceStatus,
) -> Result<()> {
    if *old == new {
        return Ok(());
    }
    let ns = obj.namespace().ok_or(Error::NoNamespace)?;
    let api: Api<MqttInstance> = Api::namespaced(ctx.client.clone(), &ns);
    let patch = json!({
        "apiVersion": MqttInstance::api_version(&()),
        "kind": MqttInstance::kind(&()),
        "status": new,
    });
    api.patch_status(
        &obj.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}
