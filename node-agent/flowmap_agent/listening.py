"""The agent's listening end of the dp socket (sockets and ``selectors`` only): it accepts dp
workers, reads their reports as data arrives whatever their size, and sends them what to capture
and what is saved, holding boundedly much whatever a peer sends (see :class:`ReportReader`).
:mod:`flowmap_agent.receiving` puts it on the agent's event loop."""

from __future__ import annotations

import collections
import contextlib
import os
import selectors
import socket
import time
from collections.abc import Iterator, Mapping

from flowmap_dp import wire_pb2
from flowmap_dp.errors import WireError
from flowmap_dp.framing import KIND_ACK, KIND_CONTROL, MAX_FRAME, Stream, frame

RECV_BYTES = 1 << 20  # one read of one connection


class ReportReader:
    """Agent side: listen on a unix socket, accept dp workers, yield their reports.

    Single-threaded over ``selectors``; the agent calls :meth:`poll` whenever :meth:`fileno` is
    readable (or from a thread), so reports of any size are read as they arrive. :meth:`set_control`
    tells every connected worker, and every later one, what to capture.

    Whatever is on the other end: a connection that breaks the framing, sends a body that is not a
    Report, or does not read what the agent sends it (a dp reads its controls at once) is closed
    and counted in :attr:`errors` by reason; at most ``max_connections`` are kept; and the bytes
    held for incomplete frames, all connections together, stay under ``max_buffered`` (beyond it
    the connection whose frame has waited longest is closed: a dp's frame arrives at the speed of
    memory, and a dp resends what was not acknowledged on its next connection).
    """

    def __init__(self, path: str, backlog: int = 16, *, max_connections: int = 64,
                 max_buffered: int = 4 * MAX_FRAME) -> None:
        self.path = path
        self.max_connections, self.max_buffered = max_connections, max_buffered
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        # Only its owner may connect; the agent also keeps the directory its own (0700), so there
        # is no moment at which another user could, whatever the umask.
        os.chmod(path, 0o600)
        self._listener.listen(backlog)
        self._listener.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._peers: dict[socket.socket, Stream] = {}
        self._control: wire_pb2.Control | None = None
        # Connections closed, by reason: magic, version, length, payload (WireError), stalled (does
        # not read), truncated (closed in the middle of a frame), budget (max_buffered), and
        # connections (refused beyond max_connections).
        self.errors: collections.Counter[str] = collections.Counter()

    @property
    def rejected(self) -> int:
        """Connections closed for what they sent (framing or payload)."""
        return sum(self.errors[r] for r in ("magic", "version", "length", "payload"))

    @property
    def buffered(self) -> int:
        """Bytes held for incomplete frames, all connections together."""
        return sum(p.buffered for p in self._peers.values())

    def fileno(self) -> int:
        """Readable whenever a connection or the listener is: for an event loop's ``add_reader``."""
        return self._sel.fileno()

    def set_interfaces(self, interfaces: list[str]) -> None:
        """Send the desired interface set to all workers now and to each new one on connect."""
        self.set_control(wire_pb2.Control(interfaces=interfaces))

    def set_control(self, control: wire_pb2.Control) -> None:
        """Send what to capture (interfaces, the node's addresses, the overlay on the underlay)
        to all workers now and to each new one on connect."""
        self._control = control
        for conn in list(self._peers):
            self._send_control(conn)

    def _send_control(self, conn: socket.socket) -> None:
        if self._control is not None:
            self._send(conn, frame(KIND_CONTROL, self._control.SerializeToString()))

    def _send(self, conn: socket.socket, data: bytes) -> None:
        """Never waits: a dp reads what the agent sends at once (a thread of its own), so a full
        socket buffer means a peer that does not read, and a half-sent frame would poison it."""
        try:
            sent = conn.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._drop(conn)
            return
        if sent < len(data):
            self._drop(conn, "stalled")

    def ack(self, positions: Mapping[int, tuple[int, int]]) -> None:
        """Tell the dp workers which of their reports are saved: worker -> (run id, sequence)."""
        data = b"".join(frame(KIND_ACK, wire_pb2.Ack(run_id=run, worker=worker, sequence=seq).SerializeToString())
                        for worker, (run, seq) in positions.items())
        if data:
            for conn in list(self._peers):
                self._send(conn, data)

    @property
    def connections(self) -> int:
        """dp workers connected now."""
        return len(self._peers)

    def poll(self, timeout: float | None = None) -> list[wire_pb2.Report]:
        """Wait up to ``timeout`` for activity; return the reports that arrived (one read per ready
        connection: call again while :meth:`fileno` is readable)."""
        out: list[wire_pb2.Report] = []
        for key, _ev in self._sel.select(timeout):
            if key.fileobj is self._listener:
                self._accept()
                continue
            conn = key.fileobj
            assert isinstance(conn, socket.socket)
            peer = self._peers.get(conn)
            if peer is None:
                continue  # closed earlier in this round
            try:
                data = conn.recv(RECV_BYTES)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                self._drop(conn, "truncated" if peer.buffered else None)
                continue
            try:
                out += peer.feed(data, time.monotonic())
            except WireError as exc:
                self._drop(conn, exc.reason)
        self._keep_budget()
        return out

    def _accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except OSError:  # gone before we took it, or out of descriptors: the next poll tries again
            return
        if len(self._peers) >= self.max_connections:
            self.errors["connections"] += 1
            conn.close()
            return
        conn.setblocking(False)
        self._peers[conn] = Stream()
        self._sel.register(conn, selectors.EVENT_READ, None)
        self._send_control(conn)

    def _keep_budget(self) -> None:
        held = self.buffered
        while held > self.max_buffered:
            conn, peer = min(((c, p) for c, p in self._peers.items() if p.buffered), key=lambda cp: cp[1].since)
            held -= peer.buffered
            self._drop(conn, "budget")

    def reports(self, timeout: float) -> Iterator[wire_pb2.Report]:
        """Yield reports until ``timeout`` seconds pass without a new one."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            batch = self.poll(left)
            if batch:
                yield from batch
                deadline = time.monotonic() + timeout

    def _drop(self, conn: socket.socket, reason: str | None = None) -> None:
        if reason is not None:
            self.errors[reason] += 1
        if self._peers.pop(conn, None) is not None:
            self._sel.unregister(conn)
        conn.close()

    def close(self) -> None:
        """Close every connection and the listener, and remove the socket file."""
        for conn in list(self._peers):
            self._drop(conn)
        self._sel.close()
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
