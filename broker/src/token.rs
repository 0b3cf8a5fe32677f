//! Token mode (SPEC A3): the token service and token verification.
//!
//! An application server holding an AccessKey/SecretKey pair asks the token
//! service (`/token/apply`, `/token/revoke`, `/token/query` on the admin port)
//! for short-lived tokens bound to topics and actions. Each request is signed
//! the seed's way: the signed parameters as sorted `key=value` pairs (values of
//! one parameter sorted and joined by commas) joined by `&`, HmacSHA1 with the
//! SecretKey, Base64. A token is `v1.<payload>.<mac>`, both parts base64url,
//! the MAC an HMAC-SHA256 under the node's token signing key, so any node with
//! that key verifies it without asking the one that issued it.

use std::collections::HashMap;
use std::sync::Mutex;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use serde::{Deserialize, Serialize};

use crate::message::now_ms;
use crate::secret_file::SecretFile;
use crate::topic;

/// Longest token lifetime; longer requests are capped.
pub const MAX_LIFETIME_MS: u64 = 30 * 24 * 3600 * 1000;

/// Why a token is not accepted: the codes of `$SYS/tokenInvalidNotice`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("forged token")]
    Forged,
    #[error("token expired")]
    Expired,
    #[error("token revoked")]
    Revoked,
    #[error("resource does not match the token")]
    ResourceMismatch,
    #[error("action does not match the token")]
    ActionMismatch,
    #[error("token signature invalid")]
    BadSignature,
    #[error("account not permitted")]
    Account,
}

pub type Result<T> = std::result::Result<T, TokenError>;

impl TokenError {
    /// The seed's numeric code.
    pub fn code(self) -> i32 {
        match self {
            TokenError::Forged => 1,
            TokenError::Expired => 2,
            TokenError::Revoked => 3,
            TokenError::ResourceMismatch => 4,
            TokenError::ActionMismatch => 5,
            TokenError::BadSignature => 8,
            TokenError::Account => -1,
        }
    }
}

/// Token permission: R (subscribe), W (publish), RW (both).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TokenType {
    R,
    W,
    RW,
}

impl TokenType {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "R" => Some(Self::R),
            "W" => Some(Self::W),
            "RW" => Some(Self::RW),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::R => "R",
            Self::W => "W",
            Self::RW => "RW",
        }
    }

    pub fn reads(self) -> bool {
        matches!(self, Self::R | Self::RW)
    }

    pub fn writes(self) -> bool {
        matches!(self, Self::W | Self::RW)
    }
}

/// What a token grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Unique id, the key of revocation.
    pub id: String,
    /// AccessKey that applied for it.
    pub ak: String,
    /// Topic filters (wildcards allowed).
    pub res: Vec<String>,
    pub act: Vec<TokenType>,
    /// Expiry, milliseconds since the Unix epoch.
    pub exp: u64,
}

impl Claims {
    pub fn may_write(&self, topic: &str) -> Result<()> {
        self.check(|t| t.writes(), |f| topic::matches(f, topic))
    }

    pub fn may_read(&self, filter: &str) -> Result<()> {
        self.check(|t| t.reads(), |f| topic::filter_covers(f, filter))
    }

    fn check(
        &self,
        action: impl Fn(TokenType) -> bool,
        resource: impl Fn(&str) -> bool,
    ) -> Result<()> {
        if !self.res.iter().any(|r| resource(r)) {
            return Err(TokenError::ResourceMismatch);
        }
        if !self.act.iter().any(|a| action(*a)) {
            return Err(TokenError::ActionMismatch);
        }
        Ok(())
    }
}

/// Issues, verifies and revokes tokens.
pub struct TokenService {
    key: SecretFile,
    /// Revoked token ids with their expiry, forgotten once expired.
    revoked: Mutex<HashMap<String, u64>>,
}

impl std::fmt::Debug for TokenService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenService").finish_non_exhaustive()
    }
}

impl TokenService {
    pub fn new(signing_key: SecretFile) -> Self {
        Self {
            key: signing_key,
            revoked: Mutex::new(HashMap::new()),
        }
    }

    /// The signing key file, read again when it changes (rotation).
    pub fn key_file(&self) -> &SecretFile {
        &self.key
    }

