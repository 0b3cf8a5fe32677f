//! The admin HTTP port: `/metrics` (Prometheus text), `/healthz` (the process
//! answers), `/readyz` (the node accepts MQTT connections), the operations
//! API under `/api/v1` (`ops::http`) and the token service under `/token`.
//! When a token file is configured, everything but the probes, the OpenAPI
//! document, the token service (signed requests) and, by choice, `/metrics`
//! requires `Authorization: Bearer <token>`.

use std::io;
use std::sync::Arc;

use ntex::Service;
use ntex::http::{HttpService, Request, Response, header};
use ntex::io::Io;

use crate::broker::Broker;
use crate::secret_file::SecretFile;

/// Whether the request carries the admin bearer token (constant-time).
fn admits(token: &SecretFile, req: &Request) -> bool {
    let Some(given) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    let expected = token.get();
    let (a, b) = (given.as_bytes(), &expected[..]);
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Largest request body the admin port reads (token service forms).
const MAX_BODY: usize = 64 * 1024;

/// The admin HTTP service for one connection.
pub fn service(broker: Arc<Broker>) -> impl Service<(), Io, Res = (), Error = io::Error> {
    HttpService::new(async move |mut req: Request| {
        if req.path().starts_with("/api/v1/") {
            let public = req.path() == "/api/v1/openapi.json";
            if !public
                && broker
                    .admin_token
                    .as_ref()
                    .is_some_and(|t| !admits(t, &req))
            {
                return Ok::<_, io::Error>(unauthorized(&broker));
            }
            let Some(body) = read_body(&mut req).await else {
                return Ok(Response::PayloadTooLarge().body("request body too large or unreadable"));
            };
            let uri = req.uri().to_string();
            let query = uri.split_once('?').map_or("", |(_, q)| q).to_owned();
            let path = req.path().to_owned();
            let method = req.method().clone();
            return Ok(crate::ops::http::handle(&broker, &method, &path, &query, &body).await);
        }
        if req.path().starts_with("/token/") {
            let body = read_body(&mut req).await;
            return Ok::<_, io::Error>(match body {
                Some(body) => token_api(&broker, &req, &body),
                None => Response::PayloadTooLarge().body("request body too large or unreadable"),
            });
        }
        Ok::<_, io::Error>(respond(&broker, &req))
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
        broker.metrics.reject("token_api");
    }
    Response::Ok()
        .header(header::CONTENT_TYPE, "application/json")
        .body(serde_json::to_string(&answer).unwrap_or_default())
}

fn unauthorized(broker: &Broker) -> Response {
    broker.metrics.reject("admin_unauthorized");
    Response::Unauthorized()
        .header(header::WWW_AUTHENTICATE, "Bearer")
        .body("admin token required")
}

fn respond(broker: &Arc<Broker>, req: &Request) -> Response {
    let open = match req.path() {
        "/healthz" | "/readyz" => true,
        "/metrics" => !broker.config.auth.protect_metrics,
        _ => false,
    };
    if !open && broker.admin_token.as_ref().is_some_and(|t| !admits(t, req)) {
        return unauthorized(broker);
    }
    match req.path() {
        "/metrics" => Response::Ok()
            .header(header::CONTENT_TYPE, "text/plain; version=0.0.4")
            .body(broker.metrics.render()),
        "/healthz" => Response::Ok().body("ok"),
        "/readyz" => {
            if !broker.is_ready() {
                Response::ServiceUnavailable().body("shutting down")
            } else if broker.cluster.as_ref().is_some_and(|c| c.is_leaving()) {
                // Out of the Service's endpoints: new clients go to the
                // pods that stay.
                Response::ServiceUnavailable().body("leaving: handing sessions to the other nodes")
            } else if broker.cluster.as_ref().is_some_and(|c| !c.is_settled()) {
                Response::ServiceUnavailable()
                    .body("joining: waiting for sessions from the other nodes")
            } else {
                Response::Ok().body("ready")
            }
        }
        // The operator calls this before it lowers the replica count: the
        // node hands its sessions to the rest of the ring and tells its
        // clients to reconnect; it keeps running until it is stopped.
        "/cluster/drain" if req.method() == ntex::http::Method::POST => match &broker.cluster {
            Some(c) => {
                c.leave();
                broker.rebalance();
                Response::Accepted().body(format!(
                    "draining: {} sessions to hand over",
                    broker.sessions.len()
                ))
            }
            None => Response::Conflict().body("this node is not part of a cluster"),
        },
        _ => Response::NotFound()
            .body("not found: try /metrics, /healthz, /readyz or /api/v1/openapi.json"),
    }
}
