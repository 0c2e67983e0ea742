"""Frame decoding: link layer, VLAN, IPv4/IPv6 and the first bytes of TCP/UDP/ICMP.

``decode()`` is a pure function over a buffer and a byte range. It never raises: it returns a
``Decoded`` for a packet that belongs to a session, or one reason string from ``MALFORMED``
(the frame is broken or truncated) or ``IGNORED`` (well-formed but not sessioned: non-IP
frames, non-first IP fragments). Callers count the outcome in a ``DecodeStats``, whose totals
always add up: ``total == decoded + sum(malformed) + sum(ignored)``.

Fragments: a non-first IP fragment carries no L4 header, so ``decode`` alone cannot say whose it
is. ``Fragments.decode`` (what the readers call) remembers, per first fragment, the ports it
carried, keyed by (VLAN, src, dst, protocol, IP identification) — bounded in size and in time —
and turns a later fragment of the same datagram into a ``Decoded`` of that session (its bytes,
no payload to inspect). A later fragment whose first one was not seen stays ``"fragment"``.

Addresses stay bytes all the way to the session key; they become text only at the edges
(``format_endpoint``). The session key is one bytes object (see ``flow_key``): small to keep,
cheap to hash, and the same whichever direction the packet travels.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from struct import Struct
from typing import Final

# Link types (pcap LINKTYPE_* numbers); AF_PACKET rings always hand us Ethernet.
LINK_NULL: Final = 0
LINK_ETHERNET: Final = 1
LINK_RAW: Final = 101
LINK_LINUX_SLL: Final = 113
LINK_IPV4: Final = 228
LINK_IPV6: Final = 229
LINK_LINUX_SLL2: Final = 276

ETH_IPV4: Final = 0x0800
ETH_IPV6: Final = 0x86DD
ETH_VLAN: Final = 0x8100
ETH_QINQ: Final = 0x88A8
ETH_QINQ_OLD: Final = 0x9100
ETH_PPPOE_SESSION: Final = 0x8864

PROTO_ICMP: Final = 1
PROTO_TCP: Final = 6
PROTO_UDP: Final = 17
PROTO_ICMPV6: Final = 58

TCP_FIN: Final = 0x01
TCP_SYN: Final = 0x02
TCP_RST: Final = 0x04
TCP_ACK: Final = 0x10

# What one packet shows that a threat detection wants (``Decoded.marks``), ORed into its session's
# marks until the next report (``SessionDelta.marks``). The decoder sets the packet's own facts;
# the session table those a packet shows only against its session.
MARK_SPLIT_HANDSHAKE: Final = 0x01  # table: a SYN answered by a SYN (no ACK) from the other side
MARK_SYN_DATA: Final = 0x02  # a SYN (no ACK) carrying payload (captured), without a Fast Open cookie
MARK_FAST_OPEN: Final = 0x04  # a SYN carrying payload and a TCP Fast Open cookie (kind 34, or 254 + 0xF989)
MARK_OVERSIZED: Final = 0x08  # a fragment whose datagram, reassembled, would pass 65,535 bytes
IP_MAX: Final = 65535  # the largest IPv4 total length, the largest IPv6 payload length
TCP_OPT_FAST_OPEN: Final = 34
TCP_OPT_EXPERIMENT: Final = 254
TFO_MAGIC: Final = 0xF989  # RFC 7413's experimental option: kind 254, magic 0xF989

MALFORMED: Final = (
    "truncated_link",  # shorter than the link-layer header (Ethernet, SLL, PPPoE)
    "truncated_vlan",  # a VLAN tag cut short
    "truncated_ip",  # shorter than the fixed IPv4/IPv6 header
    "bad_ip_version",  # version nibble disagrees with the ethertype
    "bad_ihl",  # IPv4 header length below 20 bytes
    "bad_ip_length",  # IP total/payload length shorter than the headers it claims
    "truncated_ext",  # an IPv6 extension header cut short, or too many of them
    "truncated_l4",  # TCP/UDP/ICMP header cut short (by the capture or by the IP length)
    "bad_tcp_offset",  # TCP data offset below 5 words
    "internal_error",  # a decoder bug caught at the boundary; must stay 0 (the fuzz test checks)
)
IGNORED: Final = (
    "not_ip",  # ARP, LLDP, ... : well-formed, not ours
    "fragment",  # a non-first IP fragment whose first fragment was not seen (or is forgotten)
)
# Counters of the fragment table (``Fragments``); they count table events, not frames, so they
# are kept apart from the balanced frame outcomes above.
FRAGMENT_COUNTERS: Final = (
    "tracked",  # first fragments remembered (their datagram's later fragments can be attributed)
    "attributed",  # later fragments counted toward their first fragment's session
    "evicted_full",  # remembered first fragments pushed out by the size bound (table full)
    "expired",  # remembered first fragments forgotten after FRAGMENT_TIMEOUT seconds
)
FRAGMENT_TIMEOUT: Final = 30.0  # seconds a first fragment is remembered (the kernel's ipfrag_time)
FRAGMENT_MAX: Final = 4096  # first fragments remembered at most; the oldest goes first

MAX_WIRE_LEN: Final = 0xFFFFFFFF  # a capture says a frame's length in 32 bits (tp_len, pcap orig_len)

L4_NAMES: Final = {PROTO_TCP: "tcp", PROTO_UDP: "udp", PROTO_ICMP: "icmp", PROTO_ICMPV6: "icmpv6"}

_U16 = Struct("!H")
_U16x2 = Struct("!HH")
_IP4 = Struct("!BxHHHxB2x4s4s")  # vihl, total length, identification, flags+fragment offset, protocol, src, dst
_IP6 = Struct("!BxxxHB1x16s16s")  # version byte, payload length, next header, src, dst
_PORTS = Struct("!HH")
_TCP_FLAGS = Struct("!BB")  # data offset byte, flags byte (at TCP offset 12)
_ICMP = Struct("!BBxxH")  # type, code, identifier
_KEY_HEAD = Struct("!BH")  # protocol, VLAN id
_PORT = Struct("!H")

# ICMP echo request/reply types: they carry an identifier, which keys the session.
_ICMP_ECHO: Final = frozenset({0, 8})
_ICMP6_ECHO: Final = frozenset({128, 129})
_IP6_EXT_8: Final = frozenset({0, 43, 60})  # hop-by-hop, routing, destination options: (len+1)*8
_IP6_FRAGMENT: Final = 44
_U32 = Struct("!I")
_IP6_AH: Final = 51
_MAX_IP6_EXT: Final = 8  # more than this many extension headers is treated as hostile


FragKey = tuple[int, bytes, bytes, int, int]  # vlan, src, dst, IP protocol, IP identification


class Decoded:
    """One packet that belongs to a session. Offsets index the buffer given to ``decode``."""

    __slots__ = ("vlan", "proto", "src", "dst", "sport", "dport", "flags", "ip_len", "payload_start", "payload_end",
                 "frag", "marks")

    def __init__(
        self,
        vlan: int,
        proto: int,
        src: bytes,
        dst: bytes,
        sport: int,
        dport: int,
        flags: int,
        ip_len: int,
        payload_start: int,
        payload_end: int,
        marks: int = 0,
    ) -> None:
        self.vlan = vlan
        self.proto = proto
        self.src = src
        self.dst = dst
        self.sport = sport
        self.dport = dport
        self.flags = flags  # TCP flags; the ICMP type for ICMP; 0 otherwise
        self.ip_len = ip_len  # bytes counted for the session: IP header + payload as sent
        self.payload_start = payload_start
        self.payload_end = payload_end  # payload_end - payload_start may be < what was sent (snaplen)
        # A first fragment (more follow): its datagram's id, (vlan, src, dst, protocol, ident).
        self.frag: FragKey | None = None
        self.marks = marks  # MARK_* bits the decoder saw

    @property
    def payload_len(self) -> int:
        return self.payload_end - self.payload_start

    def __repr__(self) -> str:
        return (
            f"Decoded({L4_NAMES.get(self.proto, self.proto)} {format_endpoint(self.src, self.sport)}"
            f" -> {format_endpoint(self.dst, self.dport)} vlan={self.vlan} flags={self.flags:#x}"
            f" ip_len={self.ip_len} payload={self.payload_len})"
        )


class _Later:
    """A non-first fragment, as ``_decode`` hands it to ``Fragments`` (``decode`` says "fragment")."""

    __slots__ = ("key", "ip_len", "marks")

    def __init__(self, key: FragKey, ip_len: int, reassembled: int) -> None:
        self.key = key
        self.ip_len = ip_len
        # The length field its datagram would need, reassembled (IPv4 total, IPv6 payload): past
        # IP_MAX no datagram can be (the ping of death).
        self.marks = MARK_OVERSIZED if reassembled > IP_MAX else 0


class DecodeStats:
    """Outcome counters of ``decode``; ``total`` always equals the sum of the others."""

    __slots__ = ("total", "decoded", "malformed", "ignored")

    def __init__(self) -> None:
        self.total = 0
        self.decoded = 0
        self.malformed: dict[str, int] = dict.fromkeys(MALFORMED, 0)
        self.ignored: dict[str, int] = dict.fromkeys(IGNORED, 0)

    def count(self, outcome: Decoded | str) -> None:
        """Count one outcome of ``decode``."""
        self.total += 1
        if type(outcome) is str:
            if outcome in self.ignored:
                self.ignored[outcome] += 1
            else:
                self.malformed[outcome] += 1
        else:
            self.decoded += 1

    def balanced(self) -> bool:
        """True when every frame counted landed in exactly one bucket."""
        return self.total == self.decoded + sum(self.malformed.values()) + sum(self.ignored.values())


def flow_key(proto: int, vlan: int, src: bytes, sport: int, dst: bytes, dport: int) -> tuple[bytes, bool]:
    """The canonical bidirectional session key and whether the packet runs from its side ``a``.

    Layout: protocol (1), VLAN id (2), then the smaller (address, port) endpoint, then the
    larger one (address + 2-byte port each): 15 bytes for IPv4, 39 for IPv6. Both directions of
    a session give the same key; ``True`` means ``src`` is the first endpoint in the key.
    """
    head = _KEY_HEAD.pack(proto, vlan)
    if (src, sport) <= (dst, dport):
        return head + src + _PORT.pack(sport) + dst + _PORT.pack(dport), True
    return head + dst + _PORT.pack(dport) + src + _PORT.pack(sport), False


def split_key(key: bytes) -> tuple[int, int, bytes, int, bytes, int]:
    """Inverse of ``flow_key``: (proto, vlan, a_addr, a_port, b_addr, b_port)."""
    alen = (len(key) - 7) // 2
    proto, vlan = _KEY_HEAD.unpack_from(key, 0)
    a = key[3 : 3 + alen]
    (ap,) = _PORT.unpack_from(key, 3 + alen)
    b = key[5 + alen : 5 + 2 * alen]
    (bp,) = _PORT.unpack_from(key, 5 + 2 * alen)
    return proto, vlan, a, ap, b, bp


def format_endpoint(addr: bytes, port: int) -> str:
    """``ip:port``, or ``[ipv6]:port`` for IPv6 (text only here, at the edge)."""
    if len(addr) == 16:
        return f"[{ipaddress.IPv6Address(addr)}]:{port}"
    return f"{ipaddress.IPv4Address(addr)}:{port}"


def decode(buf: bytes | memoryview, start: int, end: int, link: int = LINK_ETHERNET, vlan: int = 0,
           wire_len: int = 0) -> Decoded | str:
    """Decode the frame ``buf[start:end]``; never raises.

    ``vlan`` is a VLAN id the capture already stripped (TPACKET ``tp_vlan_tci``); a tag still in
    the frame is further in, so it wins (the innermost tag keys the session). ``wire_len`` is the frame's length on the wire (``tp_len``, pcap
    ``orig_len``); it is used only when an IP length field is 0 (GSO/BIG TCP super-packets).
    """
    try:
        out = _decode(buf, start, end, link, vlan, min(wire_len, MAX_WIRE_LEN) or end - start)
    except Exception:  # a decoder bug must not stop the packet loop; it is counted and fuzzed
        return "internal_error"
    return "fragment" if type(out) is _Later else out  # type: ignore[return-value]


class Fragments:
    """Later IP fragments attributed to the session of their datagram's first fragment.

    The first fragment carries the L4 header: its ports (and flags) are remembered under the
    datagram's id — (VLAN, src, dst, IP protocol, IP identification; IPv6: the Fragment header's
    identification and next header) — for ``timeout`` seconds of capture time, at most ``limit``
    datagrams (the oldest is forgotten first: a datagram's fragments follow each other within
    milliseconds, so a flood of first fragments costs old entries, not new ones). A later
    fragment of a remembered datagram decodes as that session's packet, in its direction, with its
    own IP length as bytes and no payload (its bytes are not the start of an L4 payload); of
    any other datagram it stays ``"fragment"``. Like ``decode``, never raises.
    """

    __slots__ = ("limit", "timeout", "_seen", "counters")

    def __init__(self, limit: int = FRAGMENT_MAX, timeout: float = FRAGMENT_TIMEOUT) -> None:
        self.limit = max(0, limit)
        self.timeout = timeout
        self._seen: OrderedDict[FragKey, tuple[int, int, int, float]] = OrderedDict()  # -> sport, dport, flags, ts
        self.counters: dict[str, int] = dict.fromkeys(FRAGMENT_COUNTERS, 0)

    def __len__(self) -> int:
        return len(self._seen)

    def decode(self, buf: bytes | memoryview, start: int, end: int, link: int = LINK_ETHERNET, vlan: int = 0,
               wire_len: int = 0, ts: float = 0.0) -> Decoded | str:
        """``decode``, with later fragments of remembered datagrams attributed; ``ts`` is the
        frame's capture time."""
        try:
            out = _decode(buf, start, end, link, vlan, min(wire_len, MAX_WIRE_LEN) or end - start)
            if type(out) is _Later:
                return self._later(out, ts)
            if type(out) is Decoded and out.frag is not None:
                self._first(out, ts)
            return out  # type: ignore[return-value]
        except Exception:  # as decode: a bug is counted and fuzzed, never raised
            return "internal_error"

    def _first(self, d: Decoded, ts: float) -> None:
        seen = self._seen
        key = d.frag
        assert key is not None
        if key in seen:
            seen.move_to_end(key)
        elif self.limit == 0:
            return
        else:
            self._expire(ts)
            if len(seen) >= self.limit:
                seen.popitem(last=False)
                self.counters["evicted_full"] += 1
        seen[key] = (d.sport, d.dport, d.flags, ts)
        self.counters["tracked"] += 1

    def _expire(self, ts: float) -> None:
        """Forget the oldest datagrams while they are older than the timeout (insertion order is
        capture order, give or take the rings' interleaving: a few may stay a little longer,
        never past the size bound)."""
        seen = self._seen
        while seen:
            key, entry = next(iter(seen.items()))
            if ts - entry[3] <= self.timeout:
                break
            del seen[key]
            self.counters["expired"] += 1

    def _later(self, f: _Later, ts: float) -> Decoded | str:
        entry = self._seen.get(f.key)
        if entry is None:
            return "fragment"
        sport, dport, flags, first_ts = entry
        if abs(ts - first_ts) > self.timeout:
            del self._seen[f.key]
            self.counters["expired"] += 1
            return "fragment"
        self.counters["attributed"] += 1
        vlan, src, dst, proto, _ = f.key
        # Flags as the first fragment's (the same TCP segment or ICMP message: applying them
        # again changes no state); no payload to inspect.
        return Decoded(vlan, proto, src, dst, sport, dport, flags, f.ip_len, 0, 0, f.marks)


