"""A packet capture's filters compiled to classic BPF: the program keeps exactly what a plain
reading of the filter keeps (``selects`` below, written from the filter's definition), through
the test interpreter on made-up frames and through the kernel on a real veth with real traffic."""

from __future__ import annotations

import ipaddress
import socket
import struct
import time
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowmap_devenv.netns import netns
from tests.dp import synth
from flowmap_dp.capture import FRAME, PACKET_OUTGOING, Direction, Ring, RingConfig, iter_frames
from flowmap_dp.filtering import MAX_FILTERS, Filter, PodDirection, compile_filters
from tests.dp.bpf import run
from tests.dp.test_live import A4, A6, B4, B6, NODE_A4, Node, node  # noqa: F401 (the fixture)

PACKET_HOST = 0
net = ipaddress.ip_network


def selects(filters: Sequence[Filter], frame: bytes, pkttype: int) -> bool:
    """The filters' meaning, read straight from the frame (Ethernet, on a pod's host-side veth)."""
    if not filters:
        return True
    ethertype = int.from_bytes(frame[12:14], "big")
    ip = frame[14:]
    if ethertype == 0x0800:
        src, dst = ipaddress.ip_address(ip[12:16]), ipaddress.ip_address(ip[16:20])
        proto, later = ip[9], int.from_bytes(ip[6:8], "big") & 0x1FFF != 0
        l4 = ip[4 * (ip[0] & 0xF):]
    elif ethertype == 0x86DD:
        src, dst = ipaddress.ip_address(ip[8:24]), ipaddress.ip_address(ip[24:40])
        proto, later, l4 = ip[6], False, ip[40:]
    else:
        return False
    to_pod = pkttype == PACKET_OUTGOING
    peer = src if to_pod else dst
    ports = (int.from_bytes(l4[0:2], "big"), int.from_bytes(l4[2:4], "big")) if len(l4) >= 4 and not later else ()
    for f in filters:
        want = f.protocol
        if want == 1 and ethertype == 0x86DD:
            want = 58
        if f.peers and not any(peer in p for p in f.peers):
            continue
        if want and proto != want:
            continue
        if f.port and (f.port not in ports or proto not in (6, 17, 132)):
            continue
        if f.direction is PodDirection.INGRESS and not to_pod or f.direction is PodDirection.EGRESS and to_pod:
            continue
        return True
    return False


ADDRS4 = ["10.0.0.1", "10.0.0.2", "10.0.1.7", "192.168.5.5"]
ADDRS6 = ["fd00::1", "fd00::2", "fd00:0:0:1::7", "2001:db8::5"]
NETS = [net("10.0.0.0/24"), net("10.0.0.2/32"), net("10.0.0.0/8"), net("0.0.0.0/0"), net("192.168.5.0/25"),
        net("fd00::/64"), net("fd00::2/128"), net("fd00::/15"), net("::/0"), net("2001:db8::/33")]


def _frame(v6: bool, src: int, dst: int, proto: int, sport: int, dport: int, options: int, frag: int) -> bytes:
    l4 = struct.pack("!HH", sport, dport) + bytes(16)
    if v6:
        return synth.ether(synth.ipv6(ipaddress.ip_address(ADDRS6[src]).packed, ipaddress.ip_address(ADDRS6[dst]).packed,
                                      proto, l4))
    ip = bytearray(synth.ipv4(ipaddress.ip_address(ADDRS4[src]).packed, ipaddress.ip_address(ADDRS4[dst]).packed,
                              proto, l4, frag=frag))
    if options:  # IHL > 5: the ports move by the options' length
        ip = ip[:20] + bytes([1] * 4 * options) + ip[20:]
        ip[0] = 0x45 + options
        ip[2:4] = len(ip).to_bytes(2, "big")
    return synth.ether(bytes(ip))


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.lists(st.sampled_from(NETS), max_size=3), st.sampled_from([0, 1, 6, 17, 58, 132]),
                          st.sampled_from([0, 53, 8080]), st.sampled_from(list(PodDirection))), max_size=4),
       st.booleans(), st.integers(0, 3), st.integers(0, 3), st.sampled_from([1, 6, 17, 58, 132]),
       st.sampled_from([53, 8080, 9]), st.sampled_from([53, 8080, 9]), st.integers(0, 3),
       st.sampled_from([0x4000, 0x2000, 0x0010]), st.sampled_from([PACKET_HOST, PACKET_OUTGOING, 1]))
