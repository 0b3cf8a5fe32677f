//! Network listeners: MQTT over TCP, TLS, WebSocket and secure WebSocket, and
//! the admin HTTP port, all served by one ntex server with a worker thread per
//! core. Sockets are bound before the server starts so that a port in use is
//! a clear start-up error.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use ntex::http::{self, HttpService, Request, Response, h1};
use ntex::io::{Filter, Io, IoBoxed, Layer};
use ntex::{Pipeline, Service, SharedCfg, ws};
use ntex_mqtt::{MqttError, MqttServer, MqttServiceConfig, v3, v5};

use crate::admin;
use crate::broker::Broker;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::protocol;
use crate::tls::TlsError;

/// Start-up errors of the listeners.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error("cannot listen on {addr} ({name}): {source}")]
    Bind {
        name: &'static str,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("server: {0}")]
    Server(io::Error),
}

pub type Result<T> = std::result::Result<T, ListenerError>;

/// Sockets bound for every configured listener.
#[derive(Debug)]
pub struct Bound {
    pub tcp: Option<TcpListener>,
    pub ws: Option<TcpListener>,
    pub tls: Option<TcpListener>,
    pub wss: Option<TcpListener>,
    pub admin: Option<TcpListener>,
    pub cluster: Option<TcpListener>,
}

impl Bound {
    /// Binds the configured addresses; TLS ones only when a certificate is set.
    pub fn bind(config: &Config) -> Result<Self> {
        let l = &config.listeners;
        let tls_on = l.tls_files.is_some();
        Ok(Self {
            tcp: bind("mqtt-tcp", l.tcp)?,
            ws: bind("mqtt-ws", l.ws)?,
            tls: bind("mqtt-tls", l.tls.filter(|_| tls_on))?,
            wss: bind("mqtt-wss", l.wss.filter(|_| tls_on))?,
            admin: bind("admin", l.admin)?,
            cluster: bind("cluster", config.cluster.as_ref().map(|c| c.listen))?,
        })
    }

    /// `(name, address)` of every bound listener, for logs and tests.
    pub fn addrs(&self) -> Vec<(&'static str, SocketAddr)> {
        [
            ("mqtt-tcp", &self.tcp),
            ("mqtt-ws", &self.ws),
            ("mqtt-tls", &self.tls),
            ("mqtt-wss", &self.wss),
            ("admin", &self.admin),
            ("cluster", &self.cluster),
        ]
        .into_iter()
        .filter_map(|(n, l)| Some((n, l.as_ref()?.local_addr().ok()?)))
        .collect()
    }
}

fn bind(name: &'static str, addr: Option<SocketAddr>) -> Result<Option<TcpListener>> {
    let Some(addr) = addr else { return Ok(None) };
    let lst = ntex::server::create_tcp_listener(addr, 4096)
        .map_err(|source| ListenerError::Bind { name, addr, source })?;
    Ok(Some(lst))
}

