"""Decoding frames: every layer on bytes built by scapy (tests only) or by hand."""

from __future__ import annotations

import struct

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6EchoReply, ICMPv6EchoRequest, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.ipsec import AH
from scapy.layers.l2 import ARP, CookedLinux, Dot1AD, Dot1Q, Ether
from scapy.packet import Packet

from flowmap_dp.decode import (
    IGNORED, LINK_LINUX_SLL, LINK_LINUX_SLL2, LINK_NULL, LINK_RAW, MALFORMED, TCP_ACK, TCP_SYN, Decoded, DecodeStats,
    decode, flow_key, format_endpoint, split_key,
)

V4A, V4B = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])


def dec(frame: Packet | bytes, **kw: int) -> Decoded | str:
    raw = bytes(frame)
    return decode(raw, 0, len(raw), **kw)


def ok(frame: Packet | bytes, **kw: int) -> Decoded:
    out = dec(frame, **kw)
    assert isinstance(out, Decoded), out
    return out


def test_ipv4_tcp_syn() -> None:
    d = ok(Ether() / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=40000, dport=80, flags="S"))
    assert (d.proto, d.src, d.dst, d.sport, d.dport) == (6, V4A, V4B, 40000, 80)
    assert d.flags == TCP_SYN and d.ip_len == 40 and d.payload_len == 0 and d.vlan == 0


def test_tcp_payload_and_options() -> None:
    frame = Ether() / IP(options=b"\x01\x01\x01\x00") / TCP(flags="PA", options=[("MSS", 1460), ("NOP", None)]) / b"hello"
    raw = bytes(frame)
    d = ok(raw)
    assert raw[d.payload_start : d.payload_end] == b"hello"
    assert d.ip_len == 24 + 28 + 5 and d.flags & TCP_ACK


def test_ethernet_padding_is_not_payload() -> None:
    raw = bytes(Ether() / IP() / UDP(sport=1, dport=2) / b"ab") + b"\x00" * 20
    d = ok(raw)
    assert d.payload_len == 2 and d.ip_len == 30


def test_snaplen_cut_keeps_ip_length() -> None:
    raw = bytes(Ether() / IP() / TCP() / (b"x" * 1000))
    d = ok(raw[:80])
    assert d.ip_len == 1040 and d.payload_len == 80 - 54


def test_udp_ipv6() -> None:
    d = ok(Ether() / IPv6(src="fd00::1", dst="fd00::2") / UDP(sport=5353, dport=53) / b"q")
    assert d.proto == 17 and len(d.src) == 16 and d.ip_len == 40 + 9 and d.payload_len == 1


@pytest.mark.parametrize("ext", [IPv6ExtHdrHopByHop(), IPv6ExtHdrRouting(), IPv6ExtHdrDestOpt(),
                                 IPv6ExtHdrFragment(offset=0, m=1), AH(nh=6, payloadlen=1, icv=b"")])
def test_ipv6_extension_headers(ext: Packet) -> None:
    d = ok(Ether() / IPv6() / ext / TCP(sport=1, dport=2) / b"data")
    assert (d.proto, d.sport, d.dport, d.payload_len) == (6, 1, 2, 4)


def test_ipv6_chain_of_extensions() -> None:
    d = ok(Ether() / IPv6() / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / IPv6ExtHdrRouting() / UDP(dport=9))
    assert d.proto == 17 and d.dport == 9


def test_ipv6_later_fragment_is_ignored() -> None:
    assert dec(Ether() / IPv6() / IPv6ExtHdrFragment(offset=100) / b"rest of it") == "fragment"


def test_ipv4_fragments() -> None:
    first = ok(Ether() / IP(flags="MF", frag=0) / UDP(sport=7, dport=8) / b"part")
    assert (first.sport, first.dport) == (7, 8)
    assert dec(Ether() / IP(frag=185, proto=17) / b"tail") == "fragment"


def test_icmp_echo_pairs_by_identifier() -> None:
    req = ok(Ether() / IP(src="10.0.0.1", dst="10.0.0.2") / ICMP(type=8, id=77))
    rep = ok(Ether() / IP(src="10.0.0.2", dst="10.0.0.1") / ICMP(type=0, id=77))
    assert req.sport == rep.sport == 77 and req.flags == 8 and rep.flags == 0
    assert flow_key(req.proto, 0, req.src, req.sport, req.dst, req.dport)[0] == \
        flow_key(rep.proto, 0, rep.src, rep.sport, rep.dst, rep.dport)[0]


def test_icmpv6_echo() -> None:
    req = ok(Ether() / IPv6() / ICMPv6EchoRequest(id=5))
    rep = ok(Ether() / IPv6() / ICMPv6EchoReply(id=5))
    assert req.proto == rep.proto == 58 and req.sport == rep.sport == 5


