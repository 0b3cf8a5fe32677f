//! The inbound scanner of the PUBREL layer (`pubrel::Scanner`), over
//! arbitrary bytes in arbitrary chunks: never a panic; what passes is the
//! input with only awaited PUBCOMPs taken out, each id at most once; and
//! how the bytes were split into reads changes nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringmq_broker::pubrel::{Frame, Scanner, Step, frame};

/// What one scan gave: bytes passed, ids taken, the (offset, length) of
/// each taken packet in the input, bytes still held.
type Scanned = (Vec<u8>, Vec<u16>, Vec<(usize, usize)>, Vec<u8>);

fn scan(ids: &[u16], input: &[u8], chunk: usize) -> Scanned {
    let mut s = Scanner::default();
    s.take(ids.to_vec());
    let (mut out, mut taken, mut cuts, mut held) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut at = 0;
    for part in input.chunks(chunk.max(1)) {
        held.extend_from_slice(part);
        while !held.is_empty() {
            match s.step(&held) {
                Step::Pass(n) => {
                    assert!(n > 0 && n <= held.len());
                    out.extend(held.drain(..n));
                    at += n;
                }
                Step::Take(n, id) => {
                    assert_eq!(frame(&held), Frame::Pubcomp { len: n, id });
                    held.drain(..n);
                    taken.push(id);
                    cuts.push((at, n));
                    at += n;
                }
                Step::Wait => break,
            }
        }
    }
    (out, taken, cuts, held)
}

fuzz_target!(|data: &[u8]| {
    let [chunk, n, rest @ ..] = data else {
        return;
    };
    let n = usize::from(*n % 4).min(rest.len() / 2);
    let (ids, input) = rest.split_at(n * 2);
    let ids: Vec<u16> = ids.chunks(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
    let whole = scan(&ids, input, input.len());
    assert_eq!(scan(&ids, input, usize::from(*chunk)), whole);
    assert_eq!(scan(&ids, input, 1), whole);
    let (out, taken, cuts, held) = whole;
    let mut left = ids.clone();
    for id in &taken {
        let i = left.iter().position(|x| x == id);
        assert!(i.is_some(), "taken {id}, not awaited");
        left.swap_remove(i.unwrap_or_default());
    }
    // The input with the taken packets cut out is what passed, then what is held.
    let mut kept = Vec::new();
    let mut from = 0;
    for (at, n) in cuts {
        kept.extend_from_slice(&input[from..at]);
        from = at + n;
    }
    kept.extend_from_slice(&input[from..]);
    assert_eq!(kept, [out, held].concat());
});
