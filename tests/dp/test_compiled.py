"""The compiled per-packet path (``flowmap_dp.compiled``, Rust) against the Python reference
(``block.feed_block`` / ``classify.feed_frames`` into ``session.SessionTable``): the same blocks,
capture files and frames through both give identical reports — every delta of every ``collect``,
in order, and the health: decode outcomes, fragments, sessions created, evicted, expired, closed
and unreported, inspector errors. ``twins.assert_same_reports`` is the one comparison."""

from __future__ import annotations

import json
import random
import struct
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.all import DNS, DNSQR, DNSRR

from flowmap_dp import compiled
from flowmap_dp.block import block_packets
from flowmap_dp.classify import OFFLINE_MAX_SESSIONS, classify_file, flow_dict
from flowmap_dp.detection import Inspector
from flowmap_dp.detectors.base import Threat
from flowmap_dp.pcapfile import read_records
from flowmap_dp.session import HANDOFF_REMEMBERED, INSPECTOR_IDLE, NEW_EXCHANGE_AFTER, Timeouts
from flowmap_dp.threats import Config, bind
from tests.dp.synth import Frame, ether, ipv4, ipv6, mixed_traffic, pack_block, tcp, udp
from tests.dp.test_fragments import frags4, frags6
from tests.dp.twins import Tape, Twins, assert_same_reports, balanced, block_time, blocks_of, make_table

DATA = Path(__file__).resolve().parents[1] / "data"
CAPTURES = sorted(p for folder in (DATA / "captures", DATA / "ndpi") for p in folder.rglob("*")
                  if p.suffix in (".pcap", ".pcapng", ".cap"))
A4, B4, C4 = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]), bytes([10, 0, 0, 3])
A6, B6 = b"\xfd" + bytes(14) + b"\x01", b"\xfd" + bytes(14) + b"\x02"
SYN, SYNACK, ACK, PSH, FIN, RST = 0x02, 0x12, 0x10, 0x18, 0x11, 0x04
SHORT = Timeouts(tcp_open=0.2, tcp_half_open=0.05, tcp_closing=0.05, tcp_closed=0.01, udp=0.1, icmp=0.05, other=0.1)
_OWN = json.loads((DATA / "captures" / "MANIFEST.json").read_text())
LIMITS = {DATA / "captures" / e["file"]: e.get("threat_limits", []) for e in _OWN}
TAGS = {DATA / "captures" / e["file"]: e["tags"] for e in _OWN}
THREATS = {"deprecated-tls", "heartbleed", "http-smuggling", "slowloris"}


# -- traffic ----------------------------------------------------------------------------------------

def odd_frames(rnd: random.Random, ts: float) -> list[Frame]:
    """Frames off the common path: ICMP, an IPv6 extension chain, IPv4 fragments (attributed and
    orphaned), IP options, a cut frame, garbage, a stripped tag with an in-frame one."""
    icmp = bytes([8, 0, 0, 0, 0, 7, 0, 1]) + b"ping"
    hbh = bytes([17, 0, 1, 4, 0, 0, 0, 0])  # hop-by-hop -> UDP
    ext = ipv6(A6, B6, 0, hbh + udp(1000, 53, b"q"))
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
    """Mixed traffic (``synth.mixed_traffic``) with odd frames sprinkled in."""
    rnd = random.Random(seed)
    frames = mixed_traffic(packets, flows=300, seed=seed, pps=1e4)
    for _ in range(40):
        at = rnd.randrange(len(frames))
        frames[at:at] = odd_frames(rnd, frames[at][1])
    return frames


def hostile_blocks(rnd: random.Random) -> list[bytes]:
    """Blocks whose descriptor or packet headers lie (counts, links, offsets, lengths), bytes
    flipped at random, and blocks too short to hold a descriptor."""
    out = []
    for block in blocks_of(traffic(11, 300), 1 << 14):
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
    return [*out, b"", bytes(47), bytes(4099)]


