"""The dp's end of the report stream: a non-blocking exporter the packet loop offers reports to,
and the writer thread that sends them to the agent (framing: :mod:`flowmap_dp.framing`; what a
report holds: :mod:`flowmap_dp.reporting`).

**Nothing lost to an agent's crash.** A report written to the socket may still die with the
agent (unread in its socket buffer, or read and not yet saved). So the dp keeps each report it
sent until the agent acknowledges it (``Ack``, once its state is on disk), and on a new
connection sends the unacknowledged ones again, in order, before anything new; the agent skips
the reports it had already saved (by their sequence and part), and acknowledges an interval only
once it has all its parts.

**Never blocking the packet loop.** The loop calls :meth:`Exporter.offer`, which puts the report
into a bounded queue or, when the queue is full, drops it and counts it (``lost_reports`` and
the ``lost_sessions`` records inside). A writer thread sends, oldest first; a report it cannot
send (no agent, send timeout, broken pipe) waits and goes on the next connection, so an agent
restart loses nothing that fits the queue (only what waits when the dp stops is dropped, and
counted). The counts are cumulative and are stamped into the ``Health`` of the next report that
is sent, like Hubble's lost-events record. The send timeout is for progress: a reader that takes
its time over a large report is waited for, one that stops reading is left for a new connection.
"""

from __future__ import annotations

import collections
import contextlib
import queue
import socket
import threading
import time
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from flowmap_dp import wire_pb2
from flowmap_dp.errors import WireError
from flowmap_dp.framing import KIND_ACK, KIND_CONTROL, KIND_REPORT, FrameDecoder, frame
from flowmap_dp.settings import Settings


def send_all(sock: socket.socket, data: bytes) -> None:
    """``sendall`` whose timeout (the socket's) is for progress, not for the whole: a reader that
    takes its time over a large frame is waited for, one that stops reading is given up on."""
    view = memoryview(data)
    while view:
        view = view[sock.send(view):]


