"""Exactly-once counting of agents' deltas into Connection objects (pure: no I/O).

The counting rules (docs/architecture.md tells where they sit in the walk of a packet):

* Each agent incarnation numbers its batches 1, 2, 3 ... and delivers them in order, one at a
  time, retrying a batch until the operator answers; a resent batch keeps its number. Each batch
  names the one delivered before it (``previous``); the batches in between are acknowledged, so
  a gap is never a lost batch.
* A delta from batch N of agent A is applied to an edge only if N is above the edge's watermark
  for A. The watermark is written in the same object update as the counters it covers, so an
  update either carries both or neither.
* Batch N is acknowledged once every edge it touched has been written with a watermark >= N,
  whatever the state of other batches: a batch waits only for its own edges. The agent keeps at
  most one unacknowledged delta per edge (the next one merges until then), so what both sides
  hold is bounded by edges, not by time, and new edges are never stuck behind old ones.
* The agent says which batches it no longer holds (``acked``: none up to there) so that we can
  prune watermarks it can no longer need.

In memory, each edge holds its persisted state (as last written or read) plus pending deltas per
agent. A flush takes a snapshot of the pending deltas; on success they move into the persisted
state and the batches waiting on that edge are released; deltas that arrived during the write
stay pending. After a crash all of this is rebuilt from the objects and the agents' resends.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flowmap_operator.errors import Busy, OutOfOrder

EdgeKey = tuple[str, str, int, str]  # client group, server group, server port (0 = any), protocol


@dataclass
class Counters:
    bytes_c2s: int = 0
    bytes_s2c: int = 0
    packets_c2s: int = 0
    packets_s2c: int = 0
    sessions: int = 0  # sessions opened

    def add(self, other: Counters) -> None:
        self.bytes_c2s += other.bytes_c2s
        self.bytes_s2c += other.bytes_s2c
        self.packets_c2s += other.packets_c2s
        self.packets_s2c += other.packets_s2c
        self.sessions += other.sessions

    def sub(self, other: Counters) -> None:
        self.bytes_c2s -= other.bytes_c2s
        self.bytes_s2c -= other.bytes_s2c
        self.packets_c2s -= other.packets_c2s
        self.packets_s2c -= other.packets_s2c
        self.sessions -= other.sessions

    def copy(self) -> Counters:
        return Counters(self.bytes_c2s, self.bytes_s2c, self.packets_c2s, self.packets_s2c, self.sessions)

    def is_zero(self) -> bool:
        return not (self.bytes_c2s or self.bytes_s2c or self.packets_c2s or self.packets_s2c or self.sessions)

    def at_least(self, other: Counters) -> Counters:
        """Each count the higher of the two: self if none of ``other``'s is higher."""
        if (other.bytes_c2s <= self.bytes_c2s and other.bytes_s2c <= self.bytes_s2c
                and other.packets_c2s <= self.packets_c2s and other.packets_s2c <= self.packets_s2c
                and other.sessions <= self.sessions):
            return self
        return Counters(max(self.bytes_c2s, other.bytes_c2s), max(self.bytes_s2c, other.bytes_s2c),
                        max(self.packets_c2s, other.packets_c2s), max(self.packets_s2c, other.packets_s2c),
                        max(self.sessions, other.sessions))


@dataclass(frozen=True)
class Watermark:
    node: str
    batch: int


@dataclass
class Pending:
    """One agent's deltas for one edge that are not in the API server yet."""

    node: str
    counters: Counters
    last_batch: int


@dataclass
class Edge:
    key: EdgeKey
    persisted: Counters = field(default_factory=Counters)
    watermarks: dict[str, Watermark] = field(default_factory=dict)  # agent -> highest batch written
    pending: dict[str, Pending] = field(default_factory=dict)  # agent -> not yet written
    # The bytes (both ways) in ``pending``, kept with it: flowmap_operator.urgency ranks every dirty
    # edge each flush round, 10,000 of them in a busy cluster.
    unwritten: int = 0
    resource_version: str | None = None  # None: the object does not exist in the API yet
    dirty_since: float | None = None
    # An update whose outcome is unknown (timeout, lost connection): re-read before writing again.
    in_doubt: FlushPlan | None = None

    def applied(self) -> Counters:
        """Everything counted on this edge, written or pending."""
        total = self.persisted.copy()
        for pend in self.pending.values():
            total.add(pend.counters)
        return total

    def watermark(self, agent: str) -> int:
        """The highest batch of ``agent`` counted on this edge, written or pending."""
        written = self.watermarks[agent].batch if agent in self.watermarks else 0
        pending = self.pending[agent].last_batch if agent in self.pending else 0
        return max(written, pending)


