"""TPACKET_V3 blocks: layout, both readers, and the two readers agreeing exactly."""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from typing import Any

import pytest

from flowmap_dp.block import (
    BLOCK_DESC, TP_STATUS_VLAN_VALID, TPACKET3_HDR, block_packets, feed_block, pack_block,
)
from flowmap_dp.detectors.base import Threat
from flowmap_dp.session import SessionTable
from flowmap_dp.synth import Frame, ether, ipv4, ipv6, mixed_traffic, tcp, udp
from flowmap_dp.vectorised import feed_block_vectorised

Reader = Callable[[bytes, SessionTable], int]
READERS = [pytest.param(feed_block, id="per-packet"), pytest.param(feed_block_vectorised, id="per-block")]
A4, B4 = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])


class Tape:
    """An inspector that records every payload and decides after three."""

    made: list[Tape] = []

    def __init__(self, l4: str, client_port: int, server_port: int) -> None:
        self.ports = (client_port, server_port)
        self.fed: list[tuple[bool, bytes]] = []
        self.n = 0
        Tape.made.append(self)
        self.app = "unknown"
        self.metadata: dict[str, Any] = {}
        self.threats: list[Threat] = []

    def feed(self, from_client: bool, payload: bytes) -> bool:
        self.fed.append((from_client, payload))
        self.n += 1
        if self.n == 3:
            self.app = "echo"
        return self.n >= 3

    def judge_server_alone(self) -> bool:
        return False

    def finish(self) -> None:
        pass


def blocks_of(frames: list[Frame], size: int = 1 << 16) -> list[bytes]:
    out = []
    while frames:
        block, n = pack_block(frames, size)
        assert n > 0
        out.append(block)
        frames = frames[n:]
    return out


def odd_frames(rnd: random.Random, ts: float) -> list[Frame]:
    """Frames the per-block reader must leave to the per-packet decoder."""
    icmp = bytes([8, 0, 0, 0, 0, 7, 0, 1]) + b"ping"
    hbh = bytes([17, 0, 1, 4, 0, 0, 0, 0])  # hop-by-hop -> UDP
    v6a, v6b = b"\xfd" + bytes(14) + b"\x01", b"\xfd" + bytes(14) + b"\x02"
    ext = ipv6(v6a, v6b, 0, hbh + udp(1000, 53, b"q"))
    frag1 = ipv4(A4, B4, 17, udp(5000, 53, b"z" * 20), ident=7, frag=0x2000)
    frag2 = ipv4(A4, B4, 17, b"tail", ident=7, frag=0x0003)  # attributed to frag1's session
    orphan = ipv4(A4, B4, 17, b"lost", ident=8, frag=0x0003)  # its first fragment never came
    opts = bytearray(ipv4(A4, B4, 6, tcp(40000, 80, 0x18, b"opt")))
    opts = bytearray([0x46]) + opts[1:20] + b"\x01\x01\x01\x00" + opts[20:]
    opts[2:4] = struct.pack("!H", len(opts))
    whole = ether(ipv4(A4, B4, 6, tcp(40000, 80, 0x18, b"payload" * 20)))
    return [
        (ether(ipv4(A4, B4, 1, icmp)), ts, None),
        (ether(ext), ts, None),
        (ether(frag1), ts, None),
        (ether(frag2), ts, None),
        (ether(orphan), ts, None),
        (ether(bytes(opts)), ts, None),
        (whole[: rnd.randrange(0, len(whole))], ts, None),
        (bytes(rnd.randrange(256) for _ in range(rnd.randrange(0, 80))), ts, None),
        (ether(ipv4(A4, B4, 6, tcp(40000, 80, 0x10)), (3,)), ts, 5),
    ]


def traffic(seed: int, packets: int = 6000) -> list[Frame]:
    rnd = random.Random(seed)
    frames = mixed_traffic(packets, flows=300, seed=seed, pps=1e4)
    for _ in range(40):
        at = rnd.randrange(len(frames))
        frames[at:at] = odd_frames(rnd, frames[at][1])
    return frames


def run(reader: Reader, blocks: list[bytes], table: SessionTable | None = None) -> SessionTable:
    table = SessionTable(inspector_factory=Tape) if table is None else table  # an empty table is falsy
    for b in blocks:
        reader(b, table)
    return table


def snapshot(t: SessionTable) -> list[tuple[object, ...]]:
    """Everything the two readers must agree on, in the table's recency order."""
    return [(k, s.a_is_client, s.state, s.fins, s.first, s.last, s.pkts_c2s, s.pkts_s2c, s.bytes_c2s,
             s.bytes_s2c, s.app, s.feeds) for k, s in t.sessions.items()]


