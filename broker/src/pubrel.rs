//! PUBRELs of an earlier connection (MQTT 3.1.1 4.4, MQTT 5 4.4).
//!
//! A QoS 2 message to a client is released in two steps: the client's
//! PUBREC, our PUBREL, the client's PUBCOMP. When the connection ends
//! between PUBREL and PUBCOMP, the client may still hold the message (a
//! client that delivers on PUBREL has not delivered it yet), and the
//! protocol says the server sends the PUBREL again on the session's next
//! connection. ntex-mqtt runs that exchange itself, only for the PUBLISHes
//! of the same connection: it has no way to send a PUBREL for another
//! connection's packet id, and it closes a connection that sends a PUBCOMP
//! for an id it does not know.
//!
//! So this I/O layer sits between the transport (TCP, TLS, WebSocket) and
//! ntex-mqtt on a connection whose session owes such PUBRELs (the gate
//! looks at the CONNECT's Client ID first; other connections go without
//! it, since it costs each read and write a pass). Once the CONNECT handler
//! arms it with the session's released ids (`Releases::resend`), it writes
//! their PUBRELs right after the CONNACK and takes the client's PUBCOMPs
//! for those ids out of the stream before ntex-mqtt sees them, telling the
//! session. It finds packet boundaries by reading each fixed header
//! (`Scanner`); once nothing is awaited, it passes bytes through without
//! looking at them. Ids released on another connection of the session
//! after the gate looked (a takeover race) wait for the next connection.

use std::any::{Any, TypeId};
use std::cell::{Cell, RefCell};
use std::io;
use std::rc::Rc;

use ntex::io::{FilterBuf, FilterLayer};
use ntex::util::BytesMut;

/// MQTT fixed-header first byte of PUBREL (its flags are fixed at 0b0010).
const PUBREL: u8 = 0x62;
/// MQTT fixed-header first byte of PUBCOMP.
const PUBCOMP: u8 = 0x70;
/// Largest PUBCOMP looked at: id, reason code and a few properties. A
/// larger one is not ours to take; ntex-mqtt judges it.
const MAX_PUBCOMP: usize = 256;

/// What the front of the inbound stream holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// A whole packet of `len` bytes (header included) that is a PUBCOMP
    /// for `id`.
    Pubcomp { len: usize, id: u16 },
    /// A packet of `len` bytes (header included, maybe not all here yet)
    /// that passes.
    Other { len: usize },
    /// Not enough bytes to tell.
    Partial,
    /// Not MQTT framing (a remaining length over four bytes): from here on
    /// everything passes, ntex-mqtt refuses it.
    Malformed,
}

/// Reads the packet at the front of `buf`.
pub fn frame(buf: &[u8]) -> Frame {
    let Some(&first) = buf.first() else {
        return Frame::Partial;
    };
    let mut remaining = 0usize;
    let mut at = 1;
    loop {
        let Some(&b) = buf.get(at) else {
            return Frame::Partial;
        };
        remaining |= usize::from(b & 0x7f) << (7 * (at - 1));
        at += 1;
        if b & 0x80 == 0 {
            break;
        }
        if at > 4 {
            return Frame::Malformed;
        }
    }
    let len = at + remaining;
    if first != PUBCOMP || remaining < 2 || len > MAX_PUBCOMP {
        return Frame::Other { len };
    }
    match buf.get(at..at + 2) {
        Some(&[hi, lo]) if buf.len() >= len => Frame::Pubcomp {
            len,
            id: u16::from_be_bytes([hi, lo]),
        },
        _ => Frame::Partial,
    }
}

/// What the layer is doing with the inbound stream.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Mode {
    /// Before the CONNECT handler armed it: packet boundaries are followed.
    Tracking,
    /// PUBCOMPs of these ids are taken out.
    Taking(Vec<u16>),
    /// Everything passes untouched.
    Off,
}

/// The inbound side, apart from ntex: which bytes pass and which PUBCOMPs
/// are taken out.
#[derive(Debug)]
pub struct Scanner {
    mode: Mode,
    /// Bytes of the current packet still to pass without looking.
    skip: usize,
}

impl Default for Scanner {
    fn default() -> Self {
        Self {
            mode: Mode::Tracking,
            skip: 0,
        }
    }
}

/// One step of the scanner over the inbound bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The next `n` bytes pass.
    Pass(usize),
    /// The next `n` bytes are the PUBCOMP of `id`, awaited: taken out.
    Take(usize, u16),
    /// Wait for more bytes (nothing passes meanwhile).
    Wait,
}

