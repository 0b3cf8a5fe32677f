//! The front door of a clustered node: read a client's CONNECT without
//! consuming it, find the owner of its Client ID on the ring, and either
//! serve the client here or forward its bytes to the owner.
//!
//! Forwarding happens after TLS and WebSocket are taken off, so the owner
//! sees plain MQTT, preceded on the link by the handshake and a `Proxy` frame
//! that carries the client's IP address (for device events).

use std::net::IpAddr;
use std::sync::Arc;

use ntex::codec::{BytesCodec, Decoder};
use ntex::io::IoBoxed;
use ntex::util::{BytesMut, Either};

use super::wire::Frame;
use super::{Cluster, link};
use crate::broker::Broker;

/// The MQTT service of a worker thread.
pub type Mqtt = ntex::PipelineBinding<IoBoxed, (), ntex_mqtt::MqttError<crate::protocol::Error>>;

/// What the first packet says.
#[derive(Debug, PartialEq, Eq)]
pub enum Peek {
    /// A complete CONNECT with this Client ID (empty: the broker assigns one).
    ClientId(String),
    /// Not a CONNECT, or not one this code can read: ntex-mqtt answers it.
    Other,
}

/// Reads the Client ID from a CONNECT at the front of the buffer, leaving
/// the buffer as it is. `Ok(None)`: more bytes are needed.
#[derive(Debug, Clone, Copy)]
pub struct PeekConnect {
    /// Larger CONNECT packets are left to ntex-mqtt, which refuses them.
    pub max_size: usize,
}

impl Decoder for PeekConnect {
    type Item = Peek;
    type Error = std::convert::Infallible;

    fn decode(&self, src: &mut BytesMut) -> Result<Option<Peek>, Self::Error> {
        Ok(peek_connect(src, self.max_size))
    }
}

/// The parsing behind `PeekConnect`: MQTT 3.1.1 and 5 CONNECT up to the
/// Client ID (MQTT 5 3.1).
pub fn peek_connect(b: &[u8], max_size: usize) -> Option<Peek> {
    let &first = b.first()?;
    if first != 0x10 {
        return Some(Peek::Other);
    }
    let mut pos = 1;
    let remaining = match varint(b, &mut pos) {
        Some(Ok(n)) => n,
        Some(Err(())) => return Some(Peek::Other),
        None => return None,
    };
    if remaining > max_size {
        return Some(Peek::Other);
    }
    let end = pos + remaining;
    if b.len() < end {
        return None;
    }
    let p = &b[pos..end];
    Some(client_id(p).map_or(Peek::Other, Peek::ClientId))
}

/// MQTT variable byte integer at `b[*pos..]`: `None` if incomplete.
fn varint(b: &[u8], pos: &mut usize) -> Option<Result<usize, ()>> {
    let mut value = 0usize;
    for i in 0..4 {
        let byte = *b.get(*pos)?;
        *pos += 1;
        value |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some(Ok(value));
        }
    }
    Some(Err(()))
}

fn client_id(p: &[u8]) -> Option<String> {
    let u16_at = |i: usize| -> Option<usize> {
        Some(usize::from(u16::from_be_bytes([
            *p.get(i)?,
            *p.get(i + 1)?,
        ])))
    };
    let name_len = u16_at(0)?;
    let mut pos = 2 + name_len;
    let level = *p.get(pos)?;
    pos += 1 + 1 + 2; // level, flags, keep-alive
    if level == 5 {
        match varint(p, &mut pos)? {
            Ok(props) => pos += props,
            Err(()) => return None,
        }
    }
    let id_len = u16_at(pos)?;
    let id = p.get(pos + 2..pos + 2 + id_len)?;
    String::from_utf8(id.to_vec()).ok()
}