def test_pack_block_layout() -> None:
    frames = [(ether(ipv4(A4, B4, 17, udp(1, 2, b"x" * n))), 10.5, None) for n in (0, 100, 1000)]
    block, n = pack_block(frames, 1 << 12)
    assert n == 3 and len(block) == 4096
    _, _, status, num, first, _ = BLOCK_DESC.unpack_from(block)
    assert (status & 1, num, first) == (1, 3, 48)
    off = first
    for data, _, _ in frames:
        nxt, sec, nsec, snap, wire, _st, mac, net, *_ = TPACKET3_HDR.unpack_from(block, off)
        assert (sec, nsec, snap, wire, mac, net) == (10, 500_000_000, len(data), len(data), 82, 96)
        assert block[off + mac : off + mac + snap] == data and nxt % 8 == 0
        off += nxt
    assert pack_block(frames * 10, 1 << 10)[1] < 30  # what does not fit waits for the next block


@pytest.mark.parametrize("reader", READERS)
def test_stripped_and_in_frame_vlan_key_alike(reader: Reader) -> None:
    l3 = ipv4(A4, B4, 6, tcp(40000, 80, 0x02))
    block, _ = pack_block([(ether(l3), 1.0, 42), (ether(l3, (42,)), 2.0, None), (ether(l3), 3.0, None)])
    t = run(reader, [block], SessionTable())
    vlans = sorted(s.endpoints()[4] for s in t.sessions.values())
    assert vlans == [0, 42] and sum(s.pkts_c2s for s in t.sessions.values()) == 3
    tci, tpid = TPACKET3_HDR.unpack_from(block, 48)[9:11]
    assert (tci, tpid) == (42, 0x8100)


@pytest.mark.parametrize("reader", READERS)
def test_snaplen_cut_frames(reader: Reader) -> None:
    frames = [(ether(ipv4(A4, B4, 6, tcp(40000, 80, 0x18, b"x" * 1400))), 1.0, None)] * 3
    block, _ = pack_block(frames, snaplen=96)
    t = run(reader, [block], SessionTable())
    (s,) = t.sessions.values()
    assert s.bytes_c2s == 3 * 1440 and t.stats.decoded == 3


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_readers_agree_exactly(seed: int) -> None:
    blocks = blocks_of(traffic(seed))
    Tape.made = []
    a = run(feed_block, blocks)
    tapes_a, Tape.made = sorted((t.ports, t.fed) for t in Tape.made), []
    b = run(feed_block_vectorised, blocks)
    assert snapshot(a) == snapshot(b)
    # Each session's slow path saw the same payloads in the same order.
    assert sorted((t.ports, t.fed) for t in Tape.made) == tapes_a
    assert (a.stats.total, a.stats.decoded, a.stats.malformed, a.stats.ignored) == \
        (b.stats.total, b.stats.decoded, b.stats.malformed, b.stats.ignored)
    assert a.stats.balanced() and sum(a.stats.malformed.values()) > 0 and a.stats.ignored["fragment"] > 0
    assert a.fragments.counters == b.fragments.counters and a.fragments.counters["attributed"] > 0
    ra, rb = a.collect(1e12), b.collect(1e12)
    key = lambda d: (d.client, d.client_port, d.server, d.server_port, d.proto, d.vlan, d.first_seen)  # noqa: E731
    assert sorted(ra.sessions, key=key) == sorted(rb.sessions, key=key)
    assert ra.health == rb.health


def test_readers_agree_over_many_blocks_with_a_warm_table() -> None:
    blocks = blocks_of(traffic(7, 4000))
    a, b = run(feed_block, blocks), run(feed_block_vectorised, blocks)
    run(feed_block, blocks, a)
    run(feed_block_vectorised, blocks, b)
    assert snapshot(a) == snapshot(b)


def hostile_blocks(rnd: random.Random) -> list[bytes]:
    good = blocks_of(traffic(11, 300), 1 << 14)
    out = []
    for block in good:
        raw = bytearray(block)
        n, first = block_packets(raw)
        kind = rnd.randrange(6)
        if kind == 0:
            struct.pack_into("<I", raw, 12, rnd.choice([n + 5, 2**32 - 1]))  # more packets than written
        elif kind == 1:
            struct.pack_into("<I", raw, first, 0)  # a zero link at the first packet
        elif kind == 2:
            struct.pack_into("<I", raw, first, 3)  # an unaligned link
        elif kind == 3:
            struct.pack_into("<H", raw, first + 24, 83)  # an odd tp_mac
        elif kind == 4:
            struct.pack_into("<I", raw, first + 12, 2**31)  # a snap length past the block
        else:
            for _ in range(50):
                raw[rnd.randrange(len(raw))] = rnd.randrange(256)
        out.append(bytes(raw))
    out.append(b"")
    out.append(bytes(47))
    out.append(bytes(4099))
    return out


def test_hostile_blocks_never_raise_and_readers_agree() -> None:
    rnd = random.Random(5)
    blocks = hostile_blocks(rnd)
    a, b = run(feed_block, blocks), run(feed_block_vectorised, blocks)
    assert snapshot(a) == snapshot(b)
    assert a.stats.balanced() and b.stats.balanced() and a.stats.malformed["internal_error"] == 0


