//! Parent topic state for the operations API (O7): partitions, offsets,
//! message counts and a consumer group's backlog, and the Kafka brokers.
//!
//! librdkafka's calls here block, so `Kafka::topic_state` runs them on a
//! thread of its own and the API awaits the answer.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::oneshot;

use super::{Kafka, base_config, with_properties};

/// Why the state could not be read.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("kafka client: {0}")]
    Client(#[from] KafkaError),
    #[error(transparent)]
    Setup(#[from] super::KafkaSetupError),
    #[error("no topic {0} in Kafka")]
    NoTopic(String),
    #[error("Kafka did not answer in time")]
    Timeout,
}

// What it reads is answered as the API's `TopicState` as it is.
use ringmq_api::{KafkaBroker, PartitionState, TopicState};

impl Kafka {
    /// Reads a topic's state (and `group`'s backlog) within `timeout`.
    pub async fn topic_state(
        &self,
        topic: &str,
        group: Option<&str>,
        timeout: Duration,
    ) -> Result<TopicState, InspectError> {
        let mut c = base_config(&self.config, &self.node)?;
        // Without a group of interest, a group of this node's own that never
        // commits: reading committed offsets needs one.
        let group_id = group.map_or_else(|| format!("ringmq-inspect-{}", self.node), str::to_owned);
        c.set("group.id", group_id)
            .set("enable.auto.commit", "false");
        let config = with_properties(c, &self.config);
        let (topic, group) = (topic.to_owned(), group.map(str::to_owned));
        let (tx, rx) = oneshot::channel();
        std::thread::Builder::new()
            .name("ringmq-kafka-inspect".into())
            .spawn(move || {
                let _ = tx.send(read(config, topic, group, timeout));
            })
            .map_err(|_| InspectError::Timeout)?;
        rx.await.unwrap_or(Err(InspectError::Timeout))
    }
}

fn read(
    config: rdkafka::ClientConfig,
    topic: String,
    group: Option<String>,
    timeout: Duration,
) -> Result<TopicState, InspectError> {
    let consumer: BaseConsumer = config.create()?;
    let metadata = consumer.fetch_metadata(Some(&topic), timeout)?;
    let brokers = metadata
        .brokers()
        .iter()
        .map(|b| KafkaBroker {
            id: b.id(),
            host: b.host().to_owned(),
            port: b.port(),
        })
        .collect();
    let Some(t) = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
    else {
        return Err(InspectError::NoTopic(topic));
    };
    let mut list = TopicPartitionList::new();
    for p in t.partitions() {
        list.add_partition(&topic, p.id());
    }
    let committed = match &group {
        Some(_) => Some(consumer.committed_offsets(list, timeout)?),
        None => None,
    };
    let mut partitions = Vec::new();
    for p in t.partitions() {
        let (low, high) = consumer.fetch_watermarks(&topic, p.id(), timeout)?;
        let done = committed.as_ref().and_then(|c| {
            match c.find_partition(&topic, p.id()).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => Some(o),
                _ => None,
            }
        });
        partitions.push(PartitionState {
            partition: p.id(),
            leader: p.leader(),
            low,
            high,
            messages: high - low,
            committed: done,
            backlog: committed
                .as_ref()
                .map(|_| (high - done.unwrap_or(low)).max(0)),
        });
    }
    partitions.sort_by_key(|p| p.partition);
    Ok(TopicState {
        messages: partitions.iter().map(|p| p.messages).sum(),
        backlog: group
            .as_ref()
            .map(|_| partitions.iter().filter_map(|p| p.backlog).sum()),
        topic,
        group,
        brokers,
        partitions,
    })
}
