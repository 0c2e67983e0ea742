"""The dp -> agent report stream: framing, the dp's non-blocking exporter, the agent's reader.

**Who connects.** The agent listens on a unix stream socket; each dp worker process connects
to it (``flowmap dp run --socket PATH``) and reconnects with backoff whenever the agent is not
there. So an agent restart never needs a dp restart, and N fanout workers are N independent
streams with no extra hop through a parent process; ``Report.worker`` tells them apart.

**Framing, version 1.** Each message is a 12-byte header followed by one protobuf message
from ``wire.proto`` (package ``flowmap.dp.v1``)::

    0      4         6        8             12
    | FMDP | version | kind   | length      | <length bytes of protobuf>
      magic  u16 BE    u16 BE   u32 BE

``kind`` 1 is a ``Report`` (dp -> agent), 2 a ``Control`` (agent -> dp: the full set of
interfaces to capture, the node's addresses, the overlay to drop on the underlay; the agent
sends it on every new connection and whenever it changes), 3
an ``Ack`` (agent -> dp: reports up to a sequence are saved on the agent's side).
A reader rejects a bad magic, an unknown version, lengths above ``MAX_FRAME`` (16 MiB; the dp
keeps its parts near a quarter of it) and a report body that does not parse by closing the
connection, and counts it: a corrupt stream cannot be resynchronised, a reconnect can.

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

**Whoever connects.** The reader (the agent's end) reads as data arrives, whatever the size of
a report, and holds boundedly much whatever a peer sends: see :class:`ReportReader`.
"""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import json
import os
import queue
import selectors
import socket
import struct
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import DecodeError

from flowmap_dp import wire_pb2
from flowmap_dp.session import Report, SessionDelta

MAGIC = b"FMDP"
VERSION = 1
KIND_REPORT = 1
KIND_CONTROL = 2
KIND_ACK = 3
HEADER = struct.Struct(">4sHHI")
# A frame is one part of a report (iter_reports keeps each part's estimate under PART_BYTES): a
# reader never has to hold more than this for one connection, whoever is on the other end.
MAX_FRAME = 16 << 20
RECV_BYTES = 1 << 20  # one read of one connection
PART_BYTES = 4 << 20
RECORD_BYTES = 96  # a session record without metadata, with room to spare (about 70 on the wire)


class WireError(ValueError):
    """The peer sent something that is not a version-1 flowmap dp frame. ``reason`` says what, as
    the agent counts it: magic, version, length, payload (a body that is not its message)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def frame(kind: int, payload: bytes) -> bytes:
    """Header + payload, ready for ``sendall``."""
    if len(payload) > MAX_FRAME:
        raise WireError("length", f"frame of {len(payload)} bytes exceeds {MAX_FRAME}")
    return HEADER.pack(MAGIC, VERSION, kind, len(payload)) + payload


class FrameDecoder:
    """Incremental decoder: feed bytes as they arrive, get complete (kind, payload) frames.

    Holds at most one incomplete frame and what arrived after it in the same ``feed`` (so at most
    ``HEADER.size + MAX_FRAME`` plus one read). After a WireError the stream is useless: close it.
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes held, waiting for the rest of their frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Append ``data``; return every frame now complete. Raises WireError on garbage."""
        self._buf += data
        out: list[tuple[int, bytes]] = []
        start = 0
        try:
            while len(self._buf) - start >= HEADER.size:
                magic, version, kind, length = HEADER.unpack_from(self._buf, start)
                if magic != MAGIC:
                    raise WireError("magic", f"bad magic {bytes(magic)!r}")
                if version != VERSION:
                    raise WireError("version", f"unsupported version {version}")
                if length > MAX_FRAME:
                    raise WireError("length", f"frame length {length} exceeds {MAX_FRAME}")
                end = start + HEADER.size + length
                if len(self._buf) < end:
                    break
                out.append((kind, bytes(self._buf[start + HEADER.size : end])))
                start = end
        finally:
            del self._buf[:start]  # once per feed: many small frames cost no quadratic copying
        return out


def parse_report(payload: bytes) -> wire_pb2.Report:
    """The ``Report`` in a frame's payload; WireError("payload") if it is not one."""
    try:
        return wire_pb2.Report.FromString(payload)
    except DecodeError as exc:
        raise WireError("payload", f"a report frame whose body is not a Report: {exc}") from None


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
    queue_size: int = 8
    queue_sessions: int = 200_000  # session records waiting, all reports together: bounds memory
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


