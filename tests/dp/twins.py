"""The two session tables side by side: the Python reference (``block.feed_block`` /
``classify.feed_frames`` into ``SessionTable``) and the compiled one (``CompiledTable``), fed
the same input and held to identical reports. Shared by the dp tests and benchmarks."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from struct import Struct
from typing import Any, TypeAlias

from flowmap_dp.block import feed_block
from flowmap_dp.classify import feed_frames
from flowmap_dp.compiled import CompiledTable
from flowmap_dp.decode import IGNORED, MALFORMED, Decoded
from flowmap_dp.detectors.base import Threat
from flowmap_dp.session import Health, InspectorLike, Report, SessionTable
from flowmap_dp.threats import Config, Watching
from tests.dp.synth import Frame, pack_block

Record = tuple[bytes, int, int, float]  # a capture file's frame: (bytes, link type, length on the wire, timestamp)
REASONS = MALFORMED + IGNORED  # what ``_native.decode_frame`` and the compiled counters index
_TS_LAST = Struct("<II")  # tpacket_hdr_v1.ts_last (sec, nsec), at 40 in a block


class ReferenceTable(SessionTable):
    """The Python reference with the compiled table's feeding methods, so a test can take either."""

    def feed_block(self, block: bytes | memoryview) -> None:
        feed_block(block, self)

    def feed_frames(self, frames: Iterable[Record]) -> None:
        feed_frames(frames, self)


Table: TypeAlias = ReferenceTable | CompiledTable
KINDS = {"per-packet": ReferenceTable, "compiled": CompiledTable}  # as ``flowmap dp run --parser``


def balanced(h: Health) -> bool:
    """Every frame counted landed in exactly one bucket (``DecodeStats.balanced`` of a report)."""
    return h.packets == h.decoded + sum(h.malformed.values()) + sum(h.ignored.values())


def make_table(kind: str, **kwargs: Any) -> Table:
    """A fresh table of ``kind`` ("per-packet" or "compiled"), ``SessionTable``'s arguments."""
    table: Table = KINDS[kind](**kwargs)
    return table


class Tape:
    """An inspector that records every payload it is fed and decides ("echo") after three."""

    def __init__(self, l4: str, client_port: int, server_port: int) -> None:
        self.ports = (l4, client_port, server_port)
        self.fed: list[tuple[bool, bytes]] = []
        self.times: list[float] = []  # each payload's capture time, as fed
        self.app = "unknown"
        self.metadata: dict[str, Any] = {}
        self.threats: list[Threat] = []

    def feed(self, from_client: bool, payload: bytes, ts: float = 0.0) -> bool:
        self.fed.append((from_client, payload))
        self.times.append(ts)
        if len(self.fed) == 3:
            self.app = "echo"
        return len(self.fed) >= 3

    def judge_server_alone(self) -> bool:
        return False

    def waits(self, now: float) -> bool:
        return False

    def finish(self) -> None:
        pass


def _rows(report: Report) -> list[tuple[object, ...]]:
    return [tuple(dict(v) if f.name == "metadata" and v is not None else v
                  for f in dataclasses.fields(d) for v in (getattr(d, f.name),)) for d in report.sessions]


def assert_same_reports(ref: Report, comp: Report) -> None:
    """The one comparison: every delta of two reports, in order, field by field (metadata as a
    dict), and the health (decode outcomes, fragments, created, evicted, expired, closed,
    unreported, inspector errors, live sessions)."""
    a, b = _rows(ref), _rows(comp)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x == y, f"delta {i} of {len(a)} differs:\n  reference {x}\n  compiled  {y}"
    assert len(a) == len(b), f"{len(a)} deltas from the reference, {len(b)} from the compiled table"
    assert ref.health == comp.health, f"health differs:\n  reference {ref.health}\n  compiled  {comp.health}"
    assert ref.time == comp.time


