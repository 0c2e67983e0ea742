"""The threat detections that need what the session table sees packet by packet:
tcp-split-handshake, syn-with-data, icmp-tunnel and ping-of-death. Each is shown firing and NOT
firing on its closest benign case, through both tables (``twins``: the reference and the
compiled one give the same marks and echo counts) and then the watches; hostile input never
raises. Real traffic: tests/data/captures (``threats`` in the manifest) and test_live."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowmap_dp.classify import classify_table
from flowmap_dp.decode import (MARK_FAST_OPEN, MARK_OVERSIZED, MARK_SPLIT_HANDSHAKE, MARK_SYN_DATA, Decoded,
                               Fragments, decode)
from flowmap_dp.session import ECHO_COUNT_MAX, SessionDelta, echo_digest
from flowmap_dp.threats import Config, Watching, icmptunnel
from tests.dp.synth import ether, ipv4, ipv6, tcp
from tests.dp.twins import Twins

A4, B4 = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
A6, B6 = b"\xfd" + bytes(14) + b"\x01", b"\xfd" + bytes(14) + b"\x02"
SYN, SYNACK, ACK, PSH = 0x02, 0x12, 0x10, 0x18
MSS = bytes([2, 4, 5, 180])
COOKIE = bytes([34, 10]) + bytes(range(1, 9))


def run(frames: Iterable[bytes], config: Config = Config(), collects: int = 1) -> list[SessionDelta]:
    """Frames 1 ms apart through both tables, closed, reported (``collects`` reports, frames
    shared among them) and watched: the reference's deltas with their hits."""
    frames = list(frames)
    twins = Twins(threats=config, timeouts=None)  # each report watched, as the packet loop does
    out: list[SessionDelta] = []
    step = -(-len(frames) // collects)
    for i in range(0, len(frames), step):
        twins.feed_frames([(f, 1, len(f), 1.0 + (i + k) / 1000) for k, f in enumerate(frames[i:i + step])])
        if i + step >= len(frames):
            twins.close_all()
        report = twins.collect(0.0)
        out += report.sessions
    return out


def hits(deltas: Sequence[SessionDelta]) -> list[str]:
    return [t.name for d in deltas for t in d.threats]


# -- tcp-split-handshake ----------------------------------------------------------------------------

def _c2s(flags: int, payload: bytes = b"", options: bytes = b"", v6: bool = False) -> bytes:
    l4 = tcp(40000, 80, flags, payload, options=options)
    return ether(ipv6(A6, B6, 6, l4) if v6 else ipv4(A4, B4, 6, l4))


def _s2c(flags: int, payload: bytes = b"", v6: bool = False) -> bytes:
    l4 = tcp(80, 40000, flags, payload)
    return ether(ipv6(B6, A6, 6, l4) if v6 else ipv4(B4, A4, 6, l4))


@pytest.mark.parametrize("v6", [False, True])
def test_a_syn_answered_by_a_syn_is_a_split_handshake(v6: bool) -> None:
    deltas = run([_c2s(SYN, v6=v6), _s2c(SYN, v6=v6), _c2s(SYNACK, v6=v6), _s2c(ACK, v6=v6)])
    assert [d.marks for d in deltas] == [MARK_SPLIT_HANDSHAKE] and hits(deltas) == ["tcp-split-handshake"]
    # The answering SYN read first (another ring): still two SYNs that cross.
    assert hits(run([_s2c(SYN, v6=v6), _c2s(SYN, v6=v6), _c2s(SYNACK, v6=v6)])) == ["tcp-split-handshake"]


@pytest.mark.parametrize("frames", [
    [_c2s(SYN), _s2c(SYNACK), _c2s(ACK)],  # the ordinary handshake
    [_c2s(SYN), _c2s(SYN), _s2c(SYNACK), _s2c(SYNACK), _c2s(ACK)],  # both sides retransmitting
    [_s2c(SYNACK), _c2s(SYN), _c2s(ACK)],  # the SYN-ACK read before its SYN
    [_c2s(SYN), _s2c(SYNACK), _c2s(ACK), _c2s(0x11), _s2c(0x11), _s2c(SYN)],  # a new SYN after a close: reused
], ids=["handshake", "retransmits", "reordered", "reuse"])
def test_no_split_handshake_in_ordinary_handshakes(frames: list[bytes]) -> None:
    deltas = run(frames)
    assert not any(d.marks & MARK_SPLIT_HANDSHAKE for d in deltas) and hits(deltas) == []


# -- syn-with-data ----------------------------------------------------------------------------------

@pytest.mark.parametrize("options, mark", [
    (MSS, MARK_SYN_DATA),
    (MSS + bytes([34, 2]), MARK_SYN_DATA),  # a cookie request carries no right to send data
    (MSS + COOKIE, MARK_FAST_OPEN),
    (MSS + bytes([1, 1, 254, 12, 0xF9, 0x89]) + bytes(8), MARK_FAST_OPEN),  # the experimental option
    (MSS + bytes([254, 12, 0x12, 0x34]) + bytes(8), MARK_SYN_DATA),  # another experiment
    (bytes([0]) + COOKIE, MARK_SYN_DATA),  # past the end of options
    (bytes([8, 30]) + COOKIE, MARK_SYN_DATA),  # an option longer than the options: nothing past it
])
def test_the_decoder_marks_data_in_a_syn_and_reads_fast_open_cookies(options: bytes, mark: int) -> None:
    frame = _c2s(SYN, b"GET / HTTP/1.1\r\n\r\n", options)
    d = decode(frame, 0, len(frame))
    assert isinstance(d, Decoded) and d.marks == mark
    names = hits(run([frame, _s2c(SYNACK), _c2s(ACK)]))
    assert names == (["syn-with-data"] if mark == MARK_SYN_DATA else [])
    if mark == MARK_FAST_OPEN:  # reported only when asked
        assert hits(run([frame], Config.parse([], ["syn-with-data.fast_open=1"]))) == ["syn-with-data"]


@pytest.mark.parametrize("frames", [
    [_c2s(SYN, options=MSS + COOKIE), _s2c(SYNACK), _c2s(PSH, b"data")],  # a cookie, no data
    [_c2s(SYN), _s2c(SYNACK, b"early"), _c2s(PSH, b"data")],  # data in the SYN-ACK is not the SYN's
    [_c2s(SYN, b"x")[:54]],  # payload cut by the capture
], ids=["cookie-only", "synack-data", "snapped"])
def test_no_syn_with_data_without_data_in_the_syn(frames: list[bytes]) -> None:
    deltas = run(frames)
    assert not any(d.marks & (MARK_SYN_DATA | MARK_FAST_OPEN) for d in deltas) and hits(deltas) == []


def test_switched_off() -> None:
    assert hits(run([_c2s(SYN, b"x")], Config.parse(["syn-with-data"]))) == []
    assert hits(run([_c2s(SYN), _s2c(SYN)], Config.parse(["tcp-split-handshake"]))) == []


# -- icmp-tunnel ------------------------------------------------------------------------------------

def echo(request: bool, seq: int, payload: bytes, v6: bool = False, ident: int = 7) -> bytes:
    kind = (128 if request else 129) if v6 else (8 if request else 0)
    icmp = struct.pack("!BBHHH", kind, 0, 0, ident, seq) + payload
    src, dst = (A6, B6) if v6 else (A4, B4)
    if not request:
        src, dst = dst, src
    return ether(ipv6(src, dst, 58, icmp) if v6 else ipv4(src, dst, 1, icmp))


def ping(seq: int, size: int = 56, pattern: bytes = b"") -> bytes:
    """What iputils ping sends: a 16-byte timestamp, then its pattern (bytes counting up, or -p)."""
    fill = (pattern * size)[:size - 16] if pattern else bytes((16 + i) % 256 for i in range(size - 16))
    return struct.pack("!QQ", 1_700_000_000 + seq, seq * 1000) + fill


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("size, pattern", [(56, b""), (1472, b""), (1472, b"\xff\x00"), (0, b""), (8, b"")])
def test_pings_of_any_size_are_no_tunnel(v6: bool, size: int, pattern: bytes) -> None:
    frames = [echo(r, seq, ping(seq, size, pattern) if size >= 16 else bytes(size), v6)
              for seq in range(20) for r in (True, False)]
    deltas = run(frames, collects=4)
    assert all(d.echo_changes == 0 for d in deltas) and hits(deltas) == []


@pytest.mark.parametrize("v6", [False, True])
def test_requests_that_change_are_a_tunnel_once(v6: bool) -> None:
    frames = [echo(True, seq, ping(seq) + bytes([seq]) * 200, v6) for seq in range(10)]
    deltas = run(frames, collects=5)
    assert sum(d.echo_changes for d in deltas) == 9
    assert hits(deltas) == ["icmp-tunnel"]  # once, in the report where the count reached 4: 1, 3, 5
    assert [bool(d.threats) for d in deltas] == [False, False, True, False, False]


def test_replies_unlike_their_requests_are_a_tunnel() -> None:
    frames = [echo(r, seq, ping(seq) if r else b"server data %d" % seq * 30) for seq in range(4) for r in (True, False)]
    deltas = run(frames)
    assert deltas[0].echo_changes == 4 and hits(deltas) == ["icmp-tunnel"]
    assert hits(run(frames[:6])) == []  # three changes: below the default
    assert hits(run(frames[:6], Config.parse([], ["icmp-tunnel.changes=3"]))) == ["icmp-tunnel"]


def test_echo_sessions_are_apart_and_counts_saturate() -> None:
    # Two identifiers: each its own session and its own count.
    frames = [echo(True, s, bytes([s]) * 40, ident=i) for s in range(3) for i in (1, 2)]
    assert [d.echo_changes for d in run(frames)] == [2, 2]
    many = [echo(True, s, s.to_bytes(2, "big") * 20) for s in range(ECHO_COUNT_MAX + 10)]
    assert [d.echo_changes for d in run(many)] == [ECHO_COUNT_MAX]


def test_the_watch_forgets_ended_sessions_and_stays_bounded() -> None:
    watch = icmptunnel.IcmpTunnel(icmptunnel.LIMITS)

    def delta(client: bytes, changes: int, closed: bool = False) -> SessionDelta:
        return SessionDelta("icmp", 1, 0, client, 7, B4, 7, 0.0, 0.0, False, False, closed, "", "open", "unknown",
                            False, 1, 1, 100, 100, None, [], 0, changes)

    for i in range(icmptunnel.REMEMBERED + 50):
        assert watch.observe(delta(i.to_bytes(4, "big"), 1), 0.0) == ()
    assert len(watch.counts) == icmptunnel.REMEMBERED
    assert watch.observe(delta(A4, 3, closed=True), 0.0) == () and (1, 0, A4, B4, 7) not in watch.counts
    assert watch.observe(delta(A4, 3), 0.0) == () and len(watch.observe(delta(A4, 1), 0.0)) == 1
    assert watch.observe(delta(A4, 9), 0.0) == ()  # said once


def test_the_digest_skips_the_timestamp_and_sees_the_length() -> None:
    assert echo_digest(84, ping(1)) == echo_digest(84, ping(2))
    assert echo_digest(84, ping(1)) != echo_digest(85, ping(1))
    assert echo_digest(84, ping(1)) != echo_digest(84, ping(1)[:20] + b"X" + ping(1)[21:])
    assert 0 < echo_digest(0, b"") < 65536


# -- ping-of-death ----------------------------------------------------------------------------------

def _fragments(total: int, v6: bool = False, ident: int = 0x4242, step: int = 1480) -> list[bytes]:
    """An echo request cut into fragments whose last one ends ``total`` bytes into the datagram's
    payload (offsets from the real ICMP message: reassembled, its length field would be
    ``total`` + 20 for IPv4, ``total`` for IPv6's payload)."""
    message = struct.pack("!BBHHH", 128 if v6 else 8, 0, 0, 7, 1) + bytes(step - 8)
    frames, offset = [], 0
    while offset < total:
        size = min(step, total - offset)
        chunk = message if offset == 0 else bytes(size)
        more = offset + size < total
        if v6:
            fh = struct.pack("!BBHI", 58, 0, offset | more, ident)
            frames.append(ether(ipv6(A6, B6, 44, fh + chunk)))
        else:
            frames.append(ether(ipv4(A4, B4, 1, chunk, ident=ident, frag=(offset // 8) | (0x2000 if more else 0))))
        offset += size
    return frames


@pytest.mark.parametrize("v6", [False, True])
def test_fragments_past_65535_are_a_ping_of_death(v6: bool) -> None:
    legal = 65535 - (0 if v6 else 20)  # the largest payload a datagram may have
    frames = _fragments(legal, v6)
    deltas = run(frames)
    assert deltas[0].marks == 0 and hits(deltas) == []  # ping -s 65507: the largest legal echo
    # Only the last fragment tells; as the crafted attack sends it, 8 bytes more.
    deltas = run(_fragments(legal + 8, v6))
    assert deltas[0].marks == MARK_OVERSIZED and hits(deltas) == ["ping-of-death"]
    # One late fragment alone, its first not seen: no session to blame.
    assert run(_fragments(legal + 8, v6)[-1:]) == []


def test_oversized_fragments_of_other_protocols_are_marked_not_raised() -> None:
    frames = [ether(ipv4(A4, B4, 17, struct.pack("!HHHH", 5000, 53, 8, 0) + bytes(1472), ident=3, frag=0x2000)),
              ether(ipv4(A4, B4, 17, bytes(100), ident=3, frag=8189))]
    deltas = run(frames)
    assert deltas[0].marks == MARK_OVERSIZED and hits(deltas) == []


# -- hostile input ----------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=48), st.binary(max_size=40), st.sampled_from([SYN, SYNACK, 0xFF]),
       st.integers(0, 0xFFFF))
def test_hostile_options_and_fragments_never_raise_and_the_tables_agree(options: bytes, payload: bytes, flags: int,
                                                                         frag: int) -> None:
    raw = tcp(40000, 80, flags, payload) [:12] + bytes([min(15, 5 + len(options) // 4) << 4, flags]) + bytes(6)
    frames = [ether(ipv4(A4, B4, 6, raw + options + payload)),
              ether(ipv4(A4, B4, 1, bytes([8, 0, 0, 0, 0, 1, 0, 1]) + payload, ident=5, frag=frag)),
              ether(ipv4(A4, B4, 1, payload, ident=5, frag=frag | 1)),
              ether(ipv6(A6, B6, 44, struct.pack("!BBHI", 58, 0, frag, 5) + payload))]
    run(frames)  # the twins assert identical reports
    f = Fragments()
    for frame in frames:
        f.decode(frame, 0, len(frame))


# -- the captures' benign sides are not empty ----------------------------------------------------

CAPTURES = Path(__file__).resolve().parents[1] / "data" / "captures"


def _capture(name: str, config: Config = Config()) -> list[SessionDelta]:
    report = classify_table(CAPTURES / name).collect(0.0)
    Watching(config).observe(report.time, report.sessions)
    return report.sessions


def test_real_fast_open_sends_data_in_its_syns_and_is_told_only_when_asked() -> None:
    assert hits(_capture("tfo/curl-cookie.pcap")) == []
    told = _capture("tfo/curl-cookie.pcap", Config.parse([], ["syn-with-data.fast_open=1"]))
    assert hits(told) == ["syn-with-data"] * 2  # the second connection of each family: GET in the SYN


def test_real_pings_are_large_and_fragmented_and_still_no_tunnel() -> None:
    sessions = _capture("icmp/ping.pcap")
    sizes = sorted(max(d.bytes_c2s // max(d.packets_c2s, 1), 0) for d in sessions)
    assert len(sessions) == 4 and sizes[-2] == 1500 and hits(sessions) == []
    assert max(d.packets_c2s for d in sessions) > 3  # -s 4000: fragments
