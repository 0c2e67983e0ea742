"""The edge counters Prometheus reads: what the operator has counted, as marks that never go back (pure).

A Connection's written totals lag behind the traffic by as long as the write budget takes to go
round every busy edge: minutes at 10,000 edges. What the operator has *applied* (written, plus
the deltas waiting for their write) is fresh; but a crash loses the waiting part until the agents
resend it, so exported as it is the applied total would fall after every restart, which
Prometheus takes for a counter reset and counts the whole total again.

So each series is a high-water mark, checkpointed:

* at each round (flowmap_operator.checkpointing, every ``FLOWMAP_OPERATOR_METRICS_CHECKPOINT_INTERVAL``
  seconds while this replica leads), each series' mark becomes the higher of its mark and what is
  applied now, count by count (:meth:`EdgeTotals.take`);
* the marks are written to ConfigMaps, ``SHARDS`` of them, each carrying the marks of the series
  whose key hashes to it (:func:`shard`, :func:`encode`), rewritten only when one of its marks rose;
* only marks the API server has taken are exported (:meth:`EdgeTotals.publish`): what a scrape
  read was stored first, so a replica that reads the store before it exports never shows less;
* a new leader reads the store (:meth:`EdgeTotals.load`) and exports the higher of its marks and
  what it applies, which overtakes them as the agents resend what no write acknowledged.

A mark is never more than was counted, and the ledger counts each delta once, so once the resends
are in the series equal the Connections' totals. Where counts are lost for good (a Connection
deleted by hand starts again from nothing) a series stays flat until its traffic passes its mark.

At most ``cap`` edges get series of their own; the others are summed into one ``other`` series,
whose key is ``OTHER``. Whether an edge has its own series is decided once and kept: an edge in
``other`` stays there, and its counts stay in ``other`` after its Connection is deleted; the
slot of a deleted edge with its own series goes to the next new edge.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

from flowmap_operator.ledger import Counters, Edge, EdgeKey

SHARDS = 16  # ConfigMaps; at 10,000 edges each holds about 50 KB of JSON, 10 KB compressed
OTHER: EdgeKey = ("", "", 0, "")  # the key of the "other" series: no group has an empty name
MAX_STORED = 8 << 20  # bytes of JSON one shard may unpack to: ten times what 100,000 edges take
Marks = dict[EdgeKey, Counters]


def shard(key: EdgeKey) -> int:
    """The ConfigMap a series' mark is kept in: the same in every replica and every release."""
    return zlib.crc32("\0".join((key[0], key[1], str(key[2]), key[3])).encode("utf-8", "surrogatepass")) % SHARDS


def applied(edges: Iterable[Edge]) -> Marks:
    """Each edge's count so far, written or waiting for its write, for the edges whose Connection
    exists (an edge without one has no series yet)."""
    return {edge.key: edge.applied() for edge in edges if edge.resource_version is not None}


def encode(marks: Mapping[EdgeKey, Counters]) -> bytes:
    """One shard's marks as stored: gzip'd JSON, one row per series."""
    rows = [[*key, c.bytes_c2s, c.bytes_s2c, c.packets_c2s, c.packets_s2c, c.sessions]
            for key, c in sorted(marks.items())]
    return zlib.compress(json.dumps({"version": 1, "marks": rows}, separators=(",", ":")).encode(), 1)


def decode(data: bytes) -> Marks:
    """A stored shard's marks; ValueError saying what is wrong with anything else."""
    unpack = zlib.decompressobj()
    try:
        text = unpack.decompress(data, MAX_STORED)
    except zlib.error as exc:
        raise ValueError(f"not compressed marks: {exc}") from None
    if unpack.unconsumed_tail:
        raise ValueError(f"unpacks to more than {MAX_STORED} bytes")
    try:
        doc: Any = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("version") != 1 or not isinstance(doc.get("marks"), list):
        raise ValueError("not version 1 of the marks")
    marks: Marks = {}
    for row in doc["marks"]:
        if not (isinstance(row, list) and len(row) == 9 and all(isinstance(v, str) for v in (row[0], row[1], row[3]))
                and all(type(v) is int and v >= 0 for v in row[2:3] + row[4:])):
            raise ValueError(f"a row that is not a series' marks: {str(row)[:200]}")
        marks[(row[0], row[1], row[2], row[3])] = Counters(*row[4:])
    return marks


class EdgeTotals:
    """The series' marks: as the store holds them, and as scrapes read them.

    Changed only on the event loop. ``published`` and ``overflow`` are read by scrapes on other
    threads: each is replaced whole, never changed in place.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.forget()

    def forget(self) -> None:
        """Hold and export nothing (this replica no longer leads)."""
        self.own: dict[EdgeKey, None] = {}  # the edges with series of their own, oldest first
        self.folded: dict[EdgeKey, Counters] = {}  # edge in "other" -> its count at the last round
        self.retired = Counters()  # what edges in "other" that are gone had counted
        self.stored: list[Marks] = [{} for _ in range(SHARDS)]  # per shard, as the store holds them
        self.published: Mapping[EdgeKey, Counters] = {}  # what scrapes export
        self.overflow = 0  # edges in "other", as published

    def load(self, index: int, marks: Mapping[EdgeKey, Counters]) -> None:
        """Marks read from the store (taking the lead, or after another replica wrote the shard):
        each mark the higher of what was held and what was read."""
        held = self.stored[index]
        for key, counters in marks.items():
            held[key] = held[key].at_least(counters) if key in held else counters

    def take(self, counted: Mapping[EdgeKey, Counters]) -> dict[int, Marks]:
        """The shards whose marks rise with ``counted`` (see :func:`applied`), each whole: what
        to write. A series no longer exported leaves its shard; "other"'s mark never does."""
        shards: list[Marks] = [{} for _ in range(SHARDS)]
        for key, value in self._series(counted).items():
            index = shard(key)
            held = self.stored[index].get(key)
            shards[index][key] = value if held is None else held.at_least(value)
        index = shard(OTHER)
        if OTHER in self.stored[index]:
            shards[index].setdefault(OTHER, self.stored[index][OTHER])
        return {index: marks for index, marks in enumerate(shards) if marks != self.stored[index]}

    def wrote(self, index: int, marks: Marks) -> None:
        """The store took ``marks`` for shard ``index``."""
        self.stored[index] = marks

    def publish(self) -> None:
        """Export what the store holds, for the series exported now."""
        stored = self.stored
        published = {key: stored[index][key] for key in self.own
                     if key in stored[index := shard(key)]}  # oldest first, as before a restart
        if OTHER in stored[index := shard(OTHER)]:
            published[OTHER] = stored[index][OTHER]
        self.published = published
        self.overflow = len(self.folded)

    def _series(self, counted: Mapping[EdgeKey, Counters]) -> Marks:
        """Each series' count now: an edge's own, or the sum of the edges in "other"."""
        own, folded = self.own, self.folded
        for key in own.keys() - counted.keys():  # a deleted Connection's slot goes to the next new edge
            del own[key]
        for key in folded.keys() - counted.keys():
            self.retired.add(folded.pop(key))
        series: Marks = {}
        other = Counters()
        for key, counters in counted.items():
            if key not in own and (key in folded or len(own) >= self.cap):
                folded[key] = counters
                other.add(counters)
                continue
            own[key] = None
            series[key] = counters
        if folded or not self.retired.is_zero():
            other.add(self.retired)
            series[OTHER] = other
        return series
