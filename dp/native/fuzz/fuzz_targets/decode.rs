//! `decode::decode` and `Fragments::decode` on arbitrary frames.
//!
//! The first byte picks the mode. Bit 7 clear: one frame, `decode` alone. Bits 0-2 pick the link
//! type (every one `decode` knows, and one it does not), bits 3-4 how `wire_len` is chosen,
//! bits 5-6 the `start..end` window; then a VLAN (u16), the window's and `wire_len`'s bytes when
//! the mode reads them, and the frame. Bit 7 set: a sequence of frames through one `Fragments`
//! (bits 0-2: its size, bit 3: its timeout), each frame `[link and time step: u8][length: u16
//! LE][bytes]`.
//!
//! Besides "no panic" (overflow checks are on in fuzz builds), what must hold: a packet's payload
//! lies in the window (or starts past its end: no payload), its IP length is at least a header;
//! the bytes outside the window change nothing, nor does where the window sits in the buffer;
//! `Fragments::decode` says what `decode` says, attributing only non-first fragments, and stays
//! within its size.

#![no_main]

mod common;

use _native::decode::{
    self, Decoded, Fragments, Outcome, Reason, LINK_ETHERNET, LINK_IPV4, LINK_IPV6, LINK_LINUX_SLL, LINK_LINUX_SLL2,
    LINK_NULL, LINK_RAW,
};
use common::Input;
use libfuzzer_sys::fuzz_target;

/// Every link type the decoder reads, and one it does not (DLT_USER0).
const LINKS: [u32; 8] =
    [LINK_ETHERNET, LINK_RAW, LINK_LINUX_SLL, LINK_LINUX_SLL2, LINK_NULL, LINK_IPV4, LINK_IPV6, 147];

/// Bytes put before and after the frame to show that only the window is read.
const PAD: usize = 7;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let head = input.u8();
    if head & 0x80 == 0 {
        one(head, &mut input);
    } else {
        sequence(head, &mut input);
    }
});

fn one(head: u8, input: &mut Input) {
    let link = LINKS[(head & 7) as usize];
    let vlan = input.u16();
    let window = (head >> 5) & 3;
    let (a, b) = match window {
        1 => (input.u8() as usize, usize::MAX),
        2 => (0, input.u8() as usize),
        3 => (input.u16() as usize, input.u16() as usize),
        _ => (0, usize::MAX),
    };
    let wire_pick = (head >> 3) & 3;
    let wire_extra = match wire_pick {
        1 => input.u8() as u64,
        2 => input.u16() as u64,
        3 => input.u64(),
        _ => 0,
    };
    let frame = input.rest();
    let (start, end) = match window {
        2 => (0, frame.len().saturating_sub(b)), // the frame's last bytes left out
        _ => (a, b),
    };
    let wire_len = match wire_pick {
        0 => 0,                                 // unknown: the captured length
        1 => frame.len() as u64 + wire_extra,   // as a kernel says: at least what was captured
        _ => wire_extra,                        // anything
    };
    check(frame, start, end, link, vlan, wire_len);
}

