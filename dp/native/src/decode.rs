//! Frame decoding, as `flowmap_dp/decode.py` (the reference): link layer, VLAN, IPv4/IPv6 and
//! the first bytes of TCP/UDP/ICMP. Every read is bounds-checked (`get`), so a hostile frame
//! ends in a reason, never in a panic; the same reasons, in the same order of checks, as the
//! Python decoder (a test feeds both the same frames).

use std::collections::{HashMap, VecDeque};

use ahash::RandomState;

pub const LINK_NULL: u32 = 0;
pub const LINK_ETHERNET: u32 = 1;
pub const LINK_RAW: u32 = 101;
pub const LINK_LINUX_SLL: u32 = 113;
pub const LINK_IPV4: u32 = 228;
pub const LINK_IPV6: u32 = 229;
pub const LINK_LINUX_SLL2: u32 = 276;

const ETH_IPV4: u16 = 0x0800;
const ETH_IPV6: u16 = 0x86DD;
const ETH_VLAN: u16 = 0x8100;
const ETH_QINQ: u16 = 0x88A8;
const ETH_QINQ_OLD: u16 = 0x9100;
const ETH_PPPOE_SESSION: u16 = 0x8864;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

const IP6_FRAGMENT: u8 = 44;
const IP6_AH: u8 = 51;
const MAX_IP6_EXT: usize = 8;
pub const MAX_WIRE_LEN: u64 = u32::MAX as u64;

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
/// What one packet shows that a threat detection wants (`Decoded.marks`), as `decode.MARK_*`.
pub const MARK_SYN_DATA: u8 = 0x02;
pub const MARK_FAST_OPEN: u8 = 0x04;
pub const MARK_OVERSIZED: u8 = 0x08;
const IP_MAX: u64 = 65_535;

/// Why a frame is not a session's packet: `decode.MALFORMED` then `decode.IGNORED`, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Reason {
    TruncatedLink = 0,
    TruncatedVlan,
    TruncatedIp,
    BadIpVersion,
    BadIhl,
    BadIpLength,
    TruncatedExt,
    TruncatedL4,
    BadTcpOffset,
    InternalError,
    NotIp,
    Fragment,
}
pub const REASONS: usize = 12;

/// An address of either family; IPv4 in the first 4 bytes, the rest zero.
pub type Addr = [u8; 16];

/// One datagram's identity: (VLAN, family, src, dst, IP protocol, identification).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct FragKey {
    pub vlan: u16,
    pub v6: bool,
    pub src: Addr,
    pub dst: Addr,
    pub proto: u8,
    pub ident: u32,
}

/// One packet that belongs to a session. Offsets index the buffer given to `decode`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Decoded {
    pub vlan: u16,
    pub proto: u8,
    pub v6: bool,
    pub src: Addr,
    pub dst: Addr,
    pub sport: u16,
    pub dport: u16,
    pub flags: u8,
    pub ip_len: u64,
    pub payload_start: usize,
    pub payload_end: usize,
    /// A first fragment (more follow): its datagram's identification and IP protocol (IPv6: the
    /// Fragment header's next header); with the rest of the packet, its `FragKey`.
    pub frag: Option<(u32, u8)>,
    /// `MARK_*` bits the decoder saw.
    pub marks: u8,
}

impl Decoded {
    pub fn has_payload(&self) -> bool {
        self.payload_end > self.payload_start
    }

    fn frag_key(&self) -> Option<FragKey> {
        let (ident, proto) = self.frag?;
        Some(FragKey { vlan: self.vlan, v6: self.v6, src: self.src, dst: self.dst, proto, ident })
    }
}

/// What `decode` made of a frame; the packet itself is written to its `out` argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `out` is a session's packet.
    Packet,
    /// A non-first fragment: `out` holds its datagram's id (addresses, VLAN, `frag`) and ip_len.
    Later,
    Skip(Reason),
}