def _decode(buf: bytes | memoryview, start: int, end: int, link: int, vlan: int,
            wire_len: int) -> Decoded | _Later | str:
    pos = start
    if link == LINK_ETHERNET:
        if end - pos < 14:
            return "truncated_link"
        (etype,) = _U16.unpack_from(buf, pos + 12)
        pos += 14
    elif link == LINK_LINUX_SLL:
        if end - pos < 16:
            return "truncated_link"
        (etype,) = _U16.unpack_from(buf, pos + 14)
        pos += 16
    elif link == LINK_LINUX_SLL2:
        if end - pos < 20:
            return "truncated_link"
        (etype,) = _U16.unpack_from(buf, pos)
        pos += 20
    elif link in (LINK_RAW, LINK_IPV4, LINK_IPV6):
        if end - pos < 1:
            return "truncated_ip"
        etype = ETH_IPV6 if buf[pos] >> 4 == 6 else ETH_IPV4
    elif link == LINK_NULL:
        if end - pos < 4:
            return "truncated_link"
        family = buf[pos] | buf[pos + 3]  # host byte order: either end holds the small value
        etype = ETH_IPV4 if family == 2 else ETH_IPV6 if family in (10, 24, 28, 30) else 0
        pos += 4
    else:
        return "not_ip"

    # 802.1Q / QinQ: the innermost tag names the VLAN. The kernel strips only the outermost tag
    # into tp_vlan_tci, so "innermost" keys a session the same with or without stripping.
    while etype in (ETH_VLAN, ETH_QINQ, ETH_QINQ_OLD):
        if end - pos < 4:
            return "truncated_vlan"
        tci, etype = _U16x2.unpack_from(buf, pos)
        vlan = tci & 0x0FFF
        pos += 4
    if etype == ETH_PPPOE_SESSION:
        # PPPoE session header (6 bytes), then the 2-byte PPP protocol.
        if end - pos < 8:
            return "truncated_link"
        (ppp,) = _U16.unpack_from(buf, pos + 6)
        etype = ETH_IPV4 if ppp == 0x0021 else ETH_IPV6 if ppp == 0x0057 else 0
        pos += 8

    if etype == ETH_IPV4:
        return _ipv4(buf, pos, end, vlan, wire_len - (pos - start))
    if etype == ETH_IPV6:
        return _ipv6(buf, pos, end, vlan, wire_len - (pos - start))
    return "not_ip"


