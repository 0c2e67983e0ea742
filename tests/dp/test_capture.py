"""TPACKET_V3 rings on real veths in throwaway namespaces: direction, snap length, BPF, fanout, stats."""

from __future__ import annotations

import socket
import struct
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from flowmap_devenv.netns import Lab, netns
from flowmap_dp import synth
from flowmap_dp.capture import (
    BPF_JA, BPF_JEQ_K, BPF_LD_H_ABS, BPF_LD_W_ABS, BPF_RET_K, PACKET_OUTGOING, SKF_AD_PKTTYPE, Direction, Insn, Ring,
    RingConfig, build_filter, compile_filter, fanout_group, iter_frames, open_socket,
)

A4, B4, A6, B6 = "10.61.0.1", "10.61.0.2", "fd61::1", "fd61::2"
PACKET_HOST = 0


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


def _run(prog: list[Insn], frame: bytes, pkttype: int) -> int:
    """What the kernel's classic-BPF interpreter returns for ``frame``, for the instructions
    ``build_filter`` emits; it also checks what the kernel's checker would (jump targets, a final
    return)."""
    assert prog[-1][0] == BPF_RET_K and len(prog) <= 4096
    a = pc = 0
    while True:
        code, jt, jf, k = prog[pc]
        pc += 1
        if code == BPF_RET_K:
            return k
        if code in (BPF_LD_W_ABS, BPF_LD_H_ABS):
            size = 4 if code == BPF_LD_W_ABS else 2
            if k == SKF_AD_PKTTYPE:
                a = pkttype
            elif k + size > len(frame):
                return 0  # the kernel drops the frame on a load past its end
            else:
                a = int.from_bytes(frame[k : k + size], "big")
        elif code == BPF_JA:
            pc += k
        elif code == BPF_JEQ_K:
            assert jt <= 255 and jf <= 255
            pc += jt if a == k else jf
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")
        assert pc < len(prog), "a jump past the end"


def _frame(src: str, dst: str, vlans: tuple[int, ...] = ()) -> bytes:
    if ":" in src:
        ip = synth.ipv6(socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst), 17,
                        synth.udp(5000, 53))
    else:
        ip = synth.ipv4(socket.inet_aton(src), socket.inet_aton(dst), 17, synth.udp(5000, 53))
    return synth.ether(ip, vlans)


def test_received_mode_keeps_outgoing_frames_only_from_the_nodes_own_addresses() -> None:
    own = RingConfig(snaplen=200, local_addresses=("172.18.0.2", "fd00:172:18::2"))
    prog = build_filter(own)
    for src, dst in (("10.244.1.10", "172.18.0.2"), ("2001:db8::1", "fd00:172:18::2")):
        assert _run(prog, _frame(src, dst), PACKET_HOST) == 200  # received: always
    for src in ("172.18.0.2", "fd00:172:18::2"):
        assert _run(prog, _frame(src, "10.244.1.10" if "." in src else "fd00:10:244:1::10"), PACKET_OUTGOING) == 200
    # Forwarded: a pod's or a remote source, including addresses one word away from the node's.
    for src in ("10.244.1.10", "172.18.0.3", "fd00:172:18::3", "fd01:172:18::2", "fd00:172:19::2", "2001:db8::1"):
        dst = "10.244.1.11" if "." in src else "fd00:10:244:1::11"
        assert _run(prog, _frame(src, dst), PACKET_OUTGOING) == 0, src
    assert _run(prog, _frame("172.18.0.2", "10.244.1.10", vlans=(7,)), PACKET_OUTGOING) == 0  # a tag in the frame
    arp = struct.pack("!6s6sH", b"\xff" * 6, b"\x02" * 6, 0x0806) + bytes(28)
    assert _run(prog, arp, PACKET_OUTGOING) == 0
    # Without addresses, every outgoing frame is dropped, as before.
    assert _run(build_filter(RingConfig(snaplen=200)), _frame("172.18.0.2", "10.244.1.10"), PACKET_OUTGOING) == 0
    # The user's filter still decides after the direction check (here: IPv6 only).
    v6_only = ((BPF_LD_H_ABS, 0, 0, 12), (BPF_JEQ_K, 0, 1, 0x86DD), (BPF_RET_K, 0, 0, 262144), (BPF_RET_K, 0, 0, 0))
    prog = build_filter(RingConfig(snaplen=200, local_addresses=own.local_addresses, filter=v6_only))
    assert _run(prog, _frame("fd00:172:18::2", "fd00:10:244:1::10"), PACKET_OUTGOING) == 200
    assert _run(prog, _frame("172.18.0.2", "10.244.1.10"), PACKET_OUTGOING) == 0
    assert _run(prog, _frame("10.244.1.10", "172.18.0.2"), PACKET_HOST) == 0
    with pytest.raises(ValueError, match="not-an-address"):
        RingConfig(local_addresses=("not-an-address",))


