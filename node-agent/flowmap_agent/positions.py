"""Where each dp worker's report stream got to, and what the next report means for it (pure).

A dp worker numbers its intervals (``Report.sequence``, from 1 per run), splits a large one into
parts (``part`` of ``parts``), and picks a new run id when it restarts. The agent keeps, per
worker, the last part it took (saved with the outbox, so a restarted agent knows it too):

* a report at or before that position was sent again after the agent's restart, and was saved
  before it: skip it;
* a report beyond the next one means reports that never reached the agent: dropped by the dp
  (which counts them too) or read by an agent that died before saving them. They are counted
  here, where the agent sees them, whether or not any report carrying the dp's own counts
  arrives: each missing part, or one per missing interval (its parts are unknown);
* an interval is acknowledged to the dp only once all its parts are taken, so that the dp keeps
  (and resends on a new connection) the parts the agent has not saved.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple, Protocol

MAX_WORKERS = 1024  # dp workers per node: far above any fanout, a bound on what a peer can make us keep
_U32 = (1 << 32) - 1


class Position(NamedTuple):
    run: int
    sequence: int
    part: int = 0
    parts: int = 1
    lost: int = 0  # the dp's cumulative lost_sessions already counted (Health), for this run

    @property
    def acked(self) -> int:
        """The last interval taken whole."""
        return self.sequence if self.part + 1 >= self.parts else self.sequence - 1


class Step(NamedTuple):
    take: bool  # a report not taken before
    missing: int  # reports before it that never arrived
    restarted: bool  # the first report of a new run of the worker


class _Report(Protocol):
    @property
    def run_id(self) -> int: ...
    @property
    def sequence(self) -> int: ...
    @property
    def part(self) -> int: ...
    @property
    def parts(self) -> int: ...


def follow(last: Position | None, report: _Report) -> tuple[Step, Position]:
    """What ``report`` is, after ``last`` (None: nothing taken from its worker yet), and the
    worker's position once it is taken."""
    parts = min(max(report.parts, report.part + 1), _U32)  # whatever a peer says, it is saved in a u32
    if last is None or last.run != report.run_id:
        # The first report heard of this run: what came before it in the run did not arrive
        # (a run starts at interval 1, part 0). A worker never heard of before may have
        # reported to an earlier agent whose state is gone: only its current interval is known.
        before = report.part + (max(report.sequence - 1, 0) if last is not None else 0)
        return Step(True, before, last is not None), Position(report.run_id, report.sequence, report.part, parts)
    if (report.sequence, report.part) <= (last.sequence, last.part):
        return Step(False, 0, False), last
    if report.sequence == last.sequence:
        missing = report.part - last.part - 1
    else:
        missing = max(last.parts - last.part - 1, 0) + (report.sequence - last.sequence - 1) + report.part
    return Step(True, missing, False), Position(report.run_id, report.sequence, report.part, parts, last.lost)


def acks(positions: Mapping[int, Position]) -> dict[int, tuple[int, int]]:
    """What to acknowledge to the dp: worker -> (run id, the last interval taken whole)."""
    return {worker: (p.run, p.acked) for worker, p in positions.items()}
