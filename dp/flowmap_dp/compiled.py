"""The compiled per-packet path behind the session table's API: what the live loop runs.

``flowmap_dp._native`` (Rust, ``dp/native``, built by ``pip install``) walks a TPACKET_V3 block,
decodes each frame, and keeps the session table — keys, client/server, TCP state, counters per
direction, expiry, eviction, the dirty set — without the GIL and without a Python object per
packet. It is held to the Python reference (``block.feed_block`` into ``session.SessionTable``)
by a test that feeds both the same blocks and captures and compares every report.

What is not per packet stays here, in Python: application detection. The compiled table hands
each undecided session's payload packets over as *events* (and tells when such a session
ends); after each block they are fed, in order, to the same ``Detection`` the reference table
uses, and the table is told which sessions are decided. A decision can change how a later
packet is counted only in one case (a 5-tuple's new exchange after a pause: a DNS resolver's
port picked again): the compiled walk stops there, the events are answered, and it goes on, so
both tables agree exactly.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flowmap_dp import _native
from flowmap_dp.decode import FRAGMENT_COUNTERS, FRAGMENT_MAX, FRAGMENT_TIMEOUT, IGNORED, L4_NAMES, MALFORMED
from flowmap_dp.detection import NO_VERDICT, UNKNOWN
from flowmap_dp.detectors.base import Threat
from flowmap_dp.detectors import NAMES
from flowmap_dp.session import (
    _NO_METADATA, HANDOFF_PORTS, HANDOFF_REMEMBERED, INSPECTOR_IDLE, NEW_EXCHANGE_AFTER, STATE_NAMES, UDP_SERVICES,
    Detection, Health, InspectorFactory, InspectorLike, Report, SessionDelta, Timeouts, is_service_port, said_something,
)

FRAMES_PER_ANSWER = 1024  # capture-file frames fed between two answers to the events

_PORTS = range(65536)
_SERVICE = bytes(is_service_port(p) for p in _PORTS)
_UDP_SERVICES = bytes(p in UDP_SERVICES for p in _PORTS)
_HANDOFF_PORTS = bytes(p in HANDOFF_PORTS for p in _PORTS)


class _Record:
    """The slow path's state of one session (``session.Inspected``), by the table's handle, from
    its first handed-over payload until the report after its detection settled (then the
    compiled table keeps only the app's code)."""

    __slots__ = ("insp", "feeds", "app", "metadata", "threats", "app_new")

    def __init__(self) -> None:
        self.insp: InspectorLike | None | bool = None
        self.feeds = 0
        self.app = "unknown"
        self.metadata: Any = _NO_METADATA
        self.threats: tuple[Threat, ...] = ()
        self.app_new = False


class CompiledTable:
    """``SessionTable``'s live API over the compiled table: ``feed_block``, ``collect``,
    ``close_all``, ``expire``, ``health``. Same arguments, same reports."""

    def __init__(self, max_sessions: int = 200_000, timeouts: Timeouts | None = Timeouts(),
                 inspector_factory: InspectorFactory | None = None, feed_limit: int = 32,
                 max_pending: int | None = None, max_fragments: int = FRAGMENT_MAX) -> None:
        self.max_sessions = max_sessions
        self.detection = Detection(inspector_factory, feed_limit)
        limits = None if timeouts is None else (timeouts.tcp_open, timeouts.tcp_half_open, timeouts.tcp_closing,
                                                timeouts.tcp_closed, timeouts.udp, timeouts.icmp, timeouts.other)
        self._apps = [UNKNOWN, *NAMES, NO_VERDICT]  # app names by the code the compiled table keeps
        self._codes = {app: code for code, app in enumerate(self._apps)}
        exchange = [(self._codes[app], seconds) for app, seconds in NEW_EXCHANGE_AFTER.items()]
        self._t = _native.Table(max_sessions, max_sessions if max_pending is None else max_pending, feed_limit,
                                max(0, max_fragments), FRAGMENT_TIMEOUT, limits, _SERVICE, _UDP_SERVICES,
                                _HANDOFF_PORTS, HANDOFF_REMEMBERED, exchange)
        self._records: dict[int, _Record] = {}
        self._frames = 0
        self.parser_errors = 0  # blocks whose parsing raised (counted as ``internal_error``)

    def __len__(self) -> int:
        return len(self._t)

    @property
    def inspector_errors(self) -> int:
        return self.detection.errors

    # -- packets ---------------------------------------------------------------------------------

    def feed_block(self, block: bytes | memoryview) -> None:
        """Every frame of one TPACKET_V3 block (the GIL is released while it is walked)."""
        table = self._t
        while not table.feed_block(block):
            self._answer()
        self._answer()

    def feed_frames(self, frames: Iterable[tuple[bytes, int, int, float]]) -> None:
        """Capture-file records: (frame, link type, length on the wire, timestamp)."""
        table = self._t
        for frame, link, wire_len, ts in frames:
            while not table.feed_frame(frame, link, wire_len, ts):
                self._answer()
            self._frames += 1
            if self._frames % FRAMES_PER_ANSWER == 0:
                self._answer()
        self._answer()

    def _code(self, app: str) -> int:
        """The code of an app name: the registry's from the start, others (a test's inspector)
        as they come, never more than a byte holds."""
        code = self._codes.get(app)
        if code is None:
            if len(self._apps) > 255:
                return 0
            code = self._codes[app] = len(self._apps)
            self._apps.append(app)
        return code

    def _decided(self, handle: int, r: _Record, dirty: bool = False) -> None:
        """Tell the compiled table the detectors are done with ``handle``."""
        self._t.set_inspection(handle, self._code(r.app), dirty)

    def _answer(self) -> None:
        """Feed the handed-over payloads to the detectors, in order; tell the table who is done."""
        table, records, detection = self._t, self._records, self.detection
        for event in table.take_events():
            if len(event) == 2:  # (handle, dropped): a session that was inspected ended
                handle, dropped = event
                r = records.get(handle)
                if r is not None:
                    if r.insp is not False:
                        detection.settle(r, finish=True)
                    if dropped:
                        del records[handle]
                continue
            handle, from_client, payload, fresh, tcp, client_port, server_port, app, ts = event
            r = records.get(handle)
            if r is None:
                r = records[handle] = _Record()
                r.app = self._apps[app]  # a 5-tuple's new exchange: the old app until it settles
            elif fresh:  # the same, its previous exchange not reported yet
                r.insp, r.feeds = None, 0
            if r.insp is False:
                continue  # decided earlier in this batch
            if detection.inspect(r, tcp, client_port, server_port, from_client, payload, ts):
                self._decided(handle, r)

    # -- ends and reports ------------------------------------------------------------------------

    def expire(self, now: float) -> int:
        """End the sessions idle past their timeout; returns how many."""
        n: int = self._t.expire(now)
        self._answer()
        return n

    def close_all(self, reason: str = "end") -> None:
        self._t.close_all(reason)
        self._answer()

    def collect(self, now: float, hold: float = 0.0) -> Report:
        """As ``SessionTable.collect``: expire, judge lone server words, settle idle inspectors,
        then the deltas."""
        self.expire(now)
        recent = now - hold
        for handle, first in self._t.inspecting():
            r = self._records.get(handle)
            if r is None or first > recent:
                continue
            insp = r.insp
            if insp is not None and insp is not False and insp is not True:
                self.detection.judge_server_alone(r, insp)
                if r.insp is False:
                    self._decided(handle, r)
        for handle in self._t.idle_inspecting(now - INSPECTOR_IDLE):
            r = self._records.get(handle)
            insp = None if r is None else r.insp
            if r is not None and insp is not None and insp is not False and insp is not True \
                    and not self.detection.waits(insp, now):
                self.detection.settle(r, finish=True)
                self._decided(handle, r, dirty=said_something(r))
        deltas = [self._delta(row) for row in self._t.collect(now, hold)]
        return Report(now, deltas, self.health())

    def _delta(self, row: Any) -> SessionDelta:
        handle, (proto, vlan, client, cport, server, sport), (first, last), (new, opened, end, state, code), counts, \
            (marks, echo_changes) = row
        packets_c2s, packets_s2c, bytes_c2s, bytes_s2c = counts
        r = self._records.get(handle)
        app, decided, metadata, threats = self._apps[code], False, None, []
        if r is not None:
            app, decided = r.app, r.app_new
            if decided:
                metadata, threats = r.metadata, list(r.threats)
            if end or r.insp is False:  # nothing more to say: the table keeps the app's code
                del self._records[handle]
            else:
                r.app_new = False
        return SessionDelta(L4_NAMES.get(proto, str(proto)), proto, vlan, client, cport, server, sport, first, last,
                            new, opened, bool(end), end, STATE_NAMES[state], app, decided, packets_c2s, packets_s2c,
                            bytes_c2s, bytes_s2c, metadata, threats, marks, echo_changes)

    def count_parser_error(self) -> None:
        """A block whose parsing raised (a bug): counted as ``internal_error``."""
        self.parser_errors += 1

    def health(self) -> Health:
        total, decoded, reasons, (created, evicted, expired, closed, unreported), frags, _ = self._t.counters()
        malformed = dict(zip(MALFORMED, reasons[:len(MALFORMED)]))
        malformed["internal_error"] += self.parser_errors
        return Health(total, decoded, malformed, dict(zip(IGNORED, reasons[len(MALFORMED):])), len(self._t), created,
                      evicted, expired, closed, self.detection.errors, unreported, dict(zip(FRAGMENT_COUNTERS, frags)))
