//! The Kafka step: the parent and system topics exist with their
//! partitions (K6); what Kafka cannot do is a condition, not an error.

use kube::runtime::events::EventType;

use super::status::{remove_condition, set_condition};
use super::{Context, SYSTEM_TOPICS, event};
use crate::crd::{MqttInstance, MqttInstanceStatus};
use crate::topics::{Outcome, Target, Wanted};

/// Creates or grows the instance's topics and records the outcome in
/// `status` (`KafkaReady`, `NotSupported`) and in Events.
pub(super) async fn ensure_topics(
    ctx: &Context,
    obj: &MqttInstance,
    target: Option<Target>,
    status: &mut MqttInstanceStatus,
) {
    let (Some(k), Some(target)) = (&obj.spec.kafka, target) else {
        remove_condition(&mut status.conditions, "KafkaReady");
        return;
    };
    let mut wanted: Vec<Wanted> = k
        .parent_topics
        .iter()
        .map(|t| Wanted {
            name: t.name.clone(),
            partitions: t.partitions.unwrap_or(k.partitions),
            replication: k.replication_factor,
        })
        .collect();
    wanted.extend(SYSTEM_TOPICS.iter().map(|n| Wanted {
        name: (*n).to_owned(),
        partitions: k.partitions,
        replication: k.replication_factor,
    }));
    let outcomes = match ctx.topics.ensure(target, wanted).await {
        Ok(outcomes) => outcomes,
        Err(e) => {
            set_condition(
                &mut status.conditions,
                "KafkaReady",
                false,
                "KafkaUnavailable",
                &e.to_string(),
            );
            return;
        }
    };
    set_condition(
        &mut status.conditions,
        "KafkaReady",
        true,
        "TopicsReady",
        "every topic exists with its partitions",
    );
    let mut shrink = Vec::new();
    for (topic, outcome) in outcomes {
        match outcome {
            Outcome::Created => {
                event(ctx, obj, EventType::Normal, "KafkaTopicCreated", topic).await
            }
            Outcome::Grown { from, to } => {
                event(
                    ctx,
                    obj,
                    EventType::Normal,
                    "KafkaTopicGrown",
                    format!("{topic}: {from} -> {to} partitions"),
                )
                .await;
            }
            Outcome::CannotShrink { have, want } => {
                shrink.push(format!(
                    "{topic} has {have} partitions, the spec asks for {want}"
                ));
            }
            Outcome::Unchanged => {}
        }
    }
    if shrink.is_empty() {
        remove_condition(&mut status.conditions, "NotSupported");
    } else {
        let msg = format!("Kafka cannot remove partitions: {}", shrink.join("; "));
        set_condition(
            &mut status.conditions,
            "NotSupported",
            true,
            "PartitionDecrease",
            &msg,
        );
    }
}