fn be16(h: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([h[i], h[i + 1]])
}

fn addr4(h: &[u8]) -> Addr {
    let mut a = [0u8; 16];
    a[..4].copy_from_slice(&h[..4]);
    a
}

fn addr6(h: &[u8]) -> Addr {
    let mut a = [0u8; 16];
    a.copy_from_slice(&h[..16]);
    a
}

/// `end - pos` where `pos` may have passed `end` (an IPv6 extension chain): negative then.
fn room(end: usize, pos: usize) -> i64 {
    end as i64 - pos as i64
}

/// `decode.decode` of `buf[start..end]` (clamped to the buffer), reading non-first fragments as
/// `Later` for the fragment table. Each header is sliced once its length was checked, and read
/// by fixed offsets within the slice.
pub fn decode(buf: &[u8], start: usize, end: usize, link: u32, vlan: u16, wire_len: u64, out: &mut Decoded) -> Outcome {
    let end = end.min(buf.len());
    let start = start.min(end);
    // A capture says a frame's length in 32 bits (tp_len, pcap's orig_len): longer is no frame's
    // (and would overflow the arithmetic below); decode.py clamps alike.
    let wire = if wire_len != 0 { wire_len.min(MAX_WIRE_LEN) as i64 } else { (end - start) as i64 };
    let buf = &buf[..end];
    let mut vlan = vlan;
    let mut pos = start;
    let mut etype: u16;
    use Outcome::Skip;
    match link {
        LINK_ETHERNET => {
            if end - pos < 14 {
                return Skip(Reason::TruncatedLink);
            }
            etype = be16(buf, pos + 12);
            pos += 14;
        }
        LINK_LINUX_SLL => {
            if end - pos < 16 {
                return Skip(Reason::TruncatedLink);
            }
            etype = be16(buf, pos + 14);
            pos += 16;
        }
        LINK_LINUX_SLL2 => {
            if end - pos < 20 {
                return Skip(Reason::TruncatedLink);
            }
            etype = be16(buf, pos);
            pos += 20;
        }
        LINK_RAW | LINK_IPV4 | LINK_IPV6 => {
            if end - pos < 1 {
                return Skip(Reason::TruncatedIp);
            }
            etype = if buf[pos] >> 4 == 6 { ETH_IPV6 } else { ETH_IPV4 };
        }
        LINK_NULL => {
            if end - pos < 4 {
                return Skip(Reason::TruncatedLink);
            }
            etype = match buf[pos] | buf[pos + 3] {
                2 => ETH_IPV4,
                10 | 24 | 28 | 30 => ETH_IPV6,
                _ => 0,
            };
            pos += 4;
        }
        _ => return Skip(Reason::NotIp),
    }
    // 802.1Q / QinQ: the innermost tag names the VLAN (as decode.py says why).
    while etype == ETH_VLAN || etype == ETH_QINQ || etype == ETH_QINQ_OLD {
        if end - pos < 4 {
            return Skip(Reason::TruncatedVlan);
        }
        vlan = be16(buf, pos) & 0x0FFF;
        etype = be16(buf, pos + 2);
        pos += 4;
    }
    if etype == ETH_PPPOE_SESSION {
        if end - pos < 8 {
            return Skip(Reason::TruncatedLink);
        }
        etype = match be16(buf, pos + 6) {
            0x0021 => ETH_IPV4,
            0x0057 => ETH_IPV6,
            _ => 0,
        };
        pos += 8;
    }
    let wire_ip = wire - (pos - start) as i64;
    match etype {
        ETH_IPV4 => ipv4(buf, pos, vlan, wire_ip, out),
        ETH_IPV6 => ipv6(buf, pos, vlan, wire_ip, out),
        _ => Skip(Reason::NotIp),
    }
}

