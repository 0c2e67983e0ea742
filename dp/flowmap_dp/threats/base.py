"""The contract every threat detection follows (``flowmap_api.threats`` names them).

Two shapes, both pure (no I/O, no clock of their own):

- a **scanner** looks inside one session whose protocol a detector matched, when its inspection
  settles: its first payloads (``Flow``, bounded), the protocol's name and the metadata the
  detector extracted. It keeps no state: ``scan(flow, app, metadata, limits)`` returns its hits.
- a **watch** sees every session's report, in order, one report after another, and keeps state
  across sessions (rates per source, with hysteresis): for what one session alone cannot show
  (a SYN flood, a scan, many failed logins). One watch object per packet loop (worker).

Each has its own thresholds, ``limits``: a name per threshold, its default here, overridable
from the dp's command line (``--threat-limit NAME.KEY=VALUE``), each documented in its module's
docstring; and each can be switched off (``--threats-off NAME``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from flowmap_dp.detectors.base import Flow, Threat

Limits = Mapping[str, float]


@dataclass(frozen=True)
class Scanner:
    """A stateless look inside one settled session: see the module docstring."""

    name: str  # the threat's name (flowmap_api.threats)
    apps: frozenset[str]  # the protocols (detector names) whose sessions it looks inside
    scan: Callable[[Flow, str, Mapping[str, Any], Limits], Sequence[Threat]]
    limits: Limits = field(default_factory=dict)  # thresholds and their defaults
    # Payload packets it wants the inspector to keep feeding after the protocol matched (a
    # TLS heartbeat comes after the handshake): the inspector lingers for the most any asks.
    linger: int = 0
    # The capture time until which an idle session's inspection should stay open (the tables
    # settle an inspector after ``session.INSPECTOR_IDLE`` seconds of silence otherwise): for
    # what only time shows (slowloris). ``wait(flow, app, limits)``; 0.0 for no wait.
    wait: Callable[[Flow, str, Limits], float] | None = None


class Seen(Protocol):
    """What a watch is shown of one session in one report: ``session.SessionDelta`` is one (the
    session table sits above the threats, which know it by this shape only)."""

    l4: str
    proto: int
    vlan: int  # 0: untagged
    client: bytes  # the address, 4 or 16 bytes
    client_port: int
    server: bytes
    server_port: int
    first_seen: float
    last_seen: float
    new: bool  # first report of the session
    opened: bool  # its opening was seen since the previous report
    closed: bool
    end_reason: str
    state: str
    app: str
    app_decided: bool
    packets_c2s: int
    packets_s2c: int
    bytes_c2s: int
    bytes_s2c: int
    metadata: Mapping[str, Any] | None
    threats: list[Threat]
    marks: int  # decode.MARK_* bits its packets showed since the previous report
    echo_changes: int  # echo payloads unlike the last request since the previous report


class Watch(Protocol):
    """The state of one stateful detection in one packet loop."""

    def observe(self, session: Seen, now: float) -> Sequence[Threat]:
        """One session's report (``now``: the report's time): the hits it tips over, if any."""
        ...


# Which sessions a watch is shown (``Watcher.sees``): Watching tests these first, once per session,
# so that a session none of them concerns costs no call. A watch still checks what it needs.
TCP_OPENED = "tcp-opened"  # a TCP session in the report of its opening
MARKED = "marked"  # a session whose packets set a mark (decode.MARK_*) since the previous report
WITH_METADATA = "with-metadata"  # a session whose protocol was decided, with its metadata
ICMP = "icmp"  # an ICMP or ICMPv6 session
EVERY = "every"


@dataclass(frozen=True)
class Watcher:
    """A stateful detection: ``make(limits)`` builds its state for one packet loop."""

    name: str
    make: Callable[[Limits], Watch]
    limits: Limits = field(default_factory=dict)
    sees: str = EVERY  # which sessions it is shown: one of the above


class _Marked:
    """A stateless watch: each report whose marks have ``mark``, on one of ``protos``, is the hit."""

    def __init__(self, mark: int, protos: frozenset[int], hit: Threat) -> None:
        self.mark, self.protos, self.hit = mark, protos, (hit,)

    def observe(self, session: Seen, now: float) -> Sequence[Threat]:
        return self.hit if session.marks & self.mark and session.proto in self.protos else ()


def marked(hit: Threat, mark: int, *protos: int) -> Watcher:
    """The watcher of a detection that is one mark of the decoder or the session table (no limits)."""
    return Watcher(hit.name, lambda limits: _Marked(mark, frozenset(protos), hit), sees=MARKED)
