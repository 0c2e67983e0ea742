"""The session table: client/server decisions, counting rules, TCP state, timeouts, the bound,
the slow-path hook and the per-interval deltas."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from flowmap_dp.decode import Decoded, decode
from flowmap_dp.detectors.base import Threat
from flowmap_dp.session import CLOSED, CLOSING, OPEN, SYN_RECV, SYN_SENT, SessionTable, Timeouts, dst_is_server
from tests.dp.synth import ether, ipv4, ipv6, tcp, udp

SYN, SYNACK, ACK, PSH, FIN, RST = 0x02, 0x12, 0x10, 0x18, 0x11, 0x04


def addr(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def frame(src: str, sport: int, dst: str, dport: int, flags: int | None = ACK, payload: bytes = b"",
          proto: int = 6, vlans: tuple[int, ...] = ()) -> bytes:
    """flags=None means UDP (or the ICMP-free raw ``proto``)."""
    l4 = tcp(sport, dport, flags, payload) if proto == 6 and flags is not None else udp(sport, dport, payload)
    p = 6 if proto == 6 and flags is not None else 17
    s, d = addr(src), addr(dst)
    ip = ipv6(s, d, p, l4) if len(s) == 16 else ipv4(s, d, p, l4)
    return ether(ip, vlans)


def feed(table: SessionTable, raw: bytes, ts: float = 1.0) -> None:
    d = decode(raw, 0, len(raw))
    table.stats.count(d)
    assert isinstance(d, Decoded), d
    table.packet(d, ts, raw)


def only(table: SessionTable, now: float = 100.0) -> Any:
    report = table.collect(now)
    assert len(report.sessions) == 1, report.sessions
    return report.sessions[0]


C, S = "10.0.0.1", "10.0.0.2"


class Recorder:
    """A stand-in Inspector that records what it was fed and decides after ``need`` payloads."""

    made: list[Recorder] = []

    def __init__(self, l4: str, client_port: int, server_port: int, need: int = 2) -> None:
        self.args = (l4, client_port, server_port)
        self.fed: list[tuple[bool, bytes]] = []
        self.finished = False
        self.need = need
        self.app = "unknown"
        self.metadata: dict[str, Any] = {}
        self.threats: list[Threat] = []
        Recorder.made.append(self)

    def feed(self, from_client: bool, payload: bytes, ts: float = 0.0) -> bool:
        self.fed.append((from_client, payload))
        if len(self.fed) >= self.need:
            self.app = "redis"
            self.metadata = {"redis": {"cmd": "PING"}}
            self.threats = [Threat("sqlinjection", "' or 1=1", "test")]
            return True
        return False

    def finish(self) -> None:
        self.finished = True

    def waits(self, now: float) -> bool:
        return False


@pytest.fixture
def table() -> SessionTable:
    Recorder.made = []
    return SessionTable(inspector_factory=Recorder)


def test_syn_decides_client(table: SessionTable) -> None:
    feed(table, frame(S, 6379, C, 40000, SYN))  # even "backwards" ports: the SYN sender is the client
    d = only(table)
    assert (d.client_text, d.server_text, d.state) == ("10.0.0.2:6379", "10.0.0.1:40000", "syn_sent")


def test_synack_seen_first_decides_client(table: SessionTable) -> None:
    feed(table, frame(S, 80, C, 40000, SYNACK))
    d = only(table)
    assert (d.client_text, d.server_text, d.state) == ("10.0.0.1:40000", "10.0.0.2:80", "syn_recv")


@pytest.mark.parametrize("query_ts", [1.0, 2.0], ids=["older", "same-timestamp"])
def test_a_udp_query_read_after_its_answer_still_opens_the_session(table: SessionTable, query_ts: float) -> None:
    feed(table, frame(S, 53, C, 40000, None, b"answer"), ts=2.0)  # the answer's ring is read first
    assert not only(table, 2.5).opened
    feed(table, frame(C, 40000, S, 53, None, b"query"), ts=query_ts)
    d = only(table, 2.6)
    assert not d.new  # the same session: its opening came late
    assert d.opened and (d.client_text, d.server_text) == ("10.0.0.1:40000", "10.0.0.2:53")


def test_a_packet_read_late_from_another_ring_keeps_first_before_last(table: SessionTable) -> None:
    feed(table, frame(S, 80, C, 40000, SYNACK), ts=2.0)  # the server's ring is read first
    feed(table, frame(C, 40000, S, 80, SYN), ts=1.0)
    d = only(table)
    assert (d.first_seen, d.last_seen) == (1.0, 2.0)


@pytest.mark.parametrize("sport,dport,server", [
    (443, 40000, 443),  # well-known
    (40000, 5432, 5432),  # known service above 1024
    (40000, 33000, 33000),  # neither: the lower port serves
    (22, 80, 22),  # both well-known: the lower port serves
])
def test_mid_stream_tcp_by_ports(table: SessionTable, sport: int, dport: int, server: int) -> None:
    feed(table, frame(C, sport, S, dport, ACK))
    d = only(table)
    assert d.server_port == server and d.state == "open"


def test_udp_first_packet_decides(table: SessionTable) -> None:
    feed(table, frame(C, 40000, S, 33333, None, b"x"))
    assert only(table).client_text == "10.0.0.1:40000"


@pytest.mark.parametrize("sport,dport,client", [(53, 40000, 40000), (123, 80, 80), (67, 68, 68)])
def test_udp_reply_seen_first(table: SessionTable, sport: int, dport: int, client: int) -> None:
    feed(table, frame(S, sport, C, dport, None, b"x"))
    assert only(table).client_port == client


def test_icmp_echo_reply_first() -> None:
    table = SessionTable()
    icmp = bytes([0, 0, 0, 0, 0, 9, 0, 1])  # echo reply, id 9
    raw = ether(ipv4(addr(S), addr(C), 1, icmp))
    feed(table, raw)
    d = only(table)
    assert d.l4 == "icmp" and d.client == addr(C) and d.app == "unknown"


def test_dst_is_server_ties() -> None:
    assert dst_is_server(40000, 80) and not dst_is_server(80, 40000)
    assert dst_is_server(5000, 5000)


def test_counting_rules_ipv4_and_ipv6(table: SessionTable) -> None:
    feed(table, frame(C, 40000, S, 80, SYN))
    feed(table, frame(S, 80, C, 40000, SYNACK))
    feed(table, frame(C, 40000, S, 80, PSH, b"x" * 100))
    d = only(table)
    assert (d.packets_c2s, d.packets_s2c, d.bytes_c2s, d.bytes_s2c) == (2, 1, 40 + 140, 40)
    feed(table, frame("fd00::1", 5000, "fd00::2", 53, None, b"q" * 10))
    d6 = [s for s in table.collect(200.0).sessions if s.l4 == "udp"][0]
    assert d6.bytes_c2s == 40 + 8 + 10 and d6.client_text == "[fd00::1]:5000"


def test_snaplen_cut_frame_counts_ip_length(table: SessionTable) -> None:
    raw = frame(C, 40000, S, 80, PSH, b"x" * 1400)
    d = decode(raw, 0, 96)
    assert isinstance(d, Decoded)
    table.packet(d, 1.0, raw)
    assert only(table).bytes_c2s == 1440


def test_vlan_separates_sessions(table: SessionTable) -> None:
    feed(table, frame(C, 40000, S, 80, SYN, vlans=(10,)))
    feed(table, frame(C, 40000, S, 80, SYN, vlans=(20,)))
    feed(table, frame(C, 40000, S, 80, SYN))
    assert sorted(d.vlan for d in table.collect(2.0).sessions) == [0, 10, 20]


def test_tcp_states(table: SessionTable) -> None:
    steps = [((C, 40000, S, 80, SYN), SYN_SENT), ((S, 80, C, 40000, SYNACK), SYN_RECV),
             ((C, 40000, S, 80, ACK), OPEN), ((C, 40000, S, 80, FIN), CLOSING),
             ((S, 80, C, 40000, FIN), CLOSED)]
    for args, state in steps:
        feed(table, frame(*args))
        assert next(iter(table.sessions.values())).state == state
    table.expire(1.0 + Timeouts().tcp_closed)
    d = only(table)
    assert d.closed and d.end_reason == "fin" and len(table) == 0


def test_rst_closes(table: SessionTable) -> None:
    feed(table, frame(C, 40000, S, 80, SYN))
    feed(table, frame(S, 80, C, 40000, RST | ACK))
    assert next(iter(table.sessions.values())).state == CLOSED
    table.expire(10.0)
    assert only(table).end_reason == "rst"


def test_reuse_after_close_is_a_new_session(table: SessionTable) -> None:
    for args in [(C, 40000, S, 80, SYN), (S, 80, C, 40000, SYNACK), (C, 40000, S, 80, FIN), (S, 80, C, 40000, FIN)]:
        feed(table, frame(*args))
    feed(table, frame(C, 40000, S, 80, SYN), ts=2.0)
    deltas = table.collect(3.0).sessions
    assert [(d.closed, d.end_reason, d.packets_c2s, d.opened) for d in deltas] == [
        (True, "reused", 2, True), (False, "", 1, True)]
    assert table.health().created == 2


def test_a_session_opens_once_with_the_clients_syn(table: SessionTable) -> None:
    feed(table, frame(C, 40000, S, 80, SYN))
    feed(table, frame(C, 40000, S, 80, SYN))  # a retransmission
    first = only(table, 1.0)
    assert first.new and first.opened
    feed(table, frame(S, 80, C, 40000, SYNACK))
    assert not only(table, 2.0).opened


def test_a_syn_read_after_the_synack_still_opens_once(table: SessionTable) -> None:
    feed(table, frame(S, 80, C, 40000, SYNACK))
    feed(table, frame(S, 80, C, 40000, ACK))
    first = only(table, 1.0)
    assert first.new and not first.opened  # as the reply half of a DNAT'd connection stays
    feed(table, frame(C, 40000, S, 80, SYN))  # the client's ring, read late
    feed(table, frame(C, 40000, S, 80, SYN))
    second = only(table, 2.0)
    assert not second.new and second.opened
    feed(table, frame(C, 40000, S, 80, SYN))
    assert not only(table, 3.0).opened


@pytest.mark.parametrize("raw,opened", [
    (frame(C, 40000, S, 80, ACK), False),  # picked up mid-stream (a dp restart): counted before
    (frame(C, 40000, S, 53, None, b"x"), True),
    (ether(ipv4(addr(C), addr(S), 1, bytes([8, 0, 0, 0, 0, 9, 0, 1]))), True),  # echo request
], ids=["tcp-mid-stream", "udp", "icmp"])
def test_what_opens_a_session(table: SessionTable, raw: bytes, opened: bool) -> None:
    feed(table, raw)
    d = only(table, 1.0)
    assert d.new and d.opened == opened


def test_idle_timeouts_are_per_protocol() -> None:
    t = SessionTable(timeouts=Timeouts(udp=30.0, tcp_open=100.0))
    feed(t, frame(C, 40000, S, 53, None, b"x"), ts=0.0)
    feed(t, frame(C, 40001, S, 80, ACK), ts=0.0)
    assert t.expire(29.0) == 0
    assert t.expire(31.0) == 1 and len(t) == 1
    assert t.expire(101.0) == 1 and len(t) == 0
    assert t.health().expired == 2


def test_no_timeouts_offline() -> None:
    t = SessionTable(timeouts=None)
    feed(t, frame(C, 40000, S, 53, None, b"x"), ts=0.0)
    assert t.expire(1e9) == 0 and len(t) == 1


def test_bound_evicts_the_oldest_idle() -> None:
    t = SessionTable(max_sessions=3)
    for i in range(3):
        feed(t, frame(C, 40000 + i, S, 80, SYN), ts=float(i))
    feed(t, frame(C, 40000, S, 80, ACK), ts=5.0)  # 40000 is seen again: 40001 is now the oldest idle
    feed(t, frame(C, 40010, S, 80, SYN), ts=6.0)
    ports = sorted(s.endpoints()[1] for s in t.sessions.values())
    assert ports == [40000, 40002, 40010] and t.evicted == 1
    evicted = [d for d in t.collect(7.0).sessions if d.closed]
    assert [(d.client_port, d.end_reason) for d in evicted] == [(40001, "evicted")]


def test_deltas_between_reports(table: SessionTable) -> None:
    feed(table, frame(C, 40000, S, 80, SYN))
    first = only(table, 1.0)
    assert first.new and first.packets_c2s == 1
    assert table.collect(2.0).sessions == []  # nothing changed
    feed(table, frame(S, 80, C, 40000, SYNACK))
    feed(table, frame(S, 80, C, 40000, ACK))
    second = only(table, 3.0)
    assert not second.new and (second.packets_c2s, second.packets_s2c, second.bytes_s2c) == (0, 2, 80)
    health = table.collect(4.0).health
    assert health.sessions == 1 and health.packets == 3 and health.decoded == 3


def test_slow_path_feeds_until_done_then_never_again(table: SessionTable) -> None:
    feed(table, frame(C, 40000, S, 6379, SYN))
    feed(table, frame(C, 40000, S, 6379, PSH, b"PING\r\n"))
    feed(table, frame(S, 6379, C, 40000, PSH, b"+PONG\r\n"))
    feed(table, frame(C, 40000, S, 6379, PSH, b"PING\r\n"))
    insp = Recorder.made[0]
    assert insp.args == ("tcp", 40000, 6379)
    assert insp.fed == [(True, b"PING\r\n"), (False, b"+PONG\r\n")]
    d = only(table)
    assert d.app == "redis" and d.app_decided and d.metadata == {"redis": {"cmd": "PING"}}
    assert d.threats[0].name == "sqlinjection"
    feed(table, frame(C, 40000, S, 6379, PSH, b"PING\r\n"))
    later = only(table)
    assert later.app == "redis" and not later.app_decided and later.metadata is None


def test_undecided_session_is_finished_at_its_end(table: SessionTable) -> None:
    feed(table, frame(C, 40000, S, 6379, PSH, b"x"))
    table.close_all()
    assert Recorder.made[0].finished
    d = only(table)
    assert d.closed and d.end_reason == "end"


def test_feed_limit_stops_the_slow_path() -> None:
    t = SessionTable(inspector_factory=lambda l4, c, s: Recorder(l4, c, s, need=1000), feed_limit=3)
    Recorder.made = []
    for _ in range(10):
        feed(t, frame(C, 40000, S, 9999, PSH, b"y"))
    assert len(Recorder.made[0].fed) == 3 and Recorder.made[0].finished


def test_inspector_exception_is_counted_not_raised() -> None:
    class Broken(Recorder):
        def feed(self, from_client: bool, payload: bytes, ts: float = 0.0) -> bool:
            raise RuntimeError("detector bug")

    t = SessionTable(inspector_factory=Broken)
    feed(t, frame(C, 40000, S, 80, PSH, b"GET /"))
    feed(t, frame(C, 40000, S, 80, PSH, b"GET /"))
    assert t.inspector_errors == 1 and only(t).app == "unknown"


def test_no_inspector_for_non_tcp_udp() -> None:
    made: list[object] = []
    t = SessionTable(inspector_factory=lambda *a: made.append(a))  # type: ignore[arg-type,func-returns-value]
    icmp = bytes([8, 0, 0, 0, 0, 9, 0, 1]) + b"ping payload"
    feed(t, ether(ipv4(addr(C), addr(S), 1, icmp)))
    assert made == []


def test_syn_flood_stays_bounded() -> None:
    t = SessionTable(max_sessions=100, max_pending=50)
    for i in range(1000):
        feed(t, frame(C, 1024 + i, S, 80, SYN), ts=i * 1e-3)
    assert len(t) == 100 and t.evicted == 900 and t.created == 1000
    assert len(t._dirty) <= 150  # what the next report holds is bounded too
    report = t.collect(1.0)
    closed = [d for d in report.sessions if d.closed]
    assert len(closed) == 50 and all(d.end_reason == "evicted" for d in closed)
    assert report.health.unreported == 850 and report.health.sessions == 100
    # Sessions already reported once are always reported when they end, whatever the bound.
    for i in range(200):
        feed(t, frame(C, 30000 + i, S, 80, SYN), ts=2.0)
    assert sum(d.closed for d in t.collect(3.0).sessions) >= 100


def test_a_session_younger_than_the_hold_waits_for_the_next_report(table: SessionTable) -> None:
    """Its DNS answer, older, may still be in another ring's unretired block: report in order."""
    feed(table, frame(C, 40000, S, 80, SYN), ts=10.00)
    feed(table, frame(C, 40001, S, 80, SYN), ts=10.95)
    first = table.collect(11.0, hold=0.1).sessions
    assert [d.client_port for d in first] == [40000]
    second = table.collect(11.5, hold=0.1).sessions
    assert [(d.client_port, d.new, d.opened) for d in second] == [(40001, True, True)]


