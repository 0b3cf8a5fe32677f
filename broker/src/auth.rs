//! Authentication and authorisation (SPEC A1, A2, A4, A5, A6).
//!
//! Credentials live in one YAML file that Kubernetes mounts from a Secret:
//! users with password hashes and grants, AccessKey/SecretKey pairs for the
//! signature mode, declared Group IDs and what anonymous clients may do. The
//! file is read again when it changes; every check uses the current snapshot,
//! so new grants apply to a connected client's next packet. Secrets are never
//! logged or formatted: `Debug` of the types holding them prints no secret.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use argon2::password_hash::PasswordHash;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::Deserialize;

use crate::config::LoginConfig;
use crate::login::{Busy, Login, LoginError, Priority};
use crate::topic;

/// Errors while loading the credentials file.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read credentials file {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("invalid credentials file {path}: {error}")]
    Parse {
        path: PathBuf,
        error: serde_yaml::Error,
    },
    #[error("invalid credentials file {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error(transparent)]
    Login(#[from] LoginError),
}

pub type Result<T> = std::result::Result<T, AuthError>;

/// Why a CONNECT was refused; each maps to a CONNACK code and a trace reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("bad user name or password")]
    BadCredentials,
    #[error("not authorized")]
    NotAuthorized,
    #[error("unknown Group ID")]
    UnknownGroup,
    #[error("too many failed logins for this user name or address")]
    TooManyFailures,
    #[error("server busy: too many password checks waiting")]
    Busy,
}

impl Refusal {
    /// Label of `ringmq_packets_rejected_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::BadCredentials => "bad_credentials",
            Refusal::NotAuthorized => "not_authorized",
            Refusal::UnknownGroup => "unknown_group_id",
            Refusal::TooManyFailures => "login_rate_limited",
            Refusal::Busy => "login_busy",
        }
    }
}

/// What a grant allows on its topic filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Pub,
    Sub,
    Pubsub,
    /// Refuses publish and subscribe on the filter, whatever else allows them.
    Deny,
}

/// A permission on a topic filter (`+` and `#` allowed; `#` is every topic).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    pub filter: String,
    pub action: Action,
}

/// A password hash; `Debug` does not print it.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(Arc<str>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<secret>")
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserEntry {
    username: String,
    /// PHC string, argon2id recommended (`ringmq-broker hash-password`).
    password_hash: Secret,
    #[serde(default)]
    grants: Vec<Grant>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct AccessKeyEntry {
    access_key: String,
    secret_key: Secret,
    /// Grants of clients signing with this key; none listed means every topic.
    #[serde(default)]
    grants: Option<Vec<Grant>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AnonymousEntry {
    /// Anonymous clients may connect. Defaults to true only when the file
    /// declares no user and no access key.
    allow: Option<bool>,
    #[serde(default)]
    grants: Option<Vec<Grant>>,
}

/// The credentials file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct CredentialsFile {
    users: Vec<UserEntry>,
    access_keys: Vec<AccessKeyEntry>,
    /// Declared Group IDs; when not empty, a Client ID with another Group ID
    /// is refused at CONNECT (A5).
    group_ids: Vec<String>,
    anonymous: AnonymousEntry,
}

/// Who a connection authenticated as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Anonymous,
    User(Arc<str>),
    AccessKey(Arc<str>),
    /// Token mode: rights come from the tokens the connection uploads.
    Token(Arc<str>),
}

/// One consistent view of the credentials.
#[derive(Debug, Default)]
struct Snapshot {
    users: HashMap<String, UserEntry>,
    keys: HashMap<String, AccessKeyEntry>,
    groups: HashSet<String>,
    anonymous_allowed: bool,
    anonymous_grants: Option<Vec<Grant>>,
}

impl Snapshot {
    fn from_file(path: &Path, file: CredentialsFile) -> Result<Self> {
        let invalid = |reason: String| AuthError::Invalid {
            path: path.to_owned(),
            reason,
        };
        for g in &file.group_ids {
            if !topic::is_valid_group_id(g) {
                return Err(invalid(format!("{g:?} is not a valid Group ID")));
            }
        }
        let grants = file
            .users
            .iter()
            .flat_map(|u| &u.grants)
            .chain(
                file.access_keys
                    .iter()
                    .flat_map(|k| k.grants.iter().flatten()),
            )
            .chain(file.anonymous.grants.iter().flatten());
        for g in grants {
            topic::parse_filter(&g.filter, usize::MAX, false)
                .map_err(|e| invalid(format!("grant filter {:?}: {e}", g.filter)))?;
        }
        for u in &file.users {
            PasswordHash::new(&u.password_hash.0)
                .map_err(|e| invalid(format!("password hash of user {:?}: {e}", u.username)))?;
        }
        let anonymous_allowed = file
            .anonymous
            .allow
            .unwrap_or(file.users.is_empty() && file.access_keys.is_empty());
        Ok(Self {
            users: file
                .users
                .into_iter()
                .map(|u| (u.username.clone(), u))
                .collect(),
            keys: file
                .access_keys
                .into_iter()
                .map(|k| (k.access_key.clone(), k))
                .collect(),
            groups: file.group_ids.into_iter().collect(),
            anonymous_allowed,
            anonymous_grants: file.anonymous.grants,
        })
    }

