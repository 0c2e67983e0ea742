//! The bounded session table, as `flowmap_dp/session.py`'s `SessionTable` (the reference; a test
//! holds the two to identical reports). What is not per packet stays in Python: the detectors
//! get each undecided session's payload packets as *events*, taken in batches (`take_events`),
//! and tell the table what they decided (`set_inspection`).
//!
//! Layout: sessions live in a slab (`Vec<Session>`, slots reused through a free list), found by
//! a keyed hash index (key -> slot) and ordered least recently seen first by links inside the
//! slots (a move to the end is four stores, no allocation). A session that ended stays in its
//! slot, out of the index and the order, until the report that says so.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};

use ahash::RandomState;
use hashbrown::HashTable;

use crate::decode::{Addr, Decoded, Fragments, Reason, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, REASONS};

/// A SYN answered by a SYN (`decode.MARK_SPLIT_HANDSHAKE`); the decoder's own marks are `decode::MARK_*`.
pub const MARK_SPLIT_HANDSHAKE: u8 = 0x01;
/// Echo payloads: as `session.echo_digest`.
const ECHO_SKIP: usize = 16;
const ECHO_BYTES: usize = 256;

pub const SYN_SENT: u8 = 0;
pub const SYN_RECV: u8 = 1;
pub const OPEN: u8 = 2;
pub const CLOSING: u8 = 3;
pub const CLOSED: u8 = 4;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// End reasons, as `SessionDelta.end_reason` names them (0: not ended).
pub const END_REASONS: [&str; 8] = ["", "fin", "rst", "idle", "evicted", "reused", "end", "shutdown"];
const FIN: u8 = 1;
const RST: u8 = 2;
const IDLE: u8 = 3;
const EVICTED: u8 = 4;
const REUSED: u8 = 5;

/// Where a session's application detection stands, as `Session.insp` (None / inspector / False).
const INSP_NONE: u8 = 0; // no payload handed off since the session (or its DNS lookup) began
const INSP_LIVE: u8 = 1; // payload handed off; the detectors have not said they are done
const INSP_DONE: u8 = 2; // decided (or never inspected: not TCP/UDP)

const NIL: u32 = u32::MAX;
const RESERVED: usize = 1 << 20;

/// The canonical bidirectional key (`decode.flow_key`): the smaller endpoint first.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Key {
    pub proto: u8,
    pub v6: bool,
    pub vlan: u16,
    pub a: Addr,
    pub ap: u16,
    pub b: Addr,
    pub bp: u16,
}

impl Hash for Key {
    /// Whole words, not a field at a time: the index hashes a key for every packet. Every bit of
    /// the key goes into the keyed hash as it is (folding words first would let a sender pick
    /// keys that collide).
    fn hash<H: Hasher>(&self, h: &mut H) {
        let word = |a: &Addr, i: usize| u64::from_ne_bytes(a[i..i + 8].try_into().unwrap_or_default());
        h.write_u64((self.proto as u64) << 48 | (self.vlan as u64) << 32 | (self.ap as u64) << 16 | self.bp as u64);
        h.write_u64(word(&self.a, 0));
        h.write_u64(word(&self.b, 0));
        if self.v6 {
            h.write_u64(word(&self.a, 8));
            h.write_u64(word(&self.b, 8));
        }
    }
}

/// The key of `d` and whether `d` runs from the key's first endpoint.
pub fn flow_key(d: &Decoded) -> (Key, bool) {
    let fwd = (d.src, d.sport) <= (d.dst, d.dport);
    let (a, ap, b, bp) = if fwd { (d.src, d.sport, d.dst, d.dport) } else { (d.dst, d.dport, d.src, d.sport) };
    (Key { proto: d.proto, v6: d.v6, vlan: d.vlan, a, ap, b, bp }, fwd)
}

