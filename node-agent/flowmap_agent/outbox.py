"""The agent's half of exactly-once: numbered batches kept until the operator acknowledges them.

* Deltas merge per edge into ``pending`` (memory bounded by distinct edges, not by time).
* Each interval, ``pending`` is cut into the next numbered batch, unless ``window`` batches are
  already waiting for their acknowledgement; then it keeps merging.
* Batches are delivered in order, one call at a time; after an error everything not yet
  acknowledged is delivered again, in order, with the same numbers (the operator skips what it
  has already counted).
* A batch is dropped only once acknowledged, and the next batch says so (``acked``) so that the
  operator can prune what it kept to recognise a resend.
* ``save``/``load`` keep all of it on disk (written atomically each interval, before sending),
  so a crash of the agent loses at most what reached it after the last save.

File format (version 1): ``FMAS`` | version u16 | then records, each a u32 length and a
serialized ``ReportBatch``: the first holds the pending deltas (sequence 0) with the agent id,
the next sequence and the acked number; the rest are the unacknowledged batches, in order.
"""

from __future__ import annotations

import os
import struct
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from flowmap_api import report_pb2 as pb

MAGIC, VERSION = b"FMAS", 1
_HEAD, _LEN = struct.Struct("!4sH"), struct.Struct("!I")
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
    def __init__(self, agent_id: str, node: str, *, window: int = 4, interval_ms: int = 1000) -> None:
        self.agent_id, self.node, self.window, self.interval_ms = agent_id, node, window, interval_ms
        self.pending: dict[EdgeKey, pb.EdgeDelta] = {}
        self.names: dict[str, pb.DnsName] = {}
        self.unacked: list[pb.ReportBatch] = []
        self.sequence = 0  # the last number given to a batch
        self.acked = 0
        self.delivered = 0  # the last batch delivered on the current connection
        self.lost_deltas = 0  # to be reported with the next batch

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
        """Turn pending deltas into the next numbered batch, unless the window is full."""
        if len(self.unacked) >= self.window:
            return None
        self.sequence += 1
        batch = pb.ReportBatch(agent_id=self.agent_id, node=self.node, sequence=self.sequence,
                               interval_ms=self.interval_ms, edges=list(self.pending.values()),
                               names=list(self.names.values()), lost_deltas=self.lost_deltas)
        self.pending.clear()
        self.names.clear()
        self.lost_deltas = 0
        self.unacked.append(batch)
        return batch

    # -- delivering -----------------------------------------------------------------------------

    def to_deliver(self) -> list[pb.ReportBatch]:
        """The batches to send now, in order; each carries the current ``acked`` and send time."""
        now = int(time.time() * 1000)
        out = [b for b in self.unacked if b.sequence > max(self.delivered, self.acked)]
        for b in out:
            b.acked, b.sent_unix_ms = self.acked, now
        return out

    def delivered_ok(self, batch: pb.ReportBatch, applied: int) -> None:
        """The operator took ``batch`` and says every batch up to ``applied`` is written."""
        self.delivered = max(self.delivered, batch.sequence)
        if applied > self.acked:
            self.acked = min(applied, self.sequence)
            self.unacked = [b for b in self.unacked if b.sequence > self.acked]
        # An ack can cover batches delivered before a reconnect: never point before the list.
        self.delivered = max(self.delivered, self.acked)

    def failed(self) -> None:
        """The connection broke or the operator refused: resend all unacknowledged, in order."""
        self.delivered = self.acked

    @property
    def edges(self) -> int:
        """Edges held in memory (the bound: distinct edges, times the window)."""
        return len(self.pending) + sum(len(b.edges) for b in self.unacked)

    # -- surviving a crash ----------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """Write the whole state atomically (temp file, fsync, rename)."""
        head = pb.ReportBatch(agent_id=self.agent_id, node=self.node, sequence=self.sequence, acked=self.acked,
                              edges=list(self.pending.values()), names=list(self.names.values()),
                              lost_deltas=self.lost_deltas)
        parts = [_HEAD.pack(MAGIC, VERSION)]
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
    def load(cls, path: Path, node: str, *, window: int = 4, interval_ms: int = 1000) -> Outbox:
        """The saved state of this node's agent (raises StateError if unreadable or another node's)."""
        data = path.read_bytes()
        if len(data) > MAX_STATE_BYTES or len(data) < _HEAD.size:
            raise StateError(f"{path}: {len(data)} bytes is not a state file")
        magic, version = _HEAD.unpack_from(data)
        if magic != MAGIC or version != VERSION:
            raise StateError(f"{path}: not a version {VERSION} agent state file")
        records, pos = [], _HEAD.size
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
        box.delivered = box.acked
        return box