def _ipv4(buf: bytes | memoryview, pos: int, end: int, vlan: int, wire_ip: int) -> Decoded | _Later | str:
    if end - pos < 20:
        return "truncated_ip"
    vihl, ip_len, ident, frag, proto, src, dst = _IP4.unpack_from(buf, pos)
    if vihl >> 4 != 4:
        return "bad_ip_version"
    ihl = (vihl & 0x0F) * 4
    if ihl < 20:
        return "bad_ihl"
    if ip_len == 0:
        ip_len = wire_ip  # GSO/BIG TCP: the stack leaves the length to the wire
    if ip_len < ihl:
        return "bad_ip_length"
    if frag & 0x1FFF:
        # Later fragments have no L4 header; the first one carried the ports.
        return _Later((vlan, src, dst, proto, ident), ip_len, (frag & 0x1FFF) * 8 + ip_len)
    if end - pos < ihl:
        return "truncated_ip"
    out = _l4(buf, pos + ihl, min(end, pos + ip_len), vlan, proto, src, dst, ip_len)
    if frag & 0x2000 and type(out) is Decoded:  # more fragments follow: this is the first
        out.frag = (vlan, src, dst, proto, ident)
    return out


def _ipv6(buf: bytes | memoryview, pos: int, end: int, vlan: int, wire_ip: int) -> Decoded | _Later | str:
    if end - pos < 40:
        return "truncated_ip"
    ver, plen, nh, src, dst = _IP6.unpack_from(buf, pos)
    if ver >> 4 != 6:
        return "bad_ip_version"
    ip_len = 40 + plen if plen else max(wire_ip, 40)  # plen 0: jumbogram / BIG TCP
    stop = min(end, pos + ip_len)
    off = pos + 40
    first: FragKey | None = None
    for _ in range(_MAX_IP6_EXT):
        if nh in _IP6_EXT_8:
            if stop - off < 2:
                return "truncated_ext"
            nh, ext = buf[off], (buf[off + 1] + 1) * 8
        elif nh == _IP6_FRAGMENT:
            if stop - off < 8:
                return "truncated_ext"
            (fo,) = _U16.unpack_from(buf, off + 2)
            (ident,) = _U32.unpack_from(buf, off + 4)
            if fo & 0xFFF8:
                # Reassembled payload: what precedes this fragment's data but the fragment header,
                # then the data from its offset on.
                return _Later((vlan, src, dst, buf[off], ident), ip_len, (fo & 0xFFF8) + ip_len - 48)
            if fo & 1:  # more fragments follow: this is the first
                first = (vlan, src, dst, buf[off], ident)
            nh, ext = buf[off], 8
        elif nh == _IP6_AH:
            if stop - off < 2:
                return "truncated_ext"
            nh, ext = buf[off], (buf[off + 1] + 2) * 4
        else:
            break
        off += ext
        if off > pos + ip_len:
            return "bad_ip_length"
    else:
        return "truncated_ext"
    out = _l4(buf, off, stop, vlan, nh, src, dst, ip_len)
    if first is not None and type(out) is Decoded:
        out.frag = first
    return out


