"""Later IP fragments count toward the session of their datagram's first fragment, in both tables
(the compiled one and the per-packet reference), with exact bytes (IP lengths, as the session
table counts them) per direction."""

from __future__ import annotations

import ipaddress

import pytest
from scapy.all import IP, UDP, IPv6, IPv6ExtHdrFragment, Packet, fragment, fragment6

from flowmap_dp import _native
from flowmap_dp.decode import FRAGMENT_TIMEOUT, Decoded, Fragments, decode
from flowmap_dp.session import Health, SessionDelta
from tests.dp.synth import ether, pack_block
from tests.dp.twins import KINDS, REASONS, Table, balanced, make_table

C4, S4, C6, S6 = "10.0.0.1", "10.0.0.2", "fd00::1", "fd00::2"
T0 = 1_700_000_000.0


def ip_len(p: Packet) -> int:
    """What the dp counts for one frame: the IPv4 total length, or 40 + the IPv6 payload length."""
    return p[IP].len if IP in p else 40 + p[IPv6].plen


def frags4(src: str, dst: str, sport: int, dport: int, size: int, ident: int) -> list[Packet]:
    out = fragment(IP(src=src, dst=dst, id=ident) / UDP(sport=sport, dport=dport) / (b"x" * size), fragsize=1480)
    return [IP(bytes(p)) for p in out]  # lengths and checksums filled in


def frags6(src: str, dst: str, sport: int, dport: int, size: int, ident: int) -> list[Packet]:
    pkt = IPv6(src=src, dst=dst) / IPv6ExtHdrFragment(id=ident) / UDP(sport=sport, dport=dport) / (b"x" * size)
    return [IPv6(bytes(p)) for p in fragment6(pkt, 1500)]


def run(table: Table, packets: list[tuple[Packet, float]]) -> Table:
    # synth.ether, not scapy's Ether(): that one looks the destination's MAC up on this host.
    frames = [(ether(bytes(p)), ts, None) for p, ts in packets]
    while frames:
        block, n = pack_block(frames, 1 << 16)
        table.feed_block(block)
        frames = frames[n:]
    return table


def only(table: Table, now: float = T0 + 1) -> tuple[SessionDelta, Health]:
    report = table.collect(now)
    (d,) = report.sessions
    return d, report.health


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_a_fragmented_answer_counts_every_fragment(kind: str, v6: bool) -> None:
    frags, c, s = (frags6, C6, S6) if v6 else (frags4, C4, S4)
    query = frags(c, s, 40000, 53, 2000, 0x1234)  # a fragmented query too: both directions
    answer = frags(s, c, 53, 40000, 4000, 0x1234)  # same id, other direction: another datagram
    assert len(query) == 2 and len(answer) == 3
    d, h = only(run(make_table(kind), [(p, T0 + i * 1e-4) for i, p in enumerate(query + answer)]))
    assert (d.client, d.client_port, d.server_port) == (ipaddress.ip_address(c).packed, 40000, 53)
    assert (d.packets_c2s, d.packets_s2c) == (2, 3)
    assert d.bytes_c2s == sum(map(ip_len, query)) == 2000 + 8 + (40 + 8 if v6 else 20) * 2
    assert d.bytes_s2c == sum(map(ip_len, answer)) == 4000 + 8 + (40 + 8 if v6 else 20) * 3
    assert h.decoded == 5 and h.ignored["fragment"] == 0 and balanced(h)
    assert h.fragments == {"tracked": 2, "attributed": 3, "evicted_full": 0, "expired": 0}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_later_fragments_before_their_first_stay_unattributed(kind: str, v6: bool) -> None:
    frags, c, s = (frags6, C6, S6) if v6 else (frags4, C4, S4)
    answer = frags(s, c, 53, 40000, 4000, 77)
    orphan = frags(s, c, 53, 40000, 4000, 78)[1:]  # a datagram whose first fragment was never seen
    d, h = only(run(make_table(kind), [(p, T0) for p in [*reversed(answer), *orphan]]))
    assert (d.packets_c2s + d.packets_s2c, d.bytes_c2s + d.bytes_s2c) == (1, ip_len(answer[0]))
    assert h.ignored["fragment"] == 4 and h.decoded == 1 and balanced(h)
    assert h.fragments["attributed"] == 0