/// Serves one client connection of a front-door listener.
pub async fn serve(io: IoBoxed, broker: Arc<Broker>, cluster: Option<Arc<Cluster>>, mqtt: &Mqtt) {
    let Some(_slot) = slot(&io, &broker) else {
        return;
    };
    let Some(peek) = peek(&io, &broker).await else {
        return;
    };
    let Some(cluster) = cluster else {
        serve_here(io, &broker, mqtt, &peek).await;
        return;
    };
    let owner_of = |peek: &Peek| match peek {
        Peek::ClientId(id) if !id.is_empty() => cluster.owner(id),
        _ => cluster.node.clone(),
    };
    let mut owner = owner_of(&peek);
    if cluster.is_local(&owner) {
        wait_settled(&cluster).await;
        // A node that has just started owns everything on its ring of one
        // until it meets its peers: the owner is asked again once it has.
        owner = owner_of(&peek);
        if cluster.is_local(&owner) {
            serve_here(io, &broker, mqtt, &peek).await;
            return;
        }
    }
    // The link to the owner is a second descriptor.
    let Some(_link_slot) = slot(&io, &broker) else {
        return;
    };
    let client_ip = crate::protocol::socket_ip(&io);
    if let Err(e) = forward(&io, &cluster, &owner, client_ip).await {
        broker.metrics().reject("cluster_forward");
        tracing::info!(owner = %owner, error = %e, "client not forwarded to its session's owner");
    }
    io.close();
}

/// Pipes the client's bytes to the owner and back until either side closes.
async fn forward(
    client: &IoBoxed,
    cluster: &super::Cluster,
    owner: &str,
    client_ip: Option<IpAddr>,
) -> super::Result<()> {
    let addr = cluster
        .addr_of(owner)
        .ok_or_else(|| super::ClusterError::Link(format!("no address for {owner}")))?;
    let (up, peer) = link::dial(cluster, &addr).await?;
    if *peer != *owner {
        return Err(super::ClusterError::Link(format!(
            "{addr} is {peer}, not {owner}"
        )));
    }
    let proxy = Frame::Proxy {
        client_ip: client_ip.map(|ip| ip.to_string()).unwrap_or_default(),
    };
    up.send(proxy, &link::LINK)
        .await
        .map_err(|e| super::ClusterError::Link(format!("{e:?}")))?;
    let mut to_owner = std::pin::pin!(pipe(client, &up));
    let mut to_client = std::pin::pin!(pipe(&up, client));
    if let Either::Left(PipeEnd::SinkFailed) =
        ntex::util::select(to_owner.as_mut(), to_client.as_mut()).await
    {
        // The owner closed while its last bytes (a notice, a DISCONNECT)
        // may still be on their way to the client: let them through.
        let _ = ntex::util::select(
            to_client.as_mut(),
            ntex::time::sleep(std::time::Duration::from_secs(1)),
        )
        .await;
    }
    up.close();
    Ok(())
}

/// Why a pipe stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PipeEnd {
    /// Its source closed.
    SourceClosed,
    /// Writing to its sink failed.
    SinkFailed,
}

async fn pipe(from: &IoBoxed, to: &IoBoxed) -> PipeEnd {
    loop {
        match from.recv(&BytesCodec).await {
            Ok(Some(bytes)) => {
                if to.send(bytes, &BytesCodec).await.is_err() {
                    return PipeEnd::SinkFailed;
                }
            }
            Ok(None) | Err(Either::Left(_)) | Err(Either::Right(_)) => {
                return PipeEnd::SourceClosed;
            }
        }
    }
}

/// Reads the CONNECT's Client ID without taking it (ntex-mqtt reads the
/// CONNECT itself), within the deadline ntex-mqtt gives a CONNECT; `None`:
/// the connection closed or timed out first (counted).
async fn peek(io: &IoBoxed, broker: &Broker) -> Option<Peek> {
    let codec = PeekConnect {
        max_size: broker.config().limits.max_packet_size as usize,
    };
    let read = async {
        loop {
            match io.decode(&codec) {
                Ok(Some(p)) => return Some(p),
                Ok(None) => match io.read_more().await {
                    Ok(Some(())) => {}
                    Ok(None) => return None,
                    Err(_) => {
                        broker.metrics().reject("closed_before_connect");
                        return None;
                    }
                },
                Err(e) => match e {},
            }
        }
    };
    let timeout =
        std::time::Duration::from_secs(broker.config().limits.connect_timeout_secs.into());
    match ntex::util::select(std::pin::pin!(read), ntex::time::sleep(timeout)).await {
        Either::Left(p) => p,
        Either::Right(()) => {
            broker.metrics().reject("connect_timeout");
            io.close();
            None
        }
    }
}

