//! The token service's HTTP operations (A3): apply, revoke, query, answering
//! `{success, message, code, tokenData}` with the seed's codes.

use serde::Serialize;

use crate::broker::Broker;
use crate::message::now_ms;
use crate::token::{self, TokenType};
use crate::topic;

/// The answer of every token operation.
#[derive(Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Answer {
    pub success: bool,
    pub message: String,
    pub code: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_data: Option<String>,
}

impl Answer {
    fn ok(message: &str, token: Option<String>) -> Self {
        Self {
            success: true,
            message: message.to_owned(),
            code: 200,
            token_data: token,
        }
    }

    fn err(code: i32, message: impl Into<String>) -> Self {
        Self {
            success: false,
            message: message.into(),
            code,
            token_data: None,
        }
    }
}

/// Seed codes of the token service.
const PARAMETER_ERROR: i32 = 400;
const SIGNATURE_ERROR: i32 = 407;
const GENERATION_ERROR: i32 = 409;
const REVOCATION_ERROR: i32 = 410;

/// Decodes `application/x-www-form-urlencoded` pairs.
pub fn parse_form(input: &[u8]) -> Vec<(String, String)> {
    input
        .split(|b| *b == b'&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let mut kv = pair.splitn(2, |b| *b == b'=');
            let k = kv.next().unwrap_or_default();
            let v = kv.next().unwrap_or_default();
            (percent_decode(k, true), percent_decode(v, true))
        })
        .collect()
}

/// Decodes `%XX` escapes (and `+` as a space in forms); a malformed escape
/// stays as it is.
pub fn percent_decode(s: &[u8], plus_is_space: bool) -> String {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'+' if plus_is_space => out.push(b' '),
            b'%' => {
                let hex = s
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty())
}

/// Runs one operation.
pub fn handle(broker: &Broker, op: &str, params: &[(String, String)]) -> Answer {
    let Some(tokens) = broker.tokens() else {
        return Answer::err(PARAMETER_ERROR, "token service not configured");
    };
    let (Some(ak), Some(signature)) = (param(params, "accessKey"), param(params, "signature"))
    else {
        return Answer::err(PARAMETER_ERROR, "accessKey and signature are required");
    };
    let signed: &[&str] = match op {
        "apply" => &["actions", "resources", "expireTime", "serviceName"],
        "revoke" | "query" => &["token"],
        _ => return Answer::err(PARAMETER_ERROR, format!("unknown operation {op:?}")),
    };
    let mut values = Vec::new();
    for name in signed {
        match param(params, name) {
            Some(v) => values.push((*name, v)),
            None => return Answer::err(PARAMETER_ERROR, format!("{name} is required")),
        }
    }
    if !broker
        .auth()
        .verify_request(ak, &token::canonical(&values), signature)
    {
        return Answer::err(SIGNATURE_ERROR, "signature does not match");
    }
    let get = |name: &str| param(params, name).unwrap_or_default();
    match op {
        "apply" => apply(
            broker,
            tokens,
            ak,
            get("actions"),
            get("resources"),
            get("expireTime"),
            get("serviceName"),
        ),
        "revoke" => match tokens.revoke(get("token")) {
            Ok(claims) => {
                // Every node verifies tokens: every node learns the revocation.
                if let Some(c) = broker.peers() {
                    c.broadcast(crate::peers::PeerMsg::Revoked {
                        id: claims.id.clone(),
                        exp_ms: claims.exp,
                    });
                }
                Answer::ok("token revoked", None)
            }
            Err(e) => Answer::err(
                REVOCATION_ERROR,
                format!("revocation failed: {e} ({})", e.code()),
            ),
        },
        _ => match tokens.verify(get("token")) {
            Ok(c) => Answer::ok(&format!("token valid until {}", c.exp), None),
            Err(e) => Answer::err(e.code(), e.to_string()),
        },
    }
}

fn apply(
    broker: &Broker,
    tokens: &token::TokenService,
    ak: &str,
    actions: &str,
    resources: &str,
    expire: &str,
    service: &str,
) -> Answer {
    if service != "mq" {
        return Answer::err(PARAMETER_ERROR, "serviceName must be mq");
    }
    let mut act = Vec::new();
    for a in actions.split(',') {
        match TokenType::parse(a.trim()) {
            Some(t) => act.push(t),
            None => {
                return Answer::err(
                    PARAMETER_ERROR,
                    format!("unknown action {a:?} (R, W or RW)"),
                );
            }
        }
    }
    let res: Vec<String> = resources.split(',').map(|r| r.trim().to_owned()).collect();
    for r in &res {
        if topic::parse_filter(r, broker.config().limits.max_topic_length, false).is_err() {
            return Answer::err(PARAMETER_ERROR, format!("invalid resource {r:?}"));
        }
    }
    let Ok(exp) = expire.parse::<u64>() else {
        return Answer::err(PARAMETER_ERROR, "expireTime must be epoch milliseconds");
    };
    let now = now_ms();
    let min_ms = broker
        .config()
        .auth
        .token_min_lifetime_secs
        .saturating_mul(1000);
    if exp < now + min_ms {
        return Answer::err(
            PARAMETER_ERROR,
            format!("expireTime must be at least {} s ahead", min_ms / 1000),
        );
    }
    let exp = exp.min(now + token::MAX_LIFETIME_MS);
    let token = tokens.issue(ak, res, act, exp);
    if token.is_empty() {
        return Answer::err(GENERATION_ERROR, "token generation failed");
    }
    Answer::ok("token issued", Some(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_decode() {
        assert_eq!(
            parse_form(b"a=1&resources=t%2F1%2Ct2&x=a+b&bad=%zz"),
            [
                ("a".to_string(), "1".to_string()),
                ("resources".to_string(), "t/1,t2".to_string()),
                ("x".to_string(), "a b".to_string()),
                ("bad".to_string(), "%zz".to_string()),
            ]
        );
    }
}