def test_the_program_keeps_what_the_filters_select(parts: list[tuple[list[ipaddress.IPv4Network | ipaddress.IPv6Network],
                                                                     int, int, PodDirection]],
                                                   v6: bool, src: int, dst: int, proto: int, sport: int, dport: int,
                                                   options: int, frag: int, pkttype: int) -> None:
    filters = [Filter(tuple(p), proto_, port if proto_ in (0, 6, 17, 132) else 0, d) for p, proto_, port, d in parts]
    frame = _frame(v6, src, dst, proto, sport, dport, options, frag)
    prog = compile_filters(filters, 96)
    assert run(prog, frame, pkttype) == (96 if selects(filters, frame, pkttype) else 0)


def test_the_shapes_that_matter() -> None:
    udp53 = [Filter(protocol=17, port=53)]
    prog = compile_filters(udp53, 128)
    first = _frame(False, 0, 1, 17, 5000, 53, 0, 0x2000)  # more fragments, offset 0: has ports
    later = _frame(False, 0, 1, 17, 5000, 53, 0, 0x2010)  # offset 16 * 8: "ports" are payload
    assert run(prog, first, PACKET_HOST) == 128 and run(prog, later, PACKET_HOST) == 0
    assert run(prog, _frame(False, 0, 1, 17, 5000, 53, 3, 0x4000), PACKET_HOST) == 128  # options
    assert run(compile_filters([Filter(protocol=1)], 64), _frame(True, 0, 1, 58, 0, 0, 0, 0), PACKET_HOST) == 64
    arp = struct.pack("!6s6sH", b"\xff" * 6, b"\x02" * 6, 0x0806) + bytes(28)
    assert run(prog, arp, PACKET_HOST) == 0
    assert compile_filters([], 200) == ((6, 0, 0, 200),)
    with pytest.raises(ValueError, match="port needs"):
        Filter(protocol=1, port=53)
    with pytest.raises(ValueError, match="at most"):
        compile_filters([Filter()] * (MAX_FILTERS + 1), 64)
    # A peer group of 200 IPv6 addresses in both directions is within the kernel's limit (9
    # instructions per address and direction); 600 are not, and say so.
    many = tuple(net(f"fd00::{i:x}/128") for i in range(200))
    assert len(compile_filters([Filter(peers=many)], 64)) < 4096
    with pytest.raises(ValueError, match="4096"):
        compile_filters([Filter(peers=many * 3)], 64)
    # Every conditional jump stays short however many peers come before the next filter.
    prog = compile_filters([Filter(peers=many, port=53), Filter(protocol=6)], 64)
    assert run(prog, _frame(True, 0, 1, 6, 1, 2, 0, 0), PACKET_HOST) == 64


# Live: the kernel runs the program on the host side of pod-a's veth; a second socket on the
# same interface keeps everything, and what the first kept must be exactly the frames of the
# second that ``selects`` picks, cut to the snap length.

SNAP = 80


def _read(ring: Ring) -> list[tuple[int, int, bytes]]:
    """(pkttype, wire length, captured bytes) of every frame ready in the ring."""
    out = []
    for block in ring.blocks():
        for off, snap, length, pkttype in iter_frames(block):
            mac = FRAME.unpack_from(block, off)[6]
            out.append((pkttype, length, bytes(block[off + mac : off + mac + snap])))
    return out


