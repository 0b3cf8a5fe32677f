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

/// Frames on an ntex I/O stream, up to `max` bytes each.
#[derive(Debug, Clone, Copy)]
pub struct FrameCodec {
    pub max: usize,
}

/// The codec of authenticated links.
pub const LINK: FrameCodec = FrameCodec {
    max: wire::MAX_FRAME,
};

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = WireError;

    fn decode(&self, src: &mut BytesMut) -> std::result::Result<Option<Frame>, WireError> {
        Frame::decode_limited(src, self.max)
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
    match io.recv(&LINK).await {
        Ok(Some(f)) => Ok(f),
        Ok(None) => Err(ClusterError::Link("closed".into())),
        Err(Either::Left(e)) => Err(ClusterError::Link(e.to_string())),
        Err(Either::Right(e)) => Err(ClusterError::Link(e.to_string())),
    }
}

async fn send(io: &IoBoxed, frame: Frame) -> Result<()> {
    io.send(frame, &LINK).await.map_err(link_err)
}

/// Which end of a connection a node is: the proof of each end covers its
/// role, so that a proof one end gave can never be replayed as the other's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Dialer,
    Acceptor,
}

/// The message a node signs: the protocol, its role, both names and both
/// nonces (its own last), so a proof binds one connection and one direction.
fn proof_input(
    role: Role,
    me: &str,
    peer: &str,
    my_nonce: &[u8; 16],
    peer_nonce: &[u8; 16],
) -> Vec<u8> {
    let mut m = Vec::with_capacity(64 + me.len() + peer.len());
    m.extend_from_slice(b"ringmq-cluster-v1\0");
    m.push(match role {
        Role::Dialer => b'D',
        Role::Acceptor => b'A',
    });
    for name in [me, peer] {
        m.extend_from_slice(&u16::try_from(name.len()).unwrap_or(u16::MAX).to_be_bytes());
        m.extend_from_slice(name.as_bytes());
    }
    m.extend_from_slice(peer_nonce);
    m.extend_from_slice(my_nonce);
    m
}

/// Both sides: Hello, then Auth. Returns the peer's name and address. Every
/// read has a deadline, so a silent connection cannot stay open.
pub async fn handshake(io: &IoBoxed, cluster: &Cluster, role: Role) -> Result<(Arc<str>, String)> {
    let deadline = Duration::from_secs(10);
    match ntex::util::select(
        std::pin::pin!(handshake_inner(io, cluster, role)),
        ntex::time::sleep(deadline),
    )
    .await
    {
        Either::Left(r) => r,
        Either::Right(()) => Err(ClusterError::Link("handshake timed out".into())),
    }
}

async fn handshake_inner(
    io: &IoBoxed,
    cluster: &Cluster,
    role: Role,
) -> Result<(Arc<str>, String)> {
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
    } = recv_small(io).await?
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
    let key = hmac::Key::new(hmac::HMAC_SHA256, &secret);
    let ours = hmac::sign(
        &key,
        &proof_input(role, &cluster.node, &peer, &nonce, &peer_nonce),
    );
    let mut tag = [0u8; 32];
    tag.copy_from_slice(ours.as_ref());
    send(io, Frame::Auth { mac: tag }).await?;
    let Frame::Auth { mac: theirs } = recv_small(io).await? else {
        return Err(ClusterError::Link("expected Auth".into()));
    };
    let their_role = match role {
        Role::Dialer => Role::Acceptor,
        Role::Acceptor => Role::Dialer,
    };
    let expected = proof_input(their_role, &peer, &cluster.node, &peer_nonce, &nonce);
    hmac::verify(&key, &expected, &theirs)
        .map_err(|_| ClusterError::Link(format!("{peer} does not know the cluster secret")))?;
    Ok((Arc::from(peer), peer_addr))
}

/// A handshake frame: small, and read before the peer proved anything, so
/// the frame size limit is that of a handshake.
async fn recv_small(io: &IoBoxed) -> Result<Frame> {
    match io
        .recv(&FrameCodec {
            max: HANDSHAKE_FRAME,
        })
        .await
    {
        Ok(Some(f)) => Ok(f),
        Ok(None) => Err(ClusterError::Link("closed".into())),
        Err(Either::Left(e)) => Err(ClusterError::Link(e.to_string())),
        Err(Either::Right(e)) => Err(ClusterError::Link(e.to_string())),
    }
}

