"""The agent's half of exactly-once: numbered batches kept until the operator acknowledges them.

* Deltas merge per edge into ``pending`` (memory bounded by distinct edges, not by time).
* Each interval, the pending deltas of edges with nothing unacknowledged become the next numbered
  batch; an edge whose last delta is still unacknowledged keeps merging. So each edge has at most
  one delta in flight, everything held is bounded by twice the edges, and a new edge goes out in
  the next batch however far behind the operator's writes are.
* Batches are delivered in order, one call at a time, each naming the one before it
  (``previous``); after an error everything not yet acknowledged is delivered again, in order,
  with the same numbers (the operator skips what it has already counted).
* The operator acknowledges batch by batch (``ReportAck.received`` and ``waiting``): a batch is
  dropped once acknowledged, and the next batch says which ones the agent no longer holds
  (``acked``) so that the operator can prune what it kept to recognise a resend. When there is
  nothing new to send, a batch with sequence 0 asks for the acknowledgement.
* ``save``/``load`` keep all of it on disk (written atomically each interval, before sending),
  so a crash of the agent loses at most what reached it after the last save.

* It also keeps where each dp worker's reports got to (run id, sequence), so that a restarted
  agent counts the reports that never reached it (a gap in the sequence) instead of losing them
  silently.

File format (version 2): ``FMAS`` | version u16 | u16 count, then that many dp positions (u32
worker, u64 run id, u64 sequence) | then records, each a u32 length and a serialized
``ReportBatch``: the first holds the pending deltas (sequence 0) with the agent id, the next
sequence and the acked number; the rest are the unacknowledged batches, in order. Version 1 (no
positions) is still read.
"""

from __future__ import annotations

import os
import struct
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from flowmap_api import report_pb2 as pb

MAGIC, VERSION = b"FMAS", 2
_HEAD, _LEN = struct.Struct("!4sH"), struct.Struct("!I")
_COUNT, _POSITION = struct.Struct("!H"), struct.Struct("!IQQ")
MAX_WORKERS = 1024
MAX_STATE_BYTES = 512 * 1024 * 1024

# What identifies one agent edge; counters of deltas with the same key add up.
EdgeKey = tuple[str, str, int, int, str, bool, bool]  # client ip, server ip, server port, protocol,
#                                                      client pod, client local, server local


class StateError(ValueError):
    """The state file is not one this agent can read: start afresh (and count it as lost)."""


def edge_key(d: pb.EdgeDelta) -> EdgeKey:
    return (d.client.ip, d.server.ip, d.server.port, d.protocol, d.client.pod, d.client.local, d.server.local)


def merge(into: pb.EdgeDelta, d: pb.EdgeDelta) -> None:
    """Add ``d`` to ``into`` (same edge key): counters add, times widen, gauges take the latest."""
    into.bytes_c2s += d.bytes_c2s
    into.bytes_s2c += d.bytes_s2c
    into.packets_c2s += d.packets_c2s
    into.packets_s2c += d.packets_s2c
    into.sessions_opened += d.sessions_opened
    into.sessions_closed += d.sessions_closed
    into.sessions_active = d.sessions_active
    if d.first_seen_unix_ms and (not into.first_seen_unix_ms or d.first_seen_unix_ms < into.first_seen_unix_ms):
        into.first_seen_unix_ms = d.first_seen_unix_ms
    into.last_seen_unix_ms = max(into.last_seen_unix_ms, d.last_seen_unix_ms)
    for app in d.apps:
        if app not in into.apps:
            into.apps.append(app)
    room = 16 - len(into.threats)
    into.threats.extend(d.threats[:max(0, room)])
    if d.verdict:
        into.verdict = d.verdict