@dataclass
class Exporter:
    """dp side: a bounded queue the packet loop offers reports to, and a writer thread."""

    path: str
    queue_size: int = Settings.queue_size
    queue_sessions: int = Settings.queue_sessions  # session records waiting, all reports together: bounds memory
    send_timeout: float = 2.0
    max_backoff: float = 2.0
    _queue: queue.Queue[wire_pb2.Report | None] = field(init=False)
    controls: queue.SimpleQueue[wire_pb2.Control] = field(init=False, default_factory=queue.SimpleQueue)
    sent_reports: int = field(init=False, default=0)
    connects: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self._queue = queue.Queue(self.queue_size)
        # Each counter has one writer thread (offer: the loop, _send: the writer): no lock needed.
        self._lost_offer = [0, 0]
        self._lost_send = [0, 0]
        self._queued = 0  # session records in the queue; both threads change it, under the lock
        self._queued_lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._close_lock = threading.Lock()
        self._next_connect = 0.0
        self._backoff = 0.05
        self._thread = threading.Thread(target=self._run, name="flowmap-dp-exporter", daemon=True)
        self._stopping = threading.Event()
        # Sent, not yet acknowledged: (run id, worker, sequence, frame), oldest first.
        self._unacked: collections.deque[tuple[int, int, int, bytes]] = collections.deque()
        self._unacked_lock = threading.Lock()

    @property
    def lost_reports(self) -> int:
        """Reports dropped so far (queue full, or not sendable)."""
        return self._lost_offer[0] + self._lost_send[0]

    @property
    def lost_sessions(self) -> int:
        """Session records inside the dropped reports."""
        return self._lost_offer[1] + self._lost_send[1]

    def start(self) -> Exporter:
        """Start the writer thread."""
        self._thread.start()
        return self

    def offer(self, report: wire_pb2.Report) -> bool:
        """Hand a report to the writer without ever waiting; False (and counted) if the queue
        holds ``queue_size`` reports or would hold more than ``queue_sessions`` records."""
        n = len(report.sessions)
        with self._queued_lock:
            if not (self._queued and self._queued + n > self.queue_sessions):
                try:
                    self._queue.put_nowait(report)
                    self._queued += n
                    return True
                except queue.Full:
                    pass
        self._lost_offer[0] += 1
        self._lost_offer[1] += n
        return False

    def stop(self, timeout: float = 5.0) -> None:
        """Send what is queued (within ``timeout``), then close."""
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and time.monotonic() < deadline:
            try:
                self._queue.put(None, timeout=0.1)
                break
            except queue.Full:
                continue
        self._thread.join(max(0.0, deadline - time.monotonic()))
        self._stopping.set()  # a report still waiting for an agent is dropped (and counted)
        self._thread.join(1.0)
        self._close()

    def _run(self) -> None:
        while True:
            try:
                # Connect before the first report, and again as soon as the agent is back: the
                # agent says what to capture (Control) on every new connection.
                report = self._queue.get(timeout=None if self._connect() is not None else self._backoff)
            except queue.Empty:
                continue
            if report is None:
                return
            with self._queued_lock:
                self._queued -= len(report.sessions)
            self._send(report)

    def _send(self, report: wire_pb2.Report) -> None:
        """Send one report, on a new connection if need be: an agent that restarts finds it (and
        the queue behind it) when it is back. Dropped, and counted, only when stopping (or when it
        is larger than a frame may be, which iter_reports never makes)."""
        while not self._stopping.is_set():
            sock = self._connect()
            if sock is None:
                time.sleep(max(0.0, min(self._next_connect - time.monotonic(), 0.1)))
                continue
            if report.HasField("health"):
                report.health.lost_reports = self.lost_reports
                report.health.lost_sessions = self.lost_sessions
            try:
                data = frame(KIND_REPORT, report.SerializeToString())
            except WireError:
                break  # larger than any reader takes (iter_reports keeps parts far below): counted
            try:
                send_all(sock, data)
            except OSError:
                self._close()  # a half-written frame poisons the stream: start a new one
                continue
            self.sent_reports += 1
            with self._unacked_lock:
                self._unacked.append((report.run_id, report.worker, report.sequence, data))
                if len(self._unacked) > self.queue_size:  # an agent that never acknowledges: bounded
                    self._unacked.popleft()
            return
        self._lost_send[0] += 1
        self._lost_send[1] += len(report.sessions)

    def _connect(self) -> socket.socket | None:
        if self._sock is not None or time.monotonic() < self._next_connect:
            return self._sock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.send_timeout)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            self._next_connect = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, self.max_backoff)
            return None
        with self._unacked_lock:
            again = [data for *_, data in self._unacked]
        try:
            for data in again:  # what the last agent may not have saved, before anything new
                send_all(sock, data)
        except OSError:
            sock.close()
            return None
        self._backoff = 0.05
        self._sock = sock
        self.connects += 1
        threading.Thread(target=self._read_controls, args=(sock,), name="flowmap-dp-control", daemon=True).start()
        return sock

    def _read_controls(self, sock: socket.socket) -> None:
        decoder = FrameDecoder()
        while True:
            try:
                data = sock.recv(65536)
                frames = decoder.feed(data) if data else None
                messages = [wire_pb2.Control.FromString(p) if kind == KIND_CONTROL else wire_pb2.Ack.FromString(p)
                            for kind, p in frames or () if kind in (KIND_CONTROL, KIND_ACK)]
            except TimeoutError:
                continue  # the socket's timeout is for sends; reads just wait again
            except (OSError, WireError, DecodeError):
                frames = None
            if frames is None:
                if self._sock is sock:
                    self._close()  # the agent went away (or is no agent): reconnect on the next report
                return
            for message in messages:
                if isinstance(message, wire_pb2.Control):
                    self.controls.put(message)
                else:
                    self._acknowledged(message)

    def _acknowledged(self, ack: wire_pb2.Ack) -> None:
        with self._unacked_lock:
            while self._unacked and self._unacked[0][:2] == (ack.run_id, ack.worker) and (
                    self._unacked[0][2] <= ack.sequence):
                self._unacked.popleft()

    def _close(self) -> None:
        with self._close_lock:  # both the writer and the control reader may get here
            sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

