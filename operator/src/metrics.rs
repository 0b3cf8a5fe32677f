//! The operator's own metrics (reconcile passes, failures by error, pass
//! duration) and the small HTTP endpoint that serves them with `/healthz`.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Instant;

use kube::runtime::controller::Action;
use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::reconcile::Error;

/// Errors while registering the metrics or binding the endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics registry: {0}")]
    Prometheus(#[from] prometheus::Error),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, MetricsError>;

/// Counts and times reconcile passes.
#[derive(Debug, Clone)]
pub struct ReconcileMetrics {
    registry: Registry,
    runs: IntCounterVec,
    failures: IntCounterVec,
    duration: HistogramVec,
}

impl ReconcileMetrics {
    pub fn new() -> Result<Self> {
        let registry = Registry::new_custom(Some("ringmq_operator".into()), None)?;
        let runs = IntCounterVec::new(
            Opts::new("reconcile_runs_total", "Reconcile passes, by instance"),
            &["instance"],
        )?;
        let failures = IntCounterVec::new(
            Opts::new(
                "reconcile_failures_total",
                "Reconcile passes that failed, by instance and error kind",
            ),
            &["instance", "error"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new("reconcile_duration_seconds", "Time one reconcile pass took")
                .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
            &["instance"],
        )?;
        for c in [&runs, &failures] {
            registry.register(Box::new(c.clone()))?;
        }
        registry.register(Box::new(duration.clone()))?;
        Ok(Self {
            registry,
            runs,
            failures,
            duration,
        })
    }

    /// Runs one pass of `instance` and records it.
    pub async fn count(
        &self,
        instance: &str,
        pass: impl Future<Output = std::result::Result<Action, Error>>,
    ) -> std::result::Result<Action, Error> {
        let started = Instant::now();
        let result = pass.await;
        self.runs.with_label_values(&[instance]).inc();
        self.duration
            .with_label_values(&[instance])
            .observe(started.elapsed().as_secs_f64());
        if let Err(e) = &result {
            self.failures
                .with_label_values(&[instance, e.label()])
                .inc();
        }
        result
    }

    /// The Prometheus text of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let encoder = prometheus::TextEncoder::new();
        if encoder.encode(&self.registry.gather(), &mut out).is_err() {
            return String::new();
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Binds the metrics endpoint (`/metrics`, `/healthz`).
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })
}

/// Serves the endpoint until `shutdown` resolves. One small request per
/// connection, as Prometheus and kubelet probes send them.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: ReconcileMetrics,
    shutdown: impl Future<Output = ()>,
) {
    let mut shutdown = std::pin::pin!(shutdown);
    let mut open = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = &mut shutdown => break,
        };
        // Finished connections are reaped as new ones come.
        while open.try_join_next().is_some() {}
        let Ok((mut socket, _)) = accepted else {
            continue;
        };
        let metrics = metrics.clone();
        open.spawn(async move {
            let mut buf = [0u8; 1024];
            let read = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                socket.read(&mut buf),
            )
            .await;
            let Ok(Ok(n)) = read else { return };
            let (status, body) = answer(&buf[..n], &metrics);
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(response.as_bytes()).await;
        });
    }
    open.shutdown().await;
}

fn answer(request: &[u8], metrics: &ReconcileMetrics) -> (&'static str, String) {
    let line = request.split(|b| *b == b'\n').next().unwrap_or_default();
    let mut parts = line.split(|b| *b == b' ');
    match (parts.next(), parts.next()) {
        (Some(b"GET"), Some(b"/metrics")) => ("200 OK", metrics.render()),
        (Some(b"GET"), Some(b"/healthz")) => ("200 OK", "ok".to_owned()),
        _ => ("404 Not Found", "try /metrics or /healthz".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passes_and_failures_are_counted_by_instance_and_error() {
        let m = ReconcileMetrics::new().unwrap_or_else(|e| panic!("{e}"));
        let ok = m.count("demo", async { Ok(Action::await_change()) }).await;
        assert!(ok.is_ok());
        let failed = m.count("demo", async { Err(Error::NoNamespace) }).await;
        assert!(failed.is_err());
        let text = m.render();
        assert!(
            text.contains("ringmq_operator_reconcile_runs_total{instance=\"demo\"} 2"),
            "{text}"
        );
        assert!(
            text.contains(
                "ringmq_operator_reconcile_failures_total{error=\"no_namespace\",instance=\"demo\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("ringmq_operator_reconcile_duration_seconds_count{instance=\"demo\"} 2")
        );
    }

    #[test]
    fn the_endpoint_answers_metrics_and_health_only() {
        let m = ReconcileMetrics::new().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(answer(b"GET /healthz HTTP/1.1\r\n", &m).0, "200 OK");
        assert_eq!(answer(b"GET /metrics HTTP/1.1\r\n", &m).0, "200 OK");
        assert_eq!(answer(b"POST /metrics HTTP/1.1\r\n", &m).0, "404 Not Found");
        assert_eq!(answer(b"garbage", &m).0, "404 Not Found");
    }
}