/// One session: 128 bytes, two cache lines (the first holds what every packet touches).
/// Counters are by role (c2s = client to server) and since the previous report: totals are
/// never reported, so none are kept.
#[derive(Clone, Default)]
#[repr(C, align(64))]
pub struct Session {
    prev: u32,
    next: u32,
    batch: u16, // the event batch its last hand-off went into (wrapping: a match is only a pause)
    handoffs: u8,
    pub new: bool,
    pub a_is_client: bool,
    pub state: u8,
    fins: u8,
    insp: u8,
    pub dirty: bool,
    pub opening_seen: bool,
    pub opened: bool,
    pub app: u8, // the detectors' last word, by the Python side's code (0: unknown)
    // What the threat watches want, in what was padding: marks and echo changes since the
    // previous report, and the last echo request's digest (0: none yet).
    pub marks: u8,
    pub echo_changes: u8,
    echo_digest: u16,
    pub last: f64,
    pub pkts_c2s: u64,
    pub pkts_s2c: u64,
    pub bytes_c2s: u64,
    pub bytes_s2c: u64,
    // -- the second line: what lookups, ends and reports need
    pub first: f64,
    reply_at: f64,
    pub key: Key,
    gen: u32,
    pub in_table: bool,
    pub used: bool,
    inspected: bool, // some payload was ever handed off (Python keeps a record for it)
    pub end_reason: u8,
}

const _: () = assert!(std::mem::size_of::<Session>() == 128);

impl Session {
    /// (client addr, client port, server addr, server port).
    pub fn endpoints(&self) -> (Addr, u16, Addr, u16) {
        let k = &self.key;
        if self.a_is_client {
            (k.a, k.ap, k.b, k.bp)
        } else {
            (k.b, k.bp, k.a, k.ap)
        }
    }

    pub fn handle(&self, slot: u32) -> u64 {
        (self.gen as u64) << 32 | slot as u64
    }

    /// Counters since the previous report: packets c2s, s2c, bytes c2s, s2c.
    pub fn deltas(&self) -> [u64; 4] {
        [self.pkts_c2s, self.pkts_s2c, self.bytes_c2s, self.bytes_s2c]
    }
}

/// What the Python side must do, in the order the packets asked for it.
pub enum Event {
    /// A payload packet of an undecided session (`fresh`: the first since it began or since a
    /// DNS 5-tuple's new lookup), captured at `ts`; its bytes are `arena[start..start + len]`.
    Feed { handle: u64, fresh: bool, tcp: bool, client_port: u16, server_port: u16, from_client: bool, app: u8, ts: f64, start: usize, len: usize },
    /// A session that had payload handed off ended (`dropped`: it will never be reported).
    End { handle: u64, dropped: bool },
}

/// Idle timeouts in seconds: tcp open, half-open, closing, closed; udp; icmp; other.
#[derive(Clone, Copy)]
pub struct Timeouts(pub [f64; 7]);

/// An index entry: a slot and its key's hash (32 bits of the keyed hash).
#[derive(Clone, Copy)]
struct Entry {
    slot: u32,
    hash: u32,
}

/// The index's 64-bit hash of a 32-bit one: the low bits pick the bucket, the top 7 are the tag
/// (disjoint up to 2^25 buckets; larger tables still work, with less help from the tag).
fn spread(hash: u32) -> u64 {
    (hash as u64) << 32 | hash as u64
}

pub struct Config {
    pub max_sessions: usize,
    pub max_pending: usize,
    pub feed_limit: u8,
    pub timeouts: Option<Timeouts>,
    pub service: Vec<bool>,     // 65,536: `session.is_service_port`
    pub udp_service: Vec<bool>, // 65,536: `session.UDP_SERVICES`
    pub handoff: Vec<bool>,     // 65,536: `session.HANDOFF_PORTS`
    pub handoff_remembered: usize,
    /// By app code: seconds of silence after which a decided session's 5-tuple carries a new
    /// exchange (`session.NEW_EXCHANGE_AFTER`; infinite: never). Set as codes are handed out.
    pub new_exchange_after: [f64; 256],
}