/// IPv4 at `pos`; the frame ends where `buf` does.
fn ipv4(buf: &[u8], pos: usize, vlan: u16, wire_ip: i64, out: &mut Decoded) -> Outcome {
    use Outcome::Skip;
    let end = buf.len();
    if end - pos < 20 {
        return Skip(Reason::TruncatedIp);
    }
    let h = &buf[pos..pos + 20];
    let vihl = h[0];
    let mut ip_len = be16(h, 2) as i64;
    if vihl >> 4 != 4 {
        return Skip(Reason::BadIpVersion);
    }
    let ihl = (vihl & 0x0F) as usize * 4;
    if ihl < 20 {
        return Skip(Reason::BadIhl);
    }
    if ip_len == 0 {
        ip_len = wire_ip; // GSO/BIG TCP: the stack leaves the length to the wire
    }
    if ip_len < ihl as i64 {
        return Skip(Reason::BadIpLength);
    }
    let frag = be16(h, 6);
    out.vlan = vlan;
    out.v6 = false;
    out.src = addr4(&h[12..16]);
    out.dst = addr4(&h[16..20]);
    out.ip_len = ip_len as u64;
    out.marks = 0;
    let ident = be16(h, 4) as u32;
    if frag & 0x1FFF != 0 {
        out.frag = Some((ident, h[9]));
        // The total length its datagram would need, reassembled: past 65,535, none can be.
        if (frag & 0x1FFF) as u64 * 8 + ip_len as u64 > IP_MAX {
            out.marks = MARK_OVERSIZED;
        }
        return Outcome::Later;
    }
    if end - pos < ihl {
        return Skip(Reason::TruncatedIp);
    }
    out.frag = if frag & 0x2000 != 0 { Some((ident, h[9])) } else { None }; // the first fragment
    let stop = end.min(pos.saturating_add(ip_len as usize));
    l4(&buf[..stop], pos + ihl, h[9], out)
}

/// IPv6 at `pos`, its extension headers (at most `MAX_IP6_EXT`), then L4.
fn ipv6(buf: &[u8], pos: usize, vlan: u16, wire_ip: i64, out: &mut Decoded) -> Outcome {
    use Outcome::Skip;
    let end = buf.len();
    if end - pos < 40 {
        return Skip(Reason::TruncatedIp);
    }
    let h = &buf[pos..pos + 40];
    if h[0] >> 4 != 6 {
        return Skip(Reason::BadIpVersion);
    }
    let plen = be16(h, 4) as u64;
    let mut nh = h[6];
    out.vlan = vlan;
    out.v6 = true;
    out.src = addr6(&h[8..24]);
    out.dst = addr6(&h[24..40]);
    let ip_len = if plen != 0 { 40 + plen } else { wire_ip.max(40) as u64 };
    out.ip_len = ip_len;
    out.marks = 0;
    let limit = pos.saturating_add(ip_len as usize); // where the datagram ends
    let stop = end.min(limit);
    let mut off = pos + 40;
    let mut first: Option<(u32, u8)> = None;
    let mut ended = false;
    for _ in 0..MAX_IP6_EXT {
        let ext;
        match nh {
            0 | 43 | 60 => {
                if room(stop, off) < 2 {
                    return Skip(Reason::TruncatedExt);
                }
                ext = (buf[off + 1] as usize + 1) * 8;
                nh = buf[off];
            }
            IP6_FRAGMENT => {
                if room(stop, off) < 8 {
                    return Skip(Reason::TruncatedExt);
                }
                let e = &buf[off..off + 8];
                let id = (u32::from_be_bytes([e[4], e[5], e[6], e[7]]), e[0]);
                let fo = be16(e, 2);
                if fo & 0xFFF8 != 0 {
                    out.frag = Some(id);
                    // The payload length its datagram would need, reassembled (decode.py says how).
                    if (fo & 0xFFF8) as u64 + ip_len > IP_MAX + 48 {
                        out.marks = MARK_OVERSIZED;
                    }
                    return Outcome::Later;
                }
                if fo & 1 != 0 {
                    first = Some(id);
                }
                nh = e[0];
                ext = 8;
            }
            IP6_AH => {
                if room(stop, off) < 2 {
                    return Skip(Reason::TruncatedExt);
                }
                ext = (buf[off + 1] as usize + 2) * 4;
                nh = buf[off];
            }
            _ => {
                ended = true;
                break;
            }
        }
        off += ext;
        if off > limit {
            return Skip(Reason::BadIpLength);
        }
    }
    if !ended {
        return Skip(Reason::TruncatedExt);
    }
    out.frag = first;
    l4(&buf[..stop], off, nh, out)
}