impl Scanner {
    /// Takes out the PUBCOMPs of `ids` from now on (none: stops looking).
    pub fn take(&mut self, ids: Vec<u16>) {
        self.mode = if ids.is_empty() {
            Mode::Off
        } else {
            Mode::Taking(ids)
        };
    }

    /// Whether PUBCOMPs are still awaited.
    pub fn is_taking(&self) -> bool {
        matches!(self.mode, Mode::Taking(_))
    }

    /// Stops following the stream (nothing was armed).
    pub fn stop_tracking(&mut self) {
        if self.mode == Mode::Tracking {
            self.mode = Mode::Off;
        }
    }

    /// What to do with the front of `buf` (not empty).
    pub fn step(&mut self, buf: &[u8]) -> Step {
        if self.mode == Mode::Off {
            return Step::Pass(buf.len());
        }
        if self.skip > 0 {
            let n = self.skip.min(buf.len());
            self.skip -= n;
            return Step::Pass(n);
        }
        match frame(buf) {
            Frame::Pubcomp { len, id } => {
                if let Mode::Taking(ids) = &mut self.mode
                    && let Some(i) = ids.iter().position(|&x| x == id)
                {
                    ids.swap_remove(i);
                    if ids.is_empty() {
                        self.mode = Mode::Off;
                    }
                    return Step::Take(len, id);
                }
                self.pass(len, buf.len())
            }
            Frame::Other { len } => self.pass(len, buf.len()),
            Frame::Partial => Step::Wait,
            Frame::Malformed => {
                self.mode = Mode::Off;
                Step::Pass(buf.len())
            }
        }
    }

    fn pass(&mut self, len: usize, have: usize) -> Step {
        let n = len.min(have);
        self.skip = len - n;
        Step::Pass(n)
    }
}

/// The PUBREL packet of `id` (the same bytes in MQTT 3.1.1 and 5: a
/// success reason code may be left out).
pub fn pubrel(id: u16) -> [u8; 4] {
    let [hi, lo] = id.to_be_bytes();
    [PUBREL, 2, hi, lo]
}

/// Told the packet id of each PUBCOMP taken.
type Completed = Box<dyn Fn(u16)>;

#[derive(Default)]
struct Shared {
    scanner: RefCell<Scanner>,
    /// PUBRELs to write after the CONNACK.
    out: RefCell<Vec<u8>>,
    /// Whether anything was written yet (the CONNACK is first).
    wrote: Cell<bool>,
    completed: RefCell<Option<Completed>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("scanner", &self.scanner)
            .finish_non_exhaustive()
    }
}

/// The layer; add it before ntex-mqtt reads the CONNECT.
#[derive(Debug, Default)]
pub struct ReleaseLayer(Rc<Shared>);

/// The CONNECT handler's handle on its connection's layer (`IoRef::query`).
#[derive(Debug, Clone)]
pub struct Releases(Rc<Shared>);

impl Releases {
    /// Sends the PUBRELs of `ids` right after the CONNACK and calls
    /// `completed` for each id whose PUBCOMP arrives. Empty: the layer
    /// stops looking at the stream.
    pub fn resend(&self, ids: Vec<u16>, completed: impl Fn(u16) + 'static) {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for &id in &ids {
            out.extend_from_slice(&pubrel(id));
        }
        *self.0.out.borrow_mut() = out;
        *self.0.completed.borrow_mut() = Some(Box::new(completed));
        self.0.scanner.borrow_mut().take(ids);
    }
}

impl FilterLayer for ReleaseLayer {
    fn query(&self, id: TypeId) -> Option<Box<dyn Any>> {
        (id == TypeId::of::<Releases>()).then(|| Box::new(Releases(self.0.clone())) as Box<dyn Any>)
    }

    fn process_read_buf(&self, buf: &FilterBuf<'_>) -> io::Result<()> {
        let taken = buf.with_read_buffers(|src, dst| {
            let mut taken = Vec::new();
            let Some(mut s) = src.take() else {
                return taken;
            };
            let mut scanner = self.0.scanner.borrow_mut();
            // The first `pass` bytes of `s` go up.
            let mut pass = 0;
            let flush = |s: &mut BytesMut, dst: &mut BytesMut, pass: usize| {
                if pass == s.len() && dst.is_empty() {
                    // Most reads pass whole: the buffer goes up, no copy.
                    std::mem::swap(s, dst);
                } else {
                    dst.extend_from_slice(&s[..pass]);
                    s.advance_to(pass);
                }
            };
            while pass < s.len() {
                match scanner.step(&s[pass..]) {
                    Step::Pass(n) => pass += n,
                    Step::Take(n, id) => {
                        flush(&mut s, dst, pass);
                        s.advance_to(n);
                        pass = 0;
                        taken.push(id);
                    }
                    Step::Wait => break,
                }
            }
            flush(&mut s, dst, pass);
            if !s.is_empty() {
                *src = Some(s);
            }
            taken
        });
        if !taken.is_empty()
            && let Some(completed) = self.0.completed.borrow().as_ref()
        {
            for id in taken {
                completed(id);
            }
        }
        Ok(())
    }