    fn grants(&self, who: &Identity) -> Option<&[Grant]> {
        match who {
            Identity::Anonymous => self.anonymous_grants.as_deref(),
            Identity::User(u) => Some(self.users.get(&**u).map_or(&[][..], |e| &e.grants)),
            // Token rights are checked against the connection's tokens.
            Identity::Token(_) => Some(&[]),
            Identity::AccessKey(k) => match self.keys.get(&**k) {
                Some(e) => e.grants.as_deref(),
                // A removed key keeps no rights.
                None => Some(&[]),
            },
        }
    }
}

/// The credentials of a node and the checks on them.
#[derive(Debug)]
pub struct Auth {
    path: Option<PathBuf>,
    snapshot: RwLock<Arc<Snapshot>>,
    /// Bumped with every new snapshot, so connections holding a `Grants`
    /// notice a reload with one atomic read instead of a lock per packet.
    generation: AtomicU64,
    modified: Mutex<Option<SystemTime>>,
    login: Login,
    /// What an unknown user name's password is checked against, so that its
    /// refusal costs what a wrong password of a real user costs: the first
    /// user's hash (same parameters), or one made at start-up; none without
    /// a credentials file, where every CONNECT is accepted unchecked.
    decoy: Option<Arc<str>>,
}

/// A connection's view of the credentials: the grants checks of the
/// publish and subscribe paths, on the snapshot of one generation.
#[derive(Debug, Clone)]
pub struct Grants {
    generation: u64,
    snap: Arc<Snapshot>,
}

type HmacSha1 = Hmac<sha1::Sha1>;

impl Auth {
    /// Without a file: every client may connect, whatever user name it
    /// sends, and do anything.
    pub fn open(login: &LoginConfig, registry: &prometheus::Registry) -> Result<Self> {
        Ok(Self {
            path: None,
            snapshot: RwLock::new(Arc::new(Snapshot {
                anonymous_allowed: true,
                ..Snapshot::default()
            })),
            generation: AtomicU64::new(0),
            modified: Mutex::new(None),
            login: Login::new(login, registry)?,
            decoy: None,
        })
    }

    /// Loads the credentials file; an error here stops the start-up.
    pub fn from_file(
        path: &Path,
        login: &LoginConfig,
        registry: &prometheus::Registry,
    ) -> Result<Self> {
        let (snapshot, modified) = load(path)?;
        Ok(Self {
            path: Some(path.to_owned()),
            snapshot: RwLock::new(Arc::new(snapshot)),
            generation: AtomicU64::new(0),
            modified: Mutex::new(modified),
            login: Login::new(login, registry)?,
            decoy: Some(decoy()?),
        })
    }

    /// The login checks (limits, refusal log).
    pub fn login(&self) -> &Login {
        &self.login
    }

    /// The current grants, for a connection to keep.
    pub fn grants(&self) -> Grants {
        // Generation first: a reload in between makes the view look stale
        // and it is fetched again, never the other way round.
        let generation = self.generation.load(Ordering::Acquire);
        Grants {
            generation,
            snap: self.current(),
        }
    }

    /// Whether `grants` still reflect the current credentials.
    pub fn is_current(&self, grants: &Grants) -> bool {
        self.generation.load(Ordering::Acquire) == grants.generation
    }

