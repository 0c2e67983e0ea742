"""Packet captures on demand: a pure recorder that keeps each capture's bounds and state, and a
thin edge that feeds it from one small TPACKET_V3 ring per target interface.

The rings are the capture's own (``capture.Ring`` with the filters compiled by
``filtering.compile_filters``): the dp's main rings and per-packet path never see a capture.
The :class:`Recorder` knows nothing of sockets: it is given packets and a clock and writes the
pcapng file through ``pcapng.Writer``, stopping at the first bound a packet would pass:

* ``max_packets`` (MaxPacketsReached, once the last allowed packet is written), ``max_bytes``
  (MaxBytesReached: the whole file, blocks included), the node's disk budget shared by all its
  captures (NodeDiskFull) and ``duration`` counted from the start, or from the trigger for an
  armed capture (DurationReached).
* An *armed* capture (it waits for a trigger) writes its header at once but keeps its matching
  packets in memory, the last ``pre_trigger + LATE_TRIGGER`` seconds of them and at most
  ``WINDOW_BYTES`` of blocks (or what the file has room for, if less); :meth:`Recorder.fire`
  is told when the trigger happened (it is heard of later: the node reports it, the operator
  decides), writes the window from ``pre_trigger`` seconds before that moment, and goes on as a
  running capture.

The :class:`Captures` set holds at most ``max_captures`` armed or running captures per node;
one more ends at once with NodeCaptureLimit. Each capture's file is ``<namespace>_<name>_<uid>.pcapng``
in the node's folder (an id holds no ``_``, so the name gives the id back); a file is deleted
only through :meth:`Captures.delete`, which gives its bytes back to the disk budget.
"""

from __future__ import annotations

import enum
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import BinaryIO

from flowmap_dp import pcapng
from flowmap_dp.capture import FRAME, Direction, Ring, RingConfig, iter_frames
from flowmap_dp.filtering import Filter, compile_filters


class State(enum.Enum):
    """A capture's life on one node."""

    ARMED = "armed"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class StopReason(enum.Enum):
    """Why a capture ended (the names the PacketCapture status uses)."""

    DURATION = "DurationReached"
    MAX_BYTES = "MaxBytesReached"
    MAX_PACKETS = "MaxPacketsReached"
    DISK_FULL = "NodeDiskFull"
    NODE_LIMIT = "NodeCaptureLimit"
    STOPPED = "Stopped"
    INTERFACE_GONE = "InterfaceGone"
    FAILED = "Failed"


# A capture's id is its PacketCapture's namespace/name/uid: a DNS label, a DNS subdomain and a
# UID (lowercase letters, digits, "-"). None of them holds "/" or "_", so the file name
# (the id with "_" for "/") is safe in the folder and gives the id back.
_LABEL = r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?"
_ID = re.compile(rf"({_LABEL})/([a-z0-9](?:[-a-z0-9.]{{0,251}}[a-z0-9])?)/({_LABEL})")
SUFFIX = ".pcapng"
MAX_MESSAGE = 256  # characters of a capture's message


def check_id(capture_id: str) -> str:
    """``capture_id`` if it is a well-formed ``namespace/name/uid``; ValueError otherwise."""
    if not _ID.fullmatch(capture_id):
        raise ValueError(f"capture id {capture_id[:400]!r} is not namespace/name/uid")
    return capture_id


def file_name(capture_id: str) -> str:
    """The name of a capture's file in the node's folder."""
    return check_id(capture_id).replace("/", "_") + SUFFIX


def id_of_file(name: str) -> str | None:
    """The id of the capture whose file this is; None for a name the dp would not have made."""
    if not name.endswith(SUFFIX):
        return None
    capture_id = name.removesuffix(SUFFIX).replace("_", "/")
    return capture_id if _ID.fullmatch(capture_id) else None


@dataclass(frozen=True)
class Target:
    """One interface to capture on, and the words its interface block carries."""

    name: str
    description: str = ""  # "namespace/workload pod-name"


