//! The admin HTTP port: `/metrics` (Prometheus text), `/healthz` (the process
//! answers) and `/readyz` (the node accepts MQTT connections). When a token
//! file is configured, everything but the probes (and, by choice, `/metrics`)
//! requires `Authorization: Bearer <token>`.

use std::io;
use std::sync::Arc;

use ntex::Service;
use ntex::http::{HttpService, Request, Response, header};
use ntex::io::Io;

use crate::broker::Broker;

/// The bearer token of the admin API; `Debug` does not print it.
#[derive(Clone)]
pub struct AdminToken(Arc<str>);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<secret>)")
    }
}

impl AdminToken {
    /// Reads the token from a file (surrounding white space ignored).
    pub fn read(path: &std::path::Path) -> io::Result<Self> {
        let text = std::fs::read_to_string(path)?;
        let token = text.trim();
        if token.is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "empty token"));
        }
        Ok(Self(Arc::from(token)))
    }

    /// Constant-time comparison with the request's bearer token.
    fn admits(&self, req: &Request) -> bool {
        let Some(given) = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        else {
            return false;
        };
        let (a, b) = (given.as_bytes(), self.0.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

/// The admin HTTP service for one connection.
pub fn service(
    broker: Arc<Broker>,
    token: Option<AdminToken>,
) -> impl Service<(), Io, Res = (), Error = io::Error> {
    HttpService::new(async move |req: Request| {
        Ok::<_, io::Error>(respond(&broker, token.as_ref(), &req))
    })
    .map_err(|e| io::Error::other(format!("{e:?}")))
}

fn respond(broker: &Broker, token: Option<&AdminToken>, req: &Request) -> Response {
    let open = match req.path() {
        "/healthz" | "/readyz" => true,
        "/metrics" => !broker.config.auth.protect_metrics,
        _ => false,
    };
    if !open && token.is_some_and(|t| !t.admits(req)) {
        broker.metrics.reject("admin_unauthorized");
        return Response::Unauthorized()
            .header(header::WWW_AUTHENTICATE, "Bearer")
            .body("admin token required");
    }
    match req.path() {
        "/metrics" => Response::Ok()
            .header(header::CONTENT_TYPE, "text/plain; version=0.0.4")
            .body(broker.metrics.render()),
        "/healthz" => Response::Ok().body("ok"),
        "/readyz" => {
            if broker.is_ready() {
                Response::Ok().body("ready")
            } else {
                Response::ServiceUnavailable().body("shutting down")
            }
        }
        _ => Response::NotFound().body("not found: try /metrics, /healthz or /readyz"),
    }
}