/// Largest frame read before authentication.
const HANDSHAKE_FRAME: usize = 4096;

/// What the cluster writes to a peer through the link this node dialled.
#[derive(Debug)]
pub struct Outbound {
    pub data: super::DataQueue,
    pub control: mpsc::UnboundedSender<Frame>,
    /// Outlives a connection, like the data queue: changes queued while
    /// the link is down keep their numbers.
    pub acks: Arc<super::replication::Awaiting>,
    /// This connection's replication stream.
    pub stream: u64,
}

/// Dials a peer address, runs the link while it is up, and dials again
/// when it drops, until this node stops or finds the address is its own.
pub async fn outbound(cluster: Arc<Cluster>, broker: Arc<Broker>, addr: String) {
    if !cluster.start_dialing(&addr) {
        return;
    }
    let shutdown = cluster.shutdown().clone();
    let _guard = shutdown.guard();
    let (tx, mut rx) = super::DataQueue::new();
    let acks = Arc::new(super::replication::Awaiting::default());
    // Control frames are few and must not be lost: their queue is unbounded.
    let (ctl_tx, mut ctl_rx) = mpsc::unbounded_channel::<Frame>();
    let heartbeat = Duration::from_millis(cluster.config.heartbeat_ms);
    let mut backoff = Duration::from_millis(100);
    while !shutdown.is_set() {
        let dialled = ntex::util::select(
            std::pin::pin!(dial(&cluster, &addr)),
            std::pin::pin!(shutdown.wait()),
        )
        .await;
        let ntex::util::Either::Left(dialled) = dialled else {
            break;
        };
        match dialled {
            Ok((io, peer)) if cluster.is_local(&peer) => {
                tracing::debug!(%addr, "cluster peer address is this node");
                io.close();
                cluster.stop_dialing(&addr);
                return;
            }
            Ok((io, peer)) => {
                backoff = Duration::from_millis(100);
                // What queued up while the link was down is in the snapshot
                // that `greet` sends.
                while ctl_rx.try_recv().is_ok() {}
                let stream = match super::replication::random_id() {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "cluster link not started");
                        io.close();
                        continue;
                    }
                };
                if let Err(e) = greet(&io, &cluster, &broker, stream).await {
                    tracing::info!(peer = %peer, error = %e, "cluster link lost");
                    continue;
                }
                let link = Outbound {
                    data: tx.clone(),
                    control: ctl_tx.clone(),
                    acks: acks.clone(),
                    stream,
                };
                cluster.link_up(&peer, &addr, link);
                // The link carries the handover of a leaving node: it ends
                // with the node, after the listeners stopped.
                let result = match ntex::util::select(
                    std::pin::pin!(pump(
                        &io,
                        (&cluster, &peer),
                        &mut ctl_rx,
                        &mut rx,
                        heartbeat
                    )),
                    std::pin::pin!(shutdown.wait()),
                )
                .await
                {
                    ntex::util::Either::Left(r) => r,
                    ntex::util::Either::Right(()) => Ok(()),
                };
                cluster.link_down(&peer, stream);
                // Whatever the next link brings, the peer is off the ring
                // now: nothing waits for it.
                cluster.release(&acks);
                io.close();
                if let Err(e) = result {
                    tracing::info!(peer = %peer, error = %e, "cluster link lost");
                }
            }
            Err(e) => tracing::debug!(%addr, error = %e, "cluster peer not reached"),
        }
        if !shutdown.sleep(backoff).await {
            break;
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
    cluster.stop_dialing(&addr);
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
    let (peer, _) = handshake(&io, cluster, Role::Dialer).await?;
    Ok((io, peer))
}

