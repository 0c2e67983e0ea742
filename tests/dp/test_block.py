"""TPACKET_V3 blocks: their layout, and what each table (the compiled one and the per-packet
reference) reads from them. ``test_compiled`` holds the two to identical reports."""

from __future__ import annotations

import struct

import pytest

from flowmap_dp.block import BLOCK_DESC, TP_STATUS_VLAN_VALID, TPACKET3_HDR
from tests.dp.synth import ether, ipv4, pack_block, tcp, udp
from tests.dp.twins import KINDS, make_table

A4, B4 = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])


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


@pytest.mark.parametrize("kind", KINDS)
def test_stripped_and_in_frame_vlan_key_alike(kind: str) -> None:
    l3 = ipv4(A4, B4, 6, tcp(40000, 80, 0x02))
    block, _ = pack_block([(ether(l3), 1.0, 42), (ether(l3, (42,)), 2.0, None), (ether(l3), 3.0, None)])
    t = make_table(kind)
    t.feed_block(block)
    got = sorted((d.vlan, d.packets_c2s) for d in t.collect(4.0).sessions)
    assert got == [(0, 1), (42, 2)]
    tci, tpid = TPACKET3_HDR.unpack_from(block, 48)[9:11]
    assert (tci, tpid) == (42, 0x8100)


@pytest.mark.parametrize("kind", KINDS)
def test_snaplen_cut_frames(kind: str) -> None:
    frames = [(ether(ipv4(A4, B4, 6, tcp(40000, 80, 0x18, b"x" * 1400))), 1.0, None)] * 3
    block, _ = pack_block(frames, snaplen=96)
    t = make_table(kind)
    t.feed_block(block)
    report = t.collect(2.0)
    (d,) = report.sessions
    assert d.bytes_c2s == 3 * 1440 and report.health.decoded == 3


@pytest.mark.parametrize("kind", KINDS)
def test_vlan_valid_flag_is_required(kind: str) -> None:
    block, _ = pack_block([(ether(ipv4(A4, B4, 6, tcp(1, 2, 0x02))), 1.0, None)])
    raw = bytearray(block)
    struct.pack_into("<I", raw, 48 + 32, 77)  # a tci without TP_STATUS_VLAN_VALID is ignored
    t = make_table(kind)
    t.feed_block(bytes(raw))
    assert [d.vlan for d in t.collect(2.0).sessions] == [0]
    assert TP_STATUS_VLAN_VALID == 0x10


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("server_ring_first", [False, True], ids=["in-order", "server-ring-first"])
def test_app_is_reported_once_matched_whichever_ring_is_read_first(kind: str, server_ring_first: bool) -> None:
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
    t = make_table(kind)
    for frames in rings:
        t.feed_block(pack_block(frames)[0])
    (d,) = t.collect(2.0).sessions
    assert (d.app, d.app_decided, d.new, d.opened, d.client_port) == ("http", True, True, True, 40000)
    assert not d.metadata  # metadata and threats come once the inspector settles
    t.close_all()
    (end,) = t.collect(3.0).sessions
    assert end.app == "http" and end.app_decided and end.metadata == {
        "http": {"method": "GET", "path": "/", "version": "1.1", "host": "cache:8080", "status": 200}}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("server_ring_first", [False, True], ids=["in-order", "server-ring-first"])
def test_a_dns_lookup_opens_one_session_whichever_ring_is_read_first(kind: str, server_ring_first: bool) -> None:
    """The query enters on the client's veth, the answer on the DNS pod's: two rings."""
    q = lambda data: ether(ipv4(A4, B4, 17, udp(40000, 53, data)))  # noqa: E731
    a = lambda data: ether(ipv4(B4, A4, 17, udp(53, 40000, data)))  # noqa: E731
    query = bytes.fromhex("62070100000100000000000003617069000001000100")  # A? api
    answer = bytes.fromhex("62078180000100010000000003617069000001000100c00c000100010000003c00040a600032")
    client_ring = [(q(query), 1.0, None), (q(query[:2] + b"\x01" + query[3:]), 1.0001, None)]
    server_ring = [(a(answer), 1.0005, None), (a(answer), 1.0006, None)]
    rings = [server_ring, client_ring] if server_ring_first else [client_ring, server_ring]
    t = make_table(kind)
    for frames in rings:
        t.feed_block(pack_block(frames)[0])
    (d,) = t.collect(2.0).sessions
    assert (d.opened, d.client_port, d.packets_c2s, d.packets_s2c) == (True, 40000, 2, 2)