# -- blocks -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_mixed_traffic_with_evictions_expiry_and_hold(seed: int) -> None:
    """80 sessions at most for 300 flows, short timeouts, a collect after every other block with
    a hold: every report of the compiled table is the reference's, and each session's inspector
    was fed the same payloads in the same order."""
    hold = 0.002
    twins = Twins(Tape, max_sessions=80, timeouts=SHORT, max_fragments=8)
    reports = []
    for i, block in enumerate(blocks_of(traffic(seed), 1 << 14)):
        twins.feed_blocks([block])
        if i % 2:
            reports.append(twins.collect(block_time(block) + 0.001, hold))
    twins.close_all()
    reports.append(twins.collect(reports[-1].time + 1.0))
    h = reports[-1].health
    assert h.evicted > 50 and h.expired > 20 and h.closed == h.created > 250 and h.sessions == 0
    assert sum(h.malformed.values()) > 0 and h.malformed["internal_error"] == 0
    assert h.ignored["fragment"] > 0 and h.fragments["attributed"] > 0
    held = [d for prev, rep in zip(reports, reports[1:]) for d in rep.sessions
            if d.new and prev.time - hold < d.first_seen <= prev.time]
    assert held, "no session waited for the next report"
    ref, comp = twins.fed()
    assert ref == comp and len(ref) > 200
    ref_times, comp_times = twins.times()  # each payload's capture time, for the scanners that need it
    assert ref_times == comp_times and len({t for ts in ref_times for t in ts}) > 100


def test_a_warm_table_fed_the_same_blocks_again() -> None:
    frames = traffic(7, 4000)
    blocks = blocks_of(frames)
    twins = Twins(Tape)
    twins.feed_blocks(blocks)
    first = twins.collect(0.0)
    twins.feed_blocks(blocks)  # every packet again, older than what the table saw last
    second = twins.collect(0.0)
    assert second.health.packets == 2 * len(frames) and second.health.decoded == 2 * first.health.decoded
    assert sum(d.packets_c2s + d.packets_s2c for d in second.sessions) == first.health.decoded
    assert twins.fed()[0] == twins.fed()[1]


def test_a_syn_flood_past_max_pending_is_counted_not_kept() -> None:
    """Sessions born and ended (evicted) between two reports beyond ``max_pending`` are only
    counted; a session reported once is reported again when it ends."""
    max_sessions, max_pending, flood = 64, 16, 2000
    twins = Twins(max_sessions=max_sessions, max_pending=max_pending)
    c = lambda port, flags, data=b"": ether(ipv4(A4, B4, 6, tcp(port, 5432, flags, data)))  # noqa: E731
    startup = b"\x00\x00\x00\x08\x04\xd2\x16\x2f"  # PostgreSQL's SSLRequest
    twins.feed_blocks(blocks_of([(c(40000, SYN), 1.0, None), (c(40000, PSH, startup), 1.1, None)]))
    (first,) = twins.collect(1.5).sessions
    assert first.new and first.client_port == 40000
    twins.feed_blocks(blocks_of([(c(1024 + i, SYN), 2.0 + i * 1e-4, None) for i in range(flood)]))
    report = twins.collect(3.0)
    h = report.health
    assert h.evicted == flood + 1 - max_sessions and h.unreported == h.evicted - max_pending
    assert len(report.sessions) == max_sessions + max_pending == h.sessions + max_pending
    (old,) = [d for d in report.sessions if d.client_port == 40000]
    assert (old.new, old.closed, old.end_reason) == (False, True, "evicted")


@pytest.mark.parametrize("seed", range(4))
def test_hostile_blocks_never_raise_and_the_tables_agree(seed: int) -> None:
    twins = Twins(Tape, max_sessions=100)
    for block in hostile_blocks(random.Random(seed)):
        twins.feed_blocks([block])
        twins.collect(1.8e9)
    h = twins.collect(1.8e9).health
    assert h.packets > 0 and h.malformed["internal_error"] == 0
    assert balanced(h)
    assert twins.fed()[0] == twins.fed()[1]


_WORDS = st.sampled_from([0, 1, 3, 8, 47, 48, 68, 0xFFFF, 2**31, 2**32 - 1]) | st.integers(0, 2**32 - 1)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 3), st.lists(st.tuples(st.integers(0, 1023), st.sampled_from(["<I", "<H", "B"]), _WORDS),
                                   max_size=6), st.integers(0, 4096))
