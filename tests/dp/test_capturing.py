"""Captures on demand: the recorder's bounds on made-up packets, then real UDP between two pod
namespaces captured on the node's veths, the file read back and compared with what was sent."""

from __future__ import annotations

import hashlib
import io
import ipaddress
import socket
import time
from pathlib import Path

import pytest

from flowmap_devenv.netns import netns
from flowmap_dp.capturing import (LATE_TRIGGER, WINDOW_BYTES, Captures, DiskBudget, Recorder, Spec, State, StopReason,
                                  Target)
from flowmap_dp.filtering import Filter
from flowmap_dp.pcapfile import read_records
from tests.dp.test_capture import _udp as echo
from tests.dp.test_live import A4, B4, Node, node  # noqa: F401 (the fixture)

FRAME = bytes(range(200))


def _records(raw: bytes) -> list[tuple[float, int, int]]:
    path = Path("/dev/shm") / f"fm-capturing-{time.monotonic_ns()}.pcapng"
    path.write_bytes(raw)
    try:
        return [(r.ts, len(r.data), r.wire_len) for r in read_records(path)]
    finally:
        path.unlink()


def _recorder(now: float = 1000.0, budget: int = 1 << 30, **kw: float) -> tuple[Recorder, io.BytesIO]:
    out = io.BytesIO()
    spec = Spec("ns/c/uid", (Target("veth0", "ns/web web-0"),), **kw)  # type: ignore[arg-type]
    return Recorder(spec, out, DiskBudget(budget), now), out


def test_each_bound_stops_the_capture_once_with_its_reason() -> None:
    r, out = _recorder(max_packets=5, snaplen=128)
    for i in range(9):
        r.offer(0, 10**12 + i, FRAME[:128], 200, 1000.0)
    assert (r.state, r.reason, r.packets, r.bytes) == (State.DONE, StopReason.MAX_PACKETS, 5, 5 * 128)
    assert [n for _, n, _ in _records(out.getvalue())] == [128] * 5
    r, out = _recorder(max_bytes=1024, snaplen=128)
    for i in range(20):
        r.offer(0, i, FRAME[:128], 200, 1000.0)
    assert r.reason is StopReason.MAX_BYTES and r.writer.size == len(out.getvalue()) <= 1024
    header = len(out.getvalue()) - 160 * r.packets  # every block of 128 captured bytes is 160 bytes
    assert len(_records(out.getvalue())) == r.packets == (1024 - header) // 160
    r, out = _recorder(budget=600, snaplen=128)
    for i in range(20):
        r.offer(0, i, FRAME[:128], 200, 1000.0)
    assert r.reason is StopReason.DISK_FULL and len(out.getvalue()) <= 600
    r, _ = _recorder(duration=2)
    r.tick(1001.9)
    assert r.active
    r.tick(1002.0)
    assert (r.state, r.reason) == (State.DONE, StopReason.DURATION)
    r.stop(StopReason.STOPPED)
    assert r.reason is StopReason.DURATION  # the first reason stays


