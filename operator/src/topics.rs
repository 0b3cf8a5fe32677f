//! Kafka topics of an instance (K6, P3, P4): created, grown, never shrunk
//! (Kafka cannot), deleted only when the delete policy says so.

use std::collections::HashMap;
use std::time::Duration;

use futures::future::BoxFuture;
use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::RDKafkaErrorCode;

use crate::crd::{KafkaBinding, KafkaProtocol};

/// Errors managing topics.
#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("kafka topic {topic}: {code}")]
    Topic {
        topic: String,
        code: RDKafkaErrorCode,
    },
    #[error("kafka metadata: {0}")]
    Metadata(String),
}

pub type Result<T> = std::result::Result<T, TopicError>;

/// How to reach the Kafka cluster: the binding and the secrets from its
/// credentials Secret.
#[derive(Debug, Clone, Default)]
pub struct Target {
    pub bootstrap: String,
    pub protocol: KafkaProtocol,
    pub sasl_mechanism: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub ca_pem: Option<String>,
}

impl Target {
    pub fn new(binding: &KafkaBinding) -> Self {
        Self {
            bootstrap: binding.bootstrap_servers.clone(),
            protocol: binding.security_protocol,
            sasl_mechanism: binding.sasl_mechanism.clone(),
            ..Self::default()
        }
    }

    fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap)
            .set("client.id", "ringmq-operator");
        c.set(
            "security.protocol",
            match self.protocol {
                KafkaProtocol::Plaintext => "plaintext",
                KafkaProtocol::Ssl => "ssl",
                KafkaProtocol::SaslPlaintext => "sasl_plaintext",
                KafkaProtocol::SaslSsl => "sasl_ssl",
            },
        );
        for (k, v) in [
            ("sasl.mechanism", &self.sasl_mechanism),
            ("sasl.username", &self.username),
            ("sasl.password", &self.password),
            ("ssl.ca.pem", &self.ca_pem),
        ] {
            if let Some(v) = v {
                c.set(k, v);
            }
        }
        c
    }
}

/// A topic the instance needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub name: String,
    pub partitions: i32,
    pub replication: i32,
}

/// What `ensure` did to one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Grown {
        from: i32,
        to: i32,
    },
    Unchanged,
    /// The spec asks for fewer partitions than the topic has: Kafka cannot
    /// remove partitions, the topic keeps them (condition `NotSupported`).
    CannotShrink {
        have: i32,
        want: i32,
    },
}

/// Topic management, behind a trait so that the reconciler's tests can
/// record what it asks for.
pub trait Topics: Send + Sync {
    fn ensure(
        &self,
        target: Target,
        wanted: Vec<Wanted>,
    ) -> BoxFuture<'static, Result<Vec<(String, Outcome)>>>;
    fn delete(&self, target: Target, names: Vec<String>) -> BoxFuture<'static, Result<()>>;
}

/// The real thing: librdkafka's admin client.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rdkafka;

const TIMEOUT: Duration = Duration::from_secs(10);

fn opts() -> AdminOptions {
    AdminOptions::new().request_timeout(Some(TIMEOUT))
}

impl Topics for Rdkafka {
    fn ensure(
        &self,
        target: Target,
        wanted: Vec<Wanted>,
    ) -> BoxFuture<'static, Result<Vec<(String, Outcome)>>> {
        Box::pin(async move {
            let admin: AdminClient<DefaultClientContext> = target.client_config().create()?;
            let have = partitions(&target).await?;
            let mut out = Vec::new();
            let mut create = Vec::new();
            let mut grow = Vec::new();
            for w in &wanted {
                match have.get(&w.name) {
                    None => create.push(w),
                    Some(&n) if n < w.partitions => grow.push((w, n)),
                    Some(&n) if n > w.partitions => out.push((
                        w.name.clone(),
                        Outcome::CannotShrink {
                            have: n,
                            want: w.partitions,
                        },
                    )),
                    Some(_) => out.push((w.name.clone(), Outcome::Unchanged)),
                }
            }
            let new: Vec<NewTopic<'_>> = create
                .iter()
                .map(|w| {
                    NewTopic::new(
                        &w.name,
                        w.partitions,
                        TopicReplication::Fixed(w.replication),
                    )
                })
                .collect();
            // librdkafka refuses an empty request.
            let created = if new.is_empty() {
                Vec::new()
            } else {
                admin.create_topics(&new, &opts()).await?
            };
            for r in created {
                match r {
                    Ok(name) => out.push((name, Outcome::Created)),
                    Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => {
                        out.push((name, Outcome::Unchanged))
                    }
                    Err((topic, code)) => return Err(TopicError::Topic { topic, code }),
                }
            }
            let more: Vec<NewPartitions<'_>> = grow
                .iter()
                .map(|(w, _)| {
                    NewPartitions::new(&w.name, usize::try_from(w.partitions).unwrap_or(1))
                })
                .collect();
            let grown = if more.is_empty() {
                Vec::new()
            } else {
                admin.create_partitions(&more, &opts()).await?
            };
            for (r, (w, from)) in grown.into_iter().zip(&grow) {
                match r {
                    Ok(_) => out.push((
                        w.name.clone(),
                        Outcome::Grown {
                            from: *from,
                            to: w.partitions,
                        },
                    )),
                    Err((topic, code)) => return Err(TopicError::Topic { topic, code }),
                }
            }
            Ok(out)
        })
    }

    fn delete(&self, target: Target, names: Vec<String>) -> BoxFuture<'static, Result<()>> {
        Box::pin(async move {
            if names.is_empty() {
                return Ok(());
            }
            let admin: AdminClient<DefaultClientContext> = target.client_config().create()?;
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            for r in admin.delete_topics(&refs, &opts()).await? {
                match r {
                    Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
                    Err((topic, code)) => return Err(TopicError::Topic { topic, code }),
                }
            }
            Ok(())
        })
    }
}

/// Partition counts of every topic (librdkafka's metadata call blocks: it
/// runs on the blocking pool).
async fn partitions(target: &Target) -> Result<HashMap<String, i32>> {
    let config = target.client_config();
    tokio::task::spawn_blocking(move || {
        let consumer: rdkafka::consumer::BaseConsumer = config.create()?;
        let md = rdkafka::consumer::Consumer::fetch_metadata(&consumer, None, TIMEOUT)?;
        Ok(md
            .topics()
            .iter()
            .filter(|t| t.error().is_none())
            .map(|t| {
                (
                    t.name().to_owned(),
                    i32::try_from(t.partitions().len()).unwrap_or(i32::MAX),
                )
            })
            .collect())
    })
    .await
    .map_err(|e| TopicError::Metadata(e.to_string()))?
}