def test_many_local_addresses_stay_within_the_jump_range(pair: tuple[Lab, str, str, str, str]) -> None:
    v4 = [f"10.0.{i // 250}.{i % 250 + 1}" for i in range(300)]
    v6 = [f"fd00::{i + 1:x}" for i in range(60)]
    config = RingConfig(snaplen=200, local_addresses=tuple(v4 + v6))
    with netns(pair[1]):
        open_socket("lo", config).close()  # the kernel's checker takes the program
    prog = build_filter(config)
    for src in (v4[0], v4[-1], v6[0], v6[-1]):
        assert _run(prog, _frame(src, "fd00:1::1" if ":" in src else "10.244.0.1"), PACKET_OUTGOING) == 200
    assert _run(prog, _frame("10.0.1.251", "10.244.0.1"), PACKET_OUTGOING) == 0
    assert _run(prog, _frame("fd00::3d", "fd00:1::1"), PACKET_OUTGOING) == 0


@pytest.mark.parametrize("family,dst", [(socket.AF_INET, B4), (socket.AF_INET6, B6)], ids=["ipv4", "ipv6"])
def test_directions_and_exact_frames(pair: tuple[Lab, str, str, str, str], family: int, dst: str) -> None:
    _lab, a, b, _va, vb = pair
    # Enough blocks that IPv6 neighbour discovery, one frame per retired block, cannot fill the
    # ring before the test reads it (it reads only after the exchange).
    cfg = dict(block_size=1 << 16, block_count=32, retire_timeout_ms=20)
    with netns(b):
        both = Ring(vb, RingConfig(direction=Direction.BOTH, **cfg))  # type: ignore[arg-type]
        received = Ring(vb, RingConfig(**cfg))  # type: ignore[arg-type]
        own = Ring(vb, RingConfig(local_addresses=(B4, B6), **cfg))  # type: ignore[arg-type]
    try:
        sizes = [10, 500, 1200]
        _udp(a, b, family, dst, 5300, sizes)
        f_both, f_rx, f_own = _frames(both, 6), _frames(received, 3), _frames(own, 6)

        hdr = 14 + (20 if family == socket.AF_INET else 40) + 8
        # b received the queries and sent the answers: BOTH sees all six frames, RECEIVED the three queries.
        assert sorted(ln for pt, ln, *_ in f_both if pt != PACKET_OUTGOING) == [n + hdr for n in sizes]
        assert sorted(ln for pt, ln, *_ in f_both if pt == PACKET_OUTGOING) == [n // 2 + hdr for n in sizes]
        assert sorted(ln for _pt, ln, *_ in f_rx) == [n + hdr for n in sizes]
        assert all(pt != PACKET_OUTGOING for pt, *_ in f_rx)
        # b's own answers leave from its own address: with it named, they are kept too.
        assert sorted(f_own) == sorted(f_both)
        assert received.read_stats().drops == 0
    finally:
        both.close()
        received.close()
        own.close()


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