/// The L4 header at `off`; the captured bytes or the IP datagram end where `buf` does (`off`
/// may lie past it, after IPv6 extension headers: then nothing is there).
fn l4(buf: &[u8], off: usize, proto: u8, out: &mut Decoded) -> Outcome {
    use Outcome::Skip;
    let stop = buf.len();
    let mut packet = |sport: u16, dport: u16, flags: u8, start: usize| {
        out.proto = proto;
        out.sport = sport;
        out.dport = dport;
        out.flags = flags;
        out.payload_start = start;
        out.payload_end = stop;
        Outcome::Packet
    };
    let avail = room(stop, off);
    match proto {
        PROTO_TCP => {
            if avail < 20 {
                return Skip(Reason::TruncatedL4);
            }
            let h = &buf[off..off + 20];
            let hl = (h[12] >> 4) as usize * 4;
            if hl < 20 {
                return Skip(Reason::BadTcpOffset);
            }
            let (flags, start) = (h[13], (off + hl).min(stop));
            if flags & (TCP_SYN | TCP_ACK) == TCP_SYN && stop > start {
                out.marks = if fast_open(&buf[off + 20..start]) { MARK_FAST_OPEN } else { MARK_SYN_DATA };
            }
            packet(be16(h, 0), be16(h, 2), flags, start)
        }
        PROTO_UDP => {
            if avail < 8 {
                return Skip(Reason::TruncatedL4);
            }
            let h = &buf[off..off + 8];
            packet(be16(h, 0), be16(h, 2), 0, off + 8)
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            if avail < 8 {
                return Skip(Reason::TruncatedL4);
            }
            let h = &buf[off..off + 8];
            let (itype, code) = (h[0], h[1]);
            // Echo request and reply share the identifier; other messages key by type+code.
            let echo = if proto == PROTO_ICMP { itype == 0 || itype == 8 } else { itype == 128 || itype == 129 };
            let port = if echo { be16(h, 4) } else { (itype as u16) << 8 | code as u16 };
            packet(port, port, itype, off + 8)
        }
        _ => packet(0, 0, 0, off),
    }
}

/// Whether TCP options (at most 40 bytes) hold a Fast Open cookie (`decode._fast_open`).
fn fast_open(opts: &[u8]) -> bool {
    let mut i = 0;
    while i < opts.len() {
        match opts[i] {
            0 => return false,
            1 => i += 1,
            kind => {
                let Some(&size) = opts.get(i + 1) else { return false };
                let size = size as usize;
                if size < 2 || size > opts.len() - i {
                    return false;
                }
                let o = &opts[i..i + size];
                if kind == 34 && size > 2 || kind == 254 && size > 4 && be16(o, 2) == 0xF989 {
                    return true;
                }
                i += size;
            }
        }
    }
    false
}

/// Counters of the fragment table, as `decode.FRAGMENT_COUNTERS`.
#[derive(Default, Clone, Copy)]
pub struct FragCounters {
    pub tracked: u64,
    pub attributed: u64,
    pub evicted_full: u64,
    pub expired: u64,
}

#[derive(Clone, Copy)]
struct FragEntry {
    sport: u16,
    dport: u16,
    flags: u8,
    ts: f64,
    seq: u64,
}

