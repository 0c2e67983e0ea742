"""The dp -> agent stream: framing, the never-blocking exporter, the agent's reader. No root needed."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

import pytest

from flowmap_dp import wire_pb2
from flowmap_dp.detectors.base import Threat
from flowmap_dp.exporting import (
    HEADER, KIND_CONTROL, KIND_REPORT, MAGIC, MAX_FRAME, Exporter, FrameDecoder, ReportReader, WireError, build_reports,
    frame,
)
from flowmap_dp.session import Health, Report, SessionDelta


def _report(seq: int, sessions: int = 1) -> wire_pb2.Report:
    r = wire_pb2.Report(sequence=seq, parts=1)
    for i in range(sessions):
        r.sessions.add(ip_proto=6, client_ip=bytes([10, 0, 0, 1]), client_port=40000 + i,
                       server_ip=bytes([10, 0, 0, 2]), server_port=80, bytes_c2s=100, packets_c2s=1)
    r.health.packets = seq
    return r


def _wait(cond: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def _collect(reader: ReportReader, n: int, timeout: float = 5.0) -> list[wire_pb2.Report]:
    """The first ``n`` reports (then 50 ms more, to catch any extra one)."""
    got: list[wire_pb2.Report] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got += reader.poll(0.05)
    return got + reader.poll(0.05)


def test_header_is_documented_layout() -> None:
    data = frame(KIND_REPORT, b"xyz")
    assert data[:4] == b"FMDP"
    assert struct.unpack(">HHI", data[4:12]) == (1, KIND_REPORT, 3)
    assert data[12:] == b"xyz" and HEADER.size == 12


def test_decoder_reassembles_byte_by_byte() -> None:
    payload = _report(7, sessions=3).SerializeToString()
    data = frame(KIND_REPORT, payload) + frame(KIND_CONTROL, b"")
    dec = FrameDecoder()
    frames = [f for i in range(len(data)) for f in dec.feed(data[i : i + 1])]
    assert frames == [(KIND_REPORT, payload), (KIND_CONTROL, b"")]


@pytest.mark.parametrize("bad", [
    b"XXXX" + struct.pack(">HHI", 1, 1, 0),
    MAGIC + struct.pack(">HHI", 2, 1, 0),
    MAGIC + struct.pack(">HHI", 1, 1, MAX_FRAME + 1),
])
def test_decoder_rejects_garbage(bad: bytes) -> None:
    with pytest.raises(WireError):
        FrameDecoder().feed(bad)


def test_reports_flow_and_control_comes_back(tmp_path: Path) -> None:
    path = str(tmp_path / "agent.sock")
    reader = ReportReader(path)
    reader.set_interfaces(["eth9", "eth7"])
    exporter = Exporter(path).start()
    try:
        for seq in range(1, 4):
            assert exporter.offer(_report(seq))
        assert [r.sequence for r in _collect(reader, 3)] == [1, 2, 3]
        _wait(lambda: not exporter.controls.empty())
        assert list(exporter.controls.get().interfaces) == ["eth9", "eth7"]
        # A change reaches connected workers too.
        reader.set_interfaces(["eth1"])
        _wait(lambda: not exporter.controls.empty())
        assert list(exporter.controls.get().interfaces) == ["eth1"]
    finally:
        exporter.stop()
        reader.close()


def test_reports_wait_for_the_agent_and_only_an_overflow_is_lost(tmp_path: Path) -> None:
    path = str(tmp_path / "agent.sock")
    exporter = Exporter(path, queue_size=2, max_backoff=0.05).start()
    reader = None
    try:
        # No agent yet: the writer holds one report, the queue two more, the rest is dropped.
        offered = [exporter.offer(_report(seq, sessions=5)) for seq in range(1, 7)]
        kept = [seq for seq, ok in zip(range(1, 7), offered, strict=True) if ok]
        assert 2 <= len(kept) <= 3 and exporter.lost_reports == offered.count(False)
        reader = ReportReader(path)
        got = _collect(reader, len(kept))
        assert [r.sequence for r in got] == kept  # in order, nothing sent twice
        assert (got[-1].health.lost_reports, got[-1].health.lost_sessions) == (6 - len(kept), 5 * (6 - len(kept)))
    finally:
        exporter.stop()
        if reader:
            reader.close()


def test_offer_never_blocks_when_the_writer_is_stuck(tmp_path: Path) -> None:
    # An agent that accepts but never reads: the socket buffer fills, then the queue, then offers fail fast.
    path = str(tmp_path / "agent.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    exporter = Exporter(path, queue_size=2, send_timeout=30.0).start()
    try:
        big = _report(0, sessions=5000)
        t0 = time.monotonic()
        results = [exporter.offer(big) for _ in range(200)]
        assert time.monotonic() - t0 < 1.0
        assert not all(results)
        assert exporter.lost_reports >= results.count(False)
    finally:
        listener.close()  # unblocks the writer (broken pipe)
        exporter.stop(timeout=2.0)


def test_reader_drops_a_connection_that_sends_garbage(tmp_path: Path) -> None:
    path = str(tmp_path / "agent.sock")
    reader = ReportReader(path)
    try:
        bad = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bad.connect(path)
        bad.sendall(b"GET / HTTP/1.1\r\n\r\n")
        list(reader.reports(timeout=0.3))
        assert reader.rejected == 1 and reader.connections == 0
        bad.close()
    finally:
        reader.close()


def _delta(i: int, **kw: object) -> SessionDelta:
    base: dict[str, object] = dict(
        l4="udp", proto=17, vlan=0, client=bytes([10, 0, 0, 1]), client_port=5000 + i, server=bytes([10, 0, 0, 53]),
        server_port=53, first_seen=1.5, last_seen=2.5, new=True, opened=True, closed=False, end_reason="",
        state="open", app="dns", app_decided=False, packets_c2s=1, packets_s2c=1, bytes_c2s=60, bytes_s2c=90)
    base.update(kw)
    return SessionDelta(**base)  # type: ignore[arg-type]


def test_build_reports_splits_parts_and_carries_dns_threats_health() -> None:
    deltas = [_delta(i) for i in range(5)]
    # The shape flowmap_dp.detectors.dns.extract() produces.
    deltas[0] = _delta(0, app_decided=True, metadata={"dns": {"qname": "a.example", "answers": [
        {"name": "a.example", "type": "A", "data": "192.0.2.7", "ttl": 30},
        {"name": "a.example", "type": "AAAA", "data": "2001:db8::1", "ttl": 30},
        {"name": "a.example", "type": "CNAME", "data": "b.example", "ttl": 60}]}})
    deltas[1] = _delta(1, app="http", app_decided=True, metadata={"http": {"host": "x", "status": 200}},
                       threats=[Threat("sqlinjection", "' OR 1=1", "http.query")])
    health = Health(10, 9, {"truncated_ip": 1}, {"not_ip": 0}, 5, 5, 0, 0, 0, 0)
    rep = Report(3.0, deltas, health)
    h = wire_pb2.Health(packets=10)
    parts = build_reports(rep, run_id=9, worker=1, workers=2, sequence=4, start=2.0, health=h, part_size=2)
    assert [p.part for p in parts] == [0, 1, 2] and {p.parts for p in parts} == {3}
    assert sum(len(p.sessions) for p in parts) == 5
    assert not parts[0].HasField("health") and parts[-1].health.packets == 10
    s0 = parts[0].sessions[0]
    assert (s0.client_port, s0.server_port, s0.app, s0.new, s0.opened, s0.first_seen_ns) == (
        5000, 53, "dns", True, True, 1_500_000_000)
    assert dict(parts[0].sessions[1].metadata) == {"http.host": "x", "http.status": "200"}
    assert parts[0].sessions[0].metadata["dns.qname"] == "a.example"
    assert parts[1].sessions[0].app == ""  # undecided: no label yet
    dns = parts[-1].dns
    assert [(a.type, a.address, a.target, a.ttl) for a in dns] == [
        ("A", bytes([192, 0, 2, 7]), "", 30), ("AAAA", bytes.fromhex("20010db8" + "0" * 23 + "1"), "", 30),
        ("CNAME", b"", "b.example", 60)]
    t = parts[-1].threats[0]
    assert (t.threat, t.app, t.where, t.server_port) == ("sqlinjection", "http", "http.query", 53)
    assert all(p.run_id == 9 and p.worker == 1 and p.sequence == 4 for p in parts)


@pytest.mark.parametrize("saved", [True, False])
def test_an_agent_restart_loses_nothing(tmp_path: Path, saved: bool) -> None:
    """What waits in the queue goes to the next agent, and so does what the last one read but
    never acknowledged (it died before saving it)."""
    path = str(tmp_path / "agent.sock")
    reader = ReportReader(path)
    exporter = Exporter(path, max_backoff=0.05).start()
    try:
        first = _report(1)
        first.run_id, first.worker = 77, 0
        exporter.offer(first)
        assert [r.sequence for r in _collect(reader, 1)] == [1]
        if saved:
            reader.ack({0: (77, 1)})
            _wait(lambda: not exporter._unacked)
        reader.close()  # the agent restarts
        _wait(lambda: exporter._sock is None)  # the control reader saw EOF
        for seq in (2, 3):  # nobody listening: they wait
            report = _report(seq, sessions=3)
            report.run_id = 77
            exporter.offer(report)
        time.sleep(0.2)
        reader = ReportReader(path)
        assert [r.sequence for r in _collect(reader, 2 if saved else 3)] == ([2, 3] if saved else [1, 2, 3])
        assert exporter.lost_reports == 0 and exporter.connects == 2
    finally:
        exporter.stop()
        reader.close()


def test_stopping_without_an_agent_drops_and_counts_what_waits(tmp_path: Path) -> None:
    exporter = Exporter(str(tmp_path / "nobody.sock"), max_backoff=0.05).start()
    exporter.offer(_report(1, sessions=2))
    exporter.stop(timeout=0.5)
    assert (exporter.lost_reports, exporter.lost_sessions) == (1, 2)


def test_queue_is_bounded_by_session_records_too(tmp_path: Path) -> None:
    exporter = Exporter(str(tmp_path / "nobody.sock"), queue_size=100, queue_sessions=10)  # writer not started
    assert exporter.offer(_report(1, sessions=6))
    assert not exporter.offer(_report(2, sessions=6))  # 12 records would exceed 10
    assert exporter.offer(_report(3, sessions=4))
    assert (exporter.lost_reports, exporter.lost_sessions) == (1, 6)
