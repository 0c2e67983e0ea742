"""TPACKET_V3 rings on real veths in throwaway namespaces: direction, snap length, BPF, fanout, stats."""

from __future__ import annotations

import socket
import struct
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from flowmap_devenv.netns import Lab, netns
from tests.dp import synth
from flowmap_dp.capture import (
    BPF_JEQ_K, BPF_LD_H_ABS, BPF_LD_W_ABS, BPF_RET_K, PACKET_OUTGOING, SKF_AD_PKTTYPE, Direction, Encapsulation, Ring,
    RingConfig, build_filter, compile_filter, fanout_group, iter_frames, open_socket,
)
from tests.dp.bpf import run as _run

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


def _ipv4_with_options(src: str, dst: str, l4: bytes, proto: int = 17) -> bytes:
    """An IPv4 packet with 8 bytes of options (NOPs, end): its L4 header starts at 28, not 20."""
    base = synth.ipv4(socket.inet_aton(src), socket.inet_aton(dst), proto, l4)
    packet = bytearray([0x47]) + base[1:20] + b"\x01\x01\x01\x01\x01\x01\x01\x00" + base[20:]
    packet[2:4] = struct.pack("!H", len(packet))
    return bytes(packet)


def test_the_overlay_is_dropped_before_the_direction_check() -> None:
    """On the underlay, the overlay's encapsulated packets never reach the ring, whichever way they
    pass and whatever their source; everything else is judged as before."""
    own = ("172.18.0.2", "fd00:172:18::2")
    vxlan, ipip = Encapsulation(17, 8472), Encapsulation(4)
    prog = build_filter(RingConfig(snaplen=200, local_addresses=own, overlay=(vxlan, ipip)))
    inner = synth.ipv4(socket.inet_aton("10.244.1.10"), socket.inet_aton("10.244.2.10"), 17, synth.udp(5000, 53))
    n4, m4 = socket.inet_aton("172.18.0.2"), socket.inet_aton("172.18.0.3")
    n6, m6 = socket.inet_pton(socket.AF_INET6, own[1]), socket.inet_pton(socket.AF_INET6, "fd00:172:18::3")
    vx = b"\x08\0\0\0\0\0\x01\0" + synth.ether(inner)  # VXLAN header, VNI 1, the inner frame

    def four(src: bytes, dst: bytes, proto: int, l4: bytes, frag: int = 0x4000) -> bytes:
        return synth.ether(synth.ipv4(src, dst, proto, l4, frag=frag))

    def six(src: bytes, dst: bytes, nh: int, l4: bytes) -> bytes:
        return synth.ether(synth.ipv6(src, dst, nh, l4))

    for pkttype in (PACKET_HOST, PACKET_OUTGOING):
        for src, dst in ((m4, n4), (n4, m4)):
            assert _run(prog, four(src, dst, 17, synth.udp(41234, 8472, vx)), pkttype) == 0  # to the tunnel's port
            assert _run(prog, four(src, dst, 17, synth.udp(8472, 41234, vx)), pkttype) == 0  # from it
            assert _run(prog, four(src, dst, 4, inner), pkttype) == 0  # IPv4 in IPv4
        for src, dst in ((m6, n6), (n6, m6)):
            assert _run(prog, six(src, dst, 17, synth.udp(41234, 8472, vx)), pkttype) == 0
            assert _run(prog, six(src, dst, 4, inner), pkttype) == 0  # IPv4 in IPv6 (ip6tnl)
        # IPv4 options move the UDP header: its ports are read where they are.
        assert _run(prog, synth.ether(_ipv4_with_options("172.18.0.3", "172.18.0.2", synth.udp(41234, 8472))),
                    pkttype) == 0
    # Not the overlay: judged by the direction check as before.
    assert _run(prog, four(m4, n4, 17, synth.udp(41234, 8473)), PACKET_HOST) == 200
    assert _run(prog, four(n4, m4, 17, synth.udp(41234, 53)), PACKET_OUTGOING) == 200
    assert _run(prog, four(m4, n4, 17, synth.udp(41234, 53)), PACKET_OUTGOING) == 0  # forwarded
    assert _run(prog, four(m4, n4, 47, b"\0" * 8), PACKET_HOST) == 200  # GRE: not this node's overlay
    assert _run(prog, six(m6, n6, 6, synth.tcp(8472, 80, 2)), PACKET_HOST) == 200  # TCP on the port: not UDP
    # With options, the bytes where ports would be without them are not ports: kept.
    opts = bytearray(_ipv4_with_options("172.18.0.3", "172.18.0.2", synth.udp(41234, 53)))
    opts[20:24] = struct.pack("!HH", 8472, 8472)  # inside the options
    assert _run(prog, synth.ether(bytes(opts)), PACKET_HOST) == 200
    # A later fragment has no UDP header: its first bytes are payload, not ports (the decoder
    # attributes it only through its first fragment). Behind an IPv6 extension header, UDP is
    # not looked for.
    assert _run(prog, four(m4, n4, 17, struct.pack("!HH", 8472, 8472) + b"\0" * 20, frag=0x0003), PACKET_HOST) == 200
    hbh = bytes([17, 0, 1, 4, 0, 0, 0, 0])
    assert _run(prog, six(m6, n6, 0, hbh + synth.udp(41234, 8472, vx)), PACKET_HOST) == 200
    # A tunnel device's raw IP frames (no link header) are read the same way.
    raw = synth.ipv4(m4, n4, 17, synth.udp(41234, 8472, vx))
    assert _run(prog, raw, PACKET_HOST, link_header=0) == 0
    assert _run(prog, synth.ipv4(n4, m4, 17, synth.udp(41234, 53)), PACKET_OUTGOING, link_header=0) == 200
    assert _run(prog, synth.ipv4(m4, n4, 17, synth.udp(41234, 53)), PACKET_OUTGOING, link_header=0) == 0
    # Without an overlay, the program is what it was.
    assert build_filter(RingConfig(snaplen=200, local_addresses=own))[0] == (BPF_LD_W_ABS, 0, 0, SKF_AD_PKTTYPE)
    for bad in (Encapsulation(17, 0), Encapsulation(4, 80), Encapsulation(0), Encapsulation(17, 70000)):
        with pytest.raises(ValueError):
            RingConfig(overlay=(bad,))


