//! What a pass reads before it renders anything: the Secrets the spec
//! names (user passwords, Kafka credentials), the Secrets the operator
//! generates once, and the credentials file rendered from them.

use std::collections::BTreeMap;

use argon2::password_hash::rand_core::{OsRng, RngCore};
use base64::Engine;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use kube::api::{Api, PostParams};

use super::{Context, Error, Result};
use crate::brokerconfig::Inputs;
use crate::crd::MqttInstanceSpec;
use crate::credentials;
use crate::names::Names;
use crate::resources::{self, Context as Build};
use crate::topics::Target;

/// A reason the instance cannot be rolled out as specified, shown in the
/// status rather than retried blindly.
#[derive(Debug)]
pub(super) struct Blocked {
    pub reason: &'static str,
    pub message: String,
}

/// What the Secrets named by the spec gave.
pub(super) struct Gathered {
    /// What the broker configuration is rendered from.
    pub broker: Inputs,
    /// User passwords, by user name.
    pub passwords: BTreeMap<String, String>,
    /// The Kafka connection, when the instance binds Kafka.
    pub kafka: Option<Target>,
}

/// Reads the user passwords and the Kafka credentials; a missing one blocks
/// the pass.
pub(super) async fn gather(
    ctx: &Context,
    spec: &MqttInstanceSpec,
    ns: &str,
    secrets: &Api<Secret>,
) -> Result<std::result::Result<Gathered, Blocked>> {
    let mut passwords = BTreeMap::new();
    let mut blocked = None;
    for u in &spec.users {
        match secret_key(secrets, &u.password_secret.name, &u.password_secret.key).await? {
            Some(p) => {
                passwords.insert(u.username.clone(), p);
            }
            None => {
                blocked = Some(Blocked {
                    reason: "SecretMissing",
                    message: format!(
                        "user {}: Secret {} has no key {}",
                        u.username, u.password_secret.name, u.password_secret.key
                    ),
                });
            }
        }
    }
    let mut broker = Inputs {
        credentials: credentials::needed(spec),
        ..Inputs::default()
    };
    let kafka = match &spec.kafka {
        Some(k) => {
            let t = kafka_target(ctx, ns, k).await?;
            broker.kafka_username = t.username.clone();
            broker.kafka_ca = t.ca_pem.is_some();
            if k.credentials_secret.is_some() && t.password.is_none() {
                blocked = Some(Blocked {
                    reason: "SecretMissing",
                    message: format!(
                        "Kafka credentials Secret {} has no password",
                        k.credentials_secret.as_deref().unwrap_or_default()
                    ),
                });
            }
            Some(t)
        }
        None => None,
    };
    Ok(match blocked {
        Some(b) => Err(b),
        None => Ok(Gathered {
            broker,
            passwords,
            kafka,
        }),
    })
}

/// A key of a Secret, as text.
pub(super) async fn secret_key(
    secrets: &Api<Secret>,
    name: &str,
    key: &str,
) -> std::result::Result<Option<String>, kube::Error> {
    let Some(s) = secrets.get_opt(name).await? else {
        return Ok(None);
    };
    Ok(s.data.and_then(|d| d.get(key).cloned()).map(|b| {
        String::from_utf8_lossy(&b.0)
            .trim_end_matches(['\r', '\n'])
            .to_owned()
    }))
}

/// The Kafka connection of a binding, with its credentials Secret read.
pub(super) async fn kafka_target(
    ctx: &Context,
    ns: &str,
    k: &crate::crd::KafkaBinding,
) -> Result<Target> {
    let mut t = Target::new(k);
    if let Some(secret) = &k.credentials_secret {
        let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
        t.username = secret_key(&secrets, secret, "username").await?;
        t.password = secret_key(&secrets, secret, "password").await?;
        t.ca_pem = secret_key(&secrets, secret, "ca.crt").await?;
    }
    Ok(t)
}

/// A Secret the operator generates once (a random value) and never changes.
pub(super) async fn generated_secret(
    secrets: &Api<Secret>,
    build: &Build<'_>,
    name: String,
    key: &str,
) -> Result<String> {
    if let Some(v) = secret_key(secrets, &name, key).await? {
        return Ok(v);
    }
    let mut bytes = [0u8; 32];
    OsRng.fill_bytes(&mut bytes);
    let value = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(build.names.namespace.clone()),
            labels: Some(build.names.labels()),
            owner_references: Some(vec![build.owner.clone()]),
            ..ObjectMeta::default()
        },
        data: Some([(key.to_owned(), ByteString(value.clone().into_bytes()))].into()),
        ..Secret::default()
    };
    secrets.create(&PostParams::default(), &secret).await?;
    Ok(value)
}

/// The credentials file: the one on the Secret when it was rendered from
/// the same inputs, else rendered again off the async runtime.
pub(super) async fn render_credentials(
    secrets: &Api<Secret>,
    names: &Names,
    spec: &MqttInstanceSpec,
    uid: String,
    passwords: BTreeMap<String, String>,
) -> Result<credentials::Rendered> {
    let fingerprint = credentials::fingerprint(spec, &uid, &passwords);
    let existing = secrets.get_opt(&names.credentials_secret()).await?;
    let cached = existing
        .filter(|s| s.annotations().get(resources::CREDENTIALS_INPUT) == Some(&fingerprint))
        .and_then(|s| s.data?.remove("credentials.yaml"))
        .and_then(|b| String::from_utf8(b.0).ok());
    let yaml = match cached {
        Some(yaml) => yaml,
        None => {
            let spec = spec.clone();
            tokio::task::spawn_blocking(move || credentials::render(&spec, &uid, &passwords))
                .await
                .map_err(|e| Error::Object(format!("credentials task: {e}")))??
        }
    };
    Ok(credentials::Rendered { yaml, fingerprint })
}