def test_blocks_with_lying_headers(which: int, lies: list[tuple[int, str, int]], cut: int) -> None:
    """Header words anywhere in the first KiB (descriptor, packet headers, frames) set to odd
    values, the block cut short: the walks stop or skip alike, and nothing escapes."""
    frames = traffic(which, 60)
    raw = bytearray(pack_block(frames, 1 << 12, link_header=14 if which % 2 else 0)[0])
    for at, fmt, value in lies:
        struct.pack_into(fmt, raw, at, value & (0xFF if fmt == "B" else 0xFFFF if fmt == "<H" else 0xFFFFFFFF))
    twins = Twins(Tape, max_sessions=8, max_fragments=2)
    twins.feed_blocks([bytes(raw[: max(cut, 48)]), bytes(raw)])
    h = twins.collect(2e9).health
    assert h.malformed["internal_error"] == 0
    assert twins.fed()[0] == twins.fed()[1]


def test_memoryviews_of_blocks() -> None:
    blocks = blocks_of(traffic(4, 500))
    twins = Twins(Tape)
    twins.feed_blocks([memoryview(bytearray(b)) for b in blocks])
    twins.feed_blocks([memoryview(b) for b in blocks])
    assert twins.collect(2e9).sessions


@pytest.mark.parametrize("seed", [4, 5])
def test_raw_ip_frames_of_a_tunnel(seed: int) -> None:
    """Blocks of a device without a link header (``tp_net == tp_mac``): both tables agree, and
    count exactly what they count of the same packets behind an Ethernet header."""
    frames = mixed_traffic(3000, flows=200, seed=seed, pps=1e4, vlan_share=0.0)
    raw = [(data[14:], ts, None) for data, ts, _tci in frames]
    twins, ethernet = Twins(Tape), Twins(Tape)
    twins.feed_blocks(blocks_of(raw, link_header=0))
    ethernet.feed_blocks(blocks_of(frames))
    twins.close_all()
    ethernet.close_all()
    report = twins.collect(2e9)
    assert len(report.sessions) > 100
    assert_same_reports(ethernet.collect(2e9), report)


def test_vlan_tags_stripped_in_the_frame_and_stacked() -> None:
    """The kernel's stripped tag, a tag in the frame, QinQ (the innermost names the VLAN), and a
    TCI whose ``TP_STATUS_VLAN_VALID`` flag is off (ignored)."""
    l3 = ipv4(A4, B4, 6, tcp(40000, 80, SYN))
    frames: list[Frame] = [(ether(l3), 1.0, 42), (ether(l3, (42,)), 2.0, None), (ether(l3), 3.0, None),
                           (ether(l3, (7, 43)), 4.0, None), (ether(l3, (43,)), 5.0, 9)]
    block = bytearray(pack_block(frames)[0])
    unflagged = bytearray(pack_block([(ether(l3), 6.0, None)])[0])
    struct.pack_into("<I", unflagged, 48 + 32, 77)  # a TCI, TP_STATUS_VLAN_VALID not set
    twins = Twins()
    twins.feed_blocks([bytes(block), bytes(unflagged)])
    report = twins.collect(10.0)
    assert sorted((d.vlan, d.packets_c2s) for d in report.sessions) == [(0, 2), (42, 2), (43, 2)]


# -- capture files ----------------------------------------------------------------------------------

