"""The contract every protocol detector follows.

A detector is one immutable object with pure functions: it looks at the first few payload
packets of a session (both directions, in order) and says whether its protocol is there. It does
no I/O and keeps no state of its own; the session keeps the payloads (bounded) in a ``Flow``.
The detector's ``name`` is the contract shared by metrics labels, CRD enums, the proto and the
test fixture folders.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# A detector never sees more than this many bytes of one direction's stream.
STREAM_LIMIT = 16 * 1024


class Verdict(enum.Enum):
    """What a detector says about a session after looking at its payloads so far."""

    MATCH = "match"  # the protocol is certainly this one
    NO = "no"  # certainly not this protocol: do not ask again for this session
    MORE = "more"  # cannot tell yet: ask again when more payload arrives


@dataclass(slots=True)
class Flow:
    """What the detectors may look at: the first payloads of one session, split by direction."""

    l4: str  # "tcp" or "udp"
    client_port: int
    server_port: int
    c2s: list[bytes] = field(default_factory=list)  # payload of each client->server packet, in order
    s2c: list[bytes] = field(default_factory=list)  # payload of each server->client packet, in order
    # Arrival order of the payloads: True for client->server, False for server->client.
    order: list[bool] = field(default_factory=list)
    # Capture times (seconds) of the client's first and latest payload packets fed (0.0: none yet).
    client_first: float = 0.0
    client_last: float = 0.0
    # The latest report time at which the live table found the session idle, its inspection still
    # open (``Inspector.waits``); 0.0 offline, where only packet times are known.
    quiet_at: float = 0.0

    def add(self, from_client: bool, payload: bytes) -> None:
        """Append one packet's payload in its direction, keeping the arrival order."""
        (self.c2s if from_client else self.s2c).append(payload)
        self.order.append(from_client)

    @property
    def packets(self) -> int:
        """Payload packets seen so far, both directions."""
        return len(self.order)

    def stream(self, from_client: bool) -> bytes:
        """One direction's payloads joined (TCP segments form one byte stream), bounded."""
        return b"".join(self.c2s if from_client else self.s2c)[:STREAM_LIMIT]


@dataclass(frozen=True)
class Threat:
    """A threat found in a session's payload, reported besides the session's own protocol."""

    name: str  # a detector name, e.g. "sqlinjection"
    snippet: str  # the offending text, truncated
    where: str  # e.g. "http.query", "http.body", "mysql.query"


@dataclass(frozen=True, eq=False)  # each is one object: compared by identity (fields hold functions)
class Detector:
    """One protocol's detector (or, with ``scan``, a threat scanner): see the module docstring."""

    name: str
    l4: frozenset[str]  # {"tcp"}, {"udp"} or both
    ports: frozenset[int]  # hints: they reorder the registry for a session, never decide
    max_packets: int  # payload packets (both directions) after which the detector gives up
    detect: Callable[[Flow], Verdict]
    extract: Callable[[Flow], Mapping[str, Any]] | None = None  # metadata once matched
    # Payload packets the inspector keeps feeding after a match, so that metadata which comes
    # later (a DNS answer, an HTTP status) or threats in later requests are still seen.
    linger: int = 0
    # True once the metadata is complete (e.g. every DNS query answered): stop lingering early.
    settled: Callable[[Flow], bool] | None = None
    # A threat scanner (e.g. sqlinjection) never names a session's protocol: it looks inside
    # sessions another detector matched, given that detector's name, and returns its findings.
    scan: Callable[[Flow, str], Sequence[Threat]] | None = None
    # Asked once when the session ends while the detector still says MORE: for protocols that
    # only the session's whole shape confirms (echo: everything sent came back, nothing else).
    conclude: Callable[[Flow], Verdict] | None = None
    # Seconds of silence after which the protocol's 5-tuple, used again, carries a new exchange
    # to inspect anew (DNS: a resolver picks the same source port again for another lookup).
    new_exchange_after: float | None = None
    # Says MORE until the server has spoken (echo: a round trip needs its answer): not asked
    # before, which changes no verdict and saves a call per client packet.
    needs_answer: bool = False
    # The server answers from a new port of its own (TFTP), so the session that carries the
    # answer starts with the server's packet: its requester is remembered as that one's client.
    answers_from_new_port: bool = False