/// Runs the listeners until `shutdown` resolves, then stops gracefully.
pub async fn serve(
    broker: Arc<Broker>,
    cluster: Option<Arc<Cluster>>,
    admin: Arc<admin::Admin>,
    bound: Bound,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let config = &broker.config();
    let limits = &config.limits;
    let mqtt_cfg = SharedCfg::new("MQTT")
        .add(
            MqttServiceConfig::new()
                .set_max_qos(ntex_mqtt::QoS::ExactlyOnce)
                .set_max_size(limits.max_packet_size)
                .set_max_receive(limits.receive_maximum)
                .set_max_topic_alias(limits.topic_alias_maximum)
                .set_max_send(limits.max_inflight)
                .set_connect_timeout(ntex::time::Seconds(limits.connect_timeout_secs))
                // The protocol header has a deadline of its own (5 s unless set).
                .protocol_version_timeout(ntex::time::Seconds(limits.connect_timeout_secs)),
        )
        .build();
    let tls = match &config.listeners.tls_files {
        Some(files) if bound.tls.is_some() || bound.wss.is_some() => {
            Some(crate::tls::server_config(files)?)
        }
        _ => None,
    };
    let mut builder = ntex::server::build()
        .affinity(if config.pin_workers {
            ntex::server::Affinity::Core
        } else {
            ntex::server::Affinity::Disabled
        })
        .disable_signals()
        .graceful_shutdown_timeout(ntex::time::Seconds(
            u16::try_from(config.shutdown_timeout_secs).unwrap_or(u16::MAX),
        ));
    if config.workers > 0 {
        builder = builder.workers(config.workers);
    }
    let server_err = ListenerError::Server;
    if let Some(lst) = bound.tcp {
        let (b, c) = (broker.clone(), cluster.clone());
        builder = builder
            .listen("mqtt-tcp", lst, mqtt_cfg.clone(), async move |_| {
                front_service(b.clone(), c.clone())
            })
            .map_err(server_err)?;
    }
    if let Some(lst) = bound.ws {
        let (b, c) = (broker.clone(), cluster.clone());
        builder = builder
            .listen("mqtt-ws", lst, mqtt_cfg.clone(), async move |_| {
                ws_service(
                    b.clone(),
                    c.clone(),
                    Pipeline::new((), mqtt_service(b.clone())),
                )
            })
            .map_err(server_err)?;
    }
    if let (Some(lst), Some(tls)) = (bound.tls, tls.clone()) {
        let (b, c) = (broker.clone(), cluster.clone());
        builder = builder
            .listen("mqtt-tls", lst, mqtt_cfg.clone(), async move |_| {
                ntex::tls::rustls::TlsAcceptor::new(tls.clone())
                    .map_err(|e| {
                        MqttError::Service(protocol::Error::Transport(format!("TLS: {e}")))
                    })
                    .and_then(front_service(b.clone(), c.clone()))
            })
            .map_err(server_err)?;
    }
    if let (Some(lst), Some(tls)) = (bound.wss, tls) {
        let (b, c) = (broker.clone(), cluster.clone());
        builder = builder
            .listen("mqtt-wss", lst, mqtt_cfg.clone(), async move |_| {
                let mqtt = Pipeline::new((), mqtt_service(b.clone()));
                ntex::tls::rustls::TlsAcceptor::new(tls.clone())
                    .map_err(io::Error::other)
                    .and_then(ws_service(b.clone(), c.clone(), mqtt))
            })
            .map_err(server_err)?;
    }
    if let (Some(lst), Some(cluster)) = (bound.cluster, cluster.clone()) {
        let b = broker.clone();
        builder = builder
            .listen("cluster", lst, mqtt_cfg.clone(), async move |_| {
                let mqtt = Pipeline::new((), mqtt_service(b.clone())).bind();
                let (b, c) = (b.clone(), cluster.clone());
                ntex::service::fn_service(move |io: Io| {
                    let (b, c, mqtt) = (b.clone(), c.clone(), mqtt.clone());
                    async move {
                        crate::cluster::link::inbound(io.boxed(), c, b, &mqtt).await;
                        Ok::<_, io::Error>(())
                    }
                })
            })
            .map_err(server_err)?;
    }
    if let Some(lst) = bound.admin {
        builder = builder
            .listen("admin", lst, SharedCfg::new("ADMIN"), async move |_| {
                admin::service(admin.clone())
            })
            .map_err(server_err)?;
    }
    let server = builder.run();
    let stopper = server.clone();
    let mut server = std::pin::pin!(server);
    match ntex::util::select(server.as_mut(), std::pin::pin!(shutdown)).await {
        ntex::util::Either::Left(r) => r.map_err(ListenerError::Server),
        ntex::util::Either::Right(()) => {
            let deadline = std::time::Instant::now()
                + std::time::Duration::from_secs(config.shutdown_timeout_secs);
            if broker.peers().is_some_and(|c| !c.members().is_empty()) {
                // A planned leave (C4): the sessions go to the rest of the
                // ring, their clients are told to reconnect, and the node
                // stays until the handover and its grace period are over.
                tracing::info!("leaving the cluster: handing sessions over");
                broker.leave_cluster();
                broker
                    .wait_until(deadline, |b| b.sessions().is_empty() && b.moving() == 0)
                    .await;
            }
            tracing::info!("shutting down: closing connections");
            broker.close_all();
            // Each connection's pump sends its DISCONNECT and closes; the
            // server stops once they are gone or the timeout passed.
            broker
                .wait_until(deadline, |b| b.metrics().connections.get() == 0)
                .await;
            stopper.stop(true).await;
            server.await.map_err(ListenerError::Server)
        }
    }
}