/// A node that just joined serves its sessions once the others have handed
/// them over (bounded by the failure timeout).
async fn wait_settled(cluster: &super::Cluster) {
    let deadline = std::time::Instant::now()
        + std::time::Duration::from_millis(cluster.config.failure_timeout_ms);
    while !cluster.is_settled() && std::time::Instant::now() < deadline {
        ntex::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The owner's side: a client another node forwarded, served like a local one.
pub async fn serve_forwarded(
    io: IoBoxed,
    broker: &Broker,
    cluster: &Cluster,
    client_ip: Option<IpAddr>,
    mqtt: &Mqtt,
) {
    wait_settled(cluster).await;
    let Some(_slot) = slot(&io, broker) else {
        return;
    };
    let _forwarded = client_ip.map(|ip| crate::protocol::ForwardedFrom::new(&io, ip));
    if let Some(peek) = peek(&io, broker).await {
        // The ring moved while the client waited: its session is not this
        // node's to open (the client connects again, and the front node
        // finds the owner).
        if let Peek::ClientId(id) = &peek
            && !id.is_empty()
            && !cluster.is_local(&cluster.owner(id))
        {
            broker.metrics().reject("cluster_not_owner");
            io.close();
            return;
        }
        serve_here(io, broker, mqtt, &peek).await;
    }
}

/// A descriptor slot for a connection (`descriptors`); past the budget the
/// connection is closed and counted.
fn slot(io: &IoBoxed, broker: &Broker) -> Option<crate::descriptors::Slot> {
    let slot = broker.descriptors().take(1);
    if slot.is_none() {
        broker.metrics().reject("fd_limit");
        io.close();
    }
    slot
}

/// Serves a client on this node; a connection that ends before its CONNECT
/// was read (garbage, a timeout, a reset) is counted, since no handler saw it.
async fn serve_here(io: IoBoxed, broker: &Broker, mqtt: &Mqtt, peek: &Peek) {
    use ntex_mqtt::{MqttConnectError, MqttError};
    // A session that owes its client PUBRELs of an earlier connection gets
    // the layer that sends them, under ntex-mqtt; the others go without
    // (the layer costs every read and write a pass through it).
    let io = match peek {
        Peek::ClientId(id) if broker.owes_pubrel(id) => ntex::io::Io::<ntex::io::Sealed>::from(io)
            .add_filter(crate::pubrel::ReleaseLayer::default())
            .boxed(),
        _ => io,
    };
    let label = match mqtt.call(io).await {
        Err(MqttError::Connect(MqttConnectError::Timeout)) => "connect_timeout",
        Err(MqttError::Connect(MqttConnectError::Protocol(_))) => "malformed_connect",
        Err(MqttError::Connect(MqttConnectError::Disconnected(Some(_)))) => "closed_before_connect",
        _ => return,
    };
    broker.metrics().reject(label);
    tracing::debug!(reason = label, "connection closed before CONNECT");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect(level: u8, id: &str, props: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 4, b'M', b'Q', b'T', b'T', level, 0x02, 0, 60];
        if level == 5 {
            v.push(props.len() as u8);
            v.extend_from_slice(props);
        }
        v.extend_from_slice(&(id.len() as u16).to_be_bytes());
        v.extend_from_slice(id.as_bytes());
        let mut p = vec![0x10, v.len() as u8];
        p.extend(v);
        p
    }

    #[test]
    fn reads_the_client_id_of_both_versions() {
        let v3 = connect(4, "GID_test@@@d1", &[]);
        assert_eq!(
            peek_connect(&v3, 1024),
            Some(Peek::ClientId("GID_test@@@d1".into()))
        );
        let v5 = connect(5, "dev", &[0x11, 0, 0, 0, 10]);
        assert_eq!(peek_connect(&v5, 1024), Some(Peek::ClientId("dev".into())));
    }

    #[test]
    fn waits_for_the_whole_packet_and_leaves_the_rest_to_ntex_mqtt() {
        let v3 = connect(4, "abc", &[]);
        for n in 0..v3.len() {
            assert_eq!(peek_connect(&v3[..n], 1024), None, "prefix {n}");
        }
        assert_eq!(peek_connect(&[0x30, 0], 1024), Some(Peek::Other));
        assert_eq!(peek_connect(&v3, 4), Some(Peek::Other));
        assert_eq!(
            peek_connect(&[0x10, 0xff, 0xff, 0xff, 0xff, 1], 1024),
            Some(Peek::Other)
        );
        assert_eq!(peek_connect(&[0x10, 2, 0, 9], 1024), Some(Peek::Other));
    }
}