class Twins:
    """A reference table and a compiled one built with the same arguments and fed the same input;
    each ``collect`` asserts identical reports. With an ``inspector`` class, each table gets its
    own instances, kept in ``made`` (reference, compiled) in the order they were made."""

    def __init__(self, inspector: Callable[[str, int, int], InspectorLike] | None = None,
                 threats: Config = Config(), **kwargs: Any) -> None:
        self.made: tuple[list[Any], list[Any]] = ([], [])

        def recording(made: list[Any]) -> Callable[[str, int, int], InspectorLike] | None:
            if inspector is None:
                return None  # the real detectors

            def make(l4: str, client_port: int, server_port: int) -> InspectorLike:
                made.append(inspector(l4, client_port, server_port))
                return made[-1]
            return make

        self.ref = ReferenceTable(inspector_factory=recording(self.made[0]), **kwargs)
        self.comp = CompiledTable(inspector_factory=recording(self.made[1]), **kwargs)
        # Each table's watches (flowmap_dp.threats), as a packet loop runs them: the same hits.
        self.watching = (Watching(threats), Watching(threats))

    def feed_blocks(self, blocks: Iterable[bytes | memoryview]) -> None:
        for block in blocks:
            self.ref.feed_block(block)
            self.comp.feed_block(block)

    def feed_frames(self, frames: Sequence[Record]) -> None:
        self.ref.feed_frames(frames)
        self.comp.feed_frames(frames)

    def collect(self, now: float, hold: float = 0.0) -> Report:
        """Both tables' reports, each seen by its own watches, asserted identical (threat hits
        included); the reference's is returned."""
        ref, comp = self.ref.collect(now, hold), self.comp.collect(now, hold)
        self.watching[0].observe(ref.time, ref.sessions)
        self.watching[1].observe(comp.time, comp.sessions)
        assert self.watching[0].errors == self.watching[1].errors == 0
        assert_same_reports(ref, comp)
        assert len(self.ref) == len(self.comp)
        return ref

    def expire(self, now: float) -> int:
        n = self.ref.expire(now)
        assert self.comp.expire(now) == n
        return n

    def close_all(self, reason: str = "end") -> None:
        self.ref.close_all(reason)
        self.comp.close_all(reason)

    def fed(self) -> tuple[list[Any], list[Any]]:
        """What each table's inspectors were fed, in the order they were made (``Tape``-like
        inspectors: ``ports`` and ``fed``)."""
        ref, comp = ([(t.ports, t.fed) for t in made] for made in self.made)
        return ref, comp

    def times(self) -> tuple[list[list[float]], list[list[float]]]:
        """The capture times each table's inspectors were fed, in the order they were made."""
        ref, comp = ([list(t.times) for t in made] for made in self.made)
        return ref, comp


def blocks_of(frames: Sequence[Frame], size: int = 1 << 16, link_header: int = 14) -> list[bytes]:
    """``frames`` laid out in as many TPACKET_V3 blocks of ``size`` bytes as they need."""
    out = []
    while frames:
        block, n = pack_block(frames, size, link_header=link_header)
        assert n > 0
        out.append(block)
        frames = frames[n:]
    return out


def block_time(block: bytes) -> float:
    """The timestamp of a block's last frame (``ts_last`` of its descriptor)."""
    sec, nsec = _TS_LAST.unpack_from(block, 40)
    return sec + nsec * 1e-9


def native_outcome(out: Decoded | str) -> int | tuple[tuple[Any, ...], tuple[Any, ...]]:
    """``decode.decode``'s outcome in the shape ``_native.decode_frame`` returns it: a reason's
    index in ``MALFORMED + IGNORED``, or ((vlan, proto, src, dst, sport, dport, flags), (ip_len,
    payload_start, payload_end, first fragment))."""
    if isinstance(out, str):
        return REASONS.index(out)
    return ((out.vlan, out.proto, out.src, out.dst, out.sport, out.dport, out.flags),
            (out.ip_len, out.payload_start, out.payload_end, out.frag is not None))