def _fast_open(buf: bytes | memoryview, off: int, end: int) -> bool:
    """True when the TCP options in ``buf[off:end]`` (at most 40 bytes) hold a Fast
    Open cookie: kind 34 with one (length > 2), or kind 254 with magic 0xF989 and one. A cookie
    request (no cookie) is not Fast Open data: the server must not accept data without one."""
    while off < end:
        kind = buf[off]
        if kind == 0:  # end of options
            return False
        if kind == 1:  # no-op
            off += 1
            continue
        if end - off < 2:
            return False
        size = buf[off + 1]
        if size < 2 or size > end - off:
            return False  # malformed: no option can be read past it
        if kind == TCP_OPT_FAST_OPEN and size > 2:
            return True
        if kind == TCP_OPT_EXPERIMENT and size > 4 and buf[off + 2] << 8 | buf[off + 3] == TFO_MAGIC:
            return True
        off += size
    return False


def _l4(buf: bytes | memoryview, off: int, stop: int, vlan: int, proto: int, src: bytes, dst: bytes,
        ip_len: int) -> Decoded | str:
    """L4 header at ``off``; ``stop`` is where captured bytes or the IP datagram end."""
    if proto == PROTO_TCP:
        if stop - off < 20:
            return "truncated_l4"
        sport, dport = _PORTS.unpack_from(buf, off)
        doff, flags = _TCP_FLAGS.unpack_from(buf, off + 12)
        hl = (doff >> 4) * 4
        if hl < 20:
            return "bad_tcp_offset"
        start = min(off + hl, stop)
        marks = 0
        if flags & (TCP_SYN | TCP_ACK) == TCP_SYN and stop > start:
            marks = MARK_FAST_OPEN if _fast_open(buf, off + 20, start) else MARK_SYN_DATA
        return Decoded(vlan, proto, src, dst, sport, dport, flags, ip_len, start, stop, marks)
    if proto == PROTO_UDP:
        if stop - off < 8:
            return "truncated_l4"
        sport, dport = _PORTS.unpack_from(buf, off)
        return Decoded(vlan, proto, src, dst, sport, dport, 0, ip_len, off + 8, stop)
    if proto == PROTO_ICMP or proto == PROTO_ICMPV6:
        if stop - off < 8:
            return "truncated_l4"
        itype, _code, ident = _ICMP.unpack_from(buf, off)
        # Echo request and reply share the identifier, so they meet in one session; other
        # messages (errors, neighbour discovery) key by type+code on both sides.
        port = ident if itype in (_ICMP_ECHO if proto == PROTO_ICMP else _ICMP6_ECHO) else (itype << 8 | _code)
        return Decoded(vlan, proto, src, dst, port, port, itype, ip_len, off + 8, stop)
    # Other IP protocols (ESP, GRE, SCTP, ...): a session per address pair, no ports.
    return Decoded(vlan, proto, src, dst, 0, 0, 0, ip_len, off, stop)
