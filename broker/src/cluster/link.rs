//! Links between nodes: the handshake, the outbound task that dials a peer
//! and writes this node's frames to it, and the inbound side that applies a
//! peer's frames (or, after a `Proxy` frame, serves a forwarded client).
//!
//! Each pair of nodes has two TCP connections, one dialled by each side:
//! a node writes only to the connection it dialled and reads only from the
//! ones it accepted, so neither side has to decide who dials.

use std::sync::Arc;
use std::time::Duration;

use ntex::codec::{Decoder, Encoder};
use ntex::io::IoBoxed;
use ntex::util::{BytesMut, Either};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use tokio::sync::mpsc;

use super::wire::{self, Frame, WireError};
use super::{Cluster, ClusterError, Result};
use crate::broker::Broker;

/// Frames on an ntex I/O stream.
#[derive(Debug, Clone, Copy)]
pub struct FrameCodec;

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = WireError;

    fn decode(&self, src: &mut BytesMut) -> std::result::Result<Option<Frame>, WireError> {
        Frame::decode(src)
    }
}

impl Encoder for FrameCodec {
    type Item = Frame;
    type Error = WireError;

    fn encode(
        &self,
        item: Frame,
        dst: &mut ntex::util::BytePages,
    ) -> std::result::Result<(), WireError> {
        let mut buf = BytesMut::new();
        item.encode(&mut buf);
        dst.append(buf);
        Ok(())
    }
}

fn link_err(e: impl std::fmt::Debug) -> ClusterError {
    ClusterError::Link(format!("{e:?}"))
}

async fn recv(io: &IoBoxed) -> Result<Frame> {
    match io.recv(&FrameCodec).await {
        Ok(Some(f)) => Ok(f),
        Ok(None) => Err(ClusterError::Link("closed".into())),
        Err(Either::Left(e)) => Err(ClusterError::Link(e.to_string())),
        Err(Either::Right(e)) => Err(ClusterError::Link(e.to_string())),
    }
}

async fn send(io: &IoBoxed, frame: Frame) -> Result<()> {
    io.send(frame, &FrameCodec).await.map_err(link_err)
}

fn mac(secret: &[u8], nonce: &[u8; 16], node: &str) -> hmac::Tag {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(b"ringmq-cluster-v1\0");
    ctx.update(nonce);
    ctx.update(node.as_bytes());
    ctx.sign()
}

/// Both sides: Hello, then Auth. Returns the peer's name and address.
pub async fn handshake(io: &IoBoxed, cluster: &Cluster) -> Result<(Arc<str>, String)> {
    let mut nonce = [0u8; 16];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| ClusterError::Link("no randomness".into()))?;
    send(
        io,
        Frame::Hello {
            version: wire::VERSION,
            node: cluster.node.to_string(),
            addr: cluster.advertised(),
            nonce,
        },
    )
    .await?;
    let Frame::Hello {
        version,
        node: peer,
        addr: peer_addr,
        nonce: peer_nonce,
    } = recv(io).await?
    else {
        return Err(ClusterError::Link("expected Hello".into()));
    };
    if version != wire::VERSION {
        return Err(ClusterError::Link(format!(
            "peer {peer} speaks protocol {version}, this node {}",
            wire::VERSION
        )));
    }
    let secret = cluster.secret().get();
    let ours = mac(&secret, &peer_nonce, &cluster.node);
    let mut tag = [0u8; 32];
    tag.copy_from_slice(ours.as_ref());
    send(io, Frame::Auth { mac: tag }).await?;
    let Frame::Auth { mac: theirs } = recv(io).await? else {
        return Err(ClusterError::Link("expected Auth".into()));
    };
    let key = hmac::Key::new(hmac::HMAC_SHA256, &secret);
    let mut msg = Vec::with_capacity(18 + 16 + peer.len());
    msg.extend_from_slice(b"ringmq-cluster-v1\0");
    msg.extend_from_slice(&nonce);
    msg.extend_from_slice(peer.as_bytes());
    hmac::verify(&key, &msg, &theirs)
        .map_err(|_| ClusterError::Link(format!("{peer} does not know the cluster secret")))?;
    Ok((Arc::from(peer), peer_addr))
}