def _traffic(node: Node) -> None:
    """TCP and UDP over both families between pod-a and pod-b, a fragmented datagram, pings,
    and pod-a talking to the node itself."""
    for family, server, client in ((socket.AF_INET, B4, A4), (socket.AF_INET6, B6, A6)):
        with netns(node.pod_b):
            udp = socket.socket(family, socket.SOCK_DGRAM)
            udp.bind((server, 5353))
            tcp = socket.socket(family, socket.SOCK_STREAM)
            tcp.bind((server, 8080))
            tcp.listen()
        with netns(node.pod_a):
            cli = socket.socket(family, socket.SOCK_DGRAM)
            conn = socket.socket(family, socket.SOCK_STREAM)
        with udp, tcp, cli, conn:
            udp.settimeout(5)
            for size in (10, 1000, 4000):
                cli.sendto(b"u" * size, (server, 5353))
                data, peer = udp.recvfrom(65536)
                udp.sendto(data[:100], peer)
            conn.settimeout(5)
            conn.connect((server, 8080))
            acc, _ = tcp.accept()
            with acc:
                conn.sendall(b"t" * 3000)
                got = 0
                while got < 3000:
                    got += len(acc.recv(65536))
                acc.sendall(b"r" * 200)
                conn.recv(65536)
        _ping(node.pod_a, family, server)
    with netns(node.node):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((NODE_A4, 5353))
    with netns(node.pod_a):
        cli = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with udp, cli:
        udp.settimeout(5)
        cli.sendto(b"n" * 50, (NODE_A4, 5353))
        data, peer = udp.recvfrom(100)
        udp.sendto(data, peer)


def _ping(ns: str, family: int, to: str) -> None:
    """One echo request from a raw socket in ``ns``; waits for the kernel's reply."""
    v6 = family == socket.AF_INET6
    with netns(ns):
        sock = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP)
    with sock:
        sock.settimeout(5)
        echo = bytearray(struct.pack("!BBHHH", 128 if v6 else 8, 0, 0, 0x4242, 1) + b"p" * 56)
        if not v6:  # ICMPv6's checksum is the kernel's (it covers the pseudo-header)
            total = sum(struct.unpack(f"!{len(echo) // 2}H", echo))
            total = (total & 0xFFFF) + (total >> 16)
            echo[2:4] = struct.pack("!H", ~((total & 0xFFFF) + (total >> 16)) & 0xFFFF)
        sock.sendto(bytes(echo), (to, 0))
        while True:
            reply = sock.recv(2048)
            if (reply[0] == 129 if v6 else reply[20] == 0):  # raw IPv4 sockets include the IP header
                return


CASES = {
    "udp53-egress-to-b4": [Filter(peers=(net(f"{B4}/32"),), protocol=17, port=5353, direction=PodDirection.EGRESS)],
    "tcp8080-ingress-or-b6-net": [Filter(protocol=6, port=8080, direction=PodDirection.INGRESS),
                                  Filter(peers=(net("fd62:2::/64"),))],
    "icmp-both-families": [Filter(peers=(net("10.62.0.0/16"), net("fd62::/16")), protocol=1)],
    "port-any-protocol": [Filter(port=5353)],
    "the-node-only": [Filter(peers=(net(f"{NODE_A4}/32"),), direction=PodDirection.BOTH)],
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_kernel_keeps_exactly_the_selected_packets(node: Node, case: str) -> None:  # noqa: F811
    filters = CASES[case]
    # Blocks retired every 200 ms: the traffic fits in a few, read once it is over.
    shape = dict(direction=Direction.BOTH, retire_timeout_ms=200, block_size=1 << 20, block_count=16)
    with netns(node.node):
        everything = Ring(node.host_a, RingConfig(snaplen=65535, **shape))  # type: ignore[arg-type]
        kept = Ring(node.host_a, RingConfig(snaplen=SNAP, filter=compile_filters(filters, SNAP), **shape))  # type: ignore[arg-type]
    try:
        _traffic(node)
        time.sleep(0.5)  # the retire timer hands over the last partly filled blocks
        seen, got = [], []
        for _ in range(10):
            everything.wait(0.05)
            kept.wait(0.05)
            seen += _read(everything)
            got += _read(kept)
        assert everything.read_stats().drops == kept.read_stats().drops == 0
    finally:
        everything.close()
        kept.close()
    want = [(t, length, data[:SNAP]) for t, length, data in seen if selects(filters, data, t)]
    assert got == want
    assert len(want) >= 2 and len(want) < len(seen)  # the case selects something, and not everything
    assert any(length > SNAP for _, length, _ in want) or case == "icmp-both-families"