@pytest.mark.parametrize("every", [1, compiled.FRAMES_PER_ANSWER], ids=["answer-each-frame", "answer-per-batch"])
@pytest.mark.parametrize("path", CAPTURES, ids=[str(p.relative_to(DATA)) for p in CAPTURES])
def test_every_capture_classifies_alike(path: Path, every: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our captures and the public (nDPI) ones, per frame through the reference and through
    ``CompiledTable.feed_frames``, with the real detectors, offline (no timeouts): the same
    sessions, counters, apps, metadata and threats, which are ``flowmap dp classify``'s."""
    monkeypatch.setattr(compiled, "FRAMES_PER_ANSWER", every)
    records = [(r.data, r.link, r.wire_len, r.ts) for r in read_records(path)]
    config = Config.parse([], LIMITS.get(path, ()))  # the thresholds the manifest judges it with
    twins = Twins(partial(Inspector, scanners=bind(config)), config, max_sessions=OFFLINE_MAX_SESSIONS, timeouts=None)
    twins.feed_frames(records)
    twins.close_all()
    report = twins.collect(0.0)
    assert report.sessions and report.health.packets == len(records)
    assert [flow_dict(d) for d in report.sessions] == classify_file(path, threats=config)
    if "sqlinjection" in path.parts or path.name == "WebattackSQLinj.pcap":
        assert any(t.name == "sqlinjection" for d in report.sessions for t in d.threats)
    threat = path.parent.name  # a folder of threat captures (their benign twins raise nothing)
    if threat in THREATS and "benign" not in TAGS[path]:
        assert any(t.name == threat for d in report.sessions for t in d.threats)


def test_the_captures_are_not_all_alike() -> None:
    """What the capture test compares holds apps (20 protocols and unknown), metadata and threats."""
    flows = [f for path in CAPTURES for f in classify_file(path)]
    assert len({f["app"] for f in flows}) >= 21 and sum(bool(f["metadata"]) for f in flows) > 100
    assert sum(bool(f["threats"]) for f in flows) >= 5


# -- fragments --------------------------------------------------------------------------------------

def test_fragments_attributed_bounded_and_expired() -> None:
    """Fragmented queries and answers (IPv4, IPv6), later fragments read before their first,
    orphans, more datagrams than the fragment table holds, fragments past its timeout, spread
    over blocks with collects between."""
    t0 = 1_700_000_000.0
    packets: list[tuple[bytes, float]] = []
    for i, (frags, c, s) in enumerate([(frags4, "10.0.0.1", "10.0.0.2"), (frags6, "fd00::1", "fd00::2")]):
        query, answer = frags(c, s, 40000, 53, 2000, 0x1234), frags(s, c, 53, 40000, 4000, 0x1234)
        orphan = frags(s, c, 53, 40000, 4000, 0x99)[1:]
        packets += [(bytes(p), t0 + i) for p in [*query, *reversed(answer), *answer, *orphan]]
        crowd = [frags(s, c, 53, 41000 + k, 3000, 100 + k) for k in range(4)]  # past max_fragments
        packets += [(bytes(d[0]), t0 + i) for d in crowd] + [(bytes(p), t0 + i) for d in crowd for p in d[1:]]
        late = frags(s, c, 53, 42000, 3000, 200)
        packets += [(bytes(late[0]), t0 + i), (bytes(late[1]), t0 + i + 31), (bytes(late[2]), t0 + i + 0.5)]
    twins = Twins(max_fragments=2)
    frames = [(ether(p), ts, None) for p, ts in packets]
    for i in range(0, len(frames), 7):
        twins.feed_blocks(blocks_of(frames[i:i + 7]))
        twins.collect(t0)
    fr = twins.collect(t0 + 40).health.fragments
    assert fr["tracked"] > 0 and fr["attributed"] > 0 and fr["evicted_full"] > 0 and fr["expired"] > 0


# -- the slow path's rules --------------------------------------------------------------------------

class DnsTape(Tape):
    """Decides "dns" on the first payload, as a DNS query makes the real detector do."""

    def feed(self, from_client: bool, payload: bytes, ts: float = 0.0) -> bool:
        self.fed.append((from_client, payload))
        self.app = "dns"
        return True


def _dns(name: str, ident: int, answer: str | None = None) -> bytes:
    if answer is None:
        return bytes(DNS(id=ident, rd=1, qd=DNSQR(qname=name)))
    return bytes(DNS(id=ident, qr=1, qd=DNSQR(qname=name), an=DNSRR(rrname=name, rdata=answer)))


def _lookups(answer_first: bool) -> list[Frame]:
    """Two lookups on one 5-tuple, two seconds apart (the second's answer read first or not)."""
    q = lambda p, ts: (ether(ipv4(A4, B4, 17, udp(40000, 53, p))), ts, None)  # noqa: E731
    a = lambda p, ts: (ether(ipv4(B4, A4, 17, udp(53, 40000, p))), ts, None)  # noqa: E731
    second = [q(_dns("db.example", 2), 12.0), a(_dns("db.example", 2, "10.9.0.2"), 12.001)]
    return [q(_dns("api.example", 1), 10.0), a(_dns("api.example", 1, "10.9.0.1"), 10.001),
            *(second[::-1] if answer_first else second)]


@pytest.mark.parametrize("answer_first", [False, True], ids=["query-first", "answer-first"])
@pytest.mark.parametrize("feed", ["one-block", "capture-frames"])
def test_a_new_lookup_on_a_decided_dns_5_tuple_within_one_batch(feed: str, answer_first: bool) -> None:
    """The first lookup is decided "dns" by the detectors only once the block's payloads are
    answered; the second, 2 s later in the same block (or batch of capture frames), must still be
    inspected anew: the compiled walk stops before it, lets the detectors answer, and goes on."""
    frames = _lookups(answer_first)
    twins = Twins(DnsTape)
    if feed == "one-block":
        twins.feed_blocks([pack_block(frames)[0]])
    else:
        twins.feed_frames([(data, 1, len(data), ts) for data, ts, _ in frames])
    ref, comp = twins.fed()
    assert ref == comp and len(ref) == 2
    assert ref[1][1] == [(not answer_first, frames[2][0][42:])]  # the second lookup's first packet
    (d,) = twins.collect(13.0).sessions
    assert (d.app, d.opened, d.packets_c2s, d.packets_s2c) == ("dns", True, 2, 2)
    assert 12.0 - 10.001 > NEW_EXCHANGE_AFTER["dns"]


def test_a_new_lookup_names_what_the_real_detector_saw_last() -> None:
    twins = Twins()
    twins.feed_blocks([pack_block(_lookups(False))[0]])
    (d,) = twins.collect(13.0).sessions
    assert d.app == "dns" and d.metadata is not None and d.metadata["dns"]["qname"] == "db.example"


def test_a_pause_on_a_session_decided_otherwise_is_no_new_lookup() -> None:
    c = lambda p, ts: (ether(ipv4(A4, B4, 17, udp(40000, 7, p))), ts, None)  # noqa: E731
    twins = Twins(Tape)
    twins.feed_blocks([pack_block([c(b"a", 1.0), c(b"b", 1.1), c(b"c", 1.2), c(b"d", 5.0)])[0]])
    ref, comp = twins.fed()
    assert ref == comp and len(ref) == 1 and len(ref[0][1]) == 3
    twins.collect(6.0)


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_tftp_data_sessions_are_oriented_by_the_request(v6: bool) -> None:
    """The server answers from a new port: the data session's first packet is the server's."""
    c, s = (A6, B6) if v6 else (A4, B4)
    ip = ipv6 if v6 else ipv4
    f = lambda src, dst, sp, dp, p, ts: (ether(ip(src, dst, 17, udp(sp, dp, p))), ts, None)  # noqa: E731
    frames = [f(c, s, 5000, 69, b"\x00\x01file\x00octet\x00", 1.0),  # RRQ
              f(s, c, 6000, 5000, b"\x00\x03\x00\x01" + b"x" * 512, 1.001),  # DATA, from a new port
              f(c, s, 5000, 6000, b"\x00\x04\x00\x01", 1.002)]  # ACK
    # More requesters than are remembered: the first one's data session is oriented by ports.
    crowd = [f(c, s, 20000 + i, 69, b"\x00\x01f\x00octet\x00", 2.0) for i in range(HANDOFF_REMEMBERED)]
    frames += crowd + [f(s, c, 7100, 5000, b"\x00\x03\x00\x01", 3.0), f(s, c, 7001, 20001, b"\x00\x03\x00\x01", 3.0)]
    twins = Twins(Tape)
    twins.feed_blocks(blocks_of(frames))
    got = {(d.server_port, d.client_port) for d in twins.collect(4.0).sessions}
    # 7100 -> 5000: 5000 was forgotten, so the first packet's sender is the client
    assert {(69, 5000), (6000, 5000), (7001, 20001), (5000, 7100)} <= got


def test_tcp_5_tuples_reused_after_fin_and_rst() -> None:
    """A SYN on a fully closed 5-tuple (FIN both ways, or RST) starts a new session; on a closing
    one (one FIN) it does not."""
    c = lambda flags, ts, data=b"": (ether(ipv4(A4, B4, 6, tcp(40000, 80, flags, data))), ts, None)  # noqa: E731
    s = lambda flags, ts, data=b"": (ether(ipv4(B4, A4, 6, tcp(80, 40000, flags, data))), ts, None)  # noqa: E731
    conn = lambda t: [c(SYN, t), s(SYNACK, t + .01), c(ACK, t + .02),  # noqa: E731
                      c(PSH, t + .03, b"GET / HTTP/1.1\r\n\r\n"), s(PSH, t + .04, b"HTTP/1.1 200 OK\r\n\r\n")]
    frames = [*conn(1), c(FIN, 1.1), s(FIN, 1.2), c(ACK, 1.3),  # closed by FINs
              *conn(2), c(RST, 2.1),  # closed by a RST
              *conn(3), c(FIN, 3.1),  # closing only: the next SYN is the same session's
              *conn(4), s(RST, 4.1), c(ACK, 4.2)]
    twins = Twins(Tape)
    twins.feed_blocks([pack_block(frames)[0]])
    twins.close_all()
    ends = [(d.end_reason, d.packets_c2s + d.packets_s2c) for d in twins.collect(5.0).sessions]
    assert ends == [("reused", 8), ("reused", 6), ("end", 13)]
    assert twins.fed()[0] == twins.fed()[1]


def test_a_reply_half_reports_no_app_and_its_request_half_the_real_one() -> None:
    """A pod's call to a ClusterIP on another node, as the client's node sees it: the request
    under the Service's address (the pod's veth), the answers under the server pod's (the tunnel).
    The request half decides; the reply half, idle past INSPECTOR_IDLE and then expired, says
    nothing: an "unknown" from it would join the edge's applications."""
    pod, svc, server = A4, B4, bytes([10, 244, 1, 4])
    literal = lambda name, value: b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value  # noqa: E731
    block = literal(b":path", b"/shop.Catalog/List") + literal(b"content-type", b"application/grpc")
    call = (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")  # preface, SETTINGS
            + len(block).to_bytes(3, "big") + b"\x01\x04" + (1).to_bytes(4, "big") + block)  # HEADERS
    settings = bytes.fromhex("000006040000000000000400") + b"\x3f\xff\xff"
    frames = [(ether(ipv4(pod, svc, 6, tcp(40000, 9090, SYN))), 1.0, None),
              (ether(ipv4(pod, svc, 6, tcp(40000, 9090, PSH, call))), 1.01, None),
              (ether(ipv4(server, pod, 6, tcp(9090, 40000, SYNACK))), 1.002, None),
              *((ether(ipv4(server, pod, 6, tcp(9090, 40000, PSH, settings))), 1.003 + i / 1000, None)
                for i in range(4))]
    twins = Twins()
    twins.feed_blocks(blocks_of(frames))
    twins.collect(1.5)
    twins.collect(1.1 + INSPECTOR_IDLE)  # the reply half's inspector settles, idle
    twins.close_all()
    apps = {(d.server_text, d.app) for d in twins.collect(9.0).sessions}
    assert apps == {("10.0.0.2:9090", "grpc"), ("10.244.1.4:9090", "")}, apps


def test_expiry_by_protocol_and_state() -> None:
    """Sessions of each protocol and TCP state, collected at increasing times: each leaves the
    table at its timeout, with its reason (fin, rst, idle), in both tables alike."""
    frames: list[Frame] = []
    for i, port in enumerate(range(41000, 41060)):
        t = 1.0 + i * 0.01
        c = lambda flags, ts: (ether(ipv4(A4, B4, 6, tcp(port, 80, flags))), ts, None)  # noqa: E731
        s = lambda flags, ts: (ether(ipv4(B4, A4, 6, tcp(80, port, flags))), ts, None)  # noqa: E731
        frames += [[c(SYN, t)], [c(SYN, t), s(SYNACK, t)], [c(SYN, t), s(SYNACK, t), c(ACK, t)],
                   [c(SYN, t), s(SYNACK, t), c(ACK, t), c(FIN, t)], [c(SYN, t), s(SYNACK, t), c(FIN, t), s(FIN, t)],
                   [c(SYN, t), c(RST, t)]][i % 6]
        frames.append((ether(ipv4(A4, C4, 17, udp(port, 53, b"q"))), t, None))
        frames.append((ether(ipv4(A4, C4, 1, bytes([8, 0, 0, 0, 0, port % 256, 0, 1]))), t, None))
        frames.append((ether(ipv4(A4, C4, 47, b"gre")), t, None))
    timeouts = Timeouts(tcp_open=3.0, tcp_half_open=1.0, tcp_closing=2.0, tcp_closed=0.5, udp=2.5, icmp=1.5, other=4.0)
    twins = Twins(Tape, timeouts=timeouts, max_sessions=1000)
    twins.feed_blocks(blocks_of(frames))
    reasons: dict[str, int] = {}
    for k in range(1, 20):
        for d in twins.collect(1.0 + k * 0.3).sessions:
            reasons[d.end_reason] = reasons.get(d.end_reason, 0) + d.closed
    assert twins.expire(100.0) == 0 and len(twins.ref) == 0
    assert reasons["fin"] == 10 and reasons["rst"] == 10 and reasons["idle"] == 40 + 60 + 60 + 1


# -- everything at random ---------------------------------------------------------------------------

class Rules(Tape):
    """An inspector steered by each payload's first byte: D decides "dns", L matches "http" and
    lingers, E raises (a detector bug), J makes the server's lone words decide, M adds metadata."""

    def __init__(self, l4: str, client_port: int, server_port: int) -> None:
        super().__init__(l4, client_port, server_port)
        self.alone = False

    def feed(self, from_client: bool, payload: bytes, ts: float = 0.0) -> bool:
        self.fed.append((from_client, payload))
        kind = payload[:1]
        if kind == b"E":
            raise RuntimeError("a detector bug")
        if kind == b"D":
            self.app, self.metadata = "dns", {"lookup": payload[1:].decode()}
            return True
        if kind == b"L":
            self.app = "http"
        elif kind == b"J":
            self.alone = True
        elif kind == b"M":
            self.metadata["m"] = len(self.fed)
            self.threats.append(Threat("sqlinjection", payload[:8].decode(), "c2s"))
        return False

    def judge_server_alone(self) -> bool:
        if self.alone:
            self.app = "dns"
        return self.alone

    def finish(self) -> None:
        self.metadata["finished"] = len(self.fed)


_PORTS = [53, 69, 80, 5000, 6000, 40000, 40001]
_PACKET = st.tuples(
    st.sampled_from([0.0, 1e-4, 0.01, 0.3, 1.2, 2.5, 40.0, -0.5]),  # time since the previous packet
    st.sampled_from([(A4, B4), (B4, A4), (A4, C4), (C4, B4), (A6, B6), (B6, A6)]),
    st.sampled_from([6, 6, 17, 17, 1, 47]),
    st.sampled_from(_PORTS), st.sampled_from(_PORTS),
    st.sampled_from([SYN, SYNACK, ACK, PSH, FIN, RST, 0x14, 0x01]),
    st.sampled_from([b"", b"", b"D1", b"D2", b"Lx", b"Ex", b"Jx", b"Mx", b"q" * 30]),
    st.sampled_from([None, None, None, "stripped", "in-frame"]),
)
_STEP = _PACKET | st.tuples(st.sampled_from(["cut", "collect"]), st.sampled_from([0.0, 0.1, 1.0, 5.0]),
                            st.sampled_from([0.0, 0.0, 0.5, 3.0]))


def _frame(step: tuple[Any, ...], ts: float) -> Frame:
    _, (src, dst), proto, sport, dport, flags, payload, tag = step
    if proto == 6:
        l4 = tcp(sport, dport, flags, payload)
    elif proto == 17:
        l4 = udp(sport, dport, payload)
    elif proto == 1:
        l4 = bytes([(0, 8, 3)[sport % 3], 0, 0, 0, 0, dport % 3, 0, 1]) + payload
    else:
        l4 = payload
    ip = (ipv6 if len(src) == 16 else ipv4)(src, dst, 58 if proto == 1 and len(src) == 16 else proto, l4)
    if tag == "stripped":
        return ether(ip), ts, 7
    return ether(ip, (7,) if tag == "in-frame" else ()), ts, None


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_STEP, max_size=150), st.sampled_from([1, 2, 5, 50]), st.sampled_from([None, 0, 1, 3]),
       st.sampled_from([1, 2, 3, 32]), st.sampled_from([None, Timeouts(), Timeouts(1, 0.5, 0.5, 0.2, 1, 0.3, 2)]))
