//! `block::walk` into a small `Table`, then the detectors' answers, `expire`, `collect` and
//! `close_all`, as `flowmap_dp.compiled` drives them.
//!
//! Input: `[mode: u8][sessions: u8][pending and feed limit: u8][fragments: u8]`, then either the
//! block itself (mode bit 0 set: raw bytes, header and chain as they come) or frames that are
//! laid out in blocks the way `tests/dp/synth.py: pack_block` does (so the fuzzer starts past
//! the headers), each frame `[flags: u8][length: u16 LE][bytes]` with optional fields read after
//! the flags (see `Frame`). Mode bits 1-2 pick how the detectors answer, bit 3 idle timeouts,
//! bit 4 a hold on new sessions in `collect`.
//!
//! What must hold besides "no panic": the counters add up (every frame read is decoded or has
//! one reason, `internal_error` never), the table stays within `max_sessions` and holds what was
//! created and not ended, a stop for the detectors always lets the walk move on after
//! `next_batch`, a well-formed block has every frame counted once however often it stopped, every
//! reported session changed, and in the end every session is reported once as new and once as
//! ended, unless it was dropped for a full report.

#![no_main]

mod common;

use _native::block::{self, BLOCK_DESC_SIZE};
use _native::decode::{Fragments, Reason};
use _native::table::{Config, Counters, Event, Session, Table, Timeouts, CLOSED, END_REASONS};
use common::Input;
use libfuzzer_sys::fuzz_target;

const TPACKET3_HDR_SIZE: usize = 48;
const TPACKET3_HDRLEN: usize = 68; // sizeof(tpacket3_hdr) + sizeof(sockaddr_ll)
const TP_STATUS_USER: u32 = 0x1;
const TP_STATUS_VLAN_VALID: u32 = 0x10;
const SHUTDOWN: u8 = 7; // END_REASONS[7]
const MAX_FRAMES: usize = 64; // per block
const DNS: u8 = 1; // app codes: one whose 5-tuple carries a new exchange after a 1 s pause, one never
const OTHER: u8 = 2;
const BASE_TS: u32 = 1_700_000_000;
/// Time steps between frames (flags bits 5-7): none, within a burst, past a new-exchange
/// pause, past the short timeouts, past them all, and backwards (rings are read in turn).
const STEPS: [f64; 8] = [0.0, 0.001, 0.2, 1.5, 12.0, 45.0, 400.0, -0.7];

struct Plan {
    answer: u8,
    hold: f64,
    max_sessions: usize,
    max_fragments: usize,
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let mode = input.u8();
    let sessions = input.u8();
    let limits = input.u8();
    let fragments = input.u8();
    let plan = Plan {
        answer: (mode >> 1) & 3,
        hold: if mode & 16 != 0 { 5.0 } else { 0.0 },
        max_sessions: 1 + sessions as usize % 64,
        max_fragments: fragments as usize % 9,
    };
    let mut service = vec![false; 65_536];
    service[..1024].fill(true);
    let mut udp_service = vec![false; 65_536];
    for p in [53, 67, 69, 123, 5353] {
        udp_service[p] = true;
    }
    let mut handoff = vec![false; 65_536];
    handoff[69] = true;
    let mut new_exchange_after = [f64::INFINITY; 256];
    new_exchange_after[DNS as usize] = 1.0;
    let cfg = Config {
        max_sessions: plan.max_sessions,
        max_pending: limits as usize % 17,
        feed_limit: 1 + (limits >> 5),
        timeouts: (mode & 8 != 0).then_some(Timeouts([60.0, 10.0, 10.0, 2.0, 30.0, 10.0, 30.0])),
        service,
        udp_service,
        handoff,
        handoff_remembered: 4,
        new_exchange_after,
    };
    let mut table = Table::new(cfg, Fragments::new(plan.max_fragments, if fragments & 0x80 != 0 { 1.0 } else { 30.0 }));
    let mut seen = Seen::default();
    let mut now = BASE_TS as f64;

    if mode & 1 != 0 {
        let raw = input.rest();
        feed(&mut table, raw, None, &plan);
        after_block(&mut table, &plan, now, &mut seen);
    } else {
        let mut ts = (BASE_TS, 0u32);
        while !input.is_empty() {
            let (blk, exact, last_ts) = build_block(&mut input, &mut ts);
            feed(&mut table, &blk.bytes, exact.then_some(blk.frames), &plan);
            now = now.max(last_ts);
            after_block(&mut table, &plan, now, &mut seen);
        }
    }