@dataclass(frozen=True)
class Spec:
    """What one capture asks of this node (the agent's Control, decoded)."""

    id: str  # namespace/name/uid
    targets: tuple[Target, ...]
    filters: tuple[Filter, ...] = ()
    snaplen: int = 128
    max_bytes: int = 1 << 20
    max_packets: int = 10_000
    duration: float = 60.0
    armed: bool = False  # wait for the trigger (fire) before writing; else start at once
    pre_trigger: float = 0.0  # armed: seconds of packets kept from before the trigger

    def __post_init__(self) -> None:
        check_id(self.id)
        if not (0 < self.snaplen <= 262144 and 1024 <= self.max_bytes and 0 < self.max_packets
                and 0 < self.duration and 0 <= self.pre_trigger):
            raise ValueError(f"capture {self.id!r}: a bound out of range")
        if self.pre_trigger and not self.armed:
            raise ValueError(f"capture {self.id!r}: a pre-trigger window needs an armed capture")


# The most an armed capture holds in memory (its blocks' size in the file): a node's armed
# captures (at most --max-captures of them) hold at most that many times this.
WINDOW_BYTES = 16 << 20
# How late a trigger may be told (a report interval, the operator's round, the stream) and still
# find its pre-trigger window whole.
LATE_TRIGGER = 10.0