def test_random_sessions_with_every_rule(steps: list[tuple[Any, ...]], max_sessions: int, max_pending: int | None,
                                         feed_limit: int, timeouts: Timeouts | None) -> None:
    """Few endpoints and ports (DNS, TFTP, services), every TCP flag, pauses past the DNS
    re-lookup, packets out of order, tags, tiny tables, detectors that decide, linger, raise,
    judge the server alone; blocks cut and reports collected (with holds) anywhere."""
    twins = Twins(Rules, max_sessions=max_sessions, max_pending=max_pending, feed_limit=feed_limit,
                  timeouts=timeouts, max_fragments=4)
    ts = now = 100.0
    frames: list[Frame] = []
    for step in [*steps, ("cut", 0.0, 0.0)]:
        if isinstance(step[0], str):
            twins.feed_blocks(blocks_of(frames))
            frames = []
            if step[0] == "collect":
                now = max(now, ts) + step[1]
                twins.collect(now, step[2])
            continue
        ts = max(0.0, ts + step[0])
        frames.append(_frame(step, ts))
    twins.close_all()
    twins.collect(now + 1)
    assert twins.fed()[0] == twins.fed()[1]
    assert twins.ref.inspector_errors == twins.comp.inspector_errors


@pytest.mark.parametrize("feed_limit", [
    0, 1, 2])
