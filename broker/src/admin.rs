//! The admin HTTP port: `/metrics` (Prometheus text), `/healthz` (the process
//! answers) and `/readyz` (the node accepts MQTT connections).

use std::io;
use std::sync::Arc;

use ntex::Service;
use ntex::http::{HttpService, Request, Response, header};
use ntex::io::Io;

use crate::broker::Broker;

/// The admin HTTP service for one connection.
pub fn service(broker: Arc<Broker>) -> impl Service<(), Io, Res = (), Error = io::Error> {
    HttpService::new(async move |req: Request| Ok::<_, io::Error>(respond(&broker, &req)))
        .map_err(|e| io::Error::other(format!("{e:?}")))
}

fn respond(broker: &Broker, req: &Request) -> Response {
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
