//! Raw MQTT packets over a plain socket, for input no client library sends.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use super::Broker;

pub fn remaining_length(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if n == 0 {
            break;
        }
    }
}

pub fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut p = vec![first];
    remaining_length(body.len(), &mut p);
    p.extend_from_slice(body);
    p
}

pub fn string(s: &[u8]) -> Vec<u8> {
    let mut v = (s.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(s);
    v
}

/// CONNECT for protocol level 4 (3.1.1) or 5, clean session, keep-alive 60.
pub fn connect(level: u8, client_id: &str) -> Vec<u8> {
    let mut body = string(b"MQTT");
    body.extend_from_slice(&[level, 0x02, 0, 60]);
    if level == 5 {
        body.push(0); // no properties
    }
    body.extend(string(client_id.as_bytes()));
    packet(0x10, &body)
}

/// CONNECT (3.1.1) with a user name and password, clean session.
pub fn connect_with(client_id: &str, user: &[u8], password: &[u8]) -> Vec<u8> {
    let mut body = string(b"MQTT");
    body.extend_from_slice(&[4, 0xC2, 0, 60]);
    body.extend(string(client_id.as_bytes()));
    body.extend(string(user));
    body.extend(string(password));
    packet(0x10, &body)
}

/// CONNECT of a persistent session: 3.1.1 cleanSession=0, MQTT 5 clean
/// start 0 with a session expiry of 3600 s; keep-alive 60.
pub fn connect_keep(level: u8, client_id: &str) -> Vec<u8> {
    let mut body = string(b"MQTT");
    body.extend_from_slice(&[level, 0x00, 0, 60]);
    if level == 5 {
        body.extend_from_slice(&[5, 0x11, 0, 0, 0x0e, 0x10]);
    }
    body.extend(string(client_id.as_bytes()));
    packet(0x10, &body)
}

pub fn subscribe(level: u8, filter: &[u8]) -> Vec<u8> {
    subscribe_qos(level, filter, 1)
}

/// SUBSCRIBE (packet id 1) to one filter at `qos`.
pub fn subscribe_qos(level: u8, filter: &[u8], qos: u8) -> Vec<u8> {
    let mut body = vec![0, 1];
    if level == 5 {
        body.push(0);
    }
    body.extend(string(filter));
    body.push(qos);
    packet(0x82, &body)
}

pub fn publish_qos1(level: u8, topic: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut body = string(topic);
    body.extend_from_slice(&[0, 7]);
    if level == 5 {
        body.push(0);
    }
    body.extend_from_slice(payload);
    packet(0x32, &body)
}

pub struct Raw(pub TcpStream);

impl Raw {
    pub fn open(b: &Broker) -> Raw {
        let s = TcpStream::connect(b.addr()).unwrap_or_else(|e| panic!("connect: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap_or_else(|e| panic!("{e}"));
        Raw(s)
    }

    pub fn send(&mut self, bytes: &[u8]) {
        // The broker may already have closed the socket: that is a valid answer.
        let _ = self.0.write_all(bytes);
    }

    /// Reads one packet: (first byte, body); `None` when the broker closed.
    pub fn read(&mut self) -> Option<(u8, Vec<u8>)> {
        let mut first = [0u8; 1];
        self.0.read_exact(&mut first).ok()?;
        let mut len = 0usize;
        let mut shift = 0;
        loop {
            let mut b = [0u8; 1];
            self.0.read_exact(&mut b).ok()?;
            len |= usize::from(b[0] & 0x7f) << shift;
            shift += 7;
            if b[0] & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0u8; len];
        self.0.read_exact(&mut body).ok()?;
        Some((first[0], body))
    }

    /// Reads until the broker closes; returns the packets it sent first.
    pub fn until_closed(&mut self) -> Vec<(u8, Vec<u8>)> {
        let mut got = Vec::new();
        while let Some(p) = self.read() {
            got.push(p);
        }
        got
    }

    pub fn connected(b: &Broker, level: u8, id: &str) -> Raw {
        let mut r = Raw::open(b);
        r.send(&connect(level, id));
        let (kind, body) = r.read().unwrap_or_else(|| panic!("no CONNACK"));
        assert_eq!(kind, 0x20);
        assert_eq!(body.get(1), Some(&0), "CONNECT accepted");
        r
    }
}
