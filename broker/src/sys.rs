//! System topics a client publishes to in order to talk to the broker itself:
//! `$SYS/getOfflineMsg` (B6), `$SYS/enableOrderMsg` (B11) and
//! `$SYS/uploadToken` (A3); and the notices the broker sends in token mode.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ntex::util::{ByteString, Bytes};
use serde::Deserialize;

use crate::auth::Identity;
use crate::broker::Broker;
use crate::connection::Connection;
use crate::message::{QoS, now_ms};
use crate::session::{Delivery, Session};
use crate::token::{Claims, TokenError, TokenType};

pub const GET_OFFLINE_MSG: &str = "$SYS/getOfflineMsg";
pub const ENABLE_ORDER_MSG: &str = "$SYS/enableOrderMsg";
pub const UPLOAD_TOKEN: &str = "$SYS/uploadToken";
pub const TOKEN_EXPIRE_NOTICE: &str = "$SYS/tokenExpireNotice";
/// How long a connection stays open after a token invalid notice, so that
/// the notice reaches the client before the close.
pub const NOTICE_LINGER: std::time::Duration = std::time::Duration::from_millis(100);

pub const TOKEN_INVALID_NOTICE: &str = "$SYS/tokenInvalidNotice";

/// The expiry notice goes out this long before a token expires.
const EXPIRE_NOTICE_LEAD_MS: u64 = 5 * 60 * 1000;

/// Why a system-topic request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SysError {
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("too many offline pulls (at most {0} a second)")]
    RateLimited(u32),
    #[error("token refused: {0}")]
    Token(TokenError, TokenType),
}

pub type Result<T> = std::result::Result<T, SysError>;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PullRequest {
    push_order: PushOrder,
    max_push_num: u32,
}

#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
enum PushOrder {
    Asc,
    Desc,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OrderRequest {
    order: String,
}

/// Whether the topic is one the broker answers itself.
pub fn is_sys_request(topic: &str) -> bool {
    topic == GET_OFFLINE_MSG || topic == ENABLE_ORDER_MSG || topic == UPLOAD_TOKEN
}

/// Handles a publish to a system topic.
pub fn handle(conn: &Connection, topic: &str, payload: &[u8]) -> Result<()> {
    match topic {
        GET_OFFLINE_MSG => pull(conn, payload),
        UPLOAD_TOKEN => upload_token(conn, payload),
        ENABLE_ORDER_MSG => {
            let req: OrderRequest =
                serde_json::from_slice(payload).map_err(|e| SysError::Malformed(e.to_string()))?;
            let on = match req.order.as_str() {
                "true" => true,
                "false" => false,
                other => {
                    return Err(SysError::Malformed(format!(
                        "order must be \"true\" or \"false\", got {other:?}"
                    )));
                }
            };
            let mut st = conn.session.lock();
            st.ordered = on;
            conn.session.save(&st, None);
            Ok(())
        }
        other => Err(SysError::Malformed(format!("unknown system topic {other}"))),
    }
}

#[derive(Debug, Deserialize)]
struct UploadRequest {
    /// The seed's table spells it `Token`, its sample code `token`.
    #[serde(alias = "Token")]
    token: String,
    #[serde(rename = "type")]
    ty: String,
}

/// `$SYS/uploadToken`: verifies a token and gives its rights to the
/// connection (one token per type); the first one releases offline messages.
fn upload_token(conn: &Connection, payload: &[u8]) -> Result<()> {
    let req: UploadRequest =
        serde_json::from_slice(payload).map_err(|e| SysError::Malformed(e.to_string()))?;
    let ty = TokenType::parse(&req.ty)
        .ok_or_else(|| SysError::Malformed("type must be R, W or RW".into()))?;
    let Identity::Token(ak) = &conn.identity else {
        return Err(SysError::Token(TokenError::Account, ty));
    };
    let service = conn
        .broker
        .tokens()
        .ok_or(SysError::Token(TokenError::Account, ty))?;
    let claims = service
        .verify(&req.token)
        .map_err(|e| SysError::Token(e, ty))?;
    if *claims.ak != **ak {
        return Err(SysError::Token(TokenError::Account, ty));
    }
    let covers = claims.act.iter().any(|a| *a == ty || *a == TokenType::RW);
    if !covers {
        return Err(SysError::Token(TokenError::ActionMismatch, ty));
    }
    install_token(conn, ty, claims);
    Ok(())
}

/// Gives a verified token's rights to the connection and schedules its
/// expiry notice.
pub fn install_token(conn: &Connection, ty: TokenType, claims: Claims) {
    let (id, exp) = (claims.id.clone(), claims.exp);
    let mut st = conn.session.lock();
    st.tokens.insert(ty, claims);
    st.offline_hold = false;
    drop(st);
    conn.conn.wake.notify_one();
    let session = conn.session.clone();
    let broker = conn.broker.clone();
    let generation = conn.conn.generation;
    let wait = exp
        .saturating_sub(now_ms())
        .saturating_sub(EXPIRE_NOTICE_LEAD_MS);
    ntex::rt::spawn(async move {
        ntex::time::sleep(Duration::from_millis(wait)).await;
        let current = {
            let st = session.lock();
            st.attached
                .as_ref()
                .is_some_and(|c| c.generation == generation)
                && st.tokens.get(&ty).is_some_and(|c| c.id == id)
        };
        if current {
            let body = serde_json::json!({"expireTime": exp, "type": ty.as_str()}).to_string();
            notify(&broker, &session, TOKEN_EXPIRE_NOTICE, body);
        }
    });
}

/// Sends a broker notice to one session, like a P2P message.
fn notify(broker: &Broker, session: &Session, topic: &'static str, body: String) {
    let msg = broker.message(
        ByteString::from_static(topic),
        Bytes::from(body.into_bytes()),
        QoS::AtLeastOnce,
        false,
        Arc::from(""),
    );
    broker.offer(session, Delivery::new(Arc::new(msg), QoS::AtLeastOnce));
}

/// `$SYS/getOfflineMsg`: moves up to `maxPushNum` offline messages, oldest or
/// newest first, to the connection's queue and stops the automatic push.
fn pull(conn: &Connection, payload: &[u8]) -> Result<()> {
    let req: PullRequest =
        serde_json::from_slice(payload).map_err(|e| SysError::Malformed(e.to_string()))?;
    if !(1..=30).contains(&req.max_push_num) {
        return Err(SysError::Malformed("maxPushNum must be 1..30".into()));
    }
    let limit = conn.broker.config().limits.offline_pulls_per_sec;
    let now = Instant::now();
    let (start, count) = conn.pulls.get();
    let (start, count) = if now.duration_since(start) >= Duration::from_secs(1) {
        (now, 0)
    } else {
        (start, count)
    };
    if count >= limit {
        conn.broker.metrics().reject("offline_pull_rate");
        return Err(SysError::RateLimited(limit));
    }
    conn.pulls.set((start, count + 1));
    let n = usize::try_from(req.max_push_num).unwrap_or(30);
    let mut st = conn.session.lock();
    st.pull_mode = true;
    let n = n.min(st.offline.len());
    let taken: Vec<_> = if req.push_order == PushOrder::Asc {
        st.offline.drain(..n).collect()
    } else {
        let len = st.offline.len();
        st.offline.drain(len - n..).rev().collect()
    };
    // Pulled messages go before live ones: they are older.
    for d in taken.into_iter().rev() {
        st.queue.push_front(d);
    }
    drop(st);
    conn.conn.wake.notify_one();
    Ok(())
}