    table.close_all(SHUTDOWN);
    check(&table, &plan);
    assert!(table.inspecting().is_empty(), "an ended session is still being inspected");
    answer(&mut table, plan.answer);
    collect(&mut table, now + 1e6, 0.0, &mut seen);
    let mut again = 0;
    table.collect(now + 2e6, 0.0, |_, _| again += 1);
    assert_eq!(again, 0, "sessions reported twice");
    assert_eq!(table.len(), 0);
    let c = table.counters;
    assert_eq!(seen.ended, c.closed - c.unreported, "every ended session reported once, unless dropped");
    assert_eq!(seen.new, c.created - c.unreported, "every session reported new once, unless dropped");
});

/// Walk `block` to its end, answering the detectors at every stop. `frames`: how many frames a
/// well-formed block holds, each to be counted exactly once.
fn feed(table: &mut Table, block: &[u8], frames: Option<usize>, plan: &Plan) {
    let before = table.counters.total;
    let mut resume = None;
    let mut stops = 0usize;
    loop {
        match block::walk(block, table, resume.take()) {
            Ok(()) => break,
            Err(r) => {
                // The stopped frame goes through once its session's events were taken, so every
                // frame stops the walk at most once.
                stops += 1;
                assert!(stops <= block.len() + 1, "the walk stops without moving on");
                answer(table, plan.answer);
                resume = Some(r);
            }
        }
        check(table, plan);
    }
    check(table, plan);
    if let Some(n) = frames {
        assert_eq!(table.counters.total - before, n as u64, "a frame missed or counted twice ({stops} stops)");
    }
}

/// The detectors: take the events and answer some (policy 0: never; 1: every session decided;
/// 2: decided, DNS for port 53 (and to be reported); 3: every other handle decided as DNS, and a
/// handle that is gone).
fn answer(table: &mut Table, policy: u8) {
    let mut decided = Vec::new();
    for e in &table.events {
        if let Event::Feed { handle, server_port, start, len, .. } = *e {
            assert!(start + len <= table.arena.len(), "an event's payload past the arena");
            decided.push((handle, server_port == 53));
        }
    }
    for (handle, dns) in decided {
        match policy {
            1 => table.set_inspection(handle, OTHER, false),
            2 => table.set_inspection(handle, if dns { DNS } else { OTHER }, dns),
            3 if handle & 1 == 0 => table.set_inspection(handle, DNS, true),
            3 => table.set_inspection(handle.wrapping_add(1 << 32) | 0xFFFF, OTHER, false),
            _ => {}
        }
    }
    table.next_batch();
}

fn after_block(table: &mut Table, plan: &Plan, now: f64, seen: &mut Seen) {
    answer(table, plan.answer);
    table.expire(now);
    check(table, plan);
    let _ = table.inspecting();
    collect(table, now, plan.hold, seen);
    check(table, plan);
}

/// What the reports said so far.
#[derive(Default)]
struct Seen {
    new: u64,
    ended: u64,
}

fn collect(table: &mut Table, now: f64, hold: f64, seen: &mut Seen) {
    table.collect(now, hold, |_, s: &Session| {
        assert!(s.used);
        assert!(s.first <= s.last, "first seen {} after last seen {}", s.first, s.last);
        assert!((s.end_reason as usize) < END_REASONS.len() && s.state <= CLOSED);
        assert_eq!(s.in_table, s.end_reason == 0, "in the table and ended, or neither");
        let [c2s, s2c, bc2s, bs2c] = s.deltas(); // overflow-checked: counters never go back
        assert!(c2s + s2c > 0 || s.end_reason != 0, "reported without a packet or an end");
        assert!(bc2s >= 20 * c2s && bs2c >= 20 * s2c, "fewer bytes than IP headers");
        seen.new += s.new as u64;
        seen.ended += (s.end_reason != 0) as u64;
    });
}

fn check(table: &Table, plan: &Plan) {
    let c: Counters = table.counters;
    assert_eq!(c.total, c.decoded + c.reasons.iter().sum::<u64>(), "the counters do not add up");
    assert_eq!(c.reasons[Reason::InternalError as usize], 0);
    assert!(table.len() <= plan.max_sessions, "{} sessions, at most {}", table.len(), plan.max_sessions);
    assert_eq!(table.len() as u64, c.created - c.closed, "the table holds what was created and not ended");
    assert!(c.evicted + c.expired <= c.closed && c.unreported <= c.closed);
    assert!(table.fragments.len() <= plan.max_fragments);
}

struct Block {
    bytes: Vec<u8>,
    frames: usize,
}

