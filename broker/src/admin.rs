//! The admin HTTP port: `/metrics` (Prometheus text), `/healthz` (the process
//! answers), `/readyz` (the node accepts MQTT connections), the operations
//! API under `/api/v1` (`ops::http`), the web console under `/console/`
//! (`console`), `/cluster/drain` and the token service under `/token`.
//!
//! Who may do what (README "Security"): the probes, the OpenAPI document,
//! the token service (its requests are signed) and, with `protect_metrics:
//! false`, `/metrics` answer everyone. The rest reads
//! client data or changes the instance: with `auth.admin_token_file` it
//! needs `Authorization: Bearer <token>` (a token of
//! `auth.admin_read_token_file` is enough for GET); with no admin token it is
//! answered only to requests from loopback, so that an embedded-defaults node
//! bound to `[::]` exposes nothing but its probes and metrics.

use std::io;
use std::net::IpAddr;
use std::sync::Arc;

use ntex::Service;
use ntex::http::{HttpService, Method, Request, Response, header};
use ntex::io::Io;

use crate::broker::Broker;
use crate::kafka::Kafka;
use crate::secret_file::SecretFile;

/// The bearer tokens of the admin port.
#[derive(Debug, Default)]
pub struct AdminTokens {
    /// Everything (`auth.admin_token_file`).
    full: Option<SecretFile>,
    /// GET requests and `/metrics` (`auth.admin_read_token_file`).
    read: Option<SecretFile>,
}

/// What a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Answered to everyone: probes, the API description, signed token requests.
    Nothing,
    /// Reads client data or metrics.
    Read,
    /// Changes something (kick, publish, acknowledge, drain).
    Change,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// A token is configured and the request carries no valid one (401).
    TokenRequired,
    /// A read-only token asked for a change (403).
    ReadOnly,
    /// No admin token is configured and the request is not from loopback (403).
    LoopbackOnly,
}

impl AdminTokens {
    pub fn new(full: Option<SecretFile>, read: Option<SecretFile>) -> Self {
        Self { full, read }
    }

    /// The token files, for the reload loop.
    pub fn files(&self) -> impl Iterator<Item = &SecretFile> {
        self.full.iter().chain(self.read.iter())
    }

    /// Whether the admin (full) token is configured.
    pub fn has_full(&self) -> bool {
        self.full.is_some()
    }

    /// Decides a request that needs `need`, from `peer` with `bearer`.
    pub fn decide(
        &self,
        need: Need,
        peer: Option<IpAddr>,
        bearer: Option<&str>,
    ) -> Result<(), Denied> {
        if need == Need::Nothing {
            return Ok(());
        }
        let matches = |t: &Option<SecretFile>| {
            t.as_ref()
                .zip(bearer)
                .is_some_and(|(t, given)| same(given.as_bytes(), &t.get()))
        };
        if matches(&self.full) {
            return Ok(());
        }
        if matches(&self.read) {
            return match need {
                Need::Change => Err(Denied::ReadOnly),
                _ => Ok(()),
            };
        }
        if self.full.is_some() {
            return Err(Denied::TokenRequired);
        }
        // No admin token: loopback only. A read token alone still guards
        // reads from elsewhere.
        if peer.is_some_and(|ip| ip.to_canonical().is_loopback()) {
            return Ok(());
        }
        if self.read.is_some() && need == Need::Read {
            return Err(Denied::TokenRequired);
        }
        Err(Denied::LoopbackOnly)
    }
}

