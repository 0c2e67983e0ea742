"""Packet captures as the agent asks for them: its ``Control`` decoded (pure), the plan that
brings the node's captures to it (pure), and the thin edge that carries the plan out on a
:class:`capturing.Captures` and says how each capture stands (``Health.packet_captures``).

**Who runs them.** Every worker receives every ``Control`` (each has its own connection), but
the packet captures are the node's, not a worker's: worker 0 runs them all, in its own loop
(with ``--workers 1`` that is the only process; with more, the others ignore these fields). Their
rings are their own, so the fanout groups and the session tables never see them.

**A Control is the whole desired set** (the newest wins):

* an id not held yet starts (armed when ``armed``); one that cannot be
  decoded is refused whole, as a failed capture whose message says why, and the others go on;
* ``fired`` fires an armed capture (a new one is armed and fired at once: the trigger happened
  before this dp heard of it), from ``fired_ns`` (when it happened; 0: now);
* a held id no longer listed stops (Stopped);
* a file is deleted, and its bytes given back to the disk budget, when its capture has ended and
  its id is neither listed nor in ``keep``. A listed id counts as kept: a capture that ends
  between two Controls is not deleted before the agent has seen that it ended.

An id is started once per run of the dp: a finished capture still listed is not started again,
and a changed entry under a held id is ignored (a PacketCapture's spec is immutable).

**Files of an earlier run** (``--capture-dir`` outlives the dp) are counted against the disk
budget when the dp starts, and the first Control that neither lists nor keeps their id deletes
them, so the agent names every id it keeps in every Control, the first one included. An id
listed again whose file is still there was running when the dp stopped: it is reported failed
(interrupted), its partial file kept, never overwritten.

Every size is bounded: the entries of one Control (``MAX_WANTED``, the rest ignored) and of
``keep`` (``MAX_KEEP``), targets, filters and peers per capture, and the capture's own bounds
(the PacketCapture schema's caps).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from flowmap_dp import wire_pb2
from flowmap_dp.capturing import RING, Captures, DiskBudget, Result, Spec, State, Target, check_id
from flowmap_dp.errors import Malformed
from flowmap_dp.filtering import MAX_FILTERS, MAX_SNAPLEN, Filter, PodDirection, compile_filters

MAX_WANTED = 256  # captures in one Control: far more than a node may run (--max-captures)
MAX_KEEP = 1024  # ids in one Control's keep
MAX_TARGETS = 64  # interfaces per capture: 1 MiB of ring each (capturing.RING)
MAX_PEERS = 256  # networks per filter (the program must stay within the kernel's 4096 instructions)
MAX_ID = 400  # characters of an id echoed back when it is malformed
IFNAMSIZ = 16
# The PacketCapture schema's caps, checked again here: the dp takes no size on trust.
MAX_BYTES = 100 << 20
MAX_PACKETS = 1_000_000
MAX_DURATION = 600
MAX_PRE_TRIGGER = 30

_DIRECTIONS = {
    wire_pb2.PACKET_CAPTURE_DIRECTION_BOTH: PodDirection.BOTH,
    wire_pb2.PACKET_CAPTURE_DIRECTION_INGRESS: PodDirection.INGRESS,
    wire_pb2.PACKET_CAPTURE_DIRECTION_EGRESS: PodDirection.EGRESS,
}


def _within(what: str, value: int, low: int, high: int) -> int:
    if not low <= value <= high:
        raise Malformed(f"{what} {value} not in {low}..{high}")
    return value


def _network(n: wire_pb2.PacketCaptureNetwork) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if len(n.address) not in (4, 16):
        raise Malformed(f"a peer address of {len(n.address)} bytes (4 or 16)")
    _within("a peer's prefix length", n.prefix_length, 0, 8 * len(n.address))
    return ipaddress.ip_network((n.address, n.prefix_length), strict=False)


def _filter(f: wire_pb2.PacketCaptureFilter) -> Filter:
    if len(f.peers) > MAX_PEERS:
        raise Malformed(f"a filter with {len(f.peers)} peers (at most {MAX_PEERS})")
    if f.direction not in _DIRECTIONS:
        raise Malformed(f"unknown direction {f.direction}")
    try:
        return Filter(tuple(_network(n) for n in f.peers), f.protocol, f.port, _DIRECTIONS[f.direction])
    except Malformed:
        raise
    except ValueError as e:
        raise Malformed(str(e)) from None


def _target(t: wire_pb2.PacketCaptureTarget) -> Target:
    raw = t.name.encode("utf-8", "replace")
    if not 0 < len(raw) < IFNAMSIZ or "/" in t.name or "\0" in t.name or t.name in (".", ".."):
        raise Malformed(f"interface name {t.name[:IFNAMSIZ * 2]!r} is not one")
    return Target(t.name, t.description)  # the description is cut to its bound in the file


def spec_of(entry: wire_pb2.PacketCapture) -> Spec:
    """The capture one ``Control.packet_captures`` entry asks for; Malformed (the whole entry is
    refused) for anything the dp cannot run as asked."""
    try:
        check_id(entry.id)
    except ValueError as e:
        raise Malformed(str(e)) from None
    if not 0 < len(entry.targets) <= MAX_TARGETS:
        raise Malformed(f"{len(entry.targets)} targets (1..{MAX_TARGETS})")
    if len(entry.filters) > MAX_FILTERS:
        raise Malformed(f"{len(entry.filters)} filters (at most {MAX_FILTERS})")
    targets = tuple(_target(t) for t in entry.targets)
    if len({t.name for t in targets}) != len(targets):
        raise Malformed("an interface named twice")
    filters = tuple(_filter(f) for f in entry.filters)
    snaplen = _within("snap length", entry.snap_length, 1, MAX_SNAPLEN)
    try:
        compile_filters(filters, snaplen)  # the kernel's bound on the program, checked before a file exists
    except ValueError as e:
        raise Malformed(str(e)) from None
    if entry.pre_trigger_seconds and not entry.armed:
        raise Malformed("pre-trigger seconds for a capture that is not armed")
    return Spec(entry.id, targets, filters, snaplen=snaplen,
                max_bytes=_within("max bytes", entry.max_bytes, 1024, MAX_BYTES),
                max_packets=_within("max packets", entry.max_packets, 1, MAX_PACKETS),
                duration=float(_within("duration", entry.duration_seconds, 1, MAX_DURATION)),
                armed=entry.armed,
                pre_trigger=float(_within("pre-trigger seconds", entry.pre_trigger_seconds, 0, MAX_PRE_TRIGGER)))


@dataclass(frozen=True)
class Plan:
    """What to do to the node's captures, in this order: stop, delete, start, fire, refuse,
    interrupted."""

    stop: tuple[str, ...] = ()
    delete: tuple[str, ...] = ()
    start: tuple[Spec, ...] = ()
    fire: tuple[tuple[str, float | None], ...] = ()  # (id, when; None: now), after the starts
    refuse: tuple[tuple[str, str], ...] = ()  # (id, why)
    interrupted: tuple[str, ...] = ()  # listed again, with a file of an earlier run: failed, file kept


def plan(control: wire_pb2.Control, held: Mapping[str, State], leftovers: Collection[str] = ()) -> Plan:
    """The plan that brings the captures ``held`` (this run's, by id) and the files of an
    earlier run (``leftovers``, by id) to what ``control`` asks (see the module docstring)."""
    wanted: dict[str, wire_pb2.PacketCapture] = {}
    for entry in control.packet_captures[:MAX_WANTED]:
        wanted.setdefault(entry.id[:MAX_ID], entry)  # an id listed twice: the first entry counts
    keep = set(control.keep[:MAX_KEEP]) | set(wanted)
    stop = [i for i, state in held.items() if i not in wanted and state in (State.ARMED, State.RUNNING)]
    delete = [i for i in [*held, *leftovers] if i not in keep]
    start: list[Spec] = []
    fire: list[tuple[str, float | None]] = []
    refuse: list[tuple[str, str]] = []
    interrupted: list[str] = []
    for capture_id, entry in wanted.items():
        if capture_id in held:
            if entry.fired and held[capture_id] is State.ARMED:
                fire.append((capture_id, entry.fired_ns / 1e9 or None))
            continue
        if capture_id in leftovers:
            interrupted.append(capture_id)
            continue
        try:
            spec = spec_of(entry)
        except Malformed as e:
            refuse.append((capture_id, str(e)))
            continue
        start.append(spec)
        if entry.fired and spec.armed:
            fire.append((capture_id, entry.fired_ns / 1e9 or None))
    return Plan(tuple(stop), tuple(delete), tuple(start), tuple(fire), tuple(refuse), tuple(interrupted))


def status(result: Result) -> wire_pb2.PacketCaptureStatus:
    """How one capture stands, as the agent reads it."""
    return wire_pb2.PacketCaptureStatus(
        id=result.id, state=result.state.value, packets=result.packets, bytes=result.bytes, drops=result.drops,
        file_bytes=result.file_bytes, sha256=result.sha256, stop_reason=result.reason.value if result.reason else "",
        message=result.message, path=result.path)


class PacketCaptures:
    """Worker 0's packet captures (the edge): the node's :class:`Captures`, brought to each
    Control and polled by the loop while any is armed or running."""

    POLL_INTERVAL = RING.retire_timeout_ms / 1000  # a capture's ring hands over a block this often
    # Seconds of each poll the captures may take: a quarter of the worker at most, so that the
    # node's session counts never wait for a capture (a capture that cannot keep up drops in
    # its own ring, and says so in its status).
    BUDGET = POLL_INTERVAL / 4

    def __init__(self, folder: Path, disk_bytes: int, max_captures: int) -> None:
        self.captures = Captures(folder, DiskBudget(disk_bytes), max_captures)
        self.captures.adopt()

    @property
    def active(self) -> bool:
        """Is there anything to poll?"""
        return self.captures.active

    def apply(self, control: wire_pb2.Control, now: float) -> None:
        """Bring the node's captures to ``control``."""
        c = self.captures
        held = {i: state for i in (*c.captures, *c.refused) if (state := c.state(i)) is not None}
        p = plan(control, held, c.leftovers.keys())
        for capture_id in p.stop:
            c.stop(capture_id)
        for capture_id in p.delete:
            c.delete(capture_id)
        for spec in p.start:
            c.start(spec, now)
        for capture_id, at in p.fire:
            c.fire(capture_id, now, at)
        for capture_id, why in p.refuse:
            c.refuse(capture_id, why)
        for capture_id in p.interrupted:
            c.interrupted(capture_id)

    def poll(self, now: float) -> None:
        """Read the captures' rings into their files, for at most BUDGET of the worker's time;
        end those whose time or bounds are up."""
        self.captures.poll(now, self.BUDGET)

    def statuses(self) -> Iterable[wire_pb2.PacketCaptureStatus]:
        """Each capture of this run, as it stands."""
        return [status(r) for r in self.captures.results()]

    def close(self) -> None:
        """The dp stops: every capture ends (Stopped), its file closed and kept."""
        self.captures.close()
