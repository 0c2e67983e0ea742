"""Echo (RFC 862, TCP and UDP): the server returns exactly what the client sent.

Evidence used: the client speaks first; the server never sends a byte the client did not send
before it (its stream stays a prefix of the client's stream, in arrival order; over UDP each
answer datagram equals the request before it). During the session that must hold for two round
trips before it counts, since protocols whose two sides open with the same greeting (two
identical SSH banners) look like one echo. When the session ends with everything echoed and
nothing else, one round trip of at least 4 bytes is enough (``conclude``). Echo is asked last, so
a real protocol that happens to be echoed is still named for what it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flowmap_dp.detectors.base import Detector, Flow, Verdict

_MIN_ECHOED = 4


def _ordered(flow: Flow) -> list[tuple[bool, bytes]]:
    c, s = iter(flow.c2s), iter(flow.s2c)
    return [(d, next(c) if d else next(s)) for d in flow.order]


def _round_trips(flow: Flow) -> int | None:
    """Completed echo round trips, or None as soon as the server says anything else."""
    if not flow.order or not flow.order[0]:
        return None if flow.order else 0
    trips = 0
    if flow.l4 == "udp":
        last: bytes | None = None
        for from_client, payload in _ordered(flow):
            if from_client:
                last = payload
            elif payload != last:
                return None
            else:
                trips, last = trips + 1, None
        return trips
    client = echoed = b""
    pending = False
    for from_client, payload in _ordered(flow):
        if from_client:
            client += payload
            pending = True
            continue
        echoed += payload
        if len(echoed) > len(client) or client[: len(echoed)] != echoed:
            return None
        if pending and len(echoed) == len(client):
            trips, pending = trips + 1, False
    return trips


def _caught_up(flow: Flow) -> bool:
    return sum(map(len, flow.s2c)) == sum(map(len, flow.c2s)) >= _MIN_ECHOED


def detect(flow: Flow) -> Verdict:
    """MATCH after two complete echo round trips; NO once the server says something else."""
    trips = _round_trips(flow)
    if trips is None:
        return Verdict.NO
    return Verdict.MATCH if trips >= 2 and _caught_up(flow) else Verdict.MORE


def conclude(flow: Flow) -> Verdict:
    """At session end: one complete round trip with everything echoed is enough."""
    trips = _round_trips(flow)
    return Verdict.MATCH if trips and _caught_up(flow) else Verdict.NO


def extract(flow: Flow) -> Mapping[str, Any]:
    """How many bytes were echoed."""
    return {"echo": {"bytes": sum(len(p) for p in flow.s2c)}}


DETECTOR = Detector(
    name="echo",
    l4=frozenset({"tcp", "udp"}),
    ports=frozenset({7}),
    max_packets=8,
    detect=detect,
    extract=extract,
    conclude=conclude,
    needs_answer=True,
)