/// Dials a peer address, runs the link while it is up, and dials again
/// when it drops, until this node stops or finds the address is its own.
pub async fn outbound(cluster: Arc<Cluster>, broker: Arc<Broker>, addr: String) {
    if !cluster.start_dialing(&addr) {
        return;
    }
    let (tx, mut rx) = mpsc::channel::<Frame>(cluster.config.link_queue);
    let heartbeat = Duration::from_millis(cluster.config.heartbeat_ms);
    let mut backoff = Duration::from_millis(100);
    loop {
        match dial(&cluster, &addr).await {
            Ok((io, peer)) if cluster.is_local(&peer) => {
                tracing::debug!(%addr, "cluster peer address is this node");
                io.close();
                cluster.stop_dialing(&addr);
                return;
            }
            Ok((io, peer)) => {
                backoff = Duration::from_millis(100);
                if let Err(e) = greet(&io, &cluster, &broker).await {
                    tracing::info!(peer = %peer, error = %e, "cluster link lost");
                    continue;
                }
                cluster.link_up(&peer, &addr, tx.clone());
                let result = pump(&io, &cluster, &mut rx, heartbeat).await;
                if cluster.link_down(&peer, &addr) {
                    broker.peer_gone(&peer);
                }
                io.close();
                if let Err(e) = result {
                    tracing::info!(peer = %peer, error = %e, "cluster link lost");
                }
            }
            Err(e) => tracing::debug!(%addr, error = %e, "cluster peer not reached"),
        }
        ntex::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Connects and authenticates.
pub async fn dial(cluster: &Cluster, addr: &str) -> Result<(IoBoxed, Arc<str>)> {
    let connect = ntex::connect::connect(addr.to_owned());
    let io = match ntex::util::select(
        std::pin::pin!(connect),
        ntex::time::sleep(Duration::from_secs(3)),
    )
    .await
    {
        Either::Left(Ok(io)) => io.boxed(),
        Either::Left(Err(e)) => return Err(link_err(e)),
        Either::Right(()) => return Err(ClusterError::Link("connect timed out".into())),
    };
    let (peer, _) = handshake(&io, cluster).await?;
    Ok((io, peer))
}

/// What a new link carries first: the members this node knows, its routes,
/// the token revocations in force and its retained messages.
async fn greet(io: &IoBoxed, cluster: &Cluster, broker: &Broker) -> Result<()> {
    send(
        io,
        Frame::Members {
            addrs: cluster.known_addrs(),
        },
    )
    .await?;
    send(
        io,
        Frame::Routes {
            filters: cluster.local_snapshot(),
        },
    )
    .await?;
    if let Some(t) = &broker.tokens {
        for (id, exp_ms) in t.revocations() {
            send(io, Frame::Revoked { id, exp_ms }).await?;
        }
    }
    let now = std::time::Instant::now();
    for msg in broker.retained.matching("#") {
        send(
            io,
            Frame::Retain {
                msg: super::to_wire(&msg, now),
            },
        )
        .await?;
    }
    Ok(())
}

/// Writes queued frames and heartbeats until the connection fails.
async fn pump(
    io: &IoBoxed,
    cluster: &Cluster,
    rx: &mut mpsc::Receiver<Frame>,
    heartbeat: Duration,
) -> Result<()> {
    loop {
        let frame = {
            let next = std::pin::pin!(rx.recv());
            match ntex::util::select(next, ntex::time::sleep(heartbeat)).await {
                Either::Left(Some(f)) => f,
                Either::Left(None) => return Ok(()),
                Either::Right(()) => Frame::Heartbeat {
                    leaving: cluster.is_leaving(),
                },
            }
        };
        io.encode(frame, &FrameCodec).map_err(link_err)?;
        // Batch what is already queued before waiting for the socket.
        while let Ok(f) = rx.try_recv() {
            io.encode(f, &FrameCodec).map_err(link_err)?;
        }
        io.flush(false).await.map_err(link_err)?;
        if io.is_closed() {
            return Err(ClusterError::Link("closed".into()));
        }
    }
}

/// An accepted cluster connection: a peer's link, or a forwarded client.
pub async fn inbound(
    io: IoBoxed,
    cluster: Arc<Cluster>,
    broker: Arc<Broker>,
    mqtt: &super::gate::Mqtt,
) {
    let peer = match handshake(&io, &cluster).await {
        Ok((peer, addr)) => {
            // A node this one does not dial yet (not in its peer list): dial
            // back, so that both directions of the pair exist.
            if !cluster.is_local(&peer) && !addr.is_empty() && !cluster.dials(&addr) {
                ntex::rt::spawn(outbound(cluster.clone(), broker.clone(), addr));
            }
            peer
        }
        Err(e) => {
            broker.metrics.reject("cluster_handshake");
            tracing::warn!(error = %e, "cluster connection refused");
            io.close();
            return;
        }
    };
    let first = match recv(&io).await {
        Ok(f) => f,
        Err(_) => return,
    };
    if let Frame::Proxy { client_ip } = &first {
        let ip = client_ip.parse().ok();
        super::gate::serve_forwarded(io, &broker, ip, mqtt).await;
        return;
    }
    let mut frame = first;
    loop {
        apply(&cluster, &broker, &peer, frame);
        frame = match recv(&io).await {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(peer = %peer, error = %e, "cluster inbound link closed");
                return;
            }
        };
    }
}

/// Applies one frame from `peer`.
fn apply(cluster: &Arc<Cluster>, broker: &Arc<Broker>, peer: &Arc<str>, frame: Frame) {
    match frame {
        Frame::Heartbeat { leaving } => cluster.heard(peer, leaving),
        Frame::Settled { members } => cluster.settled_from(peer, members),
        Frame::Revoked { id, exp_ms } => {
            if let Some(t) = &broker.tokens {
                t.revoke_id(&id, exp_ms);
            }
        }
        // Nodes the peer knows: a node that was given only some of the
        // others as peers (seeds) finds the rest this way.
        Frame::Members { addrs } => {
            for addr in addrs {
                if !cluster.dials(&addr) {
                    ntex::rt::spawn(outbound(cluster.clone(), broker.clone(), addr));
                }
            }
        }
        f @ (Frame::Routes { .. } | Frame::RouteAdd { .. } | Frame::RouteDel { .. }) => {
            let (add, del) = cluster.remote_routes(peer, &f);
            broker.remote_routes(peer, &add, &del);
        }
        Frame::Publish { msg, groups } => broker.publish_forwarded(msg, &groups),
        Frame::Direct {
            client_id,
            persistent,
            msg,
        } => broker.deliver_direct(&client_id, persistent, msg),
        Frame::Retain { msg } => broker.retain_replica(msg),
        Frame::Session(ws) => broker.install_session(ws),
        Frame::Hello { .. } | Frame::Auth { .. } | Frame::Proxy { .. } => {
            tracing::warn!(peer = %peer, "unexpected cluster frame ignored");
        }
    }
}