/// One frame's header fields, as `pack_block` writes them; flags bits: 0 a device without a
/// link header (raw IP), 1 a VLAN tag stripped into the header (TCI: u16 after the flags), 2 a
/// snap length below the frame's (cut: u8), 3 the block's last frame, 4 one header field or the
/// block's frame count set to a value from the input (which: u8, value: u32), 5-7 the time step.
struct Frame<'a> {
    data: &'a [u8],
    raw: bool,
    tci: Option<u16>,
    cut: usize,
    corrupt: Option<(u8, u32)>,
}

/// Lay the next frames out as one block; whether its chain is intact (nothing corrupted), and
/// its last frame's time.
fn build_block(input: &mut Input, ts: &mut (u32, u32)) -> (Block, bool, f64) {
    let mut frames = Vec::new();
    let mut stamps = Vec::new();
    while !input.is_empty() && frames.len() < MAX_FRAMES {
        let flags = input.u8();
        let tci = (flags & 2 != 0).then(|| input.u16());
        let cut = if flags & 4 != 0 { input.u8() as usize } else { 0 };
        let corrupt = (flags & 16 != 0).then(|| (input.u8(), input.u32()));
        let len = input.u16() as usize;
        let data = input.take(len);
        // Whole nanoseconds, as the kernel stamps: sec + nsec * 1e-9 is what the walk reads.
        let step = (STEPS[(flags >> 5) as usize] * 1e9) as i64;
        let t = (ts.0 as i64 * 1_000_000_000 + ts.1 as i64 + step).max(0);
        *ts = ((t / 1_000_000_000) as u32, (t % 1_000_000_000) as u32);
        stamps.push(*ts);
        frames.push(Frame { data, raw: flags & 1 != 0, tci, cut, corrupt });
        if flags & 8 != 0 {
            break;
        }
    }
    let mut exact = true;
    let first = (BLOCK_DESC_SIZE + 7) & !7;
    let steps: Vec<(usize, usize, usize)> = frames.iter().map(|f| {
        let link_header = if f.raw { 0 } else { 14 };
        // The kernel's macoff: the network header aligned to 16 after the headers.
        let mac = ((TPACKET3_HDRLEN + link_header.max(16) + 15) & !15) - link_header;
        let cap = f.data.len();
        (mac, link_header, (mac + cap + 7) & !7)
    }).collect();
    let size = first + steps.iter().map(|s| s.2).sum::<usize>();
    let mut out = vec![0u8; size];
    let mut off = first;
    let mut num = frames.len() as u32;
    for (i, (f, &(mac, link_header, step))) in frames.iter().zip(&steps).enumerate() {
        let cap = f.data.len();
        let mut next = if i + 1 == frames.len() { 0 } else { step as u32 };
        let mut snap = cap.saturating_sub(f.cut) as u32;
        let (mut mac_field, mut net_field) = (mac as u16, (mac + link_header) as u16);
        if let Some((which, value)) = f.corrupt {
            exact = false;
            match which % 5 {
                0 => next = value,
                1 => mac_field = value as u16,
                2 => net_field = value as u16,
                3 => snap = value,
                _ => num = value,
            }
        }
        let status = TP_STATUS_USER | if f.tci.is_some() { TP_STATUS_VLAN_VALID } else { 0 };
        let h = &mut out[off..off + TPACKET3_HDR_SIZE];
        put32(h, 0, next);
        put32(h, 4, stamps[i].0);
        put32(h, 8, stamps[i].1);
        put32(h, 12, snap);
        put32(h, 16, cap as u32);
        put32(h, 20, status);
        h[24..26].copy_from_slice(&mac_field.to_le_bytes());
        h[26..28].copy_from_slice(&net_field.to_le_bytes());
        put32(h, 32, f.tci.unwrap_or(0) as u32);
        h[36..38].copy_from_slice(&(if f.tci.is_some() { 0x8100u16 } else { 0 }).to_le_bytes());
        out[off + mac..off + mac + cap].copy_from_slice(f.data);
        off += step;
    }
    put32(&mut out, 0, 3);
    put32(&mut out, 4, BLOCK_DESC_SIZE as u32);
    put32(&mut out, 8, TP_STATUS_USER);
    put32(&mut out, 12, num);
    put32(&mut out, 16, first as u32);
    put32(&mut out, 20, off as u32);
    let last = stamps.last().map_or(BASE_TS as f64, |t| t.0 as f64 + t.1 as f64 * 1e-9);
    (Block { bytes: out, frames: frames.len() }, exact, last)
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