#[derive(Default, Clone, Copy)]
pub struct Counters {
    pub total: u64,
    pub decoded: u64,
    pub reasons: [u64; REASONS],
    pub created: u64,
    pub evicted: u64,
    pub expired: u64,
    pub closed: u64,
    pub unreported: u64,
}

pub struct Table {
    cfg: Config,
    slots: Vec<Session>,
    free: Vec<u32>,
    index: HashTable<Entry>, // slots by the keyed hash of their key; grows with the sessions
    hasher: RandomState,
    head: u32,
    tail: u32,
    dirty: Vec<(u32, u32)>, // (slot, gen) in the order they changed
    pending_ended: usize,
    asked: HashMap<(bool, Addr, u16), (), RandomState>, // requesters on a handoff port
    asked_order: VecDeque<(bool, Addr, u16)>,
    soonest_exchange: f64, // the smallest of `new_exchange_after`
    pub fragments: Fragments,
    pub counters: Counters,
    pub events: Vec<Event>,
    pub arena: Vec<u8>,
    pub batch: u16,
}

impl Table {
    pub fn new(cfg: Config, fragments: Fragments) -> Self {
        // Room for a full table's slots up front (up to a million sessions: an offline table may
        // be bounded far higher), so filling it never moves them: address space is reserved,
        // pages are touched as sessions arrive. The index grows instead: sized for the bound, a
        // few thousand sessions would be scattered over megabytes and every lookup would miss
        // the cache; its entries carry their hash, so growing never reads a slot.
        let room = cfg.max_sessions.min(RESERVED);
        Table {
            slots: Vec::with_capacity(room + cfg.max_pending.min(RESERVED)),
            free: Vec::new(),
            index: HashTable::new(),
            hasher: RandomState::new(),
            head: NIL,
            tail: NIL,
            dirty: Vec::new(),
            pending_ended: 0,
            asked: HashMap::with_hasher(RandomState::new()),
            asked_order: VecDeque::new(),
            soonest_exchange: cfg.new_exchange_after.iter().copied().fold(f64::INFINITY, f64::min),
            fragments,
            counters: Counters::default(),
            events: Vec::new(),
            arena: Vec::new(),
            batch: 1,
            cfg,
        }
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    fn hash(&self, key: &Key) -> u32 {
        (self.hasher.hash_one(key) >> 32) as u32
    }

    fn find(&self, hash: u32, key: &Key) -> Option<u32> {
        let slots = &self.slots;
        self.index.find(spread(hash), |e| e.hash == hash && slots[e.slot as usize].key == *key).map(|e| e.slot)
    }

    fn index_insert(&mut self, hash: u32, i: u32) {
        self.index.insert_unique(spread(hash), Entry { slot: i, hash }, |e| spread(e.hash));
    }

    fn index_remove(&mut self, i: u32) {
        let hash = self.hash(&self.slots[i as usize].key);
        if let Ok(entry) = self.index.find_entry(spread(hash), |e| e.slot == i) {
            entry.remove();
        }
    }

    pub fn max_sessions(&self) -> usize {
        self.cfg.max_sessions
    }

    pub fn count(&mut self, out: Result<(), Reason>) {
        self.counters.total += 1;
        match out {
            Ok(()) => self.counters.decoded += 1,
            Err(r) => self.counters.reasons[r as usize] += 1,
        }
    }

    // -- order ---------------------------------------------------------------------------------

    fn unlink(&mut self, i: u32) {
        let (p, n) = (self.slots[i as usize].prev, self.slots[i as usize].next);
        if p == NIL { self.head = n } else { self.slots[p as usize].next = n }
        if n == NIL { self.tail = p } else { self.slots[n as usize].prev = p }
    }

    fn push_back(&mut self, i: u32) {
        let t = self.tail;
        {
            let s = &mut self.slots[i as usize];
            s.prev = t;
            s.next = NIL;
        }
        if t == NIL { self.head = i } else { self.slots[t as usize].next = i }
        self.tail = i;
    }

    fn touch(&mut self, i: u32) {
        if self.tail != i {
            self.unlink(i);
            self.push_back(i);
        }
    }

    fn alloc(&mut self) -> u32 {
        match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Session::default());
                (self.slots.len() - 1) as u32
            }
        }
    }

    fn release(&mut self, i: u32) {
        let s = &mut self.slots[i as usize];
        let gen = s.gen.wrapping_add(1);
        *s = Session { gen, ..Session::default() };
        self.free.push(i);
    }

    fn mark_dirty(&mut self, i: u32) {
        let s = &mut self.slots[i as usize];
        if !s.dirty {
            s.dirty = true;
            self.dirty.push((i, s.gen));
        }
    }

    // -- hot path ------------------------------------------------------------------------------

    /// Account one decoded packet captured at `ts`; `buf` holds its payload. False (and nothing
    /// done) when the packet may start a new DNS lookup of a session whose detection is still in
    /// the untaken events: the caller takes them, lets the detectors answer, and tries again.
    pub fn packet(&mut self, d: &Decoded, ts: f64, buf: &[u8]) -> bool {
        let (key, fwd) = flow_key(d);
        let hash = self.hash(&key);
        let i = match self.find(hash, &key) {
            None => self.create(key, hash, fwd, d, ts),
            Some(i) => {
                let s = &self.slots[i as usize];
                let reused = s.state == CLOSED && d.proto == PROTO_TCP && d.flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
                if !reused && s.insp == INSP_LIVE && s.batch == self.batch && d.has_payload()
                    && ts - s.last > self.soonest_exchange
                {
                    return false;
                }
                self.touch(i);
                if reused {
                    self.end(i, REUSED, true); // a new connection on the same 5-tuple after a full close
                    self.create(key, hash, fwd, d, ts)
                } else {
                    i
                }
            }
        };
        let s = &mut self.slots[i as usize];
        let from_client = fwd == s.a_is_client;
        if s.insp == INSP_DONE && ts - s.last > self.cfg.new_exchange_after[s.app as usize] && d.has_payload() {
            // A 5-tuple used again after a pause carries a new exchange (session.py says why).
            s.insp = INSP_NONE;
            s.handoffs = 0;
            if from_client {
                s.opened = true;
            } else {
                s.opening_seen = false;
                s.reply_at = ts;
            }
        }
        if from_client {
            s.pkts_c2s += 1;
            s.bytes_c2s += d.ip_len;
        } else {
            s.pkts_s2c += 1;
            s.bytes_s2c += d.ip_len;
        }
        // Rings are read one after another, so a packet can be older than one already seen.
        if ts > s.last {
            s.last = ts;
        } else if ts < s.first {
            s.first = ts;
        }
        if from_client && !s.opening_seen && ts <= s.reply_at && d.proto != PROTO_TCP {
            s.opening_seen = true; // the client's first packet, read after the reply
            s.opened = true;
        }
        if d.proto == PROTO_TCP {
            tcp(s, d.flags, from_client);
        } else if (d.proto == PROTO_ICMP || d.proto == PROTO_ICMPV6) && d.has_payload() {
            let (request, reply) = if d.proto == PROTO_ICMP { (8, 0) } else { (128, 129) };
            if d.flags == request || d.flags == reply {
                let payload = buf.get(d.payload_start..d.payload_end.min(buf.len())).unwrap_or(&[]);
                echo(s, d.flags == request, echo_digest(d.ip_len, payload));
            }
        }
        s.marks |= d.marks;
        if s.insp != INSP_DONE && d.has_payload() && s.handoffs < self.cfg.feed_limit {
            let fresh = s.handoffs == 0;
            s.handoffs += 1;
            s.insp = INSP_LIVE;
            s.inspected = true;
            s.batch = self.batch;
            let (_, cp, _, sp) = s.endpoints();
            let payload = buf.get(d.payload_start..d.payload_end.min(buf.len())).unwrap_or(&[]);
            let start = self.arena.len();
            self.arena.extend_from_slice(payload);
            self.events.push(Event::Feed {
                handle: s.handle(i),
                fresh,
                tcp: d.proto == PROTO_TCP,
                client_port: cp,
                server_port: sp,
                from_client,
                app: s.app,
                ts,
                start,
                len: payload.len(),
            });
        }
        self.mark_dirty(i);
        true
    }

    fn create(&mut self, key: Key, hash: u32, fwd: bool, d: &Decoded, ts: f64) -> u32 {
        if self.index.len() >= self.cfg.max_sessions && self.head != NIL {
            let oldest = self.head;
            self.counters.evicted += 1;
            self.end(oldest, EVICTED, true);
        }
        let mut state = OPEN;
        let src_client = match d.proto {
            PROTO_TCP => match d.flags & (TCP_SYN | TCP_ACK) {
                TCP_SYN => {
                    state = SYN_SENT;
                    true
                }
                f if f == TCP_SYN | TCP_ACK => {
                    state = SYN_RECV;
                    false
                }
                _ => self.dst_is_server(d.sport, d.dport), // picked up mid-stream
            },
            PROTO_UDP => {
                let svc = &self.cfg.udp_service;
                let (mut s_svc, mut d_svc) = (svc[d.sport as usize], svc[d.dport as usize]);
                if s_svc == d_svc {
                    s_svc = self.cfg.service[d.sport as usize];
                    d_svc = self.cfg.service[d.dport as usize];
                }
                let guess = !s_svc || d_svc; // not a reply from a service to a client's port
                self.udp_expected(d, guess)
            }
            PROTO_ICMP | PROTO_ICMPV6 => d.flags != 0 && d.flags != 129, // echo reply: the receiver asked
            _ => true,
        };
        let i = self.alloc();
        let inspectable = d.proto == PROTO_TCP || d.proto == PROTO_UDP;
        let opening = d.proto != PROTO_TCP;
        {
            let s = &mut self.slots[i as usize];
            s.key = key;
            s.used = true;
            s.in_table = true;
            s.a_is_client = fwd == src_client;
            s.state = state;
            s.first = ts;
            s.last = ts;
            s.insp = if inspectable { INSP_NONE } else { INSP_DONE };
            s.new = true;
            s.opening_seen = opening;
            s.opened = opening;
            if !src_client {
                // A reply seen first: the reply half of a DNAT'd flow, or a late pickup.
                s.opening_seen = false;
                s.opened = false;
                s.reply_at = ts;
            }
        }
        self.index_insert(hash, i);
        self.push_back(i);
        self.counters.created += 1;
        i
    }

    fn dst_is_server(&self, sport: u16, dport: u16) -> bool {
        let (s_svc, d_svc) = (self.cfg.service[sport as usize], self.cfg.service[dport as usize]);
        if s_svc != d_svc {
            return d_svc;
        }
        dport <= sport // both or neither look like services: the lower port serves
    }

    /// A server that answers from a new port (TFTP): remember who asked (bounded), as
    /// `_udp_expected`.
    fn udp_expected(&mut self, d: &Decoded, src_client: bool) -> bool {
        let handoff = &self.cfg.handoff;
        if handoff[d.dport as usize] {
            let k = (d.v6, d.src, d.sport);
            if self.asked.insert(k, ()).is_none() {
                self.asked_order.push_back(k);
                if self.asked.len() > self.cfg.handoff_remembered {
                    if let Some(old) = self.asked_order.pop_front() {
                        self.asked.remove(&old);
                    }
                }
            }
        } else if !self.asked.is_empty() && !handoff[d.sport as usize] {
            if self.asked.contains_key(&(d.v6, d.dst, d.dport)) {
                return false;
            }
            if self.asked.contains_key(&(d.v6, d.src, d.sport)) {
                return true;
            }
        }
        src_client
    }

    // -- the detectors' answers ----------------------------------------------------------------

    /// The detectors are done with the session `handle`: `app` is their word (`dirty`: the next
    /// report carries it). A handle that is gone is ignored.
    pub fn set_inspection(&mut self, handle: u64, app: u8, dirty: bool) {
        let (i, gen) = ((handle & 0xFFFF_FFFF) as u32, (handle >> 32) as u32);
        if let Some(s) = self.slots.get_mut(i as usize) {
            if s.used && s.gen == gen {
                s.insp = INSP_DONE;
                s.app = app;
                if dirty {
                    self.mark_dirty(i);
                }
            }
        }
    }

    /// Sessions in the table, least recently seen first, whose payload went to the detectors,
    /// undecided, and that were last seen at or before `before` (`SessionTable.settle_idle`).
    pub fn idle_inspecting(&self, before: f64) -> Vec<u64> {
        let mut out = Vec::new();
        let mut i = self.head;
        while i != NIL {
            let s = &self.slots[i as usize];
            if s.last > before {
                break;
            }
            if s.insp == INSP_LIVE {
                out.push(s.handle(i));
            }
            i = s.next;
        }
        out
    }

    /// Starts a new batch of events: the previous one was taken.
    pub fn next_batch(&mut self) {
        self.events.clear();
        self.arena.clear();
        self.batch = self.batch.wrapping_add(1);
    }

    // -- ends ----------------------------------------------------------------------------------

    fn end(&mut self, i: u32, reason: u8, in_table: bool) {
        if in_table {
            self.index_remove(i);
            self.unlink(i);
        }
        let max_pending = self.cfg.max_pending;
        let dropped = self.slots[i as usize].new && self.pending_ended >= max_pending;
        let s = &mut self.slots[i as usize];
        s.in_table = false;
        s.end_reason = reason;
        s.insp = INSP_DONE;
        if s.inspected {
            self.events.push(Event::End { handle: s.handle(i), dropped });
        }
        self.counters.closed += 1;
        if dropped {
            // Never reported, and the next report is full: count it, keep nothing.
            self.counters.unreported += 1;
            self.release(i);
            return;
        }
        self.pending_ended += 1;
        self.mark_dirty(i);
    }

    fn timeout_of(t: &Timeouts, s: &Session) -> f64 {
        match s.key.proto {
            PROTO_TCP => match s.state {
                SYN_SENT | SYN_RECV => t.0[1],
                OPEN => t.0[0],
                CLOSING => t.0[2],
                _ => t.0[3],
            },
            PROTO_UDP => t.0[4],
            PROTO_ICMP | PROTO_ICMPV6 => t.0[5],
            _ => t.0[6],
        }
    }

    /// End the sessions idle past their timeout; returns how many. No-op without timeouts.
    pub fn expire(&mut self, now: f64) -> usize {
        let Some(t) = self.cfg.timeouts else { return 0 };
        let shortest = t.0.iter().copied().fold(f64::INFINITY, f64::min);
        let mut stale = Vec::new();
        let mut i = self.head;
        // Least recently seen first: once one is younger than the shortest timeout, all are.
        while i != NIL {
            let s = &self.slots[i as usize];
            let idle = now - s.last;
            if idle < shortest {
                break;
            }
            if idle >= Self::timeout_of(&t, s) {
                stale.push(i);
            }
            i = s.next;
        }
        for &i in &stale {
            let s = &self.slots[i as usize];
            let reason = if s.state == CLOSED && s.fins == 3 { FIN } else if s.state == CLOSED { RST } else { IDLE };
            self.end(i, reason, true);
        }
        self.counters.expired += stale.len() as u64;
        stale.len()
    }

    /// End every session (end of a capture file, or shutdown), least recently seen first.
    pub fn close_all(&mut self, reason: u8) {
        while self.head != NIL {
            self.end(self.head, reason, true);
        }
    }

    // -- export --------------------------------------------------------------------------------

    /// Dirty sessions still in the table whose payload went to the detectors, undecided:
    /// (handle, first seen), for `SessionTable.collect`'s judging of lone server words.
    pub fn inspecting(&self) -> Vec<(u64, f64)> {
        self.live_dirty().filter(|(_, s)| s.insp == INSP_LIVE).map(|(i, s)| (s.handle(i), s.first)).collect()
    }

    fn live_dirty(&self) -> impl Iterator<Item = (u32, &Session)> {
        self.dirty.iter().filter_map(move |&(i, gen)| {
            let s = &self.slots[i as usize];
            (s.used && s.gen == gen && s.dirty).then_some((i, s))
        })
    }

    /// The sessions that changed since the previous call, in the order they changed, each handed
    /// to `out` (slot, session) before its report counters move on; as `SessionTable.collect`,
    /// sessions first seen after `now - hold` wait for the next call.
    pub fn collect<F: FnMut(u32, &Session)>(&mut self, now: f64, hold: f64, mut out: F) {
        let recent = now - hold;
        let dirty = std::mem::take(&mut self.dirty);
        let mut held = Vec::new();
        let mut ended_held = 0;
        for (i, gen) in dirty {
            let s = &mut self.slots[i as usize];
            if !(s.used && s.gen == gen && s.dirty) {
                continue;
            }
            if hold != 0.0 && s.new && s.first > recent {
                held.push((i, gen));
                ended_held += (s.end_reason != 0) as usize;
                continue;
            }
            out(i, s);
            (s.pkts_c2s, s.pkts_s2c, s.bytes_c2s, s.bytes_s2c) = (0, 0, 0, 0);
            (s.marks, s.echo_changes) = (0, 0);
            s.dirty = false;
            s.new = false;
            s.opened = false;
            if !s.in_table {
                self.release(i);
            }
        }
        self.dirty = held;
        self.pending_ended = ended_held;
    }
}

