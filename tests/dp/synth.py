"""Synthetic frames, traffic and TPACKET_V3 blocks, built by hand with ``struct`` (for tests,
benchmarks and the fuzz seeds, never shipped: run them from the repository's root, which is how
``tests.dp.synth`` imports).

Shipped code must not use scapy (GPL), and scapy is far too slow to build millions of frames;
these builders make well-formed Ethernet/VLAN/IPv4/IPv6/TCP/UDP frames (checksums left 0: the
datapath never checks them) and a mixed traffic model: thousands of flows with skewed
popularity, packets in trains as real senders produce them, 64-1500-byte frames, a TCP
handshake and close per connection, a share of IPv6 and of VLAN-tagged frames (some tags in
the frame, some stripped into the TPACKET header as the kernel does).
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from struct import Struct

from flowmap_dp.block import (BLOCK_DESC, BLOCK_DESC_SIZE, TP_STATUS_USER, TP_STATUS_VLAN_VALID, TPACKET3_HDR,
                              TPACKET3_HDRLEN)

_ETH = Struct("!6s6sH")
_TAG = Struct("!HH")
_IP4 = Struct("!BBHHHBBH4s4s")
_IP6 = Struct("!IHBB16s16s")
_TCP = Struct("!HHIIBBHHH")
_UDP = Struct("!HHHH")
_MAC_A, _MAC_B = b"\x02\x00\x00\x00\x00\x01", b"\x02\x00\x00\x00\x00\x02"
_SEQ_TS = Struct("<QIIII")

Frame = tuple[bytes, float, int | None]  # (frame, timestamp, VLAN TCI stripped by the kernel or None)


def tcp(sport: int, dport: int, flags: int, payload: bytes = b"", seq: int = 0, ack: int = 0,
        options: bytes = b"") -> bytes:
    """A TCP segment (20-byte header, then ``options``, padded with end-of-options to 4 bytes)."""
    options += bytes(-len(options) % 4)
    return _TCP.pack(sport, dport, seq, ack, (5 + len(options) // 4) << 4, flags, 65535, 0, 0) + options + payload


def udp(sport: int, dport: int, payload: bytes = b"") -> bytes:
    """A UDP datagram."""
    return _UDP.pack(sport, dport, 8 + len(payload), 0) + payload


def ipv4(src: bytes, dst: bytes, proto: int, l4: bytes, ident: int = 0, frag: int = 0x4000) -> bytes:
    """An IPv4 packet without options (``frag``: flags + fragment offset, DF by default)."""
    return _IP4.pack(0x45, 0, 20 + len(l4), ident, frag, 64, proto, 0, src, dst) + l4


def ipv6(src: bytes, dst: bytes, nh: int, l4: bytes) -> bytes:
    """An IPv6 packet without extension headers."""
    return _IP6.pack(6 << 28, len(l4), nh, 64, src, dst) + l4


def ether(ip: bytes, vlans: tuple[int, ...] = (), pad: bool = True) -> bytes:
    """An Ethernet frame around ``ip`` with in-frame VLAN tags (outermost first)."""
    etype = 0x86DD if ip[0] >> 4 == 6 else 0x0800
    head = _ETH.pack(_MAC_B, _MAC_A, 0x8100 if vlans else etype)
    for i, vid in enumerate(vlans):
        head += _TAG.pack(vid, 0x8100 if i + 1 < len(vlans) else etype)
    frame = head + ip
    return frame + b"\0" * (60 - len(frame)) if pad and len(frame) < 60 else frame


@dataclass
class _Flow:
    v6: bool
    client: bytes
    server: bytes
    cport: int
    sport: int
    is_tcp: bool
    vlan: int  # 0: none
    stripped: bool  # the kernel took the tag out of the frame
    state: int = 0  # TCP: 0-2 handshake packets sent so far, 3 open, 4 client sent FIN


def mixed_traffic(packets: int, flows: int = 5000, seed: int = 1, v6_share: float = 0.3, vlan_share: float = 0.1,
                  udp_share: float = 0.2, start: float = 1_700_000_000.0, pps: float = 1e6,
                  close_rate: float = 0.005) -> list[Frame]:
    """``packets`` frames of mixed traffic over ``flows`` flows (see the module docstring);
    ``close_rate`` is the chance that a TCP packet closes its connection (a new one follows)."""
    rnd = random.Random(seed)
    pool = []
    for i in range(flows):
        v6 = rnd.random() < v6_share
        if v6:
            c = b"\xfd\x00" + bytes(10) + i.to_bytes(4, "big")
            s = b"\xfd\x00" + bytes(12) + rnd.randrange(1, 200).to_bytes(2, "big")
        else:
            c = bytes([10, 1]) + i.to_bytes(2, "big")
            s = bytes([10, 2, 0, rnd.randrange(1, 200)])
        is_tcp = rnd.random() >= udp_share
        service = rnd.choice((80, 443, 5432, 6379, 8080, 3306, 9092)) if is_tcp else rnd.choice((53, 123, 5353, 8125))
        vlan = rnd.randrange(1, 4095) if rnd.random() < vlan_share else 0
        pool.append(_Flow(v6, c, s, rnd.randrange(32768, 61000), service, is_tcp, vlan, rnd.random() < 0.5))
    weights = [1.0 / (k + 1) for k in range(flows)]  # Zipf-like popularity: a few elephants, many mice
    out: list[Frame] = []
    ts = start
    while len(out) < packets:
        f = rnd.choices(pool, weights)[0]
        train = 1 + int(rnd.expovariate(1 / 6))
        for _ in range(train):
            out.append(_packet(f, rnd, ts, close_rate))
            ts += 1.0 / pps
            if len(out) >= packets:
                break
    return out


def _packet(f: _Flow, rnd: random.Random, ts: float, close_rate: float) -> Frame:
    from_client = rnd.random() < 0.5
    size = rnd.choice((0, 0, 0, 40, 200, 512, 1000, 1400, 1448)) if rnd.random() < 0.8 else rnd.randrange(0, 1449)
    payload = b"\xab" * size
    if f.is_tcp:
        flags = 0x10 | (0x08 if size else 0)
        if f.state < 3:  # the handshake, also for a new connection on a closed 5-tuple
            flags, from_client = ((0x02, True), (0x12, False), (0x10, True))[f.state]
            payload, f.state = b"", f.state + 1
        elif f.state == 4:  # the server's FIN answers the client's: closed, reopen next time
            flags, payload, from_client, f.state = 0x11, b"", False, 0
        elif rnd.random() < close_rate:
            flags, payload, from_client, f.state = 0x11, b"", True, 4
        l4 = tcp(f.cport, f.sport, flags, payload) if from_client else tcp(f.sport, f.cport, flags, payload)
        proto = 6
    else:
        l4 = udp(f.cport, f.sport, payload[:1400]) if from_client else udp(f.sport, f.cport, payload[:1400])
        proto = 17
    src, dst = (f.client, f.server) if from_client else (f.server, f.client)
    ip = ipv6(src, dst, proto, l4) if f.v6 else ipv4(src, dst, proto, l4)
    if f.vlan and f.stripped:
        return ether(ip), ts, f.vlan
    return ether(ip, (f.vlan,) if f.vlan else ()), ts, None


def seed_frames(rnd: random.Random) -> list[bytes]:
    """Well-formed frames of every shape the decoder knows, to be mutated."""
    a4, b4 = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
    a6, b6 = b"\xfd" + bytes(14) + b"\x01", b"\xfd" + bytes(14) + b"\x02"
    pay = bytes(rnd.randrange(256) for _ in range(rnd.choice((0, 4, 40, 300))))
    hbh = bytes([6, 0, 1, 4, 0, 0, 0, 0])
    frag6 = bytes([17, 0, 0, 1, 0, 0, 0, 7])
    ah = bytes([6, 1, 0, 0]) + bytes(8)
    icmp = bytes([8, 0, 0, 0, 0, 7, 0, 1]) + pay
    tfo = bytes([2, 4, 5, 180, 34, 10]) + rnd.randbytes(8)  # MSS, then a Fast Open cookie
    return [
        ether(ipv4(a4, b4, 6, tcp(40000, 80, 0x02, pay, options=tfo))),
        ether(ipv4(b4, a4, 6, tcp(80, 40000, 0x02, pay, options=bytes([1, 254, 12, 0xF9, 0x89]) + bytes(8)))),
        ether(ipv4(b4, a4, 1, bytes([0, 0, 0, 0, 0, 7, 0, 1]) + pay)),
        ether(ipv4(a4, b4, 1, icmp, ident=9, frag=0x1FF0)),  # a later fragment past 65,535
        ether(ipv6(a6, b6, 44, bytes([58, 0, 0xFF, 0xF9, 0, 0, 0, 7]) + pay)),
        ether(ipv4(a4, b4, 6, tcp(40000, 80, 0x18, pay))),
        ether(ipv4(a4, b4, 17, udp(5353, 53, pay)), (7,)),
        ether(ipv4(a4, b4, 17, udp(5353, 53, pay)), (7, 9)),
        ether(ipv4(a4, b4, 1, icmp)),
        ether(ipv4(a4, b4, 17, udp(1, 2, pay), frag=0x2000)),
        ether(ipv4(a4, b4, 17, pay, frag=0x0010)),
        ether(ipv6(a6, b6, 6, tcp(40000, 443, 0x02, pay))),
        ether(ipv6(a6, b6, 0, hbh + tcp(40000, 443, 0x12, pay))),
        ether(ipv6(a6, b6, 44, frag6 + udp(1, 2, pay))),
        ether(ipv6(a6, b6, 51, ah + tcp(1, 2, 0x10, pay))),
        ether(ipv6(a6, b6, 58, bytes([128, 0, 0, 0, 0, 3, 0, 1]) + pay)),
        ether(ipv4(a4, b4, 47, pay)),  # GRE: sessioned without ports
    ]


def fuzz_frames(count: int, seed: int = 0) -> list[bytes]:
    """Hostile frames: random bytes, mutated well-formed frames, truncated ones, header fields
    set to random values (lengths, IHL, data offset, next headers, VLAN chains)."""
    rnd = random.Random(seed)
    out: list[bytes] = []
    seeds = seed_frames(rnd)
    while len(out) < count:
        if len(out) % 512 == 0:
            seeds = seed_frames(rnd)
        kind = rnd.randrange(4)
        if kind == 0:
            out.append(rnd.randbytes(rnd.randrange(0, 120)))
            continue
        f = bytearray(rnd.choice(seeds))
        if kind == 1:  # a few bytes flipped, mostly in the headers
            for _ in range(rnd.randrange(1, 9)):
                f[min(int(rnd.expovariate(1 / 40)), len(f) - 1)] = rnd.randrange(256)
        elif kind == 2:  # cut anywhere
            del f[rnd.randrange(0, len(f) + 1):]
        else:  # one 16-bit field anywhere in the first 80 bytes set to an extreme
            at = rnd.randrange(0, min(80, len(f) - 1))
            f[at : at + 2] = rnd.choice((0, 1, 0xFF, 0x8100, 0x86DD, 0x0800, 0xFFFF, rnd.randrange(65536))).to_bytes(2, "big")
        out.append(bytes(f))
    return out


# -- the dp -> agent stream ---------------------------------------------------------------------

_ODD_NAMES = ("a.example", "_svc1._tcp.example.com.", "Bücher.example", "evil.com\n", "a<b", "", "x" * 300, ".",
              "a..b", "\x00")


def _report(rnd: random.Random) -> bytes:
    """A serialized Report of a few sessions, answers and hits, with odd values where they are legal."""
    from flowmap_dp import wire_pb2  # the packet builders above need no protobuf

    def ip() -> bytes:
        return rnd.choice((bytes([10, 0, 0, rnd.randrange(4)]), b"\xfd" + bytes(14) + b"\x01", bytes([169, 254, 0, 1]),
                           bytes([224, 0, 0, 1]), rnd.randbytes(rnd.choice((0, 3, 4, 16, 17)))))

    def big() -> int:
        return rnd.choice((0, 1, 1500, 2**62 + 1, 2**64 - 1, rnd.randrange(2**64)))

    r = wire_pb2.Report(run_id=rnd.choice((7, rnd.randrange(2**64))), worker=rnd.choice((0, 1, 1023, 1024, 2**32 - 1)),
                        workers=rnd.randrange(3), sequence=rnd.choice((1, 2, 3, rnd.randrange(2**64))),
                        part=rnd.choice((0, 1, 2**32 - 1)), parts=rnd.choice((0, 1, 3, 2**32 - 1)),
                        start_ns=rnd.randrange(-2**63, 2**63), end_ns=rnd.randrange(-2**63, 2**63))
    for _ in range(rnd.randrange(6)):
        s = r.sessions.add(ip_proto=rnd.choice((6, 17, 1, 58, 132, 255, 2**32 - 1)), client_ip=ip(),
                           client_port=rnd.choice((0, 80, 65535, 65536, 2**32 - 1)), server_ip=ip(),
                           server_port=rnd.choice((0, 53, 65535, 65536, 2**32 - 1)), vlan=rnd.randrange(4096),
                           new=rnd.random() < .5, opened=rnd.random() < .5, closed=rnd.random() < .5,
                           app=rnd.choice(("", "http", "dns", "unknown", "nonsense", "\u00e9")), bytes_c2s=big(),
                           bytes_s2c=big(), packets_c2s=big(), packets_s2c=big(),
                           first_seen_ns=rnd.randrange(-2**63, 2**63), last_seen_ns=rnd.randrange(-2**63, 2**63))
        if rnd.random() < .3:
            r.threats.add(threat=rnd.choice(("sqlinjection", "nonsense")), ip_proto=s.ip_proto, client_ip=s.client_ip,
                          client_port=s.client_port, server_ip=s.server_ip, server_port=s.server_port,
                          snippet="x" * rnd.choice((0, 10, 300)), seen_ns=rnd.randrange(-2**63, 2**63))
    for _ in range(rnd.randrange(4)):
        r.dns.add(name=rnd.choice(_ODD_NAMES), type=rnd.choice(("A", "AAAA", "CNAME", "")), address=ip(),
                  ttl=rnd.randrange(2**32))
    if rnd.random() < .5:
        r.health.lost_sessions = big()
        r.health.lost_reports = big()
    return r.SerializeToString()


def wire_streams(count: int, seed: int = 0) -> list[tuple[list[bytes], int | None]]:
    """Byte streams as a connection to the agent's socket might carry them: whole frames of
    reports with odd values (and of the agent's own kinds), and the same mutated (a header or body
    byte changed, the length a lie, cut short, garbage after them, random bytes), each split into
    reads at random points. With each, the number of reports it holds when intact, else None."""
    from flowmap_dp.framing import HEADER, KIND_ACK, KIND_CONTROL, KIND_REPORT, MAGIC, frame

    rnd = random.Random(seed)
    out: list[tuple[list[bytes], int | None]] = []
    while len(out) < count:
        kinds = [rnd.choice((KIND_REPORT, KIND_REPORT, KIND_REPORT, KIND_CONTROL, KIND_ACK, 9))
                 for _ in range(rnd.randrange(1, 4))]
        data = bytearray(b"".join(frame(k, _report(rnd) if k == KIND_REPORT else rnd.randbytes(rnd.randrange(8)))
                                  for k in kinds))
        reports: int | None = kinds.count(KIND_REPORT)
        how = rnd.randrange(7)
        if how == 1:  # a byte of a header
            data[rnd.randrange(HEADER.size)] = rnd.randrange(256)
            reports = None
        elif how == 2:  # bytes of a body
            for _ in range(rnd.randrange(1, 5)):
                data[rnd.randrange(len(data))] = rnd.randrange(256)
            reports = None
        elif how == 3:  # the length a lie
            data[8:12] = rnd.choice((0, 1, 2**24, 2**31, 2**32 - 1, rnd.randrange(2**32))).to_bytes(4, "big")
            reports = None
        elif how == 4:  # cut short
            del data[rnd.randrange(len(data)):]
            reports = None
        elif how == 5:  # garbage after
            data += rnd.choice((rnd.randbytes(rnd.randrange(1, 40)), MAGIC + bytes(8), MAGIC))
            reports = None
        elif how == 6:  # no frame at all
            data = bytearray(rnd.randbytes(rnd.randrange(0, 64)))
            reports = None
        cuts = sorted(rnd.randrange(len(data) + 1) for _ in range(rnd.randrange(4)))
        out.append(([bytes(data[a:b]) for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)], reports))
    return out


# -- TPACKET_V3 blocks, as the kernel lays them out (flowmap_dp.block reads them) -----------------

def pack_block(frames: Iterable[tuple[bytes, float] | tuple[bytes, float, int | None]], block_size: int = 1 << 20,
               snaplen: int = 65535, seq: int = 0, link_header: int = 14) -> tuple[bytes, int]:
    """Lay frames out as the kernel would in one TPACKET_V3 block (for tests and benchmarks).

    Each frame is (bytes, timestamp) or (bytes, timestamp, stripped VLAN TCI). Returns the block
    and how many frames fit; the rest belong in the next block. ``link_header`` is the device's
    link header length: 14 for Ethernet, 0 for a tunnel whose frames are raw IP.
    """
    out = bytearray(block_size)
    # The kernel's macoff: the network header aligned to 16 after the headers (tpacket_rcv).
    mac = ((TPACKET3_HDRLEN + max(link_header, 16) + 15) & ~15) - link_header
    first = off = (BLOCK_DESC_SIZE + 7) & ~7
    n = last = 0
    ts_first = ts_last = (0, 0)
    for item in frames:
        data, ts = item[0], item[1]
        tci = item[2] if len(item) > 2 else None
        cap = min(len(data), snaplen)
        step = (mac + cap + 7) & ~7
        if off + step > block_size:
            break
        sec = int(ts)
        nsec = int(round((ts - sec) * 1e9))
        if nsec >= 1_000_000_000:
            sec, nsec = sec + 1, nsec - 1_000_000_000
        status = TP_STATUS_USER | (TP_STATUS_VLAN_VALID if tci is not None else 0)
        TPACKET3_HDR.pack_into(out, off, step, sec, nsec, cap, len(data), status, mac, mac + link_header, 0, tci or 0,
                               0x8100 if tci is not None else 0, 0)
        out[off + mac : off + mac + cap] = data[:cap]
        last = off
        if n == 0:
            ts_first = (sec, nsec)
        ts_last = (sec, nsec)
        off += step
        n += 1
    if n:
        struct.pack_into("<I", out, last, 0)  # as prb_close_block: the last packet links nowhere
    BLOCK_DESC.pack_into(out, 0, 3, BLOCK_DESC_SIZE, TP_STATUS_USER, n, first, off)
    _SEQ_TS.pack_into(out, 24, seq, *ts_first, *ts_last)
    return bytes(out), n