    fn current(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reads the file again if it changed. A broken new version is reported
    /// and the previous credentials stay in force.
    pub fn reload_if_changed(&self) -> Result<bool> {
        let Some(path) = &self.path else {
            return Ok(false);
        };
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        {
            let last = self.modified.lock().unwrap_or_else(|e| e.into_inner());
            if *last == modified {
                return Ok(false);
            }
        }
        let (snapshot, modified) = load(path)?;
        *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(snapshot);
        self.generation.fetch_add(1, Ordering::AcqRel);
        *self.modified.lock().unwrap_or_else(|e| e.into_inner()) = modified;
        Ok(true)
    }

    /// Authenticates a CONNECT (A1, A2, A5) from `ip`. `client_id` has
    /// passed the Client ID rules already. Password checks run on the login
    /// pool, never on the caller's thread; every refusal of a named login
    /// costs one verification (a decoy where nothing real was checked), so
    /// that its timing does not tell whether the name exists.
    pub async fn authenticate(
        &self,
        client_id: &str,
        username: Option<&str>,
        password: Option<&[u8]>,
        ip: Option<std::net::IpAddr>,
    ) -> std::result::Result<Identity, Refusal> {
        let group_id = client_id.split_once("@@@").map(|(g, _)| g);
        let generation = self.generation.load(Ordering::Acquire);
        let snap = self.current();
        if !snap.groups.is_empty() && !group_id.is_some_and(|g| snap.groups.contains(g)) {
            return Err(Refusal::UnknownGroup);
        }
        let Some(username) = username.filter(|u| !u.is_empty()) else {
            return if snap.anonymous_allowed {
                Ok(Identity::Anonymous)
            } else {
                Err(Refusal::NotAuthorized)
            };
        };
        if self.path.is_none() {
            // No credentials file: a user name means nothing here.
            return Ok(Identity::Anonymous);
        }
        let password = password.unwrap_or_default();
        // A user name and password that passed lately get in even while
        // the name is over its failure limit: the devices of a fleet sharing
        // it are not locked out by the one with a wrong password.
        if snap.users.contains_key(username)
            && self.login.remembered(generation, username, password)
        {
            // Not a new proof: the name's failure count stays.
            return Ok(Identity::User(Arc::from(username)));
        }
        let Some(priority) = self.login.admit(username, ip) else {
            return Err(Refusal::TooManyFailures);
        };
        let verdict = self
            .check(
                &snap, generation, client_id, group_id, username, password, priority,
            )
            .await;
        match verdict {
            Ok(_) => self.login.succeeded(username),
            Err(Refusal::BadCredentials | Refusal::NotAuthorized) => {
                self.login.failed(username, ip);
            }
            Err(_) => {}
        }
        verdict
    }

    #[allow(clippy::too_many_arguments)] // one CONNECT's facts, checked in one place
    async fn check(
        &self,
        snap: &Snapshot,
        generation: u64,
        client_id: &str,
        group_id: Option<&str>,
        username: &str,
        password: &[u8],
        priority: Priority,
    ) -> std::result::Result<Identity, Refusal> {
        let busy = |Busy| Refusal::Busy;
        if let Some(user) = snap.users.get(username) {
            let hash = user.password_hash.0.clone();
            let ok = self
                .login
                .verify(generation, username, hash, password, priority)
                .await
                .map_err(busy)?;
            return if ok {
                Ok(Identity::User(Arc::from(username)))
            } else {
                Err(Refusal::BadCredentials)
            };
        }
        let refusal = if let Some(rest) = username.strip_prefix("Token|") {
            // Token mode: `Token|AccessKey|InstanceId`; the tokens follow.
            let ak = rest.split('|').next().unwrap_or_default();
            if snap.keys.contains_key(ak) {
                return Ok(Identity::Token(Arc::from(ak)));
            }
            Refusal::NotAuthorized
        } else if let Some(key) = snap.keys.get(signature_access_key(username)) {
            // Signature mode (A2): Base64(HmacSHA1(SecretKey, GroupID)) as the
            // seeds sign it, or over the whole Client ID as newer clients do.
            let given = base64::engine::general_purpose::STANDARD
                .decode(password)
                .unwrap_or_default();
            let valid = group_id
                .into_iter()
                .chain([client_id])
                .any(|data| verify_hmac(key.secret_key.0.as_bytes(), data.as_bytes(), &given));
            if valid {
                return Ok(Identity::AccessKey(Arc::from(signature_access_key(
                    username,
                ))));
            }
            Refusal::BadCredentials
        } else {
            Refusal::BadCredentials
        };
        if let Some(hash) = self.decoy_hash(snap) {
            self.login
                .decoy(hash, password, priority)
                .await
                .map_err(busy)?;
        }
        Err(refusal)
    }

    fn decoy_hash(&self, snap: &Snapshot) -> Option<Arc<str>> {
        match snap.users.values().next() {
            Some(u) => Some(u.password_hash.0.clone()),
            None => self.decoy.clone(),
        }
    }

    /// Whether `signature` is Base64(HmacSHA1(SecretKey of `ak`, `data`)):
    /// the token service's request signature.
    pub fn verify_request(&self, ak: &str, data: &str, signature: &str) -> bool {
        let snap = self.current();
        let Some(key) = snap.keys.get(ak) else {
            return false;
        };
        base64::engine::general_purpose::STANDARD
            .decode(signature)
            .is_ok_and(|tag| verify_hmac(key.secret_key.0.as_bytes(), data.as_bytes(), &tag))
    }
}

impl Grants {
    /// Whether an AccessKey is still configured (a token outlives no key).
    pub fn has_access_key(&self, ak: &str) -> bool {
        self.snap.keys.contains_key(ak)
    }