def test_the_feed_limit(feed_limit: int) -> None:
    frames = [(ether(ipv4(A4, B4, 17, udp(40000, 7, p))), 1.0 + i, None) for i, p in enumerate([b"a", b"b", b"c"])]
    twins = Twins(Tape, feed_limit=feed_limit)
    twins.feed_blocks(blocks_of(frames))
    twins.collect(9.0)
    assert twins.fed()[0] == twins.fed()[1]
    assert sum(len(fed) for _, fed in twins.fed()[0]) == min(feed_limit, 3)  # 0: detection off, nothing fed


def test_a_feed_limit_a_byte_cannot_hold_is_refused() -> None:
    for kind in ("per-packet", "compiled"):
        with pytest.raises(ValueError, match="feed_limit"):
            make_table(kind, feed_limit=256)


def test_a_parser_error_is_counted_alike() -> None:
    twins = Twins()
    twins.ref.count_parser_error()
    twins.comp.count_parser_error()
    assert twins.collect(0.0).health.malformed["internal_error"] == 1


def test_the_reasons_a_table_is_closed_with() -> None:
    twins = Twins()
    twins.feed_blocks(blocks_of([(ether(ipv4(A4, B4, 17, udp(40000, 53, b"x"))), 1.0, None)]))
    twins.close_all("shutdown")
    (d,) = twins.collect(2.0).sessions
    assert (d.closed, d.end_reason) == (True, "shutdown")