    fn mac_key(&self) -> ring::hmac::Key {
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.key.get())
    }

    /// Issues a token; `exp` is already validated and capped.
    pub fn issue(&self, ak: &str, res: Vec<String>, act: Vec<TokenType>, exp: u64) -> String {
        let mut id = [0u8; 12];
        // The id only needs to be unique: a failed random read falls back to
        // the time, which is unique enough within one node.
        if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id).is_err() {
            id[..8].copy_from_slice(&now_ms().to_be_bytes());
        }
        let claims = Claims {
            id: B64URL.encode(id),
            ak: ak.to_owned(),
            res,
            act,
            exp,
        };
        let payload = serde_json::to_vec(&claims).unwrap_or_default();
        let payload = B64URL.encode(payload);
        let mac = ring::hmac::sign(&self.mac_key(), payload.as_bytes());
        format!("v1.{payload}.{}", B64URL.encode(mac.as_ref()))
    }

    /// Checks a token's form, MAC, expiry and revocation.
    pub fn verify(&self, token: &str) -> Result<Claims> {
        let mut parts = token.split('.');
        let (Some("v1"), Some(payload), Some(mac), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Forged);
        };
        let mac = B64URL.decode(mac).map_err(|_| TokenError::Forged)?;
        ring::hmac::verify(&self.mac_key(), payload.as_bytes(), &mac)
            .map_err(|_| TokenError::BadSignature)?;
        let claims: Claims = B64URL
            .decode(payload)
            .ok()
            .and_then(|p| serde_json::from_slice(&p).ok())
            .ok_or(TokenError::Forged)?;
        if claims.exp <= now_ms() {
            return Err(TokenError::Expired);
        }
        if self.is_revoked(&claims.id) {
            return Err(TokenError::Revoked);
        }
        Ok(claims)
    }

    pub fn is_revoked(&self, id: &str) -> bool {
        self.revoked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(id)
    }

    /// Revokes a valid token.
    pub fn revoke(&self, token: &str) -> Result<Claims> {
        let claims = self.verify(token)?;
        self.revoke_id(&claims.id, claims.exp);
        Ok(claims)
    }

    /// Records a revocation by token id (one another node made); kept until
    /// the token would have expired anyway.
    pub fn revoke_id(&self, id: &str, exp: u64) {
        let mut revoked = self.revoked.lock().unwrap_or_else(|e| e.into_inner());
        let now = now_ms();
        revoked.retain(|_, exp| *exp > now);
        if exp > now {
            revoked.insert(id.to_owned(), exp);
        }
    }

    /// The revocations in force: (token id, expiry).
    pub fn revocations(&self) -> Vec<(String, u64)> {
        let now = now_ms();
        self.revoked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, exp)| **exp > now)
            .map(|(id, exp)| (id.clone(), *exp))
            .collect()
    }
}

/// The seed's request signature base: the signed parameters as sorted
/// `key=value` pairs, the comma-separated values of each sorted, joined by `&`.
pub fn canonical(params: &[(&str, &str)]) -> String {
    let mut pairs: Vec<String> = params
        .iter()
        .map(|(k, v)| {
            let mut values: Vec<&str> = v.split(',').collect();
            values.sort_unstable();
            format!("{k}={}", values.join(","))
        })
        .collect();
    pairs.sort_unstable();
    pairs.join("&")
}

/// A refused token as the client sees it (the notice on `$SYS/tokenInvalidNotice`).
pub fn invalid_notice(err: TokenError, ty: TokenType) -> String {
    serde_json::json!({"code": err.code(), "type": ty.as_str()}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// From the seed's prose example of the request signature.
    #[test]
    fn canonical_form_sorts_pairs_and_values() {
        assert_eq!(
            canonical(&[("parama", "a"), ("paramc", "c2,c1"), ("paramb", "b2,b1,b3")]),
            "parama=a&paramb=b1,b2,b3&paramc=c1,c2"
        );
    }

    fn service(key: &str) -> (tempfile::TempDir, TokenService) {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("key");
        std::fs::write(&path, key).unwrap_or_else(|e| panic!("{e}"));
        let file = SecretFile::load(&path).unwrap_or_else(|e| panic!("{e}"));
        (dir, TokenService::new(file))
    }

    #[test]
    fn tokens_verify_expire_and_revoke() {
        let (_d1, svc) = service("signing key");
        let exp = now_ms() + 120_000;
        let t = svc.issue("AK", vec!["a/#".into()], vec![TokenType::W], exp);
        let claims = svc.verify(&t).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(claims.may_write("a/b"), Ok(()));
        assert_eq!(claims.may_write("b/a"), Err(TokenError::ResourceMismatch));
        assert_eq!(claims.may_read("a/b"), Err(TokenError::ActionMismatch));
        let (_d2, other) = service("other key");
        assert_eq!(other.verify(&t), Err(TokenError::BadSignature));
        assert_eq!(svc.verify("garbage"), Err(TokenError::Forged));
        let tampered = t.replacen("v1.", "v1.x", 1);
        assert_eq!(svc.verify(&tampered).err(), Some(TokenError::BadSignature));
        let old = svc.issue("AK", vec!["a".into()], vec![TokenType::R], now_ms() - 1);
        assert_eq!(svc.verify(&old), Err(TokenError::Expired));
        assert!(svc.revoke(&t).is_ok());
        assert_eq!(svc.verify(&t), Err(TokenError::Revoked));
    }
}