def test_an_armed_capture_keeps_its_window_and_runs_from_the_trigger() -> None:
    r, out = _recorder(armed=True, pre_trigger=2, duration=3, snaplen=128)
    for t in range(20):  # one packet a second, stamped as the kernel does (wall clock)
        r.offer(0, (1000 + t) * 10**9, FRAME[:100], 100, 1000.0 + t)
    # Kept: pre_trigger seconds, and LATE_TRIGGER more for a trigger heard of late.
    assert r.state is State.ARMED and r.packets == 0 and len(r.window) == 2 + LATE_TRIGGER + 1  # 1007 .. 1019
    r.tick(1020.5)
    assert len(r.window) == 11  # 1009 .. 1019
    r.fire(1020.5, at=1015.5)  # it happened five seconds before the dp was told
    r.offer(0, 1021 * 10**9, FRAME[:100], 100, 1021.0)
    assert [round(ts) for ts, _, _ in _records(out.getvalue())] == [1014, 1015, 1016, 1017, 1018, 1019, 1021]
    r.tick(1018.4)
    assert r.active
    r.tick(1018.5)  # three seconds after the trigger happened, not after the start, nor the telling
    assert r.reason is StopReason.DURATION
    # The window never holds more than the file has room for.
    r, _ = _recorder(armed=True, pre_trigger=30, max_bytes=2048, snaplen=128)
    for t in range(100):
        r.offer(0, 1000 * 10**9 + t, FRAME[:128], 200, 1000.0)
    assert r.window_bytes <= 2048 - r.writer.size and len(r.window) == (2048 - r.writer.size) // 160
    # Nor more than WINDOW_BYTES, however large the file may grow.
    r, _ = _recorder(armed=True, pre_trigger=30, max_bytes=100 << 20, snaplen=1024)
    big = FRAME * (1024 // len(FRAME) + 1)
    for t in range(WINDOW_BYTES // 1024 + 100):
        r.offer(0, 1000 * 10**9 + t, big[:1024], 1500, 1000.0)
    assert WINDOW_BYTES - 1100 < r.window_bytes <= WINDOW_BYTES


def test_an_armed_capture_without_a_window_writes_from_the_trigger_on() -> None:
    r, out = _recorder(armed=True, pre_trigger=0, duration=3, snaplen=128)
    for t in range(5):
        r.offer(0, (1000 + t) * 10**9, FRAME[:100], 100, 1000.0 + t)
    assert r.state is State.ARMED
    r.fire(1005.0, at=1003.5)
    r.offer(0, 1006 * 10**9, FRAME[:100], 100, 1006.0)
    assert [round(ts) for ts, _, _ in _records(out.getvalue())] == [1004, 1006]
    # Told when it happened: never later than now, never earlier than what the window may hold.
    for at, first in ((None, 1006), (2000.0, 1006), (900.0, 1000)):
        r, out = _recorder(armed=True, pre_trigger=0, duration=30, snaplen=128)
        for t in range(6):
            r.offer(0, (1000 + t) * 10**9, FRAME[:100], 100, 1000.0 + t)
        r.fire(1005.5, at=at)
        r.offer(0, 1006 * 10**9, FRAME[:100], 100, 1006.0)
        assert round(_records(out.getvalue())[0][0]) == first
    with pytest.raises(ValueError, match="armed"):
        _recorder(pre_trigger=5)  # a window is kept for a trigger only


def _udp(node: Node, sizes: list[int], port: int = 5353) -> None:
    """Datagrams from pod-a to pod-b's ``port``, each echoed at half its size, then noise the
    filter leaves out: a datagram to another port."""
    echo(node.pod_a, node.pod_b, socket.AF_INET, B4, port, sizes)
    with netns(node.pod_a):
        noise = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with noise:
        noise.sendto(b"n" * 300, (B4, port + 1))


def _run(captures: Captures, until: float) -> None:
    while time.time() < until and any(c.recorder.active for c in captures.captures.values()):
        captures.poll(time.time())
        time.sleep(0.02)


SIZES = [1, 50, 100, 500, 1000, 1400]
UDP5353 = (Filter(peers=(ipaddress.ip_network("10.62.0.0/16"),), protocol=17, port=5353),)


def test_the_file_holds_exactly_the_selected_packets(node: Node, tmp_path: Path) -> None:
    with netns(node.node):
        captures = Captures(tmp_path, DiskBudget(1 << 24))
        spec = Spec("default/web/u1", (Target(node.host_a, "default/a pod-a"), Target(node.host_b, "default/b pod-b")),
                    UDP5353, snaplen=128, duration=30)
        captures.start(spec, time.time())
    _udp(node, SIZES)
    _run(captures, time.time() + 1.0)
    captures.close()
    (result,) = captures.results()
    raw = Path(result.path).read_bytes()
    assert result.state is State.DONE and result.reason is StopReason.STOPPED and result.drops == 0
    assert result.sha256 == hashlib.sha256(raw).hexdigest() and result.file_bytes == len(raw)
    got = sorted((n, wire) for _, n, wire in _records(raw))
    # Each datagram and its answer cross both veths: Ethernet 14 + IP 20 + UDP 8 + payload.
    wire = [14 + 28 + s for s in SIZES] + [14 + 28 + s // 2 for s in SIZES]
    assert got == sorted((min(128, w), w) for w in wire * 2)
    assert result.packets == 4 * len(SIZES) and result.bytes == sum(n for n, _ in got)


def test_bounds_and_the_cap_on_live_traffic(node: Node, tmp_path: Path) -> None:
    with netns(node.node):
        captures = Captures(tmp_path, DiskBudget(1 << 24), max_captures=2)
        few = captures.start(Spec("d/few/u", (Target(node.host_a),), UDP5353, max_packets=5), time.time())
        short = captures.start(Spec("d/short/u", (Target(node.host_b),), UDP5353, duration=0.5), time.time())
        over = captures.start(Spec("d/over/u", (Target(node.host_b),), UDP5353), time.time())
    assert few.state is short.state is State.RUNNING
    assert (over.state, over.reason) == (State.FAILED, StopReason.NODE_LIMIT)
    _udp(node, SIZES)
    _run(captures, time.time() + 3.0)
    results = {r.id: r for r in captures.results()}
    assert results["d/few/u"].reason is StopReason.MAX_PACKETS and results["d/few/u"].packets == 5
    assert len(_records(Path(results["d/few/u"].path).read_bytes())) == 5
    assert results["d/short/u"].reason is StopReason.DURATION and results["d/short/u"].packets == 2 * len(SIZES)


def test_a_fired_capture_holds_the_packets_from_before_the_trigger(node: Node, tmp_path: Path) -> None:
    with netns(node.node):
        captures = Captures(tmp_path, DiskBudget(1 << 24))
        captures.start(Spec("d/armed/u", (Target(node.host_a),), UDP5353, armed=True, pre_trigger=5, duration=30), time.time())
    (capture,) = captures.captures.values()
    _udp(node, SIZES[:3])
    _run(captures, time.time() + 0.5)
    assert capture.recorder.state is State.ARMED and capture.recorder.packets == 0
    fired = time.time()
    capture.fire(fired)
    _udp(node, SIZES[3:])
    _run(captures, time.time() + 0.5)
    captures.close()
    records = _records(Path(capture.result().path).read_bytes())
    before = [wire for ts, _, wire in records if ts < fired]
    after = [wire for ts, _, wire in records if ts >= fired]
    assert sorted(before) == sorted([42 + s for s in SIZES[:3]] + [42 + s // 2 for s in SIZES[:3]])
    assert sorted(after) == sorted([42 + s for s in SIZES[3:]] + [42 + s // 2 for s in SIZES[3:]])