    /// Whether `who` may publish to `topic`.
    pub fn may_publish(&self, who: &Identity, topic: &str) -> bool {
        let Some(grants) = self.snap.grants(who) else {
            return true;
        };
        !grants
            .iter()
            .any(|g| g.action == Action::Deny && topic::matches(&g.filter, topic))
            && grants.iter().any(|g| {
                matches!(g.action, Action::Pub | Action::Pubsub) && topic::matches(&g.filter, topic)
            })
    }

    /// Whether `who` may subscribe to `filter` (a `$share/<group>/` prefix is
    /// judged by the filter behind it).
    pub fn may_subscribe(&self, who: &Identity, filter: &str) -> bool {
        let Some(grants) = self.snap.grants(who) else {
            return true;
        };
        let filter = topic::parse_filter(filter, usize::MAX, false)
            .map(|f| f.filter)
            .unwrap_or(filter);
        !grants
            .iter()
            .any(|g| g.action == Action::Deny && topic::filters_overlap(&g.filter, filter))
            && grants.iter().any(|g| {
                matches!(g.action, Action::Sub | Action::Pubsub)
                    && topic::filter_covers(&g.filter, filter)
            })
    }
}

/// Constant-time check of an HMAC-SHA1 tag.
fn verify_hmac(key: &[u8], data: &[u8], tag: &[u8]) -> bool {
    HmacSha1::new_from_slice(key).is_ok_and(|mut mac| {
        mac.update(data);
        mac.verify_slice(tag).is_ok()
    })
}

/// The AccessKey of a signature-mode user name: the name itself, or its
/// second field in the `Signature|AccessKey|InstanceId` form.
fn signature_access_key(username: &str) -> &str {
    let mut parts = username.split('|');
    match (parts.next(), parts.next()) {
        (Some("Signature"), Some(key)) => key,
        _ => username,
    }
}

/// The decoy hash of a node whose credentials name no user, made once at
/// start-up (hashing costs what a verification does; never on a worker).
fn decoy() -> Result<Arc<str>> {
    hash_password("ringmq decoy password")
        .map(Arc::from)
        .map_err(|reason| AuthError::Invalid {
            path: PathBuf::from("<decoy>"),
            reason,
        })
}

fn load(path: &Path) -> Result<(Snapshot, Option<SystemTime>)> {
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let text = std::fs::read_to_string(path).map_err(|error| AuthError::Read {
        path: path.to_owned(),
        error,
    })?;
    let file: CredentialsFile = if text.trim().is_empty() {
        CredentialsFile::default()
    } else {
        serde_yaml::from_str(&text).map_err(|error| AuthError::Parse {
            path: path.to_owned(),
            error,
        })?
    };
    Ok((Snapshot::from_file(path, file)?, modified))
}

/// A PHC argon2id hash of a password, for the credentials file.
pub fn hash_password(password: &str) -> std::result::Result<String, String> {
    use argon2::password_hash::{PasswordHasher, SaltString, rand_core::OsRng};
    let salt = SaltString::generate(&mut OsRng);
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Computed with Python's hmac module, the way the seed's Python sample
    /// signs: base64(hmac.new(b"XXXX", b"GID_AAA", sha1).digest()).
    #[test]
    fn signature_matches_the_seed_algorithm() {
        let tag = base64::engine::general_purpose::STANDARD
            .decode("2rJinBsSwnDo+VPfYZyvsRUxaTI=")
            .unwrap_or_default();
        assert!(verify_hmac(b"XXXX", b"GID_AAA", &tag));
        assert!(!verify_hmac(b"XXXY", b"GID_AAA", &tag));
    }

    #[test]
    fn secrets_do_not_show_in_debug_output() {
        let s = Secret(Arc::from("hunter2"));
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn signature_user_name_forms() {
        assert_eq!(signature_access_key("AK1"), "AK1");
        assert_eq!(signature_access_key("Signature|AK1|inst"), "AK1");
    }
}