def test_vlan_and_qinq_innermost_wins() -> None:
    assert ok(Ether() / Dot1Q(vlan=10) / IP() / UDP()).vlan == 10
    assert ok(Ether() / Dot1AD(vlan=20) / Dot1Q(vlan=30) / IP() / UDP()).vlan == 30
    # The kernel stripped the outer tag into tp_vlan_tci: the inner one is still in the frame.
    assert ok(Ether() / Dot1Q(vlan=30) / IP() / UDP(), vlan=20).vlan == 30
    assert ok(Ether() / IP() / UDP(), vlan=20).vlan == 20


def test_other_link_types() -> None:
    ip = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2))
    assert ok(ip, link=LINK_RAW).sport == 1
    assert ok(bytes(IPv6() / UDP(sport=3)), link=LINK_RAW).sport == 3
    assert ok(bytes(CookedLinux(proto=0x0800)) + ip, link=LINK_LINUX_SLL).dst == V4B
    sll2 = struct.pack("!HHIHBB8s", 0x0800, 0, 2, 1, 0, 6, b"\0" * 8)
    assert ok(sll2 + ip, link=LINK_LINUX_SLL2).src == V4A
    assert ok(struct.pack("<I", 2) + ip, link=LINK_NULL).src == V4A
    assert ok(struct.pack("<I", 30) + bytes(IPv6() / UDP()), link=LINK_NULL).proto == 17


def test_gso_zero_length_uses_wire_length() -> None:
    raw = bytearray(bytes(Ether() / IP() / TCP() / (b"x" * 100)))
    raw[16:18] = b"\0\0"
    out = decode(bytes(raw), 0, len(raw), wire_len=70_014)
    assert isinstance(out, Decoded) and out.ip_len == 70_000


@pytest.mark.parametrize("frame,reason", [
    (b"\x00" * 13, "truncated_link"),
    (bytes(Ether(type=0x8100)) + b"\x00\x01", "truncated_vlan"),
    (bytes(Ether() / IP())[:30], "truncated_ip"),
    (bytes(Ether() / IPv6())[:50], "truncated_ip"),
    (bytes(Ether(type=0x0800) / IPv6()), "bad_ip_version"),
    (bytes(Ether() / IP(ihl=4)), "bad_ihl"),
    (bytes(Ether() / IP(len=10) / TCP()), "bad_ip_length"),
    (bytes(Ether() / IP() / TCP())[:50], "truncated_l4"),
    (bytes(Ether() / IP(len=30) / TCP()), "truncated_l4"),
    (bytes(Ether() / IP() / UDP())[:40], "truncated_l4"),
    (bytes(Ether() / IP() / TCP(dataofs=2)), "bad_tcp_offset"),
    (bytes(Ether() / IPv6() / IPv6ExtHdrHopByHop() / UDP())[:55], "truncated_ext"),
    (bytes(Ether() / IPv6(plen=4) / IPv6ExtHdrHopByHop(len=3) / UDP()), "bad_ip_length"),
    (bytes(Ether() / ARP()), "not_ip"),
])
def test_malformed_reasons(frame: bytes, reason: str) -> None:
    assert dec(frame) == reason
    assert reason in MALFORMED or reason in IGNORED


def test_too_many_extension_headers() -> None:
    frame: Packet = IPv6()
    for _ in range(10):
        frame = frame / IPv6ExtHdrDestOpt()
    assert dec(Ether() / frame / UDP()) == "truncated_ext"


def test_stats_add_up() -> None:
    stats = DecodeStats()
    for frame in (b"", bytes(Ether() / ARP()), bytes(Ether() / IP() / UDP()), b"\xff" * 60):
        stats.count(decode(frame, 0, len(frame)))
    assert stats.total == 4 and stats.decoded == 1 and stats.balanced()
    assert stats.ignored["not_ip"] == 2 and stats.malformed["truncated_link"] == 1


def test_flow_key_is_direction_free() -> None:
    k1, fwd1 = flow_key(6, 7, V4A, 40000, V4B, 80)
    k2, fwd2 = flow_key(6, 7, V4B, 80, V4A, 40000)
    assert k1 == k2 and fwd1 and not fwd2 and len(k1) == 15
    assert split_key(k1) == (6, 7, V4A, 40000, V4B, 80)
    k6, _ = flow_key(17, 0, b"\x01" * 16, 1, b"\x02" * 16, 2)
    assert len(k6) == 39 and split_key(k6)[2] == b"\x01" * 16


def test_format_endpoint() -> None:
    assert format_endpoint(V4A, 80) == "10.0.0.1:80"
    assert format_endpoint(b"\xfd" + b"\0" * 14 + b"\x01", 443) == "[fd00::1]:443"


def test_decode_at_an_offset_in_a_larger_buffer() -> None:
    raw = bytes(Ether() / IP() / UDP(sport=9, dport=10) / b"abc")
    buf = memoryview(b"\xee" * 100 + raw + b"\xee" * 50)
    d = decode(buf, 100, 100 + len(raw))
    assert isinstance(d, Decoded) and d.sport == 9 and bytes(buf[d.payload_start:d.payload_end]) == b"abc"
