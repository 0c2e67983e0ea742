"""The dp's reports reach the agent whole, once, within an interval, whatever their size and
whoever else connects to the socket; what is lost on the way is counted where the agent sees it.

The agent here is the real one (``Agent.open_dp`` and ``Agent.step``, its loop's work each
interval), delivering to a gRPC server that acknowledges everything; the dp is a process of its
own sending through the real Exporter (tests.agent.dpfeed).
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from flowmap_agent.positions import Position, acks, follow
from flowmap_agent.receiving import Receiver
from flowmap_agent.metrics import REGISTRY
from flowmap_agent.running import Agent
from flowmap_agent.settings import Settings
from flowmap_api import report_pb2 as pb
from flowmap_api import report_pb2_grpc as pb_grpc
from flowmap_dp import wire_pb2
from flowmap_dp.sending import Exporter
from flowmap_dp.framing import KIND_REPORT, frame
from tests.agent.dpfeed import BYTES
from tests.conftest import REPO

# -- positions: each report once, gaps counted, an interval acknowledged once whole ---------------


def r(seq: int, part: int = 0, parts: int = 1, run: int = 7) -> wire_pb2.Report:
    return wire_pb2.Report(run_id=run, sequence=seq, part=part, parts=parts)


def walk(*reports: wire_pb2.Report, last: Position | None = None) -> list[tuple[bool, int, bool, int]]:
    """(taken, missing, restarted, acknowledged interval) after each report."""
    out = []
    for report in reports:
        step, last = follow(last, report)
        out.append((step.take, step.missing, step.restarted, last.acked))
    return out


def test_every_part_of_an_interval_is_taken_and_the_interval_acknowledged_once_whole() -> None:
    assert walk(r(1, 0, 3), r(1, 1, 3), r(1, 2, 3), r(2)) == [
        (True, 0, False, 0), (True, 0, False, 0), (True, 0, False, 1), (True, 0, False, 2)]


def test_a_resent_part_is_skipped_and_missing_parts_and_intervals_are_counted() -> None:
    assert walk(r(1, 0, 3), r(1, 0, 3), r(1, 2, 3), r(4, 1, 2)) == [
        (True, 0, False, 0), (False, 0, False, 0),
        (True, 1, False, 1),  # part 1 never came
        (True, 3, False, 4)]  # intervals 2 and 3, and part 0 of 4
    assert walk(r(5, 1, 2), last=Position(7, 3, 0, 2)) == [(True, 1 + 1 + 1, False, 5)]


def test_a_new_run_is_a_restart_and_what_it_sent_before_its_first_report_here_is_counted() -> None:
    assert walk(r(3, 0, 1, run=8), last=Position(7, 40)) == [(True, 2, True, 3)]
    assert walk(r(1, 1, 2, run=8)) == [(True, 1, False, 1)]  # a worker never heard of: its interval only
    assert acks({0: Position(7, 5, 0, 2), 1: Position(8, 9)}) == {0: (7, 4), 1: (8, 9)}


# -- the socket is the agent's own ------------------------------------------------------------


def test_the_socket_and_its_directory_are_the_agents_alone(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir(mode=0o755)
    receiver = Receiver(str(folder / "dp.sock"))
    try:
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert stat.S_IMODE((folder / "dp.sock").stat().st_mode) == 0o600
    finally:
        receiver.close()
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    with pytest.raises(ValueError, match="directory of its own"):
        Receiver(str(shared / "dp.sock"))
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777  # left as it was


# -- the agent's loop --------------------------------------------------------------------------


class Acknowledging(pb_grpc.ReportServiceServicer):
    def __init__(self) -> None:
        self.bytes = 0
        self.seen: set[int] = set()

    async def Report(self, request: pb.ReportBatch, context: grpc.aio.ServicerContext) -> pb.ReportAck:  # noqa: N802
        if request.sequence not in self.seen:
            self.seen.add(request.sequence)
            self.bytes += sum(d.bytes_c2s for d in request.edges)
        return pb.ReportAck(applied=request.sequence, received=request.sequence, leader=True)


class Loop:
    """The agent's interval loop (as ``Agent.run`` runs it, without the node's plumbing) and an
    operator acknowledging everything; records when each of the dp's intervals was read whole."""

    def __init__(self, tmp: Path, interval: float = 1.0) -> None:
        token = tmp / "token"
        token.write_text("t")
        self.registry = CollectorRegistry()
        self.agent = Agent(Settings(node="node-a", state_file=str(tmp / "state"), token_file=str(token),
                                    socket=str(tmp / "run" / "dp.sock"), interval=interval), registry=self.registry)
        self.operator = Acknowledging()
        self.read: dict[int, float] = {}  # interval -> when its last part was read off the socket
        self.taken: dict[int, float] = {}  # interval -> when the loop had it in the outbox

    async def __aenter__(self) -> Loop:
        self.server = grpc.aio.server()
        pb_grpc.add_ReportServiceServicer_to_server(self.operator, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.agent.delivery._stub = lambda: pb_grpc.ReportServiceStub(self.channel)  # type: ignore[method-assign]
        self.dp = self.agent.open_dp()
        receiver = self.agent.receiver
        assert receiver is not None
        read = receiver._read

        def timed() -> None:  # the receiver's own read, and when each interval's last part came
            before = len(receiver.waiting)
            read()
            for report in receiver.waiting[before:]:
                if report.part + 1 >= report.parts:
                    self.read.setdefault(report.sequence, time.time())
        receiver._pause()
        receiver._read = timed  # type: ignore[method-assign]
        receiver._resume()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.agent.receiver is not None
        self.agent.receiver.close()
        await self.channel.close()
        await self.server.stop(None)
        self.agent.intake.conntrack.shutdown()

    async def step(self) -> None:
        """One interval of the agent's loop."""
        started = time.monotonic()
        await self.agent.step(self.dp)
        now = time.time()
        for worker, (run, seq) in acks(self.agent.outbox.dp_positions).items():
            for s in range(1, seq + 1):
                self.taken.setdefault(s, now)
        await asyncio.sleep(max(0.0, self.agent.settings.interval - (time.monotonic() - started)))

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A series of this agent's own collectors (the socket's, the dp's health)."""
        return self.registry.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize("sessions,count", [(1_000, 5), (10_000, 20), (100_000, 5)])
def test_reports_of_any_size_arrive_within_an_interval_through_the_agents_loop(tmp_path: Path, sessions: int,
                                                                                count: int) -> None:
    def losses() -> tuple[float, float]:
        return (REGISTRY.get_sample_value("flowmap_agent_dp_report_gaps_total") or 0.0,
                REGISTRY.get_sample_value("flowmap_agent_lost_sessions_total") or 0.0)

    losses0 = losses()

    async def main() -> tuple[Loop, dict[int, float], str]:
        async with Loop(tmp_path) as loop:
            dp = subprocess.Popen([sys.executable, "-m", "tests.agent.dpfeed", str(tmp_path / "run" / "dp.sock"),
                                   str(sessions), str(count), "1.0"], cwd=REPO, stdout=subprocess.PIPE, text=True)
            try:
                offered: dict[int, float] = {}
                reader = asyncio.get_running_loop().run_in_executor(None, dp.communicate, None, 120)
                deadline = time.monotonic() + count + 60
                while len(loop.taken) < count and time.monotonic() < deadline:
                    await loop.step()
                out, _ = await reader
            finally:
                if dp.poll() is None:
                    dp.kill()
            for line in out.splitlines():
                if line.startswith("offered"):
                    _, seq, _, at = line.split()
                    offered[int(seq)] = float(at)
            return loop, offered, out

    loop, offered, out = asyncio.run(main())
    assert sorted(offered) == list(range(1, count + 1)), out
    assert sorted(loop.taken) == list(range(1, count + 1)), (sorted(loop.read), out)
    arrived = [loop.read[s] - offered[s] for s in offered]
    taken = [loop.taken[s] - offered[s] for s in offered]
    print(f"{sessions} sessions a report: {count} reports read whole {min(arrived):.3f} .. {max(arrived):.3f} s "
          f"(mean {sum(arrived) / count:.3f} s) after the dp offered them; in the outbox {min(taken):.3f} .. "
          f"{max(taken):.3f} s after")
    assert "lost 0 0" in out  # the dp handed every report over
    assert losses() == losses0
    box = loop.agent.outbox
    held = sum(d.bytes_c2s for d in box.pending.values()) + sum(d.bytes_c2s for b in box.unacked for d in b.edges)
    assert loop.operator.bytes + held == sessions * count * BYTES  # every session counted, once
    if sessions <= 10_000:
        assert max(arrived) < loop.agent.settings.interval, arrived


def test_a_frame_that_is_not_a_report_is_counted_and_the_agent_goes_on(tmp_path: Path) -> None:
    async def main() -> Loop:
        async with Loop(tmp_path, interval=0.2) as loop:
            bad = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            bad.connect(str(tmp_path / "run" / "dp.sock"))
            bad.sendall(frame(KIND_REPORT, b"\xff" * 32))  # the 44 bytes that once stopped the agent
            await loop.step()
            await loop.step()
            bad.close()
            exporter = Exporter(str(tmp_path / "run" / "dp.sock")).start()
            try:
                exporter.offer(wire_pb2.Report(run_id=7, sequence=1, parts=1, health=wire_pb2.Health(packets=1)))
                for _ in range(25):
                    await loop.step()
                    if loop.taken:
                        break
            finally:
                exporter.stop()
            return loop

    loop = asyncio.run(main())
    assert loop.metric("flowmap_agent_dp_stream_errors_total", {"reason": "payload"}) == 1
    assert 1 in loop.taken
