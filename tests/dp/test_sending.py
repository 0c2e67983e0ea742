"""The dp -> agent stream: framing, the never-blocking exporter, the agent's reader. No root needed."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import struct
import threading
import time
from pathlib import Path

import pytest

from flowmap_agent.listening import RECV_BYTES, ReportReader
from flowmap_dp import wire_pb2
from flowmap_dp.detectors.base import Threat
from flowmap_dp.sending import Exporter
from flowmap_dp.framing import HEADER, KIND_CONTROL, KIND_REPORT, MAGIC, MAX_FRAME, FrameDecoder, WireError, frame
from flowmap_dp.reporting import build_reports
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


# -- whoever connects: the reader stays up and holds boundedly much ----------------------------

def _connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    return s


def test_a_frame_whose_body_is_not_a_report_closes_that_connection_only(tmp_path: Path) -> None:
    path = str(tmp_path / "agent.sock")
    reader = ReportReader(path)
    exporter = Exporter(path).start()
    try:
        _wait(lambda: bool(reader.poll(0.01)) or reader.connections == 1)
        bad = _connect(path)
        bad.sendall(frame(KIND_REPORT, b"\xff" * 32))  # 44 bytes: a valid header, a body no Report parses
        _wait(lambda: bool(reader.poll(0.01)) or reader.errors["payload"] == 1)
        assert reader.rejected == 1 and reader.connections == 1  # the dp's connection stays
        exporter.offer(_report(1))
        assert [r.sequence for r in _collect(reader, 1)] == [1]
        bad.close()
    finally:
        exporter.stop()
        reader.close()


def test_the_socket_is_its_owners_alone(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    reader = ReportReader(str(path))
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_ISSOCK(path.stat().st_mode)
    finally:
        reader.close()


def test_hostile_connections_hold_boundedly_many_bytes_and_a_dp_still_gets_through(tmp_path: Path) -> None:
    """8 connections announce the longest frame a reader takes and send all but its last byte; 8
    more announce 64 MiB (refused at the header). The reader holds at most its budget, closes the
    oldest stalled frames, and a dp's report still arrives."""
    path = str(tmp_path / "agent.sock")
    reader = ReportReader(path)
    rss0 = _rss()
    peers: list[socket.socket] = []

    def hostile(length: int, body: int) -> None:
        s = _connect(path)
        peers.append(s)
        with contextlib.suppress(OSError):  # the reader closes it: broken pipe
            s.sendall(HEADER.pack(MAGIC, 1, KIND_REPORT, length))
            chunk = b"\x00" * (1 << 20)
            for _ in range(body >> 20):
                s.sendall(chunk)

    writers = [threading.Thread(target=hostile, args=(MAX_FRAME, MAX_FRAME - (1 << 20)), daemon=True)
               for _ in range(8)]
    writers += [threading.Thread(target=hostile, args=(64 << 20, 0), daemon=True) for _ in range(8)]
    for w in writers:
        w.start()
    most = 0
    deadline = time.monotonic() + 60
    while any(w.is_alive() for w in writers) and time.monotonic() < deadline:
        reader.poll(0.05)
        most = max(most, reader.buffered)
    assert not any(w.is_alive() for w in writers)
    grew = _rss() - rss0
    print(f"hostile frames: at most {most / 2**20:.1f} MiB held for incomplete frames (budget "
          f"{reader.max_buffered / 2**20:.0f} MiB), resident memory grew {grew / 2**20:.1f} MiB; "
          f"closed: {dict(reader.errors)}")
    assert most <= reader.max_buffered + RECV_BYTES
    assert reader.errors["length"] == 8 and reader.errors["budget"] >= 4
    exporter = Exporter(path).start()
    try:
        exporter.offer(_report(1, sessions=1000))
        assert [r.sequence for r in _collect(reader, 1)] == [1]
    finally:
        exporter.stop()
        for s in peers:
            s.close()
        reader.close()


def test_connections_beyond_the_bound_are_refused_and_a_peer_that_does_not_read_is_closed(tmp_path: Path) -> None:
    path = str(tmp_path / "agent.sock")
    reader = ReportReader(path, max_connections=3)
    peers = [_connect(path) for _ in range(4)]
    try:
        _wait(lambda: bool(reader.poll(0.01)) or reader.errors["connections"] == 1)
        assert reader.connections == 3
        # A Control larger than a socket buffer: a dp reads it at once; these peers never read.
        reader.set_control(wire_pb2.Control(interfaces=[f"veth{i:010d}" for i in range(200_000)]))
        assert reader.errors["stalled"] == 3 and reader.connections == 0
    finally:
        for s in peers:
            s.close()
        reader.close()


def test_a_slow_reader_is_waited_for_a_stopped_one_is_not(tmp_path: Path) -> None:
    """The send timeout is for progress: a 3 MB report to a reader taking ~6 MB/s (0.5 s) goes on
    one connection with a 0.2 s timeout; a reader that stops gets the report on a new connection."""
    path = str(tmp_path / "agent.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    exporter = Exporter(path, send_timeout=0.2, max_backoff=0.05).start()
    report = _report(1, sessions=50_000)
    size = len(frame(KIND_REPORT, report.SerializeToString()))
    try:
        conn, _ = listener.accept()
        exporter.offer(report)
        got, started = 0, time.monotonic()
        while got < size:
            got += len(conn.recv(32768))
            time.sleep(0.005)
        assert time.monotonic() - started > 0.2 and exporter.connects == 1 and exporter.sent_reports == 1
        exporter.offer(_report(2, sessions=50_000))  # nobody reads now: the writer gives up on this connection
        again, _ = listener.accept()
        decoder, frames = FrameDecoder(), []
        while len(frames) < 2:  # on the new connection: what was not acknowledged, then the new one
            frames += decoder.feed(again.recv(1 << 20))
        assert [wire_pb2.Report.FromString(p).sequence for _, p in frames] == [1, 2]
        assert exporter.connects >= 2
        conn.close()
        again.close()
    finally:
        listener.close()
        exporter.stop(timeout=1.0)


def test_parts_stay_far_below_the_longest_frame_whatever_the_metadata() -> None:
    big = {"http": {"host": "h" * 1000, "path": "é" * 3000, "agent": "a" * 4000}}
    deltas = [_delta(i, app="http", app_decided=True, metadata=big) for i in range(3_000)]
    answers = [{"name": f"n{i}.example", "type": "A", "data": "192.0.2.7", "ttl": 30} for i in range(60_000)]
    deltas.append(_delta(9999, app_decided=True, metadata={"dns": {"answers": answers}}))
    health = Health(10, 9, {}, {}, 5, 5, 0, 0, 0, 0)
    parts = build_reports(Report(3.0, deltas, health), run_id=1, worker=0, workers=1, sequence=1, start=2.0,
                          health=wire_pb2.Health(packets=10), part_size=20_000)
    sizes = [p.ByteSize() for p in parts]
    assert len(parts) > 3 and max(sizes) <= MAX_FRAME // 2, sizes
    assert sum(len(p.sessions) for p in parts) == 3_001 and sum(len(p.dns) for p in parts) == 60_000
    assert [p.part for p in parts] == list(range(len(parts))) and {p.parts for p in parts} == {len(parts)}
    assert [p.HasField("health") for p in parts] == [False] * (len(parts) - 1) + [True]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