class Stream:
    """One connection's bytes as the reports they carry (pure): the framing, then each report's
    body. Raises WireError (and is then useless) on anything else."""

    def __init__(self) -> None:
        self.decoder = FrameDecoder()
        self.since = 0.0  # when its incomplete frame began (the caller's clock); 0: none

    @property
    def buffered(self) -> int:
        return self.decoder.buffered

    def feed(self, data: bytes, now: float = 0.0) -> list[wire_pb2.Report]:
        """The reports ``data`` completes (frames of other kinds are the agent's own: ignored)."""
        frames = self.decoder.feed(data)
        out = [parse_report(payload) for kind, payload in frames if kind == KIND_REPORT]
        if not self.decoder.buffered:
            self.since = 0.0
        elif frames or not self.since:
            self.since = now
        return out


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


# -- table deltas -> wire messages -------------------------------------------------------------


def _ns(t: float) -> int:
    return int(t * 1e9)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str, sort_keys=True)


def _flat(metadata: Mapping[str, Any]) -> dict[str, str]:
    """Detectors nest per protocol: {"http": {"host": ...}} -> {"http.host": ...}; lists as JSON."""
    out: dict[str, str] = {}
    for k, v in metadata.items():
        if isinstance(v, dict):
            for k2, v2 in v.items():
                out[f"{k}.{k2}"] = _text(v2)
        else:
            out[k] = _text(v)
    return out


def _utf8(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "replace"))


def add_session(report: wire_pb2.Report, d: SessionDelta, metadata: dict[str, str] | None = None) -> wire_pb2.Session:
    """Append one table delta to ``report`` as a wire record (``metadata``: its flattened
    metadata, when the caller has it already).

    Built in place with ``add()`` (constructing a detached message and copying it into the
    report costs about twice as much; at 100k sessions per interval that matters).
    """
    rec = report.sessions.add(
        ip_proto=d.proto, client_ip=d.client, client_port=d.client_port, server_ip=d.server,
        server_port=d.server_port, vlan=d.vlan, new=d.new, opened=d.opened, closed=d.closed,
        close_reason=d.end_reason,
        app=d.app if d.app_decided or d.closed else "", bytes_c2s=d.bytes_c2s, bytes_s2c=d.bytes_s2c,
        packets_c2s=d.packets_c2s, packets_s2c=d.packets_s2c, first_seen_ns=int(d.first_seen * 1e9),
        last_seen_ns=int(d.last_seen * 1e9),
    )
    if metadata is None and d.metadata:
        metadata = _flat(d.metadata)
    if metadata:
        rec.metadata.update(metadata)
    return rec


def dns_answers(d: SessionDelta) -> list[wire_pb2.DnsAnswer]:
    """The answers in a decided DNS session's metadata (``{"dns": {"answers": [...]}}``, each
    ``{"name", "type", "ttl", "data"}``: an address for A/AAAA, a name for CNAME/NS/PTR)."""
    meta = d.metadata or {}
    dns = meta.get("dns")
    answers = dns.get("answers") if isinstance(dns, dict) else meta.get("answers")
    out: list[wire_pb2.DnsAnswer] = []
    for a in answers if isinstance(answers, list) else []:
        if not isinstance(a, dict) or not a.get("data"):
            continue
        kind, data = str(a.get("type", "")), a["data"]
        ans = wire_pb2.DnsAnswer(name=str(a.get("name", "")), type=kind, ttl=int(a.get("ttl") or 0),
                                 client_ip=d.client, server_ip=d.server)
        try:
            if kind in ("A", "AAAA"):
                ans.address = data if isinstance(data, bytes) else ipaddress.ip_address(str(data)).packed
            else:
                ans.target = str(data)
        except ValueError:
            continue  # a detector bug must not stop the report
        out.append(ans)
    return out


