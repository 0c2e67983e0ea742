"""The live loop behind ``flowmap dp run``: rings -> block parser -> session table -> exporter.

One :class:`Worker` owns its rings (one per interface), its session table and its exporter
connection. With N > 1 workers, each is a process (its own core, its own GIL) and the rings of
one interface form a PACKET_FANOUT group. The loop:

1. ``epoll`` over the rings' sockets with a timeout that ends at the next report;
2. every ready block of every ready ring goes through the block parser, then back to the kernel;
3. at each interval: fold PACKET_STATISTICS into the totals, ``table.collect()``, build the
   protobuf report and *offer* it to the exporter (never waiting: see ``sending``);
4. apply the newest capture the agent sent (:class:`Capture`): attach what is new, detach what
   is gone, put the new filter (the node's addresses, the overlay to drop on the underlay) on
   the rings kept; interfaces that cannot be attached yet are retried each interval, since the
   agent may name a pod's veth a moment before it exists.
5. worker 0 alone also runs the node's packet captures on demand (``demand.PacketCaptures``):
   it brings them to each ``Control`` at the interval, and reads their own small rings every
   50 ms (their ring's retire timeout) while one is armed or running; with none, the loop
   waits as if there were no such thing.

**Why a supervisor opens the fanout members.** The kernel picks a member by
``hash % members`` over the group's members *in join order*, separately for each interface. A
session whose two directions enter through two interfaces (pod A's veth, pod B's veth) lands on
one worker only if every interface's group lists the workers in the same order. Workers that
attached on their own would race, so with N > 1 the parent process opens the N sockets of an
interface in worker order (a fresh group id per attach, so a late-closing old member can never
shift the order) and hands worker i its descriptor over a unix socketpair (SCM_RIGHTS).

No exception from parsing leaves the loop: the decoder counts malformed frames by reason;
anything else is counted as ``internal_error`` and the block is still given back.
"""

from __future__ import annotations

import ipaddress
import json
import multiprocessing
import os
import random
import select
import signal
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from flowmap_dp import threats as threatreg
from flowmap_dp import wire_pb2
from flowmap_dp.capture import MAX_OVERLAY, Encapsulation, Ring, RingConfig, fanout_group, open_socket
from flowmap_dp.demand import PacketCaptures
from flowmap_dp.sending import Exporter
from flowmap_dp.reporting import iter_reports
from flowmap_dp.compiled import CompiledTable
from flowmap_dp.detection import Inspector
from flowmap_dp.session import Health, Report, SessionTable
from flowmap_dp.settings import PARSERS, Settings

BlockParser = Callable[[memoryview], None]
BLOCKS_PER_TURN = 4


@dataclass(frozen=True)
class Capture:
    """What the agent asked the dp to capture (its latest ``Control``), applied to each ring."""

    interfaces: tuple[str, ...] = ()
    local_addresses: tuple[str, ...] = ()  # the agent's: the command line's are added
    underlay: frozenset[str] = frozenset()
    overlay: tuple[Encapsulation, ...] = ()

    @classmethod
    def from_control(cls, control: wire_pb2.Control) -> Capture:
        """The capture a ``Control`` asks for; an address or encapsulation the dp cannot use is
        left out, never fatal (a newer agent's, say)."""
        def address(a: str) -> bool:
            try:
                ipaddress.ip_address(a)
            except ValueError:
                return False
            return True

        def usable(e: Encapsulation) -> bool:
            try:
                e.check()
            except ValueError:
                return False
            return True

        overlay = (Encapsulation(e.ip_proto, e.port) for e in control.overlay)
        return cls(tuple(dict.fromkeys(control.interfaces)), tuple(filter(address, control.local_addresses)),
                   frozenset(control.underlay), tuple(dict.fromkeys(filter(usable, overlay)))[:MAX_OVERLAY])

    def ring(self, base: RingConfig, name: str) -> RingConfig:
        """The ring for interface ``name``: ``base`` (the command line) with this capture's filter."""
        return replace(base, local_addresses=tuple(dict.fromkeys(base.local_addresses + self.local_addresses)),
                       overlay=self.overlay if name in self.underlay else ())

    def to_json(self) -> dict[str, Any]:
        return {"want": list(self.interfaces), "local": list(self.local_addresses), "underlay": sorted(self.underlay),
                "overlay": [list(e) for e in self.overlay]}

    @classmethod
    def from_json(cls, msg: dict[str, Any]) -> Capture:
        return cls(tuple(msg["want"]), tuple(msg["local"]), frozenset(msg["underlay"]),
                   tuple(Encapsulation(*e) for e in msg["overlay"]))