/// MQTT 3.1.1 and 5 on one port.
fn mqtt_service<Req>(
    broker: Arc<Broker>,
) -> impl Service<(), Req, Res = (), Error = MqttError<protocol::Error>>
where
    Req: ntex::service::RequestState<IoBoxed, State = ()> + 'static,
{
    // Built on each worker thread: its acknowledgements wake through it.
    crate::durable::attach_worker();
    let b3 = broker.clone();
    let b5 = broker;
    MqttServer::new()
        .v3(v3::MqttServer::new(protocol::v3::publish)
            .protocol(protocol::v3::protocol)
            .control(protocol::v3::control)
            .build(async move |c| protocol::v3::connect(&b3, c).await))
        .v5(v5::MqttServer::new(protocol::v5::publish)
            .protocol(protocol::v5::protocol)
            .control(protocol::v5::control)
            .build(async move |c| protocol::v5::connect(&b5, c).await))
}

/// A client-facing MQTT listener's service: on a clustered node, the gate
/// that serves the client here or forwards it to its session's owner.
fn front_service<F: Filter>(
    broker: Arc<Broker>,
    cluster: Option<Arc<Cluster>>,
) -> impl Service<(), Io<F>, Res = (), Error = MqttError<protocol::Error>> {
    let mqtt = Pipeline::new((), mqtt_service(broker.clone())).bind();
    ntex::service::fn_service(move |io: Io<F>| {
        let (broker, cluster, mqtt) = (broker.clone(), cluster.clone(), mqtt.clone());
        async move {
            crate::cluster::gate::serve(io.boxed(), broker, cluster, &mqtt).await;
            Ok(())
        }
    })
}

/// HTTP upgrade to WebSocket on `/mqtt` with the `mqtt` subprotocol, then
/// MQTT (through the gate, as `front_service`).
fn ws_service<F: Filter>(
    broker: Arc<Broker>,
    cluster: Option<Arc<Cluster>>,
    mqtt: Pipeline<IoBoxed, (), MqttError<protocol::Error>>,
) -> impl Service<(), Io<F>, Res = (), Error = io::Error> {
    let mqtt = mqtt.bind();
    HttpService::new(async |_req: Request| {
        Ok::<_, io::Error>(Response::NotFound().body("MQTT over WebSocket is served on /mqtt"))
    })
    .h1_control(async move |msg: h1::Control<_, _>| {
        let ack = match msg {
            h1::Control::Upgrade(ctl) => {
                let (ack, io, req, codec) = ctl.handle();
                match upgrade(io, req, codec).await {
                    Ok(io) => {
                        crate::cluster::gate::serve(
                            io.boxed(),
                            broker.clone(),
                            cluster.clone(),
                            &mqtt,
                        )
                        .await
                    }
                    Err(e) => tracing::info!(error = %e, "WebSocket upgrade refused"),
                }
                ack
            }
            _ => msg.ack(),
        };
        Ok::<_, io::Error>(ack)
    })
    .map_err(|e| io::Error::other(format!("{e:?}")))
}

async fn upgrade<F: Filter>(
    io: Io<F>,
    req: Request,
    codec: h1::Codec,
) -> io::Result<Io<Layer<ws::WsTransport, F>>> {
    if req.path() != "/mqtt" {
        io.send(
            h1::Message::Item((
                Response::NotFound().build().drop_body(),
                http::body::BodySize::Empty,
            )),
            &codec,
        )
        .await
        .map_err(|e| io::Error::other(format!("{e:?}")))?;
        return Err(io::Error::other(format!(
            "no WebSocket endpoint at {}",
            req.path()
        )));
    }
    let mut res = ws::handshake(req.head()).map_err(io::Error::other)?;
    let offers_mqtt = req
        .headers()
        .get(http::header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|p| p.trim() == "mqtt"));
    if offers_mqtt {
        res.header(http::header::SEC_WEBSOCKET_PROTOCOL, "mqtt");
    }
    io.send(
        h1::Message::Item((res.build().drop_body(), http::body::BodySize::Empty)),
        &codec,
    )
    .await
    .map_err(|e| io::Error::other(format!("{e:?}")))?;
    Ok(ws::WsTransport::create(io, ws::Codec::new()))
}