class Outbox:
    def __init__(self, agent_id: str, node: str, *, window: int = 1024, interval_ms: int = 1000) -> None:
        self.agent_id, self.node, self.window, self.interval_ms = agent_id, node, window, interval_ms
        self.pending: dict[EdgeKey, pb.EdgeDelta] = {}
        self.names: dict[str, pb.DnsName] = {}
        self.unacked: list[pb.ReportBatch] = []
        self.in_flight: set[EdgeKey] = set()  # edges with a delta in an unacknowledged batch
        self.sequence = 0  # the last number given to a batch
        self.acked = 0  # no batch up to here is held
        self.delivered = 0  # the last batch delivered on the current connection
        self.lost_deltas = 0  # to be reported with the next batch
        self.dp_positions: dict[int, tuple[int, int]] = {}  # dp worker -> (run id, last report taken)
        # The node's own addresses as they are now: every batch says them when it is sent (a resent
        # one too), so the operator always has the latest (plumbing.announced).
        self.node_addresses: tuple[str, ...] = ()

    # -- filling --------------------------------------------------------------------------------

    def add(self, deltas: Iterable[pb.EdgeDelta], names: Iterable[pb.DnsName] = ()) -> None:
        for d in deltas:
            key = edge_key(d)
            if key in self.pending:
                merge(self.pending[key], d)
            else:
                copy = pb.EdgeDelta()
                copy.CopyFrom(d)
                self.pending[key] = copy
        for n in names:
            self.names[n.ip] = n  # the latest answer for an address is the one that counts

    def cut(self) -> pb.ReportBatch | None:
        """The next numbered batch: pending deltas of edges with none in flight, and new names."""
        ready = [key for key in self.pending if key not in self.in_flight]
        if len(self.unacked) >= self.window or not (ready or self.names or self.lost_deltas):
            return None
        self.sequence += 1
        batch = pb.ReportBatch(agent_id=self.agent_id, node=self.node, sequence=self.sequence,
                               interval_ms=self.interval_ms, edges=[self.pending.pop(key) for key in ready],
                               names=list(self.names.values()), lost_deltas=self.lost_deltas)
        self.in_flight.update(ready)
        self.names.clear()
        self.lost_deltas = 0
        self.unacked.append(batch)
        return batch

    # -- delivering -----------------------------------------------------------------------------

    def to_deliver(self) -> list[pb.ReportBatch]:
        """The batches to send now, in order, each naming its predecessor; else an ack question."""
        now = int(time.time() * 1000)
        out, previous = [], self.acked
        for b in self.unacked:
            if b.sequence > self.delivered:
                b.acked, b.previous, b.sent_unix_ms = self.acked, previous, now
                b.node_addresses[:] = self.node_addresses
                out.append(b)
            previous = b.sequence
        if not out and self.unacked:
            out.append(pb.ReportBatch(agent_id=self.agent_id, node=self.node, acked=self.acked, sent_unix_ms=now,
                                      node_addresses=self.node_addresses))
        return out

    def delivered_ok(self, batch: pb.ReportBatch, ack: pb.ReportAck) -> None:
        """The operator took ``batch``: drop every batch it says is written."""
        self.delivered = max(self.delivered, batch.sequence)
        waiting = set(ack.waiting)
        keep = []
        for b in self.unacked:
            if b.sequence <= ack.applied or (b.sequence <= ack.received and b.sequence not in waiting):
                self.in_flight.difference_update(edge_key(d) for d in b.edges)
            else:
                keep.append(b)
        self.unacked = keep
        self.acked = keep[0].sequence - 1 if keep else self.sequence

    def refused(self, batch: pb.ReportBatch) -> None:
        """The operator refused ``batch`` as invalid, whole: it will never take it. Drop it and
        count its deltas as lost (``lost_deltas``), rather than block everything behind it."""
        self.unacked = [b for b in self.unacked if b is not batch]
        self.in_flight.difference_update(edge_key(d) for d in batch.edges)
        self.lost_deltas += len(batch.edges)
        self.acked = self.unacked[0].sequence - 1 if self.unacked else self.sequence

    def failed(self) -> None:
        """The connection broke or the operator refused: resend all unacknowledged, in order."""
        self.delivered = self.acked

    @property
    def edges(self) -> int:
        """Edge deltas held in memory (at most twice the distinct edges)."""
        return len(self.pending) + sum(len(b.edges) for b in self.unacked)

    # -- surviving a crash ----------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """Write the whole state atomically (temp file, fsync, rename)."""
        head = pb.ReportBatch(agent_id=self.agent_id, node=self.node, sequence=self.sequence, acked=self.acked,
                              edges=list(self.pending.values()), names=list(self.names.values()),
                              lost_deltas=self.lost_deltas)
        positions = sorted(self.dp_positions.items())[:MAX_WORKERS]
        parts = [_HEAD.pack(MAGIC, VERSION), _COUNT.pack(len(positions))]
        parts += [_POSITION.pack(worker, run, seq) for worker, (run, seq) in positions]
        for msg in (head, *self.unacked):
            data = msg.SerializeToString()
            parts += [_LEN.pack(len(data)), data]
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(b"".join(parts))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path, node: str, *, window: int = 1024, interval_ms: int = 1000) -> Outbox:
        """The saved state of this node's agent (raises StateError if unreadable or another node's)."""
        data = path.read_bytes()
        if len(data) > MAX_STATE_BYTES or len(data) < _HEAD.size:
            raise StateError(f"{path}: {len(data)} bytes is not a state file")
        magic, version = _HEAD.unpack_from(data)
        if magic != MAGIC or version not in (1, VERSION):
            raise StateError(f"{path}: not a version 1 or {VERSION} agent state file")
        pos, positions = _HEAD.size, {}
        if version >= 2:
            if pos + _COUNT.size > len(data):
                raise StateError(f"{path}: truncated")
            (count,) = _COUNT.unpack_from(data, pos)
            pos += _COUNT.size
            if count > MAX_WORKERS or pos + count * _POSITION.size > len(data):
                raise StateError(f"{path}: truncated")
            for _ in range(count):
                worker, run, seq = _POSITION.unpack_from(data, pos)
                positions[worker] = (run, seq)
                pos += _POSITION.size
        records = []
        while pos < len(data):
            if pos + _LEN.size > len(data):
                raise StateError(f"{path}: truncated")
            (size,) = _LEN.unpack_from(data, pos)
            pos += _LEN.size
            if pos + size > len(data):
                raise StateError(f"{path}: truncated")
            msg = pb.ReportBatch()
            try:
                msg.ParseFromString(data[pos:pos + size])
            except Exception as exc:  # protobuf raises DecodeError; any failure means unreadable
                raise StateError(f"{path}: corrupt record: {exc}") from None
            records.append(msg)
            pos += size
        if not records or records[0].node != node:
            raise StateError(f"{path}: state of another node")
        head = records[0]
        box = cls(head.agent_id, node, window=window, interval_ms=interval_ms)
        box.sequence, box.acked, box.lost_deltas = head.sequence, head.acked, head.lost_deltas
        box.add(head.edges, head.names)
        box.unacked = list(records[1:])
        box.dp_positions = positions
        box.in_flight = {edge_key(d) for b in box.unacked for d in b.edges}
        box.delivered = box.acked
        return box