/// Constant-time comparison of a presented token with the expected one.
fn same(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// What a request to `path` with `method` needs.
pub fn need(method: &Method, path: &str, protect_metrics: bool) -> Need {
    match path {
        "/healthz" | "/readyz" | "/api/v1/openapi.json" => Need::Nothing,
        "/metrics" if protect_metrics => Need::Read,
        "/metrics" => Need::Nothing,
        p if p.starts_with("/token/") => Need::Nothing,
        // The console's assets hold no data; what they show is asked of the
        // API, which checks the token itself.
        p if crate::console::is_console(p) && matches!(*method, Method::GET | Method::HEAD) => {
            Need::Nothing
        }
        _ if matches!(*method, Method::GET | Method::HEAD) => Need::Read,
        _ => Need::Change,
    }
}

fn bearer(req: &Request) -> Option<&str> {
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// What the admin port serves from: the node's broker, the port's bearer
/// tokens, and the Kafka cluster the instance binds (the operations API's
/// topic state, O7).
#[derive(Debug)]
pub struct Admin {
    broker: Arc<Broker>,
    tokens: AdminTokens,
    kafka: Option<Arc<Kafka>>,
}

impl Admin {
    pub fn new(broker: Arc<Broker>, tokens: AdminTokens, kafka: Option<Arc<Kafka>>) -> Self {
        Self {
            broker,
            tokens,
            kafka,
        }
    }

    /// The bearer tokens, for the reload loop.
    pub fn tokens(&self) -> &AdminTokens {
        &self.tokens
    }
}

/// Largest request body the admin port reads (token service forms).
const MAX_BODY: usize = 64 * 1024;

/// The admin HTTP service for one connection.
pub fn service(admin: Arc<Admin>) -> impl Service<(), Io, Res = (), Error = io::Error> {
    HttpService::new(async move |mut req: Request| {
        let broker = &admin.broker;
        let need = need(
            req.method(),
            req.path(),
            broker.config().auth.protect_metrics,
        );
        let peer = req.peer_addr().map(|a| a.ip());
        if let Err(denied) = admin.tokens.decide(need, peer, bearer(&req)) {
            return Ok::<_, io::Error>(refused(broker, denied));
        }
        if req.path().starts_with("/api/v1/") {
            let Some(body) = read_body(&mut req).await else {
                return Ok(Response::PayloadTooLarge().body("request body too large or unreadable"));
            };
            let uri = req.uri().to_string();
            let query = uri.split_once('?').map_or("", |(_, q)| q).to_owned();
            let path = req.path().to_owned();
            let method = req.method().clone();
            return Ok(crate::ops::http::handle(
                broker,
                admin.kafka.as_deref(),
                &method,
                &path,
                &query,
                &body,
            )
            .await);
        }
        if crate::console::is_console(req.path()) && need == Need::Nothing {
            let host = req
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok());
            return Ok(crate::console::respond(
                req.path(),
                host,
                &broker.config().listeners,
            ));
        }
        if req.path().starts_with("/token/") {
            let body = read_body(&mut req).await;
            return Ok::<_, io::Error>(match body {
                Some(body) => token_api(broker, &req, &body),
                None => Response::PayloadTooLarge().body("request body too large or unreadable"),
            });
        }
        Ok::<_, io::Error>(respond(broker, &req))
    })
    .map_err(|e| io::Error::other(format!("{e:?}")))
}

async fn read_body(req: &mut Request) -> Option<Vec<u8>> {
    let mut payload = req.take_payload();
    let mut body = Vec::new();
    while let Some(chunk) = payload.recv().await {
        body.extend_from_slice(&chunk.ok()?);
        if body.len() > MAX_BODY {
            return None;
        }
    }
    Some(body)
}

/// `/token/{apply,revoke,query}`: parameters from the query string (GET) or
/// a form body (POST), authenticated by their signature, not by the admin
/// token: the caller is an application server holding an AccessKey.
fn token_api(broker: &Broker, req: &Request, body: &[u8]) -> Response {
    let uri = req.uri().as_str();
    let query = uri.split_once('?').map_or("", |(_, q)| q);
    let mut params = crate::token_api::parse_form(query.as_bytes());
    params.extend(crate::token_api::parse_form(body));
    let op = req.path().trim_start_matches("/token/");
    let answer = crate::token_api::handle(broker, op, &params);
    if !answer.success {
        broker.metrics().reject("token_api");
    }
    Response::Ok()
        .header(header::CONTENT_TYPE, "application/json")
        .body(serde_json::to_string(&answer).unwrap_or_default())
}

fn refused(broker: &Broker, denied: Denied) -> Response {
    match denied {
        Denied::TokenRequired => {
            broker.metrics().reject("admin_unauthorized");
            Response::Unauthorized()
                .header(header::WWW_AUTHENTICATE, "Bearer")
                .body("admin token required")
        }
        Denied::ReadOnly => {
            broker.metrics().reject("admin_read_only");
            Response::Forbidden().body("the read-only admin token allows GET requests only")
        }
        Denied::LoopbackOnly => {
            broker.metrics().reject("admin_not_loopback");
            Response::Forbidden().body(
                "this node has no admin token (auth.admin_token_file): its operations API answers requests from loopback only",
            )
        }
    }
}

fn respond(broker: &Arc<Broker>, req: &Request) -> Response {
    match req.path() {
        "/metrics" => Response::Ok()
            .header(header::CONTENT_TYPE, "text/plain; version=0.0.4")
            .body(broker.metrics().render()),
        "/healthz" => Response::Ok().body("ok"),
        "/readyz" => {
            if !broker.is_ready() {
                Response::ServiceUnavailable().body("shutting down")
            } else if !broker.is_restored() {
                Response::ServiceUnavailable()
                    .body("the store cannot be opened yet (read-only or full disk?): see the log; retried every second")
            } else if broker.peers().is_some_and(|c| c.is_leaving()) {
                // Out of the Service's endpoints: new clients go to the
                // pods that stay.
                Response::ServiceUnavailable().body("leaving: handing sessions to the other nodes")
            } else if broker.peers().is_some_and(|c| !c.is_settled()) {
                Response::ServiceUnavailable()
                    .body("joining: waiting for sessions from the other nodes")
            } else {
                Response::Ok().body("ready")
            }
        }
        // The operator calls this before it lowers the replica count: the
        // node hands its sessions to the rest of the ring and tells its
        // clients to reconnect; it keeps running until it is stopped.
        "/cluster/drain" if req.method() == ntex::http::Method::POST => match broker.peers() {
            Some(c) => {
                c.leave();
                broker.rebalance();
                Response::Accepted().body(format!(
                    "draining: {} sessions to hand over",
                    broker.sessions().len()
                ))
            }
            None => Response::Conflict().body("this node is not part of a cluster"),
        },
        _ => Response::NotFound()
            .body("not found: try /metrics, /healthz, /readyz or /api/v1/openapi.json"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(dir: &std::path::Path, name: &str, value: &str) -> Option<SecretFile> {
        let path = dir.join(name);
        std::fs::write(&path, value).ok()?;
        SecretFile::load(&path).ok()
    }

    const LOOPBACK: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
    const REMOTE: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 7)));

    #[test]
    fn without_a_token_only_loopback_reads_or_changes() {
        let t = AdminTokens::default();
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap_or(IpAddr::V4(0.into()));
        for need in [Need::Read, Need::Change] {
            assert_eq!(t.decide(need, LOOPBACK, None), Ok(()));
            assert_eq!(t.decide(need, Some(mapped), None), Ok(()));
            assert_eq!(t.decide(need, REMOTE, None), Err(Denied::LoopbackOnly));
            assert_eq!(t.decide(need, None, None), Err(Denied::LoopbackOnly));
        }
        assert_eq!(t.decide(Need::Nothing, REMOTE, None), Ok(()));
    }

    #[test]
    fn with_tokens_loopback_needs_one_too_and_the_read_token_only_reads() {
        let dir = tempfile::tempdir().ok();
        let dir = dir
            .as_ref()
            .map(|d| d.path().to_owned())
            .unwrap_or_default();
        let t = AdminTokens::new(token(&dir, "full", "s3cret"), token(&dir, "read", "peek"));
        assert!(t.has_full());
        assert_eq!(
            t.decide(Need::Read, LOOPBACK, None),
            Err(Denied::TokenRequired)
        );
        assert_eq!(t.decide(Need::Change, REMOTE, Some("s3cret")), Ok(()));
        assert_eq!(t.decide(Need::Read, REMOTE, Some("peek")), Ok(()));
        assert_eq!(
            t.decide(Need::Change, REMOTE, Some("peek")),
            Err(Denied::ReadOnly)
        );
        assert_eq!(
            t.decide(Need::Change, REMOTE, Some("s3cre")),
            Err(Denied::TokenRequired)
        );
    }

    #[test]
    fn a_read_token_alone_guards_reads_from_elsewhere() {
        let dir = tempfile::tempdir().ok();
        let dir = dir
            .as_ref()
            .map(|d| d.path().to_owned())
            .unwrap_or_default();
        let t = AdminTokens::new(None, token(&dir, "read", "peek"));
        assert_eq!(
            t.decide(Need::Read, REMOTE, None),
            Err(Denied::TokenRequired)
        );
        assert_eq!(t.decide(Need::Read, REMOTE, Some("peek")), Ok(()));
        assert_eq!(
            t.decide(Need::Change, REMOTE, Some("peek")),
            Err(Denied::ReadOnly)
        );
        assert_eq!(t.decide(Need::Change, LOOPBACK, None), Ok(()));
    }

    #[test]
    fn what_each_path_needs() {
        assert_eq!(need(&Method::GET, "/readyz", true), Need::Nothing);
        assert_eq!(need(&Method::GET, "/metrics", false), Need::Nothing);
        assert_eq!(need(&Method::GET, "/metrics", true), Need::Read);
        assert_eq!(
            need(&Method::GET, "/api/v1/openapi.json", false),
            Need::Nothing
        );
        assert_eq!(need(&Method::POST, "/token/apply", false), Need::Nothing);
        assert_eq!(need(&Method::GET, "/api/v1/clients/x", false), Need::Read);
        assert_eq!(need(&Method::POST, "/api/v1/messages", false), Need::Change);
        assert_eq!(
            need(&Method::DELETE, "/api/v1/clients/x", false),
            Need::Change
        );
        assert_eq!(need(&Method::POST, "/cluster/drain", false), Need::Change);
        assert_eq!(need(&Method::GET, "/console/app.js", true), Need::Nothing);
        assert_eq!(need(&Method::POST, "/console/", true), Need::Change);
    }
}