def _vxlan_pair(lab: Lab, a: str, b: str, va: str, vb: str, port: int = 8472) -> tuple[str, str]:
    """A VXLAN tunnel over the a-b veth (the underlay), 10.63.0.1 (a) and 10.63.0.2 (b) inside."""
    names = []
    for ns, local, remote, inner, dev in ((a, A4, B4, "10.63.0.1/24", va), (b, B4, A4, "10.63.0.2/24", vb)):
        name = f"vx{dev[-6:]}"
        lab.exec(ns, "ip", "link", "add", name, "type", "vxlan", "id", "1", "local", local, "remote", remote,
                 "dstport", str(port), "dev", dev)
        lab.exec(ns, "ip", "addr", "add", inner, "dev", name)
        # IPv4 only inside: the tunnel's own IPv6 (DAD, MLD, router solicitations, at moments of
        # the kernel's choosing) would add encapsulated frames to those the tests count.
        lab.exec(ns, "sysctl", "-qw", f"net.ipv6.conf.{name}.disable_ipv6=1")
        lab.exec(ns, "ip", "link", "set", name, "up")
        names.append(name)
    return names[0], names[1]


def test_vxlan_between_two_namespaces_stays_out_of_the_underlays_ring(pair: tuple[Lab, str, str, str, str]) -> None:
    """Real VXLAN over a veth: the underlay's ring with the overlay named takes only what is not
    encapsulated; the tunnel's ring takes the packets inside, as they entered; and naming the
    overlay on an open ring (a new filter on the socket) takes effect at once."""
    lab, a, b, va, vb = pair
    _, tunnel = _vxlan_pair(lab, a, b, va, vb)
    cfg = dict(block_size=1 << 16, block_count=32, retire_timeout_ms=20, local_addresses=(B4, "10.63.0.2"))
    plain = RingConfig(**cfg)  # type: ignore[arg-type]
    with netns(b):
        under = Ring(vb, RingConfig(overlay=(Encapsulation(17, 8472),), **cfg))  # type: ignore[arg-type]
        late = Ring(vb, plain)
        inside = Ring(tunnel, plain)
    try:
        _udp(a, b, socket.AF_INET, "10.63.0.2", 5600, [100, 700])  # through the tunnel
        _udp(a, b, socket.AF_INET, B4, 5601, [100])  # on the underlay itself
        f_inside, f_late = _frames(inside, 4), _frames(late, 6)
        f_under = _frames(under, 2, timeout=1.0)
        # Inside: the queries as they entered b, and b's answers from its tunnel address.
        assert sorted((f[4], f[1]) for f in f_inside if f[4] == 5600) == [(5600, 142), (5600, 742)]
        assert sorted(f[1] for f in f_inside if f[3] == 5600) == [92, 392]
        # The encapsulated copies, 50 bytes longer, pass the underlay (with the tunnel's own ARP,
        # 92 bytes): only the ring without the overlay takes them.
        assert sorted(f[1] for f in f_late if 8472 in f[3:] and f[1] > 92) == [142, 192, 442, 792]
        assert len(f_under) == 2 and all(5601 in f[3:] for f in f_under)  # the plain exchange, nothing else
        late.refilter(RingConfig(overlay=(Encapsulation(17, 8472),), **cfg))  # type: ignore[arg-type]
        _udp(a, b, socket.AF_INET, "10.63.0.2", 5602, [300])
        _udp(a, b, socket.AF_INET, B4, 5603, [300])
        assert [5603 in f[3:] for f in _frames(late, 2, timeout=1.0)] == [True, True]
        assert [5602 in f[3:] for f in _frames(inside, 2)] == [True, True]
        with pytest.raises(ValueError):
            late.refilter(RingConfig(block_count=8))
    finally:
        under.close()
        late.close()
        inside.close()


