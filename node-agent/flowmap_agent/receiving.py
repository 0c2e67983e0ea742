"""The agent's end of the dp socket: owned here, read as data arrives, bounded whoever connects.

* The socket lives in a directory only its owner enters (0700) and is itself 0600: the dp runs
  as the same user (root holding only NET_RAW, manifests/agent/dp.yaml), nobody else connects.
  A shared directory such as /tmp, whose mode must not change, is refused.
* The event loop reads the socket whenever it is readable (``add_reader`` on the reader's
  selector), not once per interval: a report of any size is read while the dp sends it, and the
  loop drains what arrived each interval. Between two intervals at most ``max_sessions`` session
  records wait: beyond that the agent stops reading until the next interval has taken them, and
  the dp's own bounded queue takes the strain (what it cannot keep it counts).
* What the reader closes (a broken frame, a body that is not a report, a peer that does not
  read, too many connections, too many bytes held) is counted by reason
  (``flowmap_agent_dp_stream_errors_total``), and never stops the agent.
"""

from __future__ import annotations

import asyncio
import collections
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from flowmap_agent.listening import ReportReader
from flowmap_agent.positions import MAX_WORKERS
from flowmap_dp import wire_pb2

MAX_WAITING_SESSIONS = 400_000  # two full dp queues' worth of records (flowmap_dp.running.Settings)


def private_folder(socket_path: str) -> None:
    """Make the socket's directory the agent's own (0700), creating it if need be."""
    folder = Path(socket_path).parent
    folder.mkdir(parents=True, exist_ok=True)
    mode = folder.stat().st_mode
    if mode & (stat.S_ISVTX | stat.S_IWOTH):
        raise ValueError(f"the dp socket {socket_path} needs a directory of its own (0700), not a shared one "
                         f"such as {folder}")
    os.chmod(folder, 0o700)


def admissible(reports: list[wire_pb2.Report]) -> tuple[list[wire_pb2.Report], int]:
    """The reports a dp can have sent, and how many others: no dp has a worker numbered beyond
    MAX_WORKERS, and a position kept for each would only cost memory."""
    kept = [r for r in reports if r.worker < MAX_WORKERS]
    return kept, len(reports) - len(kept)


class Receiver:
    """A ReportReader on the agent's event loop, and the reports waiting for the next interval."""

    def __init__(self, path: str, *, max_sessions: int = MAX_WAITING_SESSIONS) -> None:
        private_folder(path)
        Path(path).unlink(missing_ok=True)  # a previous agent's
        self.reader = ReportReader(path)
        self.max_sessions = max_sessions
        self.waiting: list[wire_pb2.Report] = []
        self.sessions = 0  # records in ``waiting``
        self.paused = 0  # times reading stopped for the loop to catch up
        self.errors: collections.Counter[str] = collections.Counter()  # reports refused after parsing
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading = False

    def start(self) -> Receiver:
        """Read whenever the socket is readable, on the running loop."""
        self._loop = asyncio.get_running_loop()
        self._resume()
        return self

    def _resume(self) -> None:
        if self._loop is not None and not self._reading:
            self._loop.add_reader(self.reader.fileno(), self._read)
            self._reading = True

    def _pause(self) -> None:
        if self._loop is not None and self._reading:
            self._loop.remove_reader(self.reader.fileno())
            self._reading = False

    def _read(self) -> None:
        reports, refused = admissible(self.reader.poll(0))
        self.errors["worker"] += refused
        self.waiting += reports
        self.sessions += sum(len(r.sessions) for r in reports)
        if self.sessions >= self.max_sessions:
            self.paused += 1
            self._pause()

    def drain(self) -> list[wire_pb2.Report]:
        """The reports that arrived since the last call, in order; reading resumes."""
        out = self._empty()
        self._resume()
        return out

    def last(self, timeout: float) -> list[wire_pb2.Report]:
        """At a stop: what is waiting, and what arrives until ``timeout`` passes without more."""
        self._pause()
        return self._empty() + list(self.reader.reports(timeout))

    def _empty(self) -> list[wire_pb2.Report]:
        """The waiting reports; none wait after."""
        out, self.waiting, self.sessions = self.waiting, [], 0
        return out

    def close(self) -> None:
        self._pause()
        self.reader.close()

    def collect(self) -> Iterator[Metric]:
        """The socket's health, for the agent's registry."""
        errors = CounterMetricFamily("flowmap_agent_dp_stream_errors",
                                     "dp connections closed, or reports refused, by reason: magic, version, length, "
                                     "payload (not a report), stalled (does not read), truncated (closed in the "
                                     "middle of a frame), budget (too many bytes held), connections (too many), "
                                     "worker (an impossible worker number).", labels=("reason",))
        for reason, n in sorted((self.reader.errors + self.errors).items()):
            errors.add_metric((reason,), float(n))
        yield errors
        yield GaugeMetricFamily("flowmap_agent_dp_connections", "dp workers connected to the agent's socket.",
                                value=self.reader.connections)
        yield GaugeMetricFamily("flowmap_agent_dp_buffered_bytes", "Bytes held for incomplete dp frames.",
                                value=self.reader.buffered)
        yield CounterMetricFamily("flowmap_agent_dp_read_pauses",
                                  "Times the agent stopped reading the dp socket until its loop caught up.",
                                  value=self.paused)
