//! A login storm: connections that CONNECT with a wrong password, over and
//! over, for as long as the run lasts. Run beside a scenario, it shows what
//! failed logins cost the clients already connected (their latency) and
//! whether a valid login still gets in.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// CONNACK return codes seen (index = code 0..=5) and connections that
/// closed without one (index 6).
#[derive(Debug, Default)]
pub struct Answers(pub [AtomicU64; 7]);

impl Answers {
    pub fn get(&self, i: usize) -> u64 {
        self.0[i].load(Ordering::Relaxed)
    }

    pub fn total(&self) -> u64 {
        (0..7).map(|i| self.get(i)).sum()
    }
}

fn string(out: &mut Vec<u8>, s: &[u8]) {
    let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&s[..usize::from(len)]);
}

/// An MQTT 3.1.1 CONNECT with a user name and password, clean session.
pub fn connect_packet(client_id: &str, user: &str, password: &str) -> Vec<u8> {
    let mut body = Vec::new();
    string(&mut body, b"MQTT");
    body.extend_from_slice(&[4, 0xC2, 0, 60]);
    string(&mut body, client_id.as_bytes());
    string(&mut body, user.as_bytes());
    string(&mut body, password.as_bytes());
    let mut p = vec![0x10];
    let mut n = body.len();
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        p.push(byte);
        if n == 0 {
            break;
        }
    }
    p.extend(body);
    p
}

async fn login(host: &str, port: u16, packet: &[u8]) -> Option<u8> {
    let mut s = tokio::net::TcpStream::connect((host, port)).await.ok()?;
    s.write_all(packet).await.ok()?;
    let mut ack = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(30), s.read_exact(&mut ack))
        .await
        .ok()?
        .ok()?;
    (ack[0] == 0x20).then_some(ack[3])
}

/// Starts `tasks` storm loops for `user`; they stop when `stop` is set.
pub fn start(
    host: &str,
    port: u16,
    tag: &str,
    tasks: usize,
    user: &str,
    stop: Arc<AtomicBool>,
    answers: Arc<Answers>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..tasks)
        .map(|i| {
            let (host, stop, answers) = (host.to_owned(), stop.clone(), answers.clone());
            let packet = connect_packet(&format!("{tag}-storm-{i}"), user, "not-the-password");
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let slot = login(&host, port, &packet).await.map_or(6, usize::from);
                    answers.0[slot.min(6)].fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connect_packet_carries_user_and_password() {
        let p = connect_packet("c", "alice", "pw");
        assert_eq!(p[0], 0x10);
        assert_eq!(usize::from(p[1]), p.len() - 2);
        assert!(p.ends_with(b"\x00\x05alice\x00\x02pw"));
    }
}
