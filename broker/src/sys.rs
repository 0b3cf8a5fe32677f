//! System topics a client publishes to in order to talk to the broker itself:
//! `$SYS/getOfflineMsg` (B6) and `$SYS/enableOrderMsg` (B11).

use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::connection::Connection;

pub const GET_OFFLINE_MSG: &str = "$SYS/getOfflineMsg";
pub const ENABLE_ORDER_MSG: &str = "$SYS/enableOrderMsg";

/// Why a system-topic request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SysError {
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("too many offline pulls (at most {0} a second)")]
    RateLimited(u32),
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
    topic == GET_OFFLINE_MSG || topic == ENABLE_ORDER_MSG
}

/// Handles a publish to a system topic.
pub fn handle(conn: &Connection, topic: &str, payload: &[u8]) -> Result<()> {
    match topic {
        GET_OFFLINE_MSG => pull(conn, payload),
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
            conn.session.lock().ordered = on;
            Ok(())
        }
        other => Err(SysError::Malformed(format!("unknown system topic {other}"))),
    }
}

/// `$SYS/getOfflineMsg`: moves up to `maxPushNum` offline messages, oldest or
/// newest first, to the connection's queue and stops the automatic push.
fn pull(conn: &Connection, payload: &[u8]) -> Result<()> {
    let req: PullRequest =
        serde_json::from_slice(payload).map_err(|e| SysError::Malformed(e.to_string()))?;
    if !(1..=30).contains(&req.max_push_num) {
        return Err(SysError::Malformed("maxPushNum must be 1..30".into()));
    }
    let limit = conn.broker.config.limits.offline_pulls_per_sec;
    let now = Instant::now();
    let (start, count) = conn.pulls.get();
    let (start, count) = if now.duration_since(start) >= Duration::from_secs(1) {
        (now, 0)
    } else {
        (start, count)
    };
    if count >= limit {
        conn.broker.metrics.reject("offline_pull_rate");
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