class LiveTable(Protocol):
    """What the loop needs of a session table (``SessionTable``, ``CompiledTable``)."""

    max_sessions: int

    def collect(self, now: float, hold: float = 0.0) -> Report: ...

    def close_all(self, reason: str = "end") -> None: ...

    def health(self) -> Health: ...

    def count_parser_error(self) -> None: ...


def make_table(kind: str, max_sessions: int, threats: threatreg.Config = threatreg.Config()) -> tuple[LiveTable, BlockParser]:
    """A session table and its block reader: ``compiled`` (the Rust walk, decoder and table) or
    ``per-packet`` (the Python reference it is tested against); its inspectors run the threat
    scanners ``threats`` leaves on, with its thresholds."""
    factory = partial(Inspector, scanners=threatreg.bind(threats))
    if kind == "per-packet":
        from flowmap_dp.block import feed_block

        table = SessionTable(max_sessions=max_sessions, inspector_factory=factory)

        def parse(block: memoryview) -> None:
            feed_block(block, table)

        return table, parse
    if kind != "compiled":
        raise ValueError(f"unknown parser {kind!r}: one of {', '.join(PARSERS)}")
    compiled = CompiledTable(max_sessions=max_sessions, inspector_factory=factory)
    return compiled, compiled.feed_block


def _send(chan: socket.socket, msg: dict[str, Any], fds: Sequence[int] = ()) -> None:
    socket.send_fds(chan, [json.dumps(msg).encode()], list(fds))