class DiskBudget:
    """The node's bytes for all capture files; a capture takes before it writes."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0

    def reserve(self, size: int) -> bool:
        """Reserve ``size`` bytes; False (nothing taken) when they are not left."""
        if self.used + size > self.total:
            return False
        self.used += size
        return True

    def give_back(self, size: int) -> None:
        """A file of ``size`` bytes was deleted."""
        self.used = max(0, self.used - size)

    def count(self, size: int) -> None:
        """``size`` bytes already on the disk (a file left by an earlier run): counted, even past
        the total (then nothing more is written until enough is given back)."""
        self.used += size


@dataclass
class _Held:
    interface: int
    ts_ns: int
    data: bytes
    original: int
    size: int  # its block's size in the file


class Recorder:
    """One capture's state and bounds over one pcapng file (pure: no sockets, no clock of its own).

    ``now`` is always the wall clock in seconds, the clock of the packets' timestamps, so the
    pre-trigger window compares one with the other.
    """

    def __init__(self, spec: Spec, out: BinaryIO, budget: DiskBudget, now: float) -> None:
        self.spec = spec
        self.writer = pcapng.Writer(out, spec.max_bytes, reserve=budget.reserve)
        self.state = State.ARMED if spec.armed else State.RUNNING
        self.reason: StopReason | None = None
        self.message = ""
        self.started = now
        self.fired: float | None = None
        self.packets = 0
        self.bytes = 0
        self.window: deque[_Held] = deque()
        self.window_bytes = 0
        if not self.writer.section(comment=f"flowmap capture {spec.id}"):
            self._bound()
            return
        for t in spec.targets:
            if self.writer.interface(t.name, t.description, spec.snaplen) is None:
                self._bound()
                return

    @property
    def active(self) -> bool:
        """Armed or running."""
        return self.state in (State.ARMED, State.RUNNING)

    def offer(self, interface: int, ts_ns: int, data: bytes | memoryview, original: int, now: float) -> None:
        """One packet the filters kept on target ``interface`` (an index into the spec's targets)."""
        if self.state is State.RUNNING:
            self._record(interface, ts_ns, bytes(data), original)
        elif self.state is State.ARMED:
            held = _Held(interface, ts_ns, bytes(data), original, pcapng.enhanced_packet_size(len(data)))
            self.window.append(held)
            self.window_bytes += held.size
            self._trim(now)

    def fire(self, now: float, at: float | None = None) -> None:
        """The trigger happened ``at`` (None: now): write the window from ``pre_trigger`` seconds
        before it, and run; the duration counts from ``at``."""
        if self.state is not State.ARMED:
            return
        at = now if at is None else max(min(at, now), now - LATE_TRIGGER)
        self._trim(now)
        since = int((at - self.spec.pre_trigger) * 1e9)
        while self.window and self.window[0].ts_ns < since:
            self.window_bytes -= self.window.popleft().size
        self.state, self.fired = State.RUNNING, at
        while self.window and self.state is State.RUNNING:
            held = self.window.popleft()
            self._record(held.interface, held.ts_ns, held.data, held.original)
        self.window.clear()
        self.window_bytes = 0

    def tick(self, now: float) -> None:
        """Let time pass: the duration runs from the start, or from the trigger when armed."""
        if self.state is State.ARMED:
            self._trim(now)
        elif self.state is State.RUNNING and now - (self.fired or self.started) >= self.spec.duration:
            self.stop(StopReason.DURATION)

    def stop(self, reason: StopReason, message: str = "") -> None:
        """End the capture (no-op when it has ended)."""
        if not self.active:
            return
        self.state = State.FAILED if reason is StopReason.FAILED else State.DONE
        self.reason, self.message = reason, message
        self.window.clear()
        self.window_bytes = 0

    def _trim(self, now: float) -> None:
        """Keep the window within its seconds, WINDOW_BYTES and what the file still has room for."""
        since = int((now - self.spec.pre_trigger - LATE_TRIGGER) * 1e9)
        room = min(WINDOW_BYTES, self.spec.max_bytes - self.writer.size)
        while self.window and (self.window_bytes > room or self.window[0].ts_ns < since):
            self.window_bytes -= self.window.popleft().size

    def _record(self, interface: int, ts_ns: int, data: bytes, original: int) -> None:
        if not self.writer.packet(interface, ts_ns, data, original):
            self._bound()
            return
        self.packets += 1
        self.bytes += len(data)
        if self.packets >= self.spec.max_packets:
            self.stop(StopReason.MAX_PACKETS)

    def _bound(self) -> None:
        """The writer refused a block: stop on the bound it hit."""
        self.stop(StopReason.DISK_FULL if self.writer.starved else StopReason.MAX_BYTES)


# A capture's own rings: small (1 MiB per interface), both directions of the veth, no rx hash.
RING = RingConfig(block_size=1 << 18, block_count=4, retire_timeout_ms=50, direction=Direction.BOTH,
                  fill_rxhash=False)


@dataclass(frozen=True)
class Result:
    """What the dp reports of one capture."""

    id: str
    state: State
    packets: int = 0
    bytes: int = 0
    drops: int = 0
    file_bytes: int = 0
    sha256: str = ""  # once done
    reason: StopReason | None = None
    message: str = ""
    path: str = ""


def _create(path: str, flags: int) -> int:
    """Open for writing, never through a symbolic link planted where the file goes."""
    return os.open(path, flags | os.O_NOFOLLOW, 0o600)


def frames(block: memoryview) -> Iterator[tuple[int, memoryview, int]]:
    """(timestamp in ns, captured bytes, original length) of each frame of a ring block."""
    for off, snap, length, _pkttype in iter_frames(block):
        _next, sec, nsec, _snap, _len, _status, mac, _net = FRAME.unpack_from(block, off)
        yield sec * 1_000_000_000 + nsec, block[off + mac : off + mac + snap], length


class Capture:
    """One capture on this node: its rings, its file and its :class:`Recorder` (the edge)."""

    def __init__(self, spec: Spec, path: Path, budget: DiskBudget, now: float, ring: RingConfig = RING) -> None:
        self.spec, self.path = spec, path
        # Compiled before the file exists: filters the kernel would refuse (ValueError) leave nothing.
        config = replace(ring, snaplen=spec.snaplen, filter=compile_filters(spec.filters, spec.snaplen))
        self.file = open(path, "wb", opener=_create)
        try:
            self.recorder = Recorder(spec, self.file, budget, now)
        except BaseException:  # a file the set does not hold would never be deleted
            self.file.close()
            path.unlink(missing_ok=True)
            raise
        self.rings: list[Ring | None] = []
        self.drops = 0
        for target in spec.targets:
            try:
                self.rings.append(Ring(target.name, config) if self.recorder.active else None)
            except OSError:
                self.rings.append(None)  # gone before we came: its interface block stays empty
        if not any(self.rings):
            self.recorder.stop(StopReason.INTERFACE_GONE, "no target interface could be opened")
        self._closed = False
        self._finish_if_done()

    def poll(self, now: float, max_blocks: int = 1 << 30) -> bool:
        """Take up to ``max_blocks`` ready blocks of each ring into the recorder, then let time
        pass; True while it runs with blocks still ready (the caller may come back)."""
        more = False
        for index, ring in enumerate(self.rings):
            if ring is None or not self.recorder.active:
                continue
            more |= self._drain(index, ring, now, max_blocks)
            if ring.gone:
                self.drops += ring.read_stats().drops
                ring.close()
                self.rings[index] = None
        if not any(self.rings):
            self.recorder.stop(StopReason.INTERFACE_GONE, "every target interface went away")
        self.recorder.tick(now)
        self._finish_if_done()
        return more and self.recorder.active

    def _drain(self, index: int, ring: Ring, now: float, max_blocks: int) -> bool:
        """Up to ``max_blocks`` blocks; True if more are ready."""
        for _ in range(max_blocks):
            block = ring.ready_block()
            if block is None:
                return False
            try:
                for ts_ns, data, length in frames(block):
                    self.recorder.offer(index, ts_ns, data, length, now)
                    data.release()  # no view into the ring outlives its block: it can be closed after
            finally:
                block.release()
                ring.release_block()
        return ring.ready_block() is not None

    def fire(self, now: float, at: float | None = None) -> None:
        """The trigger happened (see :meth:`Recorder.fire`)."""
        self.poll(now)
        self.recorder.fire(now, at)
        self._finish_if_done()

    def stop(self, reason: StopReason = StopReason.STOPPED, message: str = "") -> None:
        """End it now (deleted or stopped by the user, the dp stopping, a failure)."""
        self.recorder.stop(reason, message)
        self._finish_if_done()

    def result(self) -> Result:
        """Counters so far; the sha256 once the file is closed."""
        r = self.recorder
        drops = self.drops + sum(ring.read_stats().drops for ring in self.rings if ring is not None)
        return Result(self.spec.id, r.state, r.packets, r.bytes, drops, r.writer.size,
                      r.writer.hexdigest() if self._closed else "", r.reason, r.message, str(self.path))

    def _finish_if_done(self) -> None:
        if self.recorder.active or self._closed:
            return
        for ring in self.rings:
            if ring is not None:
                self.drops += ring.read_stats().drops
                ring.close()
        self.rings = [None] * len(self.rings)
        try:
            self.file.close()
        except OSError as e:  # the last buffered blocks did not reach the disk
            if self.recorder.reason is not StopReason.FAILED:
                self.recorder.state, self.recorder.reason = State.FAILED, StopReason.FAILED
                self.recorder.message = _why(e)
        self._closed = True


def _why(e: Exception) -> str:
    """An error, as a capture's message says it (bounded)."""
    detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return f"{type(e).__name__}: {detail}"[:MAX_MESSAGE]


class Captures:
    """The node's captures: at most ``max_captures`` armed or running, one disk budget for all.

    ``captures`` have a file of this run; ``refused`` ended before they had one (the cap, a
    failure to open), or are files of an earlier run whose capture was asked for again (see
    :meth:`adopt`); ``leftovers`` are the other files of an earlier run, counted against the
    budget until deleted, and not reported (their results were reported by that run).
    """

    def __init__(self, folder: Path, budget: DiskBudget, max_captures: int = 4) -> None:
        self.folder, self.budget, self.max_captures = folder, budget, max_captures
        self.captures: dict[str, Capture] = {}
        self.refused: dict[str, Result] = {}
        self.leftovers: dict[str, Result] = {}

    @property
    def active(self) -> bool:
        """Is any capture armed or running (else the loop has nothing to poll)?"""
        return bool(self.captures) and any(c.recorder.active for c in self.captures.values())

    def adopt(self) -> None:
        """Count the files an earlier run left in the folder (the dp's own names only; a folder
        that does not exist yet has none; one that cannot be read fails the first start, saying why)."""
        try:
            entries = list(os.scandir(self.folder))
        except OSError:
            return
        for entry in entries:
            capture_id = id_of_file(entry.name)
            if capture_id is None or not entry.is_file(follow_symlinks=False):
                continue
            size = entry.stat(follow_symlinks=False).st_size
            self.budget.count(size)
            self.leftovers[capture_id] = Result(capture_id, State.FAILED, file_bytes=size, reason=StopReason.FAILED,
                                                message="interrupted: the dp restarted while it ran", path=entry.path)

    def start(self, spec: Spec, now: float) -> Result:
        """Start (or arm) one capture, unless the node already holds its cap of them. A file an
        earlier run left under this id is not overwritten: that capture is reported as failed."""
        if spec.id in self.leftovers:
            return self.interrupted(spec.id)
        if sum(c.recorder.active for c in self.captures.values()) >= self.max_captures:
            self.refused[spec.id] = Result(spec.id, State.FAILED, reason=StopReason.NODE_LIMIT,
                                           message=f"this node runs at most {self.max_captures} captures")
            return self.refused[spec.id]
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.captures[spec.id] = Capture(spec, self.folder / file_name(spec.id), self.budget, now)
        except Exception as e:  # a file or a ring that would not open; or a bug: never the dp's end
            return self.refuse(spec.id, f"could not start: {_why(e)}")
        return self.captures[spec.id].result()

    def interrupted(self, capture_id: str) -> Result:
        """A file of an earlier run whose capture is asked for again: that run was stopped while
        the capture ran, so it is reported failed, with its partial file (never overwritten)."""
        if capture_id in self.leftovers:
            self.refused[capture_id] = self.leftovers.pop(capture_id)
        return self.refused[capture_id]

    def refuse(self, capture_id: str, message: str) -> Result:
        """Record a capture that never started (a malformed request, a file that would not open)."""
        self.refused[capture_id] = Result(capture_id, State.FAILED, reason=StopReason.FAILED,
                                          message=message[:MAX_MESSAGE])
        return self.refused[capture_id]

    def state(self, capture_id: str) -> State | None:
        """Where a capture of this run stands; None for an id it does not hold."""
        if capture_id in self.captures:
            return self.captures[capture_id].recorder.state
        return self.refused[capture_id].state if capture_id in self.refused else None

    def fire(self, capture_id: str, now: float, at: float | None = None) -> None:
        """The trigger of an armed capture happened (``at``; None: now)."""
        if (capture := self.captures.get(capture_id)) is not None:
            self._guarded(capture, lambda: capture.fire(now, at))

    def stop(self, capture_id: str, reason: StopReason = StopReason.STOPPED, message: str = "") -> None:
        """End one capture now (its file stays until deleted)."""
        if capture_id in self.captures:
            self.captures[capture_id].stop(reason, message)

    def delete(self, capture_id: str) -> None:
        """Forget a capture (stopped first if it runs) and delete its file, giving its bytes
        back to the budget. A file that cannot be deleted keeps its bytes counted."""
        size, path = 0, ""
        if (capture := self.captures.pop(capture_id, None)) is not None:
            capture.stop()
            size, path = capture.recorder.writer.size, str(capture.path)
        for held in (self.refused, self.leftovers):
            if (result := held.pop(capture_id, None)) is not None and result.path:
                size, path = result.file_bytes, result.path
        if not path:
            return
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError:
            return
        self.budget.give_back(size)

    def poll(self, now: float, budget: float = float("inf")) -> None:
        """Let every active capture read its rings, a block at a time in turn, for at most about
        ``budget`` seconds: what a capture cannot take in that time waits in its ring, and what
        its ring cannot hold is counted as the capture's drops, never the dp's."""
        deadline = time.monotonic() + budget
        busy = [c for c in self.captures.values() if c.recorder.active]
        while busy:
            busy = [c for c in busy if self._guarded(c, partial(c.poll, now, 1))]
            if time.monotonic() >= deadline:
                break

    @staticmethod
    def _guarded(capture: Capture, work: Callable[[], bool | None]) -> bool:
        """Do ``work`` (its word: come back?); when it fails (a write error: the disk; or a bug),
        that capture ends as failed, saying why, and the others go on."""
        try:
            return bool(work())
        except Exception as e:
            try:
                capture.stop(StopReason.FAILED, _why(e))
            except Exception:  # its file or a ring would not even close: it still ends
                capture.recorder.stop(StopReason.FAILED, _why(e))
            return False

    def results(self) -> list[Result]:
        """Every capture's result, the refused ones included (not the leftovers)."""
        return [c.result() for c in self.captures.values()] + list(self.refused.values())

    def close(self) -> None:
        """Stop every capture (the dp is stopping)."""
        for capture in self.captures.values():
            capture.stop()