@dataclass(frozen=True)
class FlushPlan:
    """What one object update carries: counters and watermarks, taken from pending at a moment."""

    key: EdgeKey
    counters: Counters  # the new persisted totals
    watermarks: dict[str, Watermark]  # the new watermark list (already pruned)
    taken: dict[str, Pending]  # per agent, the pending part this update carries


@dataclass
class _Agent:
    node: str
    delivered: int = 0  # highest batch received (or acknowledged by an earlier replica)
    acked_by_agent: int = 0  # the agent will never resend batches up to here
    waiting: dict[int, set[EdgeKey]] = field(default_factory=dict)  # batch -> edges not yet written (never empty)


class Ledger:
    """Every edge's counters and watermarks, and every agent's acknowledgement state."""

    def __init__(self) -> None:
        self.edges: dict[EdgeKey, Edge] = {}
        self.agents: dict[str, _Agent] = {}

    # -- loading what is already in the API ------------------------------------------------------

    def load(self, key: EdgeKey, counters: Counters, watermarks: Iterable[tuple[str, str, int]],
             resource_version: str | None) -> None:
        """Take an existing object's state (operator start, a write conflict, an update in doubt)."""
        edge = self.edges.setdefault(key, Edge(key))
        doubt, edge.in_doubt = edge.in_doubt, None
        edge.persisted = counters.copy()
        edge.watermarks = {agent: Watermark(node, batch) for agent, node, batch in watermarks}
        edge.resource_version = resource_version
        if doubt is not None and doubt.taken and all(
                agent in edge.watermarks and edge.watermarks[agent].batch >= took.last_batch
                for agent, took in doubt.taken.items()):
            # The update in doubt did land (an update is atomic: all its watermarks or none).
            self._settle(edge, doubt)
        # Pending deltas the object already carries (written by someone else) are dropped.
        for agent, pend in list(edge.pending.items()):
            if agent in edge.watermarks and edge.watermarks[agent].batch >= pend.last_batch:
                del edge.pending[agent]
                edge.unwritten -= pend.counters.bytes_c2s + pend.counters.bytes_s2c
                self._release(agent, key, pend.last_batch)
        if not edge.pending:
            edge.dirty_since = None

    # -- applying a batch -----------------------------------------------------------------------

    def begin_batch(self, agent: str, node: str, sequence: int, acked: int, previous: int) -> None:
        """Check a batch's place in its agent's sequence before its deltas are applied.

        ``sequence`` 0 asks only for the acknowledgement: it changes nothing but ``acked``.
        """
        state = self.agents.get(agent)
        if state is None:
            if not sequence:
                return
            # Unknown agent (first contact, or we restarted): the agent says what it dropped.
            state = self.agents[agent] = _Agent(node, delivered=acked, acked_by_agent=acked)
        # Every batch up to ``acked`` is written (the agent drops a batch only then), so a batch
        # that follows one of those, or one received, follows everything before it.
        state.delivered = max(state.delivered, acked)
        if sequence > state.delivered and previous > state.delivered:
            raise OutOfOrder(sequence, previous, state.delivered)
        state.acked_by_agent = max(state.acked_by_agent, acked)
        state.delivered = max(state.delivered, sequence)
        # Batches the agent says it dropped need no tracking any more.
        for seq in [s for s in state.waiting if s <= state.acked_by_agent]:
            del state.waiting[seq]

    def apply(self, agent: str, sequence: int, key: EdgeKey, delta: Counters, now: float) -> bool:
        """Count one edge delta of batch ``sequence`` unless it already is; True if it counted."""
        state = self.agents[agent]
        edge = self.edges.get(key)
        if edge is None:  # (not setdefault: an Edge made and thrown away for every delta costs more than the rest)
            edge = self.edges[key] = Edge(key)
        if sequence <= edge.watermark(agent):
            return False
        pend = edge.pending.get(agent)
        if pend is None:
            edge.pending[agent] = Pending(state.node, delta.copy(), sequence)
        else:
            pend.counters.add(delta)
            pend.last_batch = sequence
        edge.unwritten += delta.bytes_c2s + delta.bytes_s2c
        if edge.dirty_since is None:
            edge.dirty_since = now
        state.waiting.setdefault(sequence, set()).add(key)
        return True

    def touch(self, key: EdgeKey, now: float) -> None:
        """Something besides the counters changed (the action): write the object again."""
        edge = self.edges.get(key)
        if edge is None:
            edge = self.edges[key] = Edge(key)
        if edge.dirty_since is None:
            edge.dirty_since = now

    def acked(self, agent: str) -> int:
        """The highest batch whose deltas, and all earlier ones', are in the API server."""
        state = self.agents.get(agent)
        if state is None:
            return 0
        return min(state.waiting) - 1 if state.waiting else state.delivered

    def progress(self, agent: str) -> tuple[int, int, list[int]]:
        """What a ReportAck says: (acked, received, the batches after ``acked`` still waiting)."""
        state = self.agents.get(agent)
        if state is None:
            return 0, 0, []
        return self.acked(agent), state.delivered, sorted(state.waiting)

    def waiting_batches(self, agent: str) -> int:
        state = self.agents.get(agent)
        return len(state.waiting) if state else 0

    def admit(self, agent: str, sequence: int, most_waiting: int) -> bool:
        """Whether batch ``sequence`` is new (not one resent); a new one is refused (Busy) while
        ``most_waiting`` batches of its agent are not written yet."""
        state = self.agents.get(agent)
        new = state is None or sequence > state.delivered
        waiting = self.waiting_batches(agent)
        if new and waiting >= most_waiting:
            raise Busy(f"{waiting} batches of this agent are not written yet")
        return new

    # -- writing --------------------------------------------------------------------------------

    def plan(self, key: EdgeKey) -> FlushPlan:
        """The next update of one edge: persisted + pending, watermarks pruned of what is done."""
        edge = self.edges[key]
        taken = {agent: Pending(pend.node, pend.counters.copy(), pend.last_batch)
                 for agent, pend in edge.pending.items()}
        marks = {agent: wm for agent, wm in edge.watermarks.items() if not self._prunable(agent, wm.batch)}
        for agent, pend in taken.items():
            marks[agent] = Watermark(pend.node, pend.last_batch)
        return FlushPlan(key, edge.applied(), marks, taken)

    def written(self, plan: FlushPlan, resource_version: str) -> None:
        """The update carrying ``plan`` was accepted by the API server."""
        edge = self.edges[plan.key]
        edge.persisted = plan.counters.copy()
        edge.watermarks = dict(plan.watermarks)
        edge.resource_version = resource_version
        self._settle(edge, plan)

    def created(self, key: EdgeKey, resource_version: str) -> None:
        """The edge's object was made (its status still empty): the next update goes to it."""
        self.edges[key].resource_version = resource_version

    def unmade(self, key: EdgeKey) -> None:
        """The edge needs an object of its own made again (its name turned out to be another edge's)."""
        self.edges[key].resource_version = None

    def vanished(self, key: EdgeKey) -> None:
        """The edge's object is gone (someone deleted it): made again, with what is pending only."""
        self.load(key, Counters(), [], None)

    def forget(self, key: EdgeKey) -> None:
        """The edge's object was deleted on purpose (idle past its TTL)."""
        self.edges.pop(key, None)

    def in_doubt(self, plan: FlushPlan) -> None:
        """The update carrying ``plan`` may or may not have landed: re-read before the next one."""
        self.edges[plan.key].in_doubt = plan

    def _settle(self, edge: Edge, plan: FlushPlan) -> None:
        for agent, took in plan.taken.items():
            pend = edge.pending[agent]
            pend.counters.sub(took.counters)
            edge.unwritten -= took.counters.bytes_c2s + took.counters.bytes_s2c
            if pend.last_batch == took.last_batch:
                # Nothing newer arrived while writing (a zero delta of a newer batch still waits).
                del edge.pending[agent]
            self._release(agent, plan.key, took.last_batch)
        if not edge.pending:
            edge.dirty_since = None

    def dirty(self) -> list[Edge]:
        """Edges with something to write, in no order of note: which goes first is
        flowmap_operator.urgency's to say."""
        return [e for e in self.edges.values() if e.dirty_since is not None]

    def _release(self, agent: str, key: EdgeKey, upto: int) -> None:
        state = self.agents.get(agent)
        if state is None:
            return
        for seq in [seq for seq in state.waiting if seq <= upto]:
            keys = state.waiting[seq]
            keys.discard(key)
            if not keys:
                del state.waiting[seq]

    def _prunable(self, agent: str, batch: int) -> bool:
        state = self.agents.get(agent)
        return state is not None and state.acked_by_agent >= batch


def watermarks_from_status(status: Mapping[str, Any]) -> list[tuple[str, str, int]]:
    """The (agent, node, batch) list as a Connection's status stores it."""
    return [(o["agent"], o["node"], int(o["batch"])) for o in status.get("observers", [])]


def watermarks_to_status(marks: Mapping[str, Watermark]) -> list[dict[str, Any]]:
    return [{"agent": agent, "node": wm.node, "batch": wm.batch} for agent, wm in sorted(marks.items())]