/// `decode.Fragments`: later fragments attributed to their first fragment's session, bounded in
/// size (the oldest goes first) and time. Order is a queue of (key, seq); an entry moved to the
/// end leaves a stale copy behind, skipped when reached and compacted when they pile up.
pub struct Fragments {
    limit: usize,
    timeout: f64,
    seen: HashMap<FragKey, FragEntry, RandomState>,
    order: VecDeque<(FragKey, u64)>,
    seq: u64,
    pub counters: FragCounters,
}

impl Fragments {
    pub fn new(limit: usize, timeout: f64) -> Self {
        Fragments {
            limit,
            timeout,
            seen: HashMap::with_hasher(RandomState::new()),
            order: VecDeque::new(),
            seq: 0,
            counters: FragCounters::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// `Fragments.decode`: `decode`, with later fragments of remembered datagrams attributed.
    #[allow(clippy::too_many_arguments)]
    pub fn decode(&mut self, buf: &[u8], start: usize, end: usize, link: u32, vlan: u16, wire_len: u64, ts: f64,
                  out: &mut Decoded) -> Result<(), Reason> {
        match decode(buf, start, end, link, vlan, wire_len, out) {
            Outcome::Packet => {
                if let Some(key) = out.frag_key() {
                    self.first(key, out, ts);
                }
                Ok(())
            }
            Outcome::Later => self.later(out, ts),
            Outcome::Skip(r) => Err(r),
        }
    }

    fn live(&self, key: &FragKey, seq: u64) -> bool {
        self.seen.get(key).is_some_and(|e| e.seq == seq)
    }

    /// The oldest live entry's key, dropping stale queue entries on the way.
    fn front(&mut self) -> Option<FragKey> {
        while let Some(&(key, seq)) = self.order.front() {
            if self.live(&key, seq) {
                return Some(key);
            }
            self.order.pop_front();
        }
        None
    }

    fn first(&mut self, key: FragKey, d: &Decoded, ts: f64) {
        if !self.seen.contains_key(&key) {
            if self.limit == 0 {
                return;
            }
            self.expire(ts);
            if self.seen.len() >= self.limit {
                if let Some(old) = self.front() {
                    self.seen.remove(&old);
                    self.order.pop_front();
                    self.counters.evicted_full += 1;
                }
            }
        }
        self.seq += 1;
        self.seen.insert(key, FragEntry { sport: d.sport, dport: d.dport, flags: d.flags, ts, seq: self.seq });
        self.order.push_back((key, self.seq));
        self.counters.tracked += 1;
        if self.order.len() > 2 * self.seen.len() + 64 {
            let seen = &self.seen;
            self.order.retain(|(k, s)| seen.get(k).is_some_and(|e| e.seq == *s));
        }
    }

    fn expire(&mut self, ts: f64) {
        while let Some(key) = self.front() {
            if ts - self.seen[&key].ts <= self.timeout {
                break;
            }
            self.seen.remove(&key);
            self.order.pop_front();
            self.counters.expired += 1;
        }
    }

    /// A later fragment (`d` holds its datagram's id): its first fragment's ports and flags, no
    /// payload, or `Fragment` when the first was not seen (or is forgotten).
    fn later(&mut self, d: &mut Decoded, ts: f64) -> Result<(), Reason> {
        let Some(key) = d.frag_key() else { return Err(Reason::Fragment) };
        let Some(e) = self.seen.get(&key).copied() else {
            return Err(Reason::Fragment);
        };
        if (ts - e.ts).abs() > self.timeout {
            self.seen.remove(&key); // its queue entry goes stale
            self.counters.expired += 1;
            return Err(Reason::Fragment);
        }
        self.counters.attributed += 1;
        d.proto = key.proto;
        d.sport = e.sport;
        d.dport = e.dport;
        d.flags = e.flags;
        d.payload_start = 0;
        d.payload_end = 0;
        d.frag = None; // `marks` stays: the decoder's word on this fragment
        Ok(())
    }
}