class Worker:
    """One packet loop: its rings, its table, its exporter; and for worker 0, the node's packet
    captures on demand.

    Every worker receives every ``Control`` (each has its own connection to the agent), so any
    one could run the packet captures; worker 0 does, because it is always there (it is the only
    process with ``--workers 1``, and the first with more) and the captures are the node's, one
    set for all workers. Its reports' health carries their statuses; the other workers ignore
    the Control's packet captures.
    """

    def __init__(self, settings: Settings, worker: int = 0, channel: socket.socket | None = None) -> None:
        self.settings = settings
        self.worker = worker
        self.channel = channel  # to the supervisor (N > 1): it opens our rings
        self.table, self.parse = make_table(settings.parser, settings.max_sessions, settings.threats)
        self.watching = threatreg.Watching(settings.threats)
        self.exporter = Exporter(settings.socket_path, queue_size=settings.queue_size,
                                 queue_sessions=settings.queue_sessions)
        self.rings: dict[str, Ring] = {}
        self.by_fd: dict[int, Ring] = {}
        self.capture = Capture(tuple(settings.interfaces))
        self.failed: dict[str, str] = {}
        self.epoll = select.epoll()
        if channel is not None:
            self.epoll.register(channel.fileno(), select.EPOLLIN)
        self.sequence = 0
        self.blocks = 0
        self.stopping = False
        self._retired = [0, 0, 0]  # kernel stats of rings already detached
        self.packet_captures = PacketCaptures(Path(settings.capture_dir), settings.capture_disk_bytes,
                                              settings.max_captures) if worker == 0 else None

    # -- interfaces ----------------------------------------------------------------------------

    @property
    def wanted(self) -> tuple[str, ...]:
        return self.capture.interfaces

    def apply(self, capture: Capture) -> None:
        """Attach what is wanted and missing, detach what is attached and not wanted, and put
        the capture's filter on the rings that stay (an address of the node, an underlay)."""
        self.capture = capture
        for name, ring in list(self.rings.items()):
            if name in capture.interfaces:
                try:
                    ring.refilter(capture.ring(self.settings.ring, name))
                except OSError as e:  # never seen; a ring that cannot take its filter must not count
                    self.detach(name)
                    self.failed[name] = str(e)
        if self.channel is not None:
            _send(self.channel, capture.to_json())  # the supervisor attaches for all workers
            return
        for name in [n for n in self.rings if n not in capture.interfaces]:
            self.detach(name)
        for name in capture.interfaces:
            if name not in self.rings:
                self.attach(name)

    def attach(self, name: str, sock: socket.socket | None = None) -> None:
        """Open a ring on ``name`` (or map ``sock``); a failure is remembered and retried."""
        config = self.capture.ring(self.settings.ring, name)
        try:
            ring = Ring(name, config, sock=sock)
        except OSError as e:
            self.failed[name] = str(e)
            return
        if sock is not None:
            try:
                ring.refilter(config)  # the supervisor opened it for a capture older than ours, maybe
            except OSError as e:
                ring.close()
                self.failed[name] = str(e)
                return
        self.failed.pop(name, None)
        self.rings[name] = ring
        self.by_fd[ring.fileno()] = ring
        self.epoll.register(ring.fileno(), select.EPOLLIN | select.EPOLLERR)

    def detach(self, name: str) -> None:
        """Drain and close the ring on ``name`` (its last blocks are still counted)."""
        ring = self.rings.pop(name)
        self._drain(ring)
        st = ring.read_stats()
        self._retired = [self._retired[0] + st.packets, self._retired[1] + st.drops, self._retired[2] + st.freezes]
        self.epoll.unregister(ring.fileno())
        del self.by_fd[ring.fileno()]
        ring.close()

    def _from_supervisor(self) -> None:
        assert self.channel is not None
        data, fds, _flags, _addr = socket.recv_fds(self.channel, 65536, 4)
        if not data:
            self.stopping = True  # the supervisor is gone
            return
        msg = json.loads(data)
        if "attach" in msg:
            name = msg["attach"]
            if name in self.rings:
                self.detach(name)
            self.attach(name, socket.socket(fileno=fds[0]))
        elif "detach" in msg and msg["detach"] in self.rings:
            self.detach(msg["detach"])
        elif "failed" in msg:
            self.failed = dict(msg["failed"])

    # -- loop ------------------------------------------------------------------------------------

    def _drain(self, ring: Ring, limit: int = 1 << 30) -> bool:
        """Parse up to ``limit`` ready blocks; True if more are ready (the caller comes back)."""
        for _ in range(limit):
            block = ring.ready_block()
            if block is None:
                return False
            self.blocks += 1
            try:
                self.parse(block)
            except Exception:  # a parser bug must not stop capture; counted, block given back
                self.table.count_parser_error()
            finally:
                block.release()
                ring.release_block()
        return ring.ready_block() is not None

    def health(self) -> wire_pb2.Health:
        """Cumulative health of this worker (lost counts are stamped again by the exporter)."""
        packets, drops, freezes = self._retired
        for ring in self.rings.values():
            st = ring.read_stats()
            packets, drops, freezes = packets + st.packets, drops + st.drops, freezes + st.freezes
        h = self.table.health()
        return wire_pb2.Health(
            packets=h.packets, decoded=h.decoded, kernel_packets=packets, kernel_drops=drops,
            kernel_freezes=freezes, malformed=h.malformed, ignored=h.ignored, table_size=h.sessions,
            table_capacity=self.table.max_sessions, evictions=h.evicted,
            lost_reports=self.exporter.lost_reports, lost_sessions=self.exporter.lost_sessions,
            interfaces=sorted(self.rings), failed_interfaces=sorted(self.failed), blocks=self.blocks,
            sessions_created=h.created, sessions_expired=h.expired, sessions_closed=h.closed,
            inspector_errors=h.inspector_errors, fragments=h.fragments,
            packet_captures=self.packet_captures.statuses() if self.packet_captures is not None else (),
        )

    def report(self, start: float, final: bool = False) -> None:
        """Collect the interval's deltas and offer them to the exporter."""
        if final:
            self.table.close_all("shutdown")
        # Sessions younger than a block's retire timeout wait one report (SessionTable.collect).
        rep = self.table.collect(time.time(), hold=0.0 if final else self.settings.ring.retire_timeout_ms / 1000 + 0.01)
        self.watching.observe(rep.time, rep.sessions)
        self.sequence += 1
        for r in iter_reports(rep, run_id=self.settings.run_id, worker=self.worker, workers=self.settings.workers,
                               sequence=self.sequence, start=start, health=self.health(),
                               part_size=self.settings.part_size):
            self.exporter.offer(r)

    def run(self) -> None:
        """Capture until ``stopping`` is set (by a signal), then send a final report."""
        self.exporter.start()
        if self.channel is None:
            self.apply(self.capture)
        interval = self.settings.interval
        start = time.time()
        next_report = time.monotonic() + interval
        chan_fd = self.channel.fileno() if self.channel is not None else -1
        # Rings with blocks still ready after their turn. A few blocks per ring per turn keeps
        # the rings fair and the reports on time under a sustained burst.
        pending: dict[int, Ring] = {}
        captures = self.packet_captures
        next_capture = 0.0  # the next read of the packet captures' rings, while any runs
        while not self.stopping:
            wait = 0.0 if pending else max(0.0, next_report - time.monotonic())
            if captures is not None and captures.active:
                wait = min(wait, max(0.0, next_capture - time.monotonic()))
            try:
                events = self.epoll.poll(wait)
            except InterruptedError:
                events = []
            for fd, ev in events:
                if fd == chan_fd:
                    self._from_supervisor()
                elif (ring := self.by_fd.get(fd)) is not None:
                    if ev & select.EPOLLERR:
                        ring.check_error()
                    pending[fd] = ring
            for fd, ring in list(pending.items()):
                if self.by_fd.get(fd) is not ring or not self._drain(ring, BLOCKS_PER_TURN):
                    del pending[fd]
            # The main rings first: the captures read theirs when no main ring has blocks waiting.
            if captures is not None and captures.active and not pending and time.monotonic() >= next_capture:
                captures.poll(time.time())
                next_capture = time.monotonic() + captures.POLL_INTERVAL
            if time.monotonic() >= next_report:
                self._interval_tasks()
                now = time.time()
                self.report(start)
                start = now
                next_report += interval
                if next_report < time.monotonic():  # fell behind: skip, do not report in a burst
                    next_report = time.monotonic() + interval
        for ring in list(self.rings.values()):
            self._drain(ring)
        if captures is not None:
            captures.close()  # Stopped, files kept: the final report says so
        self.report(start, final=True)
        for name in list(self.rings):
            self.detach(name)
        self.exporter.stop()

    def _interval_tasks(self) -> None:
        latest = None
        while not self.exporter.controls.empty():
            latest = self.exporter.controls.get()
        if latest is not None:
            self.apply(Capture.from_control(latest))
            if self.packet_captures is not None:
                self.packet_captures.apply(latest, time.time())
        for name, ring in list(self.rings.items()):
            if ring.gone:  # the interface went away: it stays wanted, it may come back
                self.detach(name)
                self.failed[name] = "interface went away"
                if self.channel is not None:
                    _send(self.channel, {"gone": name})
        if self.channel is None:
            for name in [n for n in self.wanted if n not in self.rings]:
                self.attach(name)