/// Decode `frame[start..end]` and hold the result to the invariants.
fn check(frame: &[u8], start: usize, end: usize, link: u32, vlan: u16, wire_len: u64) {
    let mut d = Decoded::default();
    let out = decode::decode(frame, start, end, link, vlan, wire_len, &mut d);
    let hi = end.min(frame.len());
    let lo = start.min(hi);
    match out {
        Outcome::Packet => {
            let header: usize = if d.v6 { 40 } else { 20 };
            assert!(d.ip_len >= header as u64, "IP length {} below a header", d.ip_len);
            assert!(d.payload_end <= hi && d.payload_end >= lo, "payload end {} outside {lo}..{hi}", d.payload_end);
            assert!(d.payload_start >= lo + header, "payload start {} inside the IP header", d.payload_start);
            if d.has_payload() {
                let _ = &frame[d.payload_start..d.payload_end];
            }
        }
        Outcome::Later => {
            assert!(d.frag.is_some(), "a non-first fragment without its datagram's id");
            assert!(d.ip_len > 0);
        }
        Outcome::Skip(r) => assert!(r != Reason::InternalError && r != Reason::Fragment, "decode said {r:?}"),
    }

    // The window clamped by hand reads the same.
    let mut e = Decoded::default();
    let clamped = decode::decode(frame, lo, hi, link, vlan, wire_len, &mut e);
    assert_eq!(out, clamped, "a window past the buffer is not the clamped window");
    same(&d, &e, out, 0);

    // The same window with other bytes around it, and elsewhere in the buffer, reads the same.
    let mut moved = vec![0xA5u8; PAD];
    moved.extend_from_slice(&frame[..hi]);
    moved.extend_from_slice(&[0x5Au8; PAD]);
    let mut e = Decoded::default();
    let shifted = decode::decode(&moved, lo + PAD, hi + PAD, link, vlan, wire_len, &mut e);
    assert_eq!(out, shifted, "bytes outside the window changed the outcome");
    same(&d, &e, out, PAD);
}

/// `a` and `b` (read `shift` bytes further into their buffer) say the same of the packet.
fn same(a: &Decoded, b: &Decoded, out: Outcome, shift: usize) {
    let id = |d: &Decoded| (d.vlan, d.v6, d.src, d.dst, d.ip_len, d.frag);
    match out {
        Outcome::Packet => {
            assert_eq!(id(a), id(b));
            assert_eq!((a.proto, a.sport, a.dport, a.flags), (b.proto, b.sport, b.dport, b.flags));
            assert_eq!((a.payload_start + shift, a.payload_end + shift), (b.payload_start, b.payload_end));
        }
        Outcome::Later => assert_eq!(id(a), id(b)),
        Outcome::Skip(_) => {}
    }
}

fn sequence(head: u8, input: &mut Input) {
    let limit = (head & 7) as usize;
    let timeout = if head & 8 != 0 { 0.5 } else { 30.0 };
    let mut frags = Fragments::new(limit, timeout);
    let (mut ts, mut firsts, mut attributed) = (1_000.0f64, 0u64, 0u64);
    while !input.is_empty() {
        let b = input.u8();
        let link = LINKS[(b & 7) as usize];
        ts += (b >> 3) as f64 * 0.25 - 2.0; // -2 s .. +5.75 s: rings are read out of order
        let len = input.u16() as usize;
        let frame = input.take(len);

        let mut plain = Decoded::default();
        let want = decode::decode(frame, 0, frame.len(), link, 0, 0, &mut plain);
        let mut d = Decoded::default();
        let got = frags.decode(frame, 0, frame.len(), link, 0, 0, ts, &mut d);
        match (want, got) {
            (Outcome::Skip(r), Err(s)) => assert_eq!(r, s),
            (Outcome::Packet, Ok(())) => {
                same(&plain, &d, want, 0);
                firsts += plain.frag.is_some() as u64;
            }
            (Outcome::Later, Ok(())) => {
                // Attributed: the first fragment's ports, this datagram's addresses, no payload.
                attributed += 1;
                assert_eq!((d.src, d.dst, d.v6, d.ip_len), (plain.src, plain.dst, plain.v6, plain.ip_len));
                assert_eq!(Some(d.proto), plain.frag.map(|f| f.1));
                assert!(!d.has_payload() && d.frag.is_none());
            }
            (Outcome::Later, Err(Reason::Fragment)) => {}
            (w, g) => panic!("Fragments::decode said {g:?} where decode said {w:?}"),
        }
        assert!(frags.len() <= limit, "{} fragments remembered, at most {limit}", frags.len());
        let c = frags.counters;
        assert_eq!(c.tracked, if limit == 0 { 0 } else { firsts });
        assert_eq!(c.attributed, attributed);
        assert!(c.evicted_full + c.expired <= c.tracked);
    }
}