/// `session.echo_digest`: FNV-1a of the IP length and the payload's bytes 16..272, folded to 16
/// bits, never 0.
fn echo_digest(ip_len: u64, payload: &[u8]) -> u16 {
    let mut h: u32 = 0x811C_9DC5;
    let tail = payload.get(ECHO_SKIP..).unwrap_or(&[]);
    for &b in (ip_len as u32).to_be_bytes().iter().chain(&tail[..tail.len().min(ECHO_BYTES)]) {
        h = (h ^ b as u32).wrapping_mul(0x0100_0193);
    }
    match ((h ^ h >> 16) & 0xFFFF) as u16 {
        0 => 1,
        d => d,
    }
}

/// `session._echo`: count an echo unlike the last request; a request becomes the last.
fn echo(s: &mut Session, request: bool, digest: u16) {
    if s.echo_digest != 0 && digest != s.echo_digest {
        s.echo_changes = s.echo_changes.saturating_add(1);
    }
    if request {
        s.echo_digest = digest;
    }
}

fn tcp(s: &mut Session, flags: u8, from_client: bool) {
    if flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        if !s.opening_seen {
            s.opening_seen = true;
            s.opened = true;
        }
        if s.state == SYN_SENT && !from_client {
            s.marks |= MARK_SPLIT_HANDSHAKE; // its opener's SYN answered by a SYN
        }
    }
    if flags & TCP_RST != 0 {
        s.state = CLOSED;
    } else if flags & TCP_FIN != 0 {
        s.fins |= if from_client { 1 } else { 2 };
        s.state = if s.fins == 3 { CLOSED } else { CLOSING };
    } else if s.state < OPEN {
        if flags & TCP_SYN != 0 {
            if flags & TCP_ACK != 0 {
                s.state = SYN_RECV;
            }
        } else {
            s.state = OPEN; // the handshake's last ACK (or a lost SYN-ACK): data can flow
        }
    }
}