    fn process_write_buf(&self, buf: &FilterBuf<'_>) -> io::Result<()> {
        buf.with_write_buffers(|src, dst| {
            if src.is_empty() {
                return;
            }
            src.move_to(dst);
            if !self.0.wrote.replace(true) {
                // The CONNACK went out: what was not armed by now never is.
                self.0.scanner.borrow_mut().stop_tracking();
                let out = std::mem::take(&mut *self.0.out.borrow_mut());
                if !out.is_empty() {
                    dst.extend_from_slice(&out);
                }
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in chunks of `chunk` bytes, as reads would bring it.
    fn run(scanner: &mut Scanner, input: &[u8], chunk: usize) -> (Vec<u8>, Vec<u16>) {
        let (mut out, mut taken, mut held) = (Vec::new(), Vec::new(), Vec::new());
        for part in input.chunks(chunk.max(1)) {
            held.extend_from_slice(part);
            while !held.is_empty() {
                match scanner.step(&held) {
                    Step::Pass(n) => out.extend(held.drain(..n)),
                    Step::Take(n, id) => {
                        held.drain(..n);
                        taken.push(id);
                    }
                    Step::Wait => break,
                }
            }
        }
        (out, taken)
    }

    fn packet(first: u8, body: &[u8]) -> Vec<u8> {
        let mut p = vec![first];
        let mut n = body.len();
        loop {
            let b = (n % 128) as u8;
            n /= 128;
            p.push(if n > 0 { b | 0x80 } else { b });
            if n == 0 {
                break;
            }
        }
        p.extend_from_slice(body);
        p
    }

    #[test]
    fn awaited_pubcomps_are_taken_out_and_the_rest_passes_in_any_chunking() {
        let publish = packet(0x32, &[&[0, 3][..], b"a/b", &[0, 7], &[b'x'; 300]].concat());
        let ours = packet(PUBCOMP, &[0, 9]);
        let ours_v5 = packet(PUBCOMP, &[0, 10, 0x92, 0]);
        let theirs = packet(PUBCOMP, &[0, 11]);
        let ping = packet(0xc0, &[]);
        let stream = [
            publish.clone(),
            ours.clone(),
            theirs.clone(),
            ping.clone(),
            ours_v5,
            ours.clone(),
        ]
        .concat();
        let want = [publish, theirs, ping, ours].concat();
        for chunk in [1, 2, 3, 7, 64, 4096] {
            let mut s = Scanner::default();
            s.take(vec![9, 10]);
            let (out, taken) = run(&mut s, &stream, chunk);
            assert_eq!(taken, [9, 10], "chunk {chunk}");
            // The second PUBCOMP of 9 was not awaited any more: it passes.
            assert_eq!(out, want, "chunk {chunk}");
            assert!(!s.is_taking());
        }
    }

    #[test]
    fn nothing_is_taken_before_arming_or_when_nothing_is_awaited() {
        let stream = [packet(0x10, &[0; 20]), packet(PUBCOMP, &[0, 9])].concat();
        let mut s = Scanner::default();
        assert_eq!(run(&mut s, &stream, 5), (stream.clone(), vec![]));
        let mut s = Scanner::default();
        s.take(Vec::new());
        assert_eq!(s.step(&stream), Step::Pass(stream.len()));
    }

    #[test]
    fn a_remaining_length_over_four_bytes_turns_the_scanner_off() {
        let mut s = Scanner::default();
        s.take(vec![1]);
        let bad = [0x30, 0xff, 0xff, 0xff, 0xff, 0x01, 0x70, 0x02, 0, 1];
        assert_eq!(s.step(&bad), Step::Pass(bad.len()));
        assert!(!s.is_taking());
    }

    #[test]
    fn a_large_pubcomp_is_not_waited_for() {
        assert_eq!(
            frame(&[PUBCOMP, 0x80, 0x02, 0, 1]),
            Frame::Other { len: 259 }
        );
        assert_eq!(frame(&[PUBCOMP, 0x02, 0]), Frame::Partial);
        assert_eq!(
            frame(&[PUBCOMP, 0x02, 0, 5]),
            Frame::Pubcomp { len: 4, id: 5 }
        );
    }
}
