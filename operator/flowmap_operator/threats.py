"""What the map keeps of threats (pure): per edge and threat name a tally, the Connection's status
list made of them, and the Kubernetes Events they raise.

An edge keeps one ``Tally`` per name (flowmap_api.threats; a name this version does not know is
``unknown``): the hits counted, when the first and the latest were seen, and the latest example.
So the list is bounded by the names, and ``status.threats`` lists them most severe first.
Counting follows the ledger: a batch's hits count only when its counters do (a batch resent
after its acknowledgement was lost is not counted again).

An edge that shows a threat raises a Warning Event on the Groups of its workloads, at most one per
Group and name every ``cooldown`` seconds (``Alerts``), from a bounded queue.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from flowmap_api import report_pb2 as pb
from flowmap_api.threats import BY_NAME, SEVERITIES, UNKNOWN
from flowmap_operator.times import iso, parse_iso

MAX_EXAMPLE = 256  # characters of an example (the CRD's bound; the agents cut at the same length)
MAX_SUMMARY = 128  # characters of status.threatSummary, the THREATS column
MAX_QUEUED = 1000  # Events waiting for the write budget; more are counted as dropped
_RANK = {s: i for i, s in enumerate(SEVERITIES)}


def severity(name: str) -> str:
    kind = BY_NAME.get(name)
    return kind.severity if kind else "Medium"  # an unknown name (a newer dp) is shown, not ranked first


@dataclass(slots=True)
class Tally:
    """One threat name's hits on one edge."""

    count: int
    first: float
    last: float
    example: str


def tally(into: dict[str, Tally], hits: Iterable[pb.ThreatHit], when: float) -> list[str]:
    """Count ``hits`` into an edge's tallies; the names counted, each once. The hits passed
    ``flowmap_api.validity``: known names (or ``unknown``), snippets bounded and printable."""
    counted: dict[str, None] = {}
    for hit in hits:
        name = hit.name if hit.name in BY_NAME else UNKNOWN
        at = hit.time_unix_ms / 1000 or when
        counted[name] = None
        t = into.get(name)
        if t is None:
            into[name] = Tally(1, at, at, hit.snippet[:MAX_EXAMPLE])
        else:
            t.count += 1
            t.first, t.last = min(t.first, at), max(t.last, at)
            t.example = hit.snippet[:MAX_EXAMPLE] or t.example
    return list(counted)


def ordered(tallies: Mapping[str, Tally]) -> list[str]:
    """The names most severe first, then by count (most first), then by name."""
    return sorted(tallies, key=lambda n: (_RANK.get(severity(n), len(_RANK)), -tallies[n].count, n))


def to_status(tallies: Mapping[str, Tally]) -> tuple[list[dict[str, Any]], str]:
    """``status.threats`` and ``status.threatSummary`` (the THREATS column: the names, most severe first)."""
    names = ordered(tallies)
    items = []
    for name in names:
        t = tallies[name]
        item: dict[str, Any] = {"name": name, "severity": severity(name), "count": t.count,
                                "firstSeen": iso(t.first), "lastSeen": iso(t.last)}
        if t.example:
            item["example"] = t.example
        items.append(item)
    summary = ",".join(names)
    return items, summary if len(summary) <= MAX_SUMMARY else summary[:MAX_SUMMARY - 3] + "..."


def from_status(items: Any) -> dict[str, Tally]:
    """An edge's tallies as its Connection said them (the operator's start); anything malformed is
    left out (the API server's schema already refuses it)."""
    out: dict[str, Tally] = {}
    if not isinstance(items, list):
        return out
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("name"), str) and isinstance(item.get("count"), int):
            out[item["name"]] = Tally(item["count"], parse_iso(item.get("firstSeen")), parse_iso(item.get("lastSeen")),
                                      str(item.get("example", ""))[:MAX_EXAMPLE])
    return out


@dataclass(frozen=True)
class Alert:
    """One Event to raise on a Group."""

    group: str
    name: str  # the threat's
    message: str


class Alerts:
    """The Events threats raise: at most one per Group and name every ``cooldown`` seconds, queued
    (bounded) for the write budget."""

    def __init__(self, cooldown: float = 600.0, max_queued: int = MAX_QUEUED) -> None:
        self.cooldown, self.max_queued = cooldown, max_queued
        self.queue: deque[Alert] = deque()
        self.raised: dict[tuple[str, str], float] = {}  # (group, name) -> when its last Event was queued
        self.dropped = 0

    def saw(self, groups: Iterable[str], edge: tuple[str, str, int, str], names: Iterable[str],
            tallies: Mapping[str, Tally], now: float) -> None:
        """``names`` were just counted on ``edge``: queue an Event for each of ``groups`` not told lately."""
        client, server, port, protocol = edge
        for name in names:
            t = tallies[name]
            message = (f"{name} ({severity(name)}): {client} -> {server} {port}/{protocol}, "
                       f"{t.count} hit{'s' if t.count != 1 else ''}")
            if t.example:
                message += f"; e.g. {t.example}"
            for group in groups:
                if now - self.raised.get((group, name), -self.cooldown) < self.cooldown:
                    continue
                if len(self.queue) >= self.max_queued:
                    self.dropped += 1
                    continue
                self.raised[(group, name)] = now
                self.queue.append(Alert(group, name, message[:1024]))
        if len(self.raised) > 4 * self.max_queued:  # forget the cooldowns that ran out
            self.raised = {k: t for k, t in self.raised.items() if now - t < self.cooldown}