class Supervisor:
    """Parent of N workers: opens each interface's fanout members in worker order (see above)."""

    def __init__(self, settings: Settings, channels: list[socket.socket]) -> None:
        self.settings = settings
        self.channels = channels
        self.capture = Capture(tuple(settings.interfaces))
        self.attached: set[str] = set()
        self.failed: dict[str, str] = {}
        self.generation = 0

    def sync(self) -> None:
        """Bring every worker to the wanted set; retry what failed before."""
        for name in sorted(self.attached - set(self.capture.interfaces)):
            self.attached.discard(name)
            self._broadcast({"detach": name})
        failed: dict[str, str] = {}
        for name in self.capture.interfaces:
            if name in self.attached:
                continue
            socks: list[socket.socket] = []
            try:
                self.generation += 1
                group = fanout_group(self.settings.run_id + self.generation, socket.if_nametoindex(name))
                for _ in self.channels:
                    socks.append(open_socket(name, self.capture.ring(self.settings.ring, name), group))
            except OSError as e:
                failed[name] = str(e)
                continue
            finally:
                if len(socks) < len(self.channels):
                    for s in socks:
                        s.close()
            for chan, s in zip(self.channels, socks):
                with s:
                    self._send(chan, {"attach": name}, [s.fileno()])
            self.attached.add(name)
        if failed != self.failed:
            self.failed = failed
            self._broadcast({"failed": failed})

    def _send(self, chan: socket.socket, msg: dict[str, Any], fds: Sequence[int] = ()) -> None:
        try:
            _send(chan, msg, fds)
        except OSError:
            pass  # that worker is gone; run() notices when it exits

    def _broadcast(self, msg: dict[str, Any]) -> None:
        for chan in self.channels:
            self._send(chan, msg)

    def run(self, procs: Sequence[multiprocessing.process.BaseProcess]) -> int:
        """Serve the workers' interface requests until all of them have exited."""
        self.sync()
        by_fd = {c.fileno(): c for c in self.channels}
        poller = select.poll()
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        last_sync = time.monotonic()
        while any(p.is_alive() for p in procs):
            for fd, _ev in poller.poll(500):
                try:
                    data = by_fd[fd].recv(65536)
                except OSError:
                    data = b""
                if not data:
                    poller.unregister(fd)
                    continue
                msg = json.loads(data)
                if "want" in msg:
                    self.capture = Capture.from_json(msg)
                elif "gone" in msg:
                    self.attached.discard(msg["gone"])
                self.sync()
                last_sync = time.monotonic()
            if time.monotonic() - last_sync >= self.settings.interval:
                self.sync()
                last_sync = time.monotonic()
        return max((p.exitcode or 0) for p in procs)


def _worker_main(settings: Settings, index: int, channel: socket.socket | None = None) -> None:
    w = Worker(settings, index, channel)

    def stop(_sig: int, _frame: object) -> None:
        w.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop if channel is None else signal.SIG_IGN)  # ^C: the parent forwards
    w.run()


def run(settings: Settings) -> int:
    """Run ``settings.workers`` packet loops until SIGTERM/SIGINT."""
    if settings.run_id == 0:
        settings = replace(settings, run_id=random.getrandbits(31) or 1)
    if settings.workers <= 1:
        _worker_main(settings, 0)
        return 0
    ctx = multiprocessing.get_context("fork")
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(settings.workers)]
    procs = [ctx.Process(target=_worker_main, args=(settings, i, child), name=f"flowmap-dp-{i}")
             for i, (_parent, child) in enumerate(pairs)]
    for p in procs:
        p.start()
    for _parent, child in pairs:
        child.close()

    def forward(_sig: int, _frame: object) -> None:
        for p in procs:
            if p.pid is not None and p.is_alive():
                os.kill(p.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return Supervisor(settings, [parent for parent, _child in pairs]).run(procs)
