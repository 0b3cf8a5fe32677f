//! A minimal HTTP/1.1 client for the admin port: one request per connection,
//! plain TCP (the admin port has no TLS; from outside the cluster reach it
//! with `kubectl port-forward`).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Errors talking to the admin port.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("server must look like http://host:port, got {0}")]
    Server(String),
    #[error("cannot reach {server}: {error}")]
    Connect {
        server: String,
        error: std::io::Error,
    },
    #[error("malformed answer from the broker")]
    Malformed,
    #[error("{status}: {message}")]
    Status { status: u16, message: String },
    #[error("answer is not what this ringmqctl expects (another version?): {0}")]
    Json(#[from] serde_json::Error),
}

pub type Result<T> = std::result::Result<T, HttpError>;

/// Where the operations API is and how to authenticate.
#[derive(Debug, Clone)]
pub struct Api {
    /// `host:port`.
    authority: String,
    token: Option<String>,
}

/// Percent-encodes a path segment or query value.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~@".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Api {
    pub fn new(server: &str, token: Option<String>) -> Result<Self> {
        let authority = server
            .strip_prefix("http://")
            .unwrap_or(server)
            .trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') || server.starts_with("https://") {
            return Err(HttpError::Server(server.to_owned()));
        }
        Ok(Self {
            authority: authority.to_owned(),
            token,
        })
    }

    /// GET `/api/v1/{path}`, read as `T`.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call("GET", path, None)
    }

    /// POST `/api/v1/{path}` with `body` as JSON, the answer read as `T`.
    pub fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        self.call("POST", path, Some(serde_json::to_string(body)?))
    }

    fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<String>,
    ) -> Result<T> {
        let connect = |error| HttpError::Connect {
            server: self.authority.clone(),
            error,
        };
        let mut s = TcpStream::connect(&self.authority).map_err(connect)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(connect)?;
        let body = body.unwrap_or_default();
        let auth = self
            .token
            .as_ref()
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "{method} /api/v1/{path} HTTP/1.1\r\nHost: {}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.authority,
            body.len()
        );
        s.write_all(request.as_bytes()).map_err(connect)?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).map_err(connect)?;
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text.split_once("\r\n\r\n").ok_or(HttpError::Malformed)?;
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or(HttpError::Malformed)?;
        if status != 200 {
            let message = serde_json::from_str::<ringmq_api::ApiError>(body)
                .map(|e| e.error)
                .unwrap_or_else(|_| body.trim().to_owned());
            return Err(HttpError::Status { status, message });
        }
        Ok(serde_json::from_str(body)?)
    }
}