def test_memoryview_blocks() -> None:
    blocks = blocks_of(traffic(4, 500))
    a = run(feed_block, [memoryview(b) for b in blocks])  # type: ignore[misc]
    b = run(feed_block_vectorised, [memoryview(bytearray(b)) for b in blocks])  # type: ignore[misc]
    assert snapshot(a) == snapshot(b)


def test_vlan_valid_flag_is_required() -> None:
    block, _ = pack_block([(ether(ipv4(A4, B4, 6, tcp(1, 2, 0x02))), 1.0, None)])
    raw = bytearray(block)
    struct.pack_into("<I", raw, 48 + 32, 77)  # a tci without TP_STATUS_VLAN_VALID is ignored
    for reader in (feed_block, feed_block_vectorised):
        t = run(reader, [bytes(raw)], SessionTable())
        assert [s.endpoints()[4] for s in t.sessions.values()] == [0]
    assert TP_STATUS_VLAN_VALID == 0x10


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("server_ring_first", [False, True], ids=["in-order", "server-ring-first"])
def test_app_is_reported_once_matched_whichever_ring_is_read_first(reader: Reader, server_ring_first: bool) -> None:
    """Live, a pod-to-pod request enters on the client's veth and the response on the server's:
    two rings. A short HTTP/1.0 exchange never fills the detector's linger, so the session only
    settles when it ends (seconds after its FINs); the app must not wait for that."""
    c = lambda flags, data=b"": ether(ipv4(A4, B4, 6, tcp(40000, 8080, flags, data)))  # noqa: E731
    s = lambda flags, data=b"": ether(ipv4(B4, A4, 6, tcp(8080, 40000, flags, data)))  # noqa: E731
    client_ring = [(c(0x02), 1.0, None), (c(0x10), 1.002, None),
                   (c(0x18, b"GET / HTTP/1.1\r\nHost: cache:8080\r\n\r\n"), 1.003, None), (c(0x10), 1.006, None)]
    server_ring = [(s(0x12), 1.001, None), (s(0x10), 1.004, None),
                   (s(0x18, b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n"), 1.005, None),
                   (s(0x18, b"ok"), 1.0051, None)]
    rings = [server_ring, client_ring] if server_ring_first else [client_ring, server_ring]
    t = run(reader, [pack_block(frames)[0] for frames in rings], SessionTable())
    (d,) = t.collect(2.0).sessions
    assert (d.app, d.app_decided, d.new, d.opened, d.client_port) == ("http", True, True, True, 40000)
    assert not d.metadata  # metadata and threats come once the inspector settles
    t.close_all()
    (end,) = t.collect(3.0).sessions
    assert end.app == "http" and end.app_decided and end.metadata == {
        "http": {"method": "GET", "path": "/", "version": "1.1", "host": "cache:8080", "status": 200}}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("server_ring_first", [False, True], ids=["in-order", "server-ring-first"])
def test_a_dns_lookup_opens_one_session_whichever_ring_is_read_first(reader: Reader, server_ring_first: bool) -> None:
    """The query enters on the client's veth, the answer on the DNS pod's: two rings."""
    q = lambda data: ether(ipv4(A4, B4, 17, udp(40000, 53, data)))  # noqa: E731
    a = lambda data: ether(ipv4(B4, A4, 17, udp(53, 40000, data)))  # noqa: E731
    query = bytes.fromhex("62070100000100000000000003617069000001000100")  # A? api
    answer = bytes.fromhex("62078180000100010000000003617069000001000100c00c000100010000003c00040a600032")
    client_ring = [(q(query), 1.0, None), (q(query[:2] + b"\x01" + query[3:]), 1.0001, None)]
    server_ring = [(a(answer), 1.0005, None), (a(answer), 1.0006, None)]
    rings = [server_ring, client_ring] if server_ring_first else [client_ring, server_ring]
    t = run(reader, [pack_block(frames)[0] for frames in rings], SessionTable())
    (d,) = t.collect(2.0).sessions
    assert (d.opened, d.client_port, d.packets_c2s, d.packets_s2c) == (True, 40000, 2, 2)


@pytest.mark.parametrize("seed", [4, 5])
def test_raw_ip_frames_of_a_tunnel_count_as_their_ethernet_twins(seed: int) -> None:
    """A tunnel without a link header (IPIP, WireGuard) gives raw IP frames (``tp_net == tp_mac``):
    both readers count them exactly as the same packets behind an Ethernet header."""
    frames = [f for f in mixed_traffic(3000, flows=200, seed=seed, pps=1e4, vlan_share=0.0)]
    raw = [(data[14:], ts, None) for data, ts, _tci in frames]
    want = snapshot(run(feed_block, blocks_of(frames)))
    assert want
    for reader in (feed_block, feed_block_vectorised):
        out: list[bytes] = []
        rest = raw
        while rest:
            block, n = pack_block(rest, 1 << 16, link_header=0)
            out.append(block)
            rest = rest[n:]
        assert snapshot(run(reader, out)) == want