class Lingerer(Tape):
    """Matches ("http") on the first payload and lingers for more, never done on its own."""

    def feed(self, from_client: bool, payload: bytes, ts: float = 0.0) -> bool:
        self.fed.append((from_client, payload))
        self.app = "http"
        self.metadata = {"path": "/x"}
        return False


@pytest.mark.parametrize(("inspector", "reported"), [(Lingerer, True), (Tape, False)])
def test_an_idle_inspector_is_settled_at_the_next_report(inspector: type[Tape], reported: bool) -> None:
    """A session idle for INSPECTOR_IDLE with its detectors still at work is settled: with an app
    (or metadata) it is reported now, decided; with nothing found it waits for its next packet."""
    frames = [(ether(ipv4(A4, B4, 6, tcp(40000, 80, 0x18, b"GET /x"))), 10.0, None)]
    twins = Twins(inspector)
    twins.feed_blocks(blocks_of(frames))
    first = twins.collect(10.5)
    assert [d.app_decided for d in first.sessions] == [inspector is Lingerer]
    assert twins.collect(10.0 + INSPECTOR_IDLE - 0.1).sessions == []  # not idle long enough
    late = twins.collect(10.0 + INSPECTOR_IDLE)
    assert [(d.app, d.app_decided, dict(d.metadata or {})) for d in late.sessions] == (
        [("http", True, {"path": "/x"})] if reported else [])