def build_reports(rep: Report, *, run_id: int, worker: int, workers: int, sequence: int, start: float,
                  health: wire_pb2.Health, part_size: int) -> list[wire_pb2.Report]:
    """One interval's table report as one or more wire reports (health on the last part)."""
    return list(iter_reports(rep, run_id=run_id, worker=worker, workers=workers, sequence=sequence, start=start,
                             health=health, part_size=part_size))


@dataclass
class _Part:
    """Which records, answers and hits one wire part of an interval's report holds."""

    first: int  # index of its first session record
    records: int = 0
    size: int = 0  # estimated bytes
    dns: list[wire_pb2.DnsAnswer] = field(default_factory=list)
    threats: list[wire_pb2.ThreatHit] = field(default_factory=list)

    def fits(self, size: int) -> bool:
        """Room for ``size`` more bytes (an empty part takes anything: one record is never too big)."""
        return self.size + size <= PART_BYTES or not self.size

    def add(self, size: int, record: bool = True) -> None:
        self.records += record
        self.size += size


def iter_reports(rep: Report, *, run_id: int, worker: int, workers: int, sequence: int, start: float,
                 health: wire_pb2.Health, part_size: int) -> Iterator[wire_pb2.Report]:
    """Like :func:`build_reports`, one part at a time: the caller offers each part before the
    next is built, so a large interval never holds all its wire records at once.

    A part holds at most ``part_size`` session records and, by estimate, at most ``PART_BYTES``
    (a quarter of ``MAX_FRAME``: whatever the detectors' metadata, no frame is too long for the
    reader); the interval's DNS answers and threat hits follow the last records, in parts of their
    own when they do not fit.
    """
    dns: list[wire_pb2.DnsAnswer] = []
    threats: list[wire_pb2.ThreatHit] = []
    items: list[tuple[SessionDelta, dict[str, str] | None]] = []
    parts = [_Part(0)]
    for d in rep.sessions:
        if d.app_decided and d.app == "dns":
            dns += dns_answers(d)
        for t in d.threats:
            threats.append(wire_pb2.ThreatHit(
                threat=t.name, ip_proto=d.proto, client_ip=d.client, client_port=d.client_port,
                server_ip=d.server, server_port=d.server_port, app=d.app, snippet=t.snippet,
                seen_ns=_ns(d.last_seen), where=t.where))
        meta = _flat(d.metadata) if d.metadata else None
        size = RECORD_BYTES + (sum(_utf8(k) + _utf8(v) + 8 for k, v in meta.items()) if meta else 0)
        if parts[-1].records >= part_size or not parts[-1].fits(size):
            parts.append(_Part(len(items)))
        items.append((d, meta))
        parts[-1].add(size)
    for answer in dns:
        if not parts[-1].fits(size := answer.ByteSize() + 8):
            parts.append(_Part(len(items)))
        parts[-1].dns.append(answer)
        parts[-1].add(size, record=False)
    for hit in threats:
        if not parts[-1].fits(size := hit.ByteSize() + 8):
            parts.append(_Part(len(items)))
        parts[-1].threats.append(hit)
        parts[-1].add(size, record=False)
    for i, part in enumerate(parts):
        r = wire_pb2.Report(run_id=run_id, worker=worker, workers=workers, sequence=sequence, part=i,
                            parts=len(parts), start_ns=_ns(start), end_ns=_ns(rep.time))
        for d, meta in items[part.first : part.first + part.records]:
            add_session(r, d, meta)
        r.dns.extend(part.dns)
        r.threats.extend(part.threats)
        if i == len(parts) - 1:
            r.health.CopyFrom(health)
        yield r