/// What a new link carries first: its replication stream, the members
/// this node knows, its routes, the token revocations in force and its
/// retained messages.
async fn greet(io: &IoBoxed, cluster: &Cluster, broker: &Broker, stream: u64) -> Result<()> {
    send(
        io,
        Frame::Stream {
            run: cluster.run(),
            link: stream,
        },
    )
    .await?;
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
    if let Some(t) = &broker.tokens() {
        for (id, exp_ms) in t.revocations() {
            send(io, Frame::Revoked { id, exp_ms }).await?;
        }
    }
    let now = std::time::Instant::now();
    for msg in broker.retained().matching("#") {
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
    (cluster, peer): (&Cluster, &str),
    ctl: &mut mpsc::UnboundedReceiver<Frame>,
    rx: &mut super::DataReceiver,
    heartbeat: Duration,
) -> Result<()> {
    // Heartbeats go out on a fixed schedule, however busy the link is: the
    // peer counts only heartbeats as signs of life.
    let mut next_beat = std::time::Instant::now();
    loop {
        let now = std::time::Instant::now();
        if now >= next_beat {
            // A peer cut off (a partition) may never make this connection
            // fail: ended here, it leaves with its routes (`routes`), and
            // the dialer tries again until the peer answers.
            if cluster.is_silent(peer) {
                return Err(ClusterError::Link(
                    "nothing heard for the failure timeout".into(),
                ));
            }
            let beat = Frame::Heartbeat {
                leaving: cluster.is_leaving(),
            };
            io.encode(beat, &LINK).map_err(link_err)?;
            next_beat = now + heartbeat;
        }
        // Control frames (routes, revocations, retained) first, then data.
        while let Ok(f) = ctl.try_recv() {
            io.encode(f, &LINK).map_err(link_err)?;
        }
        let mut batch = 0;
        while batch < 256 {
            match rx.try_recv() {
                Some(f) => {
                    io.encode(f, &LINK).map_err(link_err)?;
                    batch += 1;
                }
                None => break,
            }
        }
        io.flush(false).await.map_err(link_err)?;
        if io.is_closed() {
            return Err(ClusterError::Link("closed".into()));
        }
        if batch == 256 {
            continue;
        }
        let wait = next_beat.saturating_duration_since(std::time::Instant::now());
        let ctl_next = std::pin::pin!(ctl.recv());
        let data_next = std::pin::pin!(rx.recv());
        let next = ntex::util::select(ctl_next, data_next);
        match ntex::util::select(next, ntex::time::sleep(wait)).await {
            Either::Left(Either::Left(Some(f)) | Either::Right(Some(f))) => {
                io.encode(f, &LINK).map_err(link_err)?;
            }
            Either::Left(Either::Left(None) | Either::Right(None)) => return Ok(()),
            Either::Right(()) => {}
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
    let peer = match handshake(&io, &cluster, Role::Acceptor).await {
        // This node dialled its own address (it is in its peer list).
        Ok((peer, _)) if cluster.is_local(&peer) => {
            io.close();
            return;
        }
        Ok((peer, addr)) => {
            // A node this one does not dial yet (not in its peer list): dial
            // back, so that both directions of the pair exist.
            if !cluster.is_local(&peer) && !addr.is_empty() && !cluster.dials(&addr) {
                ntex::rt::spawn(outbound(cluster.clone(), broker.clone(), addr));
            }
            peer
        }
        Err(e) => {
            broker.metrics().reject("cluster_handshake");
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
        super::gate::serve_forwarded(io, &broker, &cluster, ip, mqtt).await;
        return;
    }
    let mut frame = first;
    let link = cluster.inbound_opened();
    let mut stream =
        super::replication::Inbound::new(cluster.clone(), broker.clone(), peer.clone());
    // The peer beats every `heartbeat_ms` however busy: a link silent for
    // the failure timeout is a peer cut off, whose TCP connection may
    // never say so.
    let silence = Duration::from_millis(cluster.config.failure_timeout_ms);
    // One timer, moved on only when it fires: a timer per frame would cost
    // on a busy link.
    let mut heard = std::time::Instant::now();
    let mut timer = Box::pin(ntex::time::sleep(silence));
    'frames: loop {
        // Never waits here: a full session holds back the acknowledgement
        // of the publish that filled it (`Inbound::forward`), not the
        // link, whose replica changes and acknowledgements must go on.
        apply(&cluster, &broker, (&peer, link), frame, &mut stream);
        frame = loop {
            match ntex::util::select(std::pin::pin!(recv(&io)), timer.as_mut()).await {
                Either::Left(Ok(f)) => {
                    heard = std::time::Instant::now();
                    break f;
                }
                Either::Left(Err(e)) => {
                    tracing::debug!(peer = %peer, error = %e, "cluster inbound link closed");
                    break 'frames;
                }
                Either::Right(()) => {
                    let quiet = heard.elapsed();
                    if quiet >= silence {
                        tracing::info!(peer = %peer, "cluster inbound link silent: closed");
                        io.close();
                        break 'frames;
                    }
                    timer = Box::pin(ntex::time::sleep(silence - quiet));
                }
            }
        };
    }
    cluster.inbound_closed(&peer, link);
}

/// Applies one frame from `peer`, arrived on its inbound link `link`.
fn apply(
    cluster: &Arc<Cluster>,
    broker: &Arc<Broker>,
    (peer, link): (&Arc<str>, u64),
    frame: Frame,
    stream: &mut super::replication::Inbound,
) {
    match frame {
        Frame::Heartbeat { leaving } => {
            cluster.heard(peer, leaving);
            stream.heartbeat();
        }
        Frame::Stream { run, link } => stream.started(run, link),
        Frame::Replicate {
            n,
            client,
            change,
            seq,
            value,
        } => {
            match super::replication::from_wire(change, seq, &value) {
                Ok(change) => broker.replica_change(peer, stream.link(), &client, change),
                Err(e) => {
                    // The copy misses this change; the owner still has it,
                    // and sends the session whole on its next link.
                    broker.metrics().reject("replica_change");
                    tracing::warn!(peer = %peer, client_id = %client, error = %e, "replica change not readable");
                }
            }
            stream.replica_change(n);
        }
        Frame::Ack {
            run,
            n,
            failed,
            forward,
        } => cluster.acked(peer, run, n, failed, forward),
        Frame::ReplicaSynced { link } => broker.replicas_synced(peer, link),
        Frame::Settled { members } => cluster.settled_from(peer, members),
        Frame::Revoked { id, exp_ms } => {
            if let Some(t) = &broker.tokens() {
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
            let (add, del) = cluster.remote_routes(peer, link, &f);
            broker.remote_routes(peer, &add, &del);
        }
        Frame::Publish { n, msg, groups } => {
            let (over, kept) =
                broker.publish_forwarded(Arc::new(super::from_wire(msg)), &groups, n != 0);
            stream.forward(n, kept, over);
        }
        Frame::Direct {
            n,
            client_id,
            persistent,
            msg,
        } => {
            let msg = Arc::new(super::from_wire(msg));
            let (over, kept) = broker.deliver_direct(&client_id, persistent, msg, n != 0);
            stream.forward(n, kept, over);
        }
        Frame::Retain { msg } => broker.retain_replica(Arc::new(super::from_wire(msg))),
        Frame::Session { n, session } => {
            let mut h = super::handover_from_wire(session);
            if broker.messages_from_copy(peer, &mut h) {
                let mut kept = crate::durable::Pending::default();
                broker.receive_session(peer, h, &mut kept);
                stream.session(n, kept);
            } else {
                stream.refuse(n);
            }
        }
        Frame::SessionGone {
            client,
            epoch,
            ttl_ms,
        } => broker.session_gone(&client, epoch, Duration::from_millis(ttl_ms)),
        Frame::Load {
            connections,
            subscriptions,
            pub_tps,
            sub_tps,
            under_replicated,
        } => broker.usage().capacity().peer_load(
            peer,
            crate::capacity::Load {
                connections,
                subscriptions,
                pub_tps,
                sub_tps,
                under_replicated,
            },
        ),
        Frame::Query { id, body } => {
            let body = cluster.answer_query(broker, &body);
            cluster.control(peer, Frame::Reply { id, body });
        }
        Frame::Reply { id, body } => cluster.answered(id, body),
        Frame::Hello { .. } | Frame::Auth { .. } | Frame::Proxy { .. } => {
            tracing::warn!(peer = %peer, "unexpected cluster frame ignored");
        }
    }
}