@pytest.mark.parametrize("kind", KINDS)
def test_the_table_bound_and_the_timeout(kind: str) -> None:
    t = make_table(kind, max_fragments=2)
    dgrams = [frags4(S4, C4, 53, 40000 + i, 3000, 100 + i) for i in range(3)]
    # Three first fragments, then all the later ones: the oldest datagram was pushed out.
    run(t, [(d[0], T0) for d in dgrams] + [(p, T0) for d in dgrams for p in d[1:]])
    report = t.collect(T0)
    assert report.health.fragments == {"tracked": 3, "attributed": 4, "evicted_full": 1, "expired": 0}
    assert report.health.ignored["fragment"] == 2
    got = sorted(d.bytes_c2s + d.bytes_s2c for d in report.sessions)
    assert got == sorted([ip_len(dgrams[0][0])] + [sum(map(ip_len, d)) for d in dgrams[1:]])
    # A later fragment past the timeout is not attributed.
    late = frags4(S4, C4, 53, 41000, 3000, 200)
    run(t, [(late[0], T0 + 1), (late[1], T0 + 1 + FRAGMENT_TIMEOUT + 0.5), (late[2], T0 + 2 + FRAGMENT_TIMEOUT)])
    h = t.collect(T0 + 40).health
    assert h.fragments["expired"] >= 1 and h.ignored["fragment"] == 4 and balanced(h)
    assert h.fragments["tracked"] - h.fragments["evicted_full"] - h.fragments["expired"] <= 2


def test_decode_alone_is_unchanged_and_tracking_is_keyed_by_the_whole_id() -> None:
    first, second, _ = (ether(bytes(p)) for p in frags4(C4, S4, 5000, 53, 3000, 9))
    assert decode(second, 0, len(second)) == "fragment"
    assert _native.decode_frame(second, 0, len(second), 1) == REASONS.index("fragment")
    assert _native.decode_frame(first, 0, len(first), 1)[1][3] is True  # a first fragment
    f = Fragments(limit=8)
    assert f.decode(second, 0, len(second), ts=1.0) == "fragment"  # first not seen yet
    out = f.decode(first, 0, len(first), ts=1.0)
    assert isinstance(out, Decoded) and out.frag is not None and (out.sport, out.dport) == (5000, 53)
    later = f.decode(second, 0, len(second), ts=1.0)
    assert isinstance(later, Decoded) and (later.sport, later.dport, later.payload_len) == (5000, 53, 0)
    assert later.ip_len == 1500
    # Another VLAN, another id: not the same datagram.
    assert f.decode(second, 0, len(second), vlan=5, ts=1.0) == "fragment"
    other = ether(bytes(frags4(C4, S4, 5000, 53, 3000, 10)[1]))
    assert f.decode(other, 0, len(other), ts=1.0) == "fragment"
    off = Fragments(limit=0)  # tracking off: the first fragment decodes, the later ones stay fragments
    assert isinstance(off.decode(first, 0, len(first)), Decoded) and len(off) == 0
    assert off.decode(second, 0, len(second)) == "fragment"


def test_an_unfragmented_datagram_is_not_tracked() -> None:
    f = Fragments()
    for p in (IP(src=C4, dst=S4, flags="DF") / UDP() / b"x", IPv6(src=C6, dst=S6) / UDP() / b"x",
              IPv6(src=C6, dst=S6) / IPv6ExtHdrFragment(m=0, offset=0) / UDP() / b"x"):  # atomic fragment
        raw = ether(bytes(p))
        out = f.decode(raw, 0, len(raw))
        assert isinstance(out, Decoded) and out.frag is None
        assert _native.decode_frame(raw, 0, len(raw), 1)[1][3] is False
    assert len(f) == 0 and f.counters["tracked"] == 0
