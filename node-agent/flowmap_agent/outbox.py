"""The agent's half of exactly-once: numbered batches kept until the operator acknowledges them.

* Deltas merge per edge into ``pending`` (flowmap_agent.deltas.merge; memory bounded by distinct
  edges, not by time).
* Each interval, the pending deltas become the next numbered batch, but for an edge whose last
  delta is not written yet (in flight): its next one goes out ``refresh`` seconds after the last
  (``FLOWMAP_AGENT_REFRESH_INTERVAL``), so that the operator counts (and exports,
  flowmap_operator.highwater) what the node saw within that time however far behind its writes
  are, without taking every interval of every busy edge. An edge may so have several deltas in
  flight; once ``MAX_IN_FLIGHT`` deltas are unacknowledged, an edge with one in flight keeps
  merging until it is acknowledged. So everything held is bounded by the edges plus
  ``MAX_IN_FLIGHT``, and a new edge goes out in the next batch whatever the operator's writes.
* Batches are delivered in order, one call at a time, each naming the one before it
  (``previous``); after an error everything not yet acknowledged is delivered again, in order,
  with the same numbers (the operator skips what it has already counted).
* The operator acknowledges batch by batch (``ReportAck.received`` and ``waiting``): a batch is
  dropped once acknowledged, and the next batch says which ones the agent no longer holds
  (``acked``) so that the operator can prune what it kept to recognise a resend. When there is
  nothing new to send, a batch with sequence 0 asks for the acknowledgement. A question whose
  answer acknowledges nothing new makes the next one wait twice as long, from the interval up to
  ``refresh``; any progress brings the wait back to the interval. Acknowledgements wait on the
  operator's writes: at 1,000 nodes, asking every second was 9 of its 10 calls, and its CPU, while
  the answer seldom changed. A later acknowledgement costs nothing else: the edges in flight still
  go every ``refresh``, and what is held stays bounded (``MAX_IN_FLIGHT``).
* ``save``/``load`` keep all of it on disk (written atomically each interval, before sending),
  so a crash of the agent loses at most what reached it after the last save; a starting agent
  takes it up with :func:`resume`.

* A batch keeps to the contract's limits (flowmap_api.limits: edges, names, encoded bytes): what
  does not fit waits for the next batch, cut at once. A batch the operator refused whole holds
  nothing the operator applied, so the one edge it names as uncountable is taken out
  (:meth:`Outbox.quarantine`) and the rest goes again under the same number; and a batch over the
  limits (cut by an older agent, read from its state file) is cut down to them, its surplus
  returned to the pending deltas for the next numbers (:meth:`Outbox.split`). Nothing
  unacknowledged is ever dropped otherwise.

* It also keeps where each dp worker's reports got to (flowmap_agent.positions), so that a
  restarted agent counts the reports that never reached it (a gap in the sequence) instead of
  losing them silently.

File format (version 3): ``FMAS`` | version u16 | u16 count, then that many dp positions (u32
worker, u64 run id, u64 sequence, u32 part, u32 parts, u64 lost sessions counted) | then records,
each a u32 length and a serialized ``ReportBatch``: the first holds the pending deltas (sequence
0) with the agent id, the next sequence and the acked number; the rest are the unacknowledged
batches, in order. Versions 1 (no positions) and 2 (worker, run id, sequence: whole intervals)
are still read.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import struct
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import TypeVar

from flowmap_agent.deltas import EdgeKey, edge_key, merge
from flowmap_agent.errors import StateError
from flowmap_agent.positions import MAX_WORKERS, Position
from flowmap_api import report_pb2 as pb
from flowmap_api.limits import (MAX_BATCH_EDGES, MAX_MESSAGE_BYTES, MAX_NAMES, MAX_NODE_VMS, MAX_POD_ADDRESSES,
                                MAX_VM_ADDRESSES, MAX_VM_NAME)
from flowmap_api.validity import MAX_POD

log = logging.getLogger("flowmap.agent")
MAGIC, VERSION = b"FMAS", 3
_HEAD, _LEN = struct.Struct("!4sH"), struct.Struct("!I")
_COUNT = struct.Struct("!H")
_POSITIONS = {2: struct.Struct("!IQQ"), 3: struct.Struct("!IQQIIQ")}
MAX_STATE_BYTES = 512 * 1024 * 1024
# What a batch's deltas and names may weigh: the operator's receive limit, less what is set when
# the batch is sent (acked, previous, the time, up to MAX_NODE_ADDRESSES addresses: under 4 KiB;
# up to MAX_NODE_VMS VMs and MAX_POD_ADDRESSES pods' secondary addresses, each at most the weight
# of the largest one the contract takes).
_LONGEST_IP = "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255"
_LARGEST_VM = pb.LocalVm(uuid="0" * 36, name="\U0010ffff" * MAX_VM_NAME, label="a" * 63,
                         addresses=[_LONGEST_IP] * MAX_VM_ADDRESSES)
_LARGEST_POD_ADDRESS = pb.PodAddresses(pod="a" * MAX_POD, ips=[_LONGEST_IP])
MAX_BATCH_BYTES = (MAX_MESSAGE_BYTES - 16 * 1024 - MAX_NODE_VMS * (_LARGEST_VM.ByteSize() + 3)
                   - MAX_POD_ADDRESSES * (_LARGEST_POD_ADDRESS.ByteSize() + 3))
_M = TypeVar("_M", pb.EdgeDelta, pb.DnsName)


def _weight(msg: pb.EdgeDelta | pb.DnsName) -> int:
    """Bytes ``msg`` adds to a batch: itself, its tag and its length."""
    return int(msg.ByteSize()) + 6


def _copy(msg: _M) -> _M:
    out = type(msg)()
    out.CopyFrom(msg)
    return out


def oversized(batch: pb.ReportBatch) -> bool:
    """More than the operator takes in one batch (flowmap_api.limits; names beyond MAX_NAMES it
    drops, as metadata)."""
    return bool(len(batch.edges) > MAX_BATCH_EDGES or batch.ByteSize() > MAX_MESSAGE_BYTES)


class _Filling:
    """A batch being filled up to the limits."""

    def __init__(self, batch: pb.ReportBatch) -> None:
        self.batch, self.room = batch, MAX_BATCH_BYTES - batch.ByteSize()

    def edge(self, d: pb.EdgeDelta) -> bool:
        """Add ``d`` if it fits (one always does, in a batch without edges)."""
        size = _weight(d)
        if len(self.batch.edges) >= MAX_BATCH_EDGES or (size > self.room and self.batch.edges):
            return False
        self.batch.edges.append(d)
        self.room -= size
        return True

    def name(self, n: pb.DnsName) -> bool:
        size = _weight(n)
        if len(self.batch.names) >= MAX_NAMES or (size > self.room and (self.batch.edges or self.batch.names)):
            return False
        self.batch.names.append(n)
        self.room -= size
        return True


# Edge deltas in unacknowledged batches beyond which an edge with one in flight waits (merging)
# for its acknowledgement: about 6 MB of deltas, and of the state file saved each interval.
MAX_IN_FLIGHT = 20_000


def question_wait(wait: float, progressed: bool, interval: float, refresh: float) -> float:
    """Seconds from an answer to the next acknowledgement question: the interval after progress,
    else twice the last wait, up to ``refresh``."""
    return interval if progressed else min(2 * wait, refresh)


class Outbox:
    def __init__(self, agent_id: str, node: str, *, window: int = 1024, interval_ms: int = 1000,
                 refresh: float = 10.0) -> None:
        self.agent_id, self.node, self.window, self.interval_ms = agent_id, node, window, interval_ms
        self.refresh = refresh  # seconds between deltas of an edge in flight
        self.sent_at: dict[EdgeKey, float] = {}  # edge in flight -> when its last delta was cut (monotonic)
        self.pending: dict[EdgeKey, pb.EdgeDelta] = {}
        self.names: dict[str, pb.DnsName] = {}
        self.unacked: list[pb.ReportBatch] = []
        self.in_flight: Counter[EdgeKey] = Counter()  # edge -> unacknowledged batches with a delta of it
        self.sequence = 0  # the last number given to a batch
        self.acked = 0  # no batch up to here is held
        self.delivered = 0  # the last batch delivered on the current connection
        self.lost_deltas = 0  # to be reported with the next batch
        self.ask_wait = interval_ms / 1000  # seconds from an answer to the next acknowledgement question
        self.ask_at = 0.0  # monotonic: no question before then
        self.dp_positions: dict[int, Position] = {}  # dp worker -> the last report taken
        # The node's own addresses as they are now: every batch says them when it is sent (a resent
        # one too), so the operator always has the latest (plumbing.announced).
        self.node_addresses: tuple[str, ...] = ()
        # The node's libvirt VMs as they are now, said the same way (flowmap_agent.domains.local_vm),
        # when the agent follows libvirt (``vms_followed``).
        self.vms: list[pb.LocalVm] = []
        self.vms_followed = False
        # The node's pods' verified secondary addresses as they are now, (pod, addresses) each
        # (flowmap_agent.plumbing.secondary_reported): every batch says them all when it is sent, like the above.
        self.pod_addresses: tuple[tuple[str, tuple[str, ...]], ...] = ()

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

    def cut(self, now: float | None = None) -> pb.ReportBatch | None:
        """The next numbered batch: the pending deltas of edges with none in flight, and of those
        in flight whose last delta went ``refresh`` seconds ago (none once ``MAX_IN_FLIGHT``
        deltas are), and new names, as many as the contract's limits allow (the rest waits for
        the next batch). ``now``: monotonic seconds."""
        if len(self.unacked) >= self.window:
            return None
        now = time.monotonic() if now is None else now
        flying, sent_at, due = self.in_flight, self.sent_at, now - self.refresh
        if flying.total() < MAX_IN_FLIGHT:
            ready = [key for key in self.pending if key not in flying or sent_at.get(key, -math.inf) <= due]
        else:
            ready = [key for key in self.pending if key not in flying]
        if not (ready or self.names or self.lost_deltas):
            return None
        filling = _Filling(pb.ReportBatch(agent_id=self.agent_id, node=self.node, sequence=self.sequence + 1,
                                          interval_ms=self.interval_ms, lost_deltas=self.lost_deltas))
        for key in ready:
            if not filling.edge(self.pending[key]):
                break
            del self.pending[key]
            flying[key] += 1
            sent_at[key] = now
        for ip in list(self.names):
            if not filling.name(self.names[ip]):
                break
            del self.names[ip]
        self.sequence += 1
        self.lost_deltas = 0
        self.unacked.append(filling.batch)
        return filling.batch

    def cut_all(self) -> list[pb.ReportBatch]:
        """Every batch there is room for now (in the window): nothing ready waits for the next interval."""
        out = []
        while (batch := self.cut()) is not None:
            out.append(batch)
        return out

    # -- delivering -----------------------------------------------------------------------------

    def to_deliver(self, now: float | None = None) -> list[pb.ReportBatch]:
        """The batches to send now, in order, each naming its predecessor; else an acknowledgement
        question if one is due at ``now`` (monotonic)."""
        due = (time.monotonic() if now is None else now) >= self.ask_at
        sent = int(time.time() * 1000)
        out, previous = [], self.acked
        for b in self.unacked:
            if b.sequence > self.delivered:
                b.acked, b.previous, b.sent_unix_ms = self.acked, previous, sent
                b.node_addresses[:] = self.node_addresses
                b.vms_followed = self.vms_followed
                b.ClearField("vms")
                b.vms.extend(self.vms)
                self._say_pod_addresses(b)
                out.append(b)
            previous = b.sequence
        if not out and self.unacked and due:
            out.append(pb.ReportBatch(agent_id=self.agent_id, node=self.node, acked=self.acked, sent_unix_ms=sent,
                                      node_addresses=self.node_addresses, vms_followed=self.vms_followed,
                                      vms=self.vms))
            self._say_pod_addresses(out[-1])
        return out

    def _say_pod_addresses(self, batch: pb.ReportBatch) -> None:
        del batch.pod_addresses[:]
        batch.pod_addresses.extend(pb.PodAddresses(pod=pod, ips=ips) for pod, ips in self.pod_addresses)

    def delivered_ok(self, batch: pb.ReportBatch, ack: pb.ReportAck, now: float | None = None) -> None:
        """The operator took ``batch`` (at ``now``, monotonic): drop every batch it says is written."""
        self.delivered = max(self.delivered, batch.sequence)
        waiting = set(ack.waiting)
        keep = []
        for b in self.unacked:
            if b.sequence <= ack.applied or (b.sequence <= ack.received and b.sequence not in waiting):
                self._landed(edge_key(d) for d in b.edges)
            else:
                keep.append(b)
        progressed = len(keep) < len(self.unacked)
        self.unacked = keep
        self.acked = keep[0].sequence - 1 if keep else self.sequence
        self.ask_wait = question_wait(self.ask_wait, progressed, self.interval_ms / 1000, self.refresh)
        self.ask_at = (time.monotonic() if now is None else now) + self.ask_wait

    def quarantine(self, batch: pb.ReportBatch, index: int) -> pb.EdgeDelta | None:
        """The operator refused ``batch`` whole because it can never count its edge ``index``:
        take that delta out (returned, for the caller to count and log; counted in
        ``lost_deltas`` too). The rest of the batch goes again under its own number: a batch
        refused whole holds nothing the operator applied. None: the batch has no such edge."""
        if not any(b is batch for b in self.unacked) or not 0 <= index < len(batch.edges):
            return None
        bad = pb.EdgeDelta()
        bad.CopyFrom(batch.edges[index])
        del batch.edges[index]
        self._landed([edge_key(bad)])
        self.lost_deltas += 1
        return bad

    def split(self, batch: pb.ReportBatch) -> bool:
        """``batch``, refused whole, is over the contract's limits (an older agent cut it): keep
        under its number what fits and return the rest to the pending deltas, for the next
        numbers (the operator holds nothing of a refused batch, so nothing is counted twice).
        False: it is within the limits, and was refused for something else."""
        if not oversized(batch) or not any(b is batch for b in self.unacked):
            return False
        edges, names = [_copy(d) for d in batch.edges], [_copy(n) for n in batch.names]
        del batch.edges[:]
        del batch.names[:]
        filling = _Filling(batch)
        kept = 0
        while kept < len(edges) and filling.edge(edges[kept]):
            kept += 1
        named = 0
        while named < len(names) and filling.name(names[named]):
            named += 1
        for d in edges[kept:]:
            key = edge_key(d)
            self._landed([key])
            newer = self.pending.get(key)
            if newer is not None:
                merge(d, newer)  # the returned delta is the older: the newer's gauges win
            self.pending[key] = d
        for n in names[named:]:
            self.names.setdefault(n.ip, n)  # a newer answer for the address wins
        return True

    def _landed(self, keys: Iterable[EdgeKey]) -> None:
        """A delta of each of ``keys`` is no longer in flight."""
        flying = self.in_flight
        for key in keys:
            flying[key] -= 1
            if flying[key] <= 0:
                del flying[key]
                self.sent_at.pop(key, None)

    def failed(self) -> None:
        """The connection broke or the operator refused: resend all unacknowledged, in order."""
        self.delivered = self.acked

    @property
    def edges(self) -> int:
        """Edge deltas held in memory (at most the distinct edges, ``MAX_IN_FLIGHT`` and a batch)."""
        return len(self.pending) + sum(len(b.edges) for b in self.unacked)

    # -- surviving a crash ----------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """Write the whole state atomically (temp file, fsync, rename)."""
        head = pb.ReportBatch(agent_id=self.agent_id, node=self.node, sequence=self.sequence, acked=self.acked,
                              edges=list(self.pending.values()), names=list(self.names.values()),
                              lost_deltas=self.lost_deltas)
        positions = sorted(self.dp_positions.items())[:MAX_WORKERS]
        parts = [_HEAD.pack(MAGIC, VERSION), _COUNT.pack(len(positions))]
        parts += [_POSITIONS[VERSION].pack(worker, *p) for worker, p in positions]
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
    def load(cls, path: Path, node: str, *, window: int = 1024, interval_ms: int = 1000,
             refresh: float = 10.0) -> Outbox:
        """The saved state of this node's agent (raises StateError if unreadable or another node's)."""
        data = path.read_bytes()
        if len(data) > MAX_STATE_BYTES or len(data) < _HEAD.size:
            raise StateError(f"{path}: {len(data)} bytes is not a state file")
        magic, version = _HEAD.unpack_from(data)
        if magic != MAGIC or version not in (1, *_POSITIONS):
            raise StateError(f"{path}: not a version 1 to {VERSION} agent state file")
        pos, positions = _HEAD.size, {}
        if version in _POSITIONS:
            entry = _POSITIONS[version]
            if pos + _COUNT.size > len(data):
                raise StateError(f"{path}: truncated")
            (count,) = _COUNT.unpack_from(data, pos)
            pos += _COUNT.size
            if count > MAX_WORKERS or pos + count * entry.size > len(data):
                raise StateError(f"{path}: truncated")
            for _ in range(count):
                worker, *fields = entry.unpack_from(data, pos)
                positions[worker] = Position(*fields)  # version 2: whole intervals, nothing counted lost
                pos += entry.size
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
        box = cls(head.agent_id, node, window=window, interval_ms=interval_ms, refresh=refresh)
        box.sequence, box.acked, box.lost_deltas = head.sequence, head.acked, head.lost_deltas
        box.add(head.edges, head.names)
        box.unacked = list(records[1:])
        box.dp_positions = positions
        box.in_flight = Counter(edge_key(d) for b in box.unacked for d in b.edges)
        box.delivered = box.acked
        return box


def resume(path: Path, node: str, *, window: int = 1024, interval_ms: int = 1000, refresh: float = 10.0) -> Outbox:
    """The outbox the last agent of this node saved at ``path``; a new one, under a new agent id,
    when there is none or it cannot be read (said, and what it held is lost)."""
    if path.exists():
        try:
            box = Outbox.load(path, node, window=window, interval_ms=interval_ms, refresh=refresh)
            log.info("resumed as %s at batch %d (%d unacknowledged)", box.agent_id, box.sequence, len(box.unacked))
            return box
        except (StateError, OSError) as exc:
            log.error("cannot resume from %s (%s): starting afresh", path, exc)
    # An agent id is at most 128 characters (flowmap_api.validity); a node name may be 253.
    return Outbox(f"{node[:114]}/{secrets.token_hex(6)}", node, window=window, interval_ms=interval_ms,
                  refresh=refresh)
