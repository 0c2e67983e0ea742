"""TPACKET_V3 rings on real veths in throwaway namespaces: direction, snap length, BPF, fanout, stats."""

from __future__ import annotations

import socket
import struct
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from flowmap_devenv.netns import Lab, netns
from flowmap_dp.capture import (
    BPF_RET_K, PACKET_OUTGOING, Direction, Ring, RingConfig, build_filter, compile_filter, fanout_group, iter_frames,
)

A4, B4, A6, B6 = "10.61.0.1", "10.61.0.2", "fd61::1", "fd61::2"


@pytest.fixture
def pair(privileged: None) -> Iterator[tuple[Lab, str, str, str, str]]:
    """Namespaces a and b joined by a veth; yields (lab, ns_a, ns_b, veth_a, veth_b)."""
    lab = Lab()
    try:
        a, b = lab.ns(), lab.ns()
        va, vb = lab.veth(a, [f"{A4}/24", f"{A6}/64"], b, [f"{B4}/24", f"{B6}/64"])
        yield lab, a, b, va, vb
    finally:
        lab.close()


def _udp(ns_a: str, ns_b: str, family: int, dst: str, port: int, sizes: list[int]) -> None:
    """Send datagrams from a to b's ``port``, b echoes each back with half the size."""
    with netns(ns_b):
        srv = socket.socket(family, socket.SOCK_DGRAM)
        srv.bind((dst, port))
    with netns(ns_a):
        cli = socket.socket(family, socket.SOCK_DGRAM)
    with srv, cli:
        cli.settimeout(2)
        srv.settimeout(2)
        for n in sizes:
            cli.sendto(b"q" * n, (dst, port))
            data, peer = srv.recvfrom(65536)
            srv.sendto(data[: n // 2], peer)
            cli.recv(65536)


def _frames(ring: Ring, expect: int, timeout: float = 5.0) -> list[tuple[int, int, int, int, int]]:
    """(pkttype, tp_len, snaplen, udp sport, udp dport) of the UDP frames in the ring.

    Reads until ``expect`` UDP frames arrived (the kernel's block retire timer can take a few
    hundred ms to hand over a partly filled block), then drains what is ready.
    """
    out: list[tuple[int, int, int, int, int]] = []
    deadline = time.monotonic() + timeout
    while (len(out) < expect and time.monotonic() < deadline) or ring.ready_block() is not None:
        ring.wait(0.02)
        for block in ring.blocks():
            for off, snap, length, pkttype in iter_frames(block):
                mac = struct.unpack_from("=H", block, off + 24)[0]
                eth = struct.unpack_from("!H", block, off + mac + 12)[0]
                l4 = off + mac + 14 + (20 if eth == 0x0800 else 40)
                proto = block[off + mac + 14 + (9 if eth == 0x0800 else 6)]
                if eth in (0x0800, 0x86DD) and proto == 17:
                    sport, dport = struct.unpack_from("!HH", block, l4)
                    out.append((pkttype, length, snap, sport, dport))
    return out


def test_filter_program_shapes() -> None:
    cfg = RingConfig(snaplen=100)
    assert build_filter(cfg)[-1] == (BPF_RET_K, 0, 0, 100)
    assert build_filter(RingConfig(direction=Direction.BOTH, snaplen=64)) == [(BPF_RET_K, 0, 0, 64)]
    user = ((0x28, 0, 0, 12), (BPF_RET_K, 0, 0, 262144), (BPF_RET_K, 0, 0, 0))
    prog = build_filter(RingConfig(snaplen=128, filter=user))
    assert prog[-2:] == [(BPF_RET_K, 0, 0, 128), (BPF_RET_K, 0, 0, 0)]  # accept capped, reject kept
    with pytest.raises(ValueError):
        RingConfig(block_size=1000)
    assert fanout_group(1, 5) != fanout_group(1, 6)


@pytest.mark.parametrize("family,dst", [(socket.AF_INET, B4), (socket.AF_INET6, B6)], ids=["ipv4", "ipv6"])
def test_directions_and_exact_frames(pair: tuple[Lab, str, str, str, str], family: int, dst: str) -> None:
    _lab, a, b, _va, vb = pair
    # Enough blocks that IPv6 neighbour discovery, one frame per retired block, cannot fill the
    # ring before the test reads it (it reads only after the exchange).
    cfg = dict(block_size=1 << 16, block_count=32, retire_timeout_ms=20)
    with netns(b):
        both = Ring(vb, RingConfig(direction=Direction.BOTH, **cfg))  # type: ignore[arg-type]
        received = Ring(vb, RingConfig(**cfg))  # type: ignore[arg-type]
    try:
        sizes = [10, 500, 1200]
        _udp(a, b, family, dst, 5300, sizes)
        f_both, f_rx = _frames(both, 6), _frames(received, 3)

        hdr = 14 + (20 if family == socket.AF_INET else 40) + 8
        # b received the queries and sent the answers: BOTH sees all six frames, RECEIVED the three queries.
        assert sorted(ln for pt, ln, *_ in f_both if pt != PACKET_OUTGOING) == [n + hdr for n in sizes]
        assert sorted(ln for pt, ln, *_ in f_both if pt == PACKET_OUTGOING) == [n // 2 + hdr for n in sizes]
        assert sorted(ln for _pt, ln, *_ in f_rx) == [n + hdr for n in sizes]
        assert all(pt != PACKET_OUTGOING for pt, *_ in f_rx)
        assert received.read_stats().drops == 0
    finally:
        both.close()
        received.close()


def test_snaplen_bounds_the_copy_not_the_length(pair: tuple[Lab, str, str, str, str]) -> None:
    _lab, a, b, _va, vb = pair
    with netns(b):
        ring = Ring(vb, RingConfig(block_size=1 << 16, block_count=32, retire_timeout_ms=20, snaplen=96))
    try:
        _udp(a, b, socket.AF_INET, B4, 5301, [1400])
        (frame,) = _frames(ring, 1)
        assert frame[1] == 1400 + 42 and frame[2] == 96
    finally:
        ring.close()


def test_bpf_filter_keeps_only_matching(pair: tuple[Lab, str, str, str, str]) -> None:
    _lab, a, b, _va, vb = pair
    with netns(b):
        ring = Ring(vb, RingConfig(block_size=1 << 16, block_count=32, retire_timeout_ms=20, snaplen=128,
                                   filter=compile_filter("udp dst port 5302")))
    try:
        _udp(a, b, socket.AF_INET, B4, 5302, [100, 200])
        _udp(a, b, socket.AF_INET, B4, 5303, [100, 200, 300])
        frames = _frames(ring, 2)
        time.sleep(0.3)
        frames += _frames(ring, 0, timeout=0.5)
        assert [(f[4], f[2]) for f in frames] == [(5302, 128), (5302, 128)]
    finally:
        ring.close()


def test_fanout_splits_by_flow_and_loses_nothing(pair: tuple[Lab, str, str, str, str]) -> None:
    _lab, a, b, _va, vb = pair
    group = fanout_group(4242, socket.if_nametoindex("lo"))
    with netns(b):
        rings = [Ring(vb, RingConfig(block_size=1 << 16, block_count=32, retire_timeout_ms=20,
                                     direction=Direction.BOTH), fanout=group) for _ in range(2)]
    try:
        ports = list(range(5400, 5440))
        for port in ports:
            _udp(a, b, socket.AF_INET, B4, port, [50, 60])
        per_ring = [_frames(r, 0, timeout=0) for r in rings]
        deadline = time.monotonic() + 5
        while sum(map(len, per_ring)) < 4 * len(ports) and time.monotonic() < deadline:
            for r, got in zip(rings, per_ring):
                got += _frames(r, 0, timeout=0.05)
        flows = [Counter(min(f[3], f[4]) for f in frames) for frames in per_ring]
        assert sum(sum(c.values()) for c in flows) == 4 * len(ports)  # 2 queries + 2 answers per flow
        assert not set(flows[0]) & set(flows[1])  # both directions of a flow land on one ring
        assert flows[0] and flows[1]  # 40 flows never all hash to one side
    finally:
        for r in rings:
            r.close()


def test_drops_are_counted_when_the_ring_is_full(pair: tuple[Lab, str, str, str, str]) -> None:
    _lab, a, b, _va, vb = pair
    with netns(b):
        ring = Ring(vb, RingConfig(block_size=4096, block_count=2, frame_size=2048, retire_timeout_ms=1000,
                                   direction=Direction.BOTH))
        srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        srv.bind((B4, 5500))
    with netns(a):
        cli = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for _ in range(200):  # never reading the ring: two 4 KiB blocks hold a handful of frames
            cli.sendto(b"z" * 1000, (B4, 5500))
        time.sleep(0.1)
        seen = len(_frames(ring, 200, timeout=1.5))
        st = ring.read_stats()
        assert st.drops > 0 and st.freezes >= 1
        assert st.packets >= 200 and st.packets - st.drops >= seen  # tp_packets includes the drops
    finally:
        cli.close()
        srv.close()
        ring.close()


def test_interface_removed_under_the_ring(pair: tuple[Lab, str, str, str, str]) -> None:
    lab, a, b, va, vb = pair
    with netns(b):
        ring = Ring(vb, RingConfig(block_size=1 << 16, block_count=4, retire_timeout_ms=10))
    try:
        lab.exec(a, "ip", "link", "del", va)  # takes the peer with it
        deadline = time.monotonic() + 3
        while not ring.gone and time.monotonic() < deadline:
            ring.wait(0.05)
            for _block in ring.blocks():
                pass
        assert ring.gone
    finally:
        ring.close()
