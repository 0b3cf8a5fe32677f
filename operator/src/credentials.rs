//! The brokers' credentials file, built from the users and Group IDs the
//! instance declares (A1, A5). Passwords come from the Secrets the spec
//! names and leave the operator only as argon2id hashes.

use std::collections::BTreeMap;

use argon2::password_hash::{PasswordHasher, SaltString};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::crd::{GrantAction, MqttInstanceSpec};

/// Errors while building the file.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("no password for user {0} (spec.users[].passwordSecret)")]
    MissingPassword(String),
    #[error("cannot hash the password of user {0}")]
    Hash(String),
}

pub type Result<T> = std::result::Result<T, CredentialsError>;

/// Whether the instance declares anything the brokers need the file for.
pub fn needed(spec: &MqttInstanceSpec) -> bool {
    !spec.users.is_empty() || !spec.group_ids.is_empty()
}

/// The salt of a user's hash: derived from the instance's UID, the user
/// and the password, so that the file only changes (and the pods only
/// roll) when a password does, without storing anything.
fn salt(uid: &str, user: &str, password: &str) -> Result<SaltString> {
    let digest = Sha256::digest(format!("{uid}\0{user}\0{password}").as_bytes());
    SaltString::encode_b64(&digest[..16]).map_err(|_| CredentialsError::Hash(user.to_owned()))
}

/// The rendered file and the fingerprint of what it was rendered from.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub yaml: String,
    pub fingerprint: String,
}

/// A digest of everything [`render`] reads: a pass whose fingerprint
/// matches the one on the existing Secret reuses its file instead of
/// hashing every password again (argon2 is deliberately slow).
pub fn fingerprint(
    spec: &MqttInstanceSpec,
    uid: &str,
    passwords: &BTreeMap<String, String>,
) -> String {
    let input = json!({
        "uid": uid,
        "users": spec.users,
        "groupIds": spec.group_ids,
        "passwords": passwords,
    });
    let digest = Sha256::digest(input.to_string().as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// `credentials.yaml` for the brokers; `passwords` by user name.
pub fn render(
    spec: &MqttInstanceSpec,
    uid: &str,
    passwords: &BTreeMap<String, String>,
) -> Result<String> {
    let mut users = Vec::new();
    for u in &spec.users {
        let password = passwords
            .get(&u.username)
            .ok_or_else(|| CredentialsError::MissingPassword(u.username.clone()))?;
        let hash = argon2::Argon2::default()
            .hash_password(password.as_bytes(), &salt(uid, &u.username, password)?)
            .map_err(|_| CredentialsError::Hash(u.username.clone()))?
            .to_string();
        let grants: Vec<_> = u
            .grants
            .iter()
            .map(|g| {
                let action = match g.action {
                    GrantAction::Pub => "pub",
                    GrantAction::Sub => "sub",
                    GrantAction::Pubsub => "pubsub",
                };
                json!({ "filter": g.filter, "action": action })
            })
            .collect();
        users.push(json!({ "username": u.username, "password_hash": hash, "grants": grants }));
    }
    let groups: Vec<&str> = spec.group_ids.iter().map(String::as_str).collect();
    // Devices of an instance that declares only Group IDs stay anonymous.
    let anonymous = json!({ "allow": spec.users.is_empty() });
    let file = json!({ "users": users, "group_ids": groups, "anonymous": anonymous });
    Ok(serde_yaml::to_string(&file).unwrap_or_default())
}
