//! The operator's view of the broker pods: their operations API (status,
//! per-node table, alarms) and the drain call of a scale-down.

use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::brokerconfig::ports;
use crate::names::Names;

/// Errors talking to a broker pod.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("{addr}: {error}")]
    Io { addr: String, error: std::io::Error },
    #[error("{addr}: no answer within {0:?}", ANSWER)]
    Timeout { addr: String },
    #[error("{addr}: HTTP {status}: {body}")]
    Status {
        addr: String,
        status: u16,
        body: String,
    },
    #[error("{addr}: malformed answer")]
    Malformed { addr: String },
}

pub type Result<T> = std::result::Result<T, BrokerError>;

/// How long one call may take.
const ANSWER: Duration = Duration::from_secs(5);

/// What the reconciler asks of broker pods.
pub trait Brokers: Send + Sync {
    /// `GET /api/v1/{path}` on pod `ordinal`.
    fn get(
        &self,
        names: &Names,
        ordinal: i32,
        path: &str,
        token: &str,
    ) -> BoxFuture<'static, Result<Value>>;
    /// `POST /cluster/drain` on pod `ordinal`.
    fn drain(&self, names: &Names, ordinal: i32, token: &str) -> BoxFuture<'static, Result<()>>;
}

/// Where pod `ordinal`'s admin port is.
pub trait Locate: Send + Sync {
    fn admin_addr(&self, names: &Names, ordinal: i32) -> String;
}

/// In the cluster: the pod's DNS name under the headless Service.
#[derive(Debug, Clone, Copy, Default)]
pub struct PodDns;

impl Locate for PodDns {
    fn admin_addr(&self, names: &Names, ordinal: i32) -> String {
        format!("{}:{}", names.pod_host(ordinal), ports::ADMIN)
    }
}

/// Plain HTTP/1.1 to the admin port (it has no TLS; it is reached on the
/// pod network only).
#[derive(Debug, Clone)]
pub struct Http<L> {
    pub locate: L,
}

impl<L: Locate> Brokers for Http<L> {
    fn get(
        &self,
        names: &Names,
        ordinal: i32,
        path: &str,
        token: &str,
    ) -> BoxFuture<'static, Result<Value>> {
        let addr = self.locate.admin_addr(names, ordinal);
        let request = format!("GET /api/v1/{path}");
        let token = token.to_owned();
        Box::pin(async move {
            let body = call(&addr, &request, &token).await?;
            serde_json::from_str(&body).map_err(|_| BrokerError::Malformed { addr })
        })
    }

    fn drain(&self, names: &Names, ordinal: i32, token: &str) -> BoxFuture<'static, Result<()>> {
        let addr = self.locate.admin_addr(names, ordinal);
        let token = token.to_owned();
        Box::pin(async move { call(&addr, "POST /cluster/drain", &token).await.map(drop) })
    }
}

async fn call(addr: &str, request_line: &str, token: &str) -> Result<String> {
    let io = |error| BrokerError::Io {
        addr: addr.to_owned(),
        error,
    };
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.map_err(io)?;
        let request = format!(
            "{request_line} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        s.write_all(request.as_bytes()).await.map_err(io)?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.map_err(io)?;
        Ok::<_, BrokerError>(raw)
    };
    let raw =
        tokio::time::timeout(ANSWER, exchange)
            .await
            .map_err(|_| BrokerError::Timeout {
                addr: addr.to_owned(),
            })??;
    let text = String::from_utf8_lossy(&raw);
    let malformed = || BrokerError::Malformed {
        addr: addr.to_owned(),
    };
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(malformed)?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(malformed)?;
    if !(200..300).contains(&status) {
        return Err(BrokerError::Status {
            addr: addr.to_owned(),
            status,
            body: body.chars().take(200).collect(),
        });
    }
    Ok(body.to_owned())
}