def test_a_dns_5_tuple_used_again_after_a_pause_is_inspected_again() -> None:
    """A resolver can pick the same source port again: each lookup's answer names a server."""
    from tests.dp.test_detection import _dns_answer, _dns_query

    table = SessionTable()  # the real detectors
    for i, ts in ((7, 1.0), (8, 5.0)):
        feed(table, frame(C, 40000, S, 53, None, _dns_query(i)), ts=ts)
        feed(table, frame(S, 53, C, 40000, None, _dns_answer(i)), ts=ts + 0.001)
        (d,) = table.collect(ts + 0.5).sessions
        assert d.app == "dns" and d.metadata["dns"]["answers"], (i, d)


def test_a_dnatd_dns_answer_names_its_address_in_the_next_report() -> None:
    """The query went to the DNS Service's ClusterIP, the answer comes from the pod: on the node
    they are two 5-tuples, and the answer's session never sees a client word. Its answer is read
    once the other rings had their time (the hold), not when the session expires."""
    from tests.dp.test_detection import _dns_answer, _dns_query

    table = SessionTable()  # the real detectors
    feed(table, frame(C, 40000, "10.96.0.10", 53, None, _dns_query(7)), ts=1.0)
    feed(table, frame(S, 53, C, 40000, None, _dns_answer(7)), ts=1.001)
    held = table.collect(1.05, hold=0.1).sessions  # too recent: another ring may still hold its client
    assert held == []
    by_server = {d.server: d for d in table.collect(1.2, hold=0.1).sessions}
    answer = by_server[addr(S)]
    assert answer.app == "dns" and answer.app_decided and answer.metadata["dns"]["answers"], answer
    assert by_server[addr("10.96.0.10")].app != "dns" or not by_server[addr("10.96.0.10")].metadata


@pytest.mark.parametrize("answer_first", [False, True], ids=["query-first", "answer-first"])
def test_each_lookup_on_a_reused_dns_5_tuple_opens_a_session(answer_first: bool) -> None:
    """Two lookups a pause apart on one source port are two sessions, whichever ring is read first."""
    from tests.dp.test_detection import _dns_answer, _dns_query

    table = SessionTable()
    opened = []
    for i, ts in ((7, 1.0), (8, 5.0)):
        packets = [(frame(C, 40000, S, 53, None, _dns_query(i)), ts),
                   (frame(S, 53, C, 40000, None, _dns_answer(i)), ts + 0.001)]
        for raw, when in reversed(packets) if answer_first else packets:
            feed(table, raw, ts=when)
        (d,) = table.collect(ts + 0.5).sessions
        opened.append(d.opened)
        assert d.app == "dns" and d.metadata["dns"]["answers"], (i, d)
    assert opened == [True, True]
    feed(table, frame(C, 40000, S, 53, None, _dns_query(9)), ts=5.2)  # the same lookup's next query
    assert not table.collect(6.0).sessions[0].opened