def test_a_tunnel_without_a_link_header_is_read_as_raw_ip(privileged: None) -> None:
    """A TUN device (raw IP, like IPIP and WireGuard tunnels): the direction check finds the
    source where the packet starts, and both tables (compiled, per-packet) decode the frames as IP."""
    import fcntl
    import os

    from tests.dp.twins import KINDS, make_table

    lab = Lab()
    try:
        ns = lab.ns()
        lab.exec(ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        with netns(ns):
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
            fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", b"fmtun0", 0x0001 | 0x1000))  # TUNSETIFF: IFF_TUN|IFF_NO_PI
        lab.exec(ns, "ip", "addr", "add", "10.64.0.1/24", "dev", "fmtun0")
        lab.exec(ns, "ip", "link", "set", "fmtun0", "up")
        with netns(ns):
            ring = Ring("fmtun0", RingConfig(block_size=1 << 16, block_count=32, retire_timeout_ms=20,
                                             local_addresses=("10.64.0.1",)))
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            here, there, far = (socket.inet_aton(a) for a in ("10.64.0.1", "10.64.0.2", "10.64.0.9"))
            os.write(fd, synth.ipv4(there, here, 17, synth.udp(7000, 7001, b"a" * 100)))  # received
            os.write(fd, synth.ipv4(there, far, 17, synth.udp(7000, 7002, b"b" * 50)))  # received, then forwarded back out
            sock.sendto(b"c" * 30, ("10.64.0.2", 7003))  # the node's own, out of the tunnel: kept
            blocks: list[bytes] = []
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and sum(b[12] for b in blocks) < 2:
                ring.wait(0.05)
                blocks += [bytes(b) for b in ring.blocks()]
            time.sleep(0.2)
            ring.wait(0.1)
            blocks += [bytes(b) for b in ring.blocks()]
            port = sock.getsockname()[1]
            for kind in KINDS:
                table = make_table(kind)
                for block in blocks:
                    table.feed_block(block)
                got = sorted((min((d.client, d.client_port), (d.server, d.server_port)),
                              max((d.client, d.client_port), (d.server, d.server_port)), d.bytes_c2s + d.bytes_s2c)
                             for d in table.collect(time.time()).sessions)
                # Each packet once: the forwarded one where it entered, not again as it left.
                assert got == sorted([((here, port), (there, 7003), 58), ((there, 7000), (far, 7002), 78),
                                      ((here, 7001), (there, 7000), 128)]), got
        finally:
            ring.close()
            sock.close()
            os.close(fd)
    finally:
        lab.close()
