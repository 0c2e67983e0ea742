"""What the rate watches (``synflood``, ``portscan``, ``peerscan``) share: how a TCP connection
attempt ended, told from one session's report, and bounded per-key state.

**An attempt** is a TCP session, counted once: in the report whose ``opened`` is true (the client's
SYN was seen). Its outcome is read from that same report, the first that says anything of it
(its counters are then the session's totals, unless its SYN was read after its answer):

===============  ==============================================================================
``half-open``    the handshake never completed: ``state`` is ``syn_sent`` or ``syn_recv``; or the
                 session is ``closed`` (a RST: two FINs need more packets) after at most the
                 client's SYN and one more packet of its own (its RST: a SYN-ACK answered by a
                 reset, what ``nmap -sS`` and a flooder's own kernel do) and at most one of the
                 server's (its SYN-ACK)
``refused``      ``closed`` after the client's SYN alone: the server (or a firewall for it) reset it
``completed``    anything else: the handshake finished (``open``, ``closing``, or closed after it)
===============  ==============================================================================

Both session tables (the compiled one and the per-packet reference) give the same reports
(``tests/dp/test_compiled.py``), so both give the same outcomes. Offline (``classify``), the one
report is the whole session. Live, a session's first report comes at least the rings' retire
timeout (``hold``, 64 ms) after its first packet; a handshake still unfinished then is counted
half-open even if it completes later (a server slower than that to answer): a rate and a ratio
decide, never one session.

What no report shows: sessions born and ended within one interval past the table's
``max_pending`` (a flood of more than ``--max-sessions`` a second) are only counted in
``Health.unreported``, without their addresses; those reported are then far past any threshold.
A session evicted before its first report is still reported (``end_reason`` ``evicted``), and
counted.

**Bounded state.** ``Recent`` keeps at most ``size`` keys, least recently touched evicted first;
``Distinct`` keeps at most ``size`` distinct items per key, each for ``window`` seconds.
``DistinctFailures`` is the watch of port-scan and peer-scan on both.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Generic, TypeVar

from flowmap_dp.decode import PROTO_TCP, format_endpoint
from flowmap_dp.detectors.base import Threat
from flowmap_dp.threats.base import Seen


HALF_OPEN, REFUSED, COMPLETED = "half-open", "refused", "completed"
_UNFINISHED = frozenset({"syn_sent", "syn_recv"})

K = TypeVar("K")
V = TypeVar("V")


def outcome(s: Seen) -> str | None:
    """How the TCP attempt ``s`` opens ended (``HALF_OPEN``, ``REFUSED``, ``COMPLETED``), or None
    when this report does not count one (not TCP, or not the report of its opening)."""
    if s.proto != PROTO_TCP or not s.opened:
        return None
    if s.state in _UNFINISHED:
        return HALF_OPEN
    if s.state == "closed" and s.packets_s2c <= 1:
        if s.packets_c2s == 1:
            return REFUSED
        if s.packets_c2s == 2:
            return HALF_OPEN
    return COMPLETED


def address(addr: bytes) -> str:
    """An address as text (no port)."""
    return format_endpoint(addr, 0).rsplit(":", 1)[0].strip("[]")


def failed(s: Seen) -> str | None:
    """``HALF_OPEN`` or ``REFUSED`` for a failed attempt, else None."""
    out = outcome(s)
    return None if out is None or out == COMPLETED else out


class Recent(Generic[K, V]):
    """At most ``size`` keys, each with its state; touching a key makes it the most recent, and a
    new key past the bound evicts the least recent (its state is forgotten)."""

    def __init__(self, size: int, make: Callable[[], V]) -> None:
        self.size = max(1, size)
        self.make = make
        self.items: OrderedDict[K, V] = OrderedDict()
        self.evicted = 0

    def get(self, key: K, create: bool = True) -> V | None:
        """The state of ``key`` (made when ``create``, else None when it has none)."""
        items = self.items
        value = items.get(key)
        if value is not None:
            items.move_to_end(key)
        elif create:
            value = items[key] = self.make()
            if len(items) > self.size:
                items.popitem(last=False)
                self.evicted += 1
        return value

    def __len__(self) -> int:
        return len(self.items)


class Distinct:
    """Distinct items seen within the last ``window`` seconds (at most ``size`` of them: once full,
    the oldest makes room), and whether this key already fired: it fires once, and again only
    after a whole window without a failed attempt (the count fell to zero)."""

    __slots__ = ("seen", "fired")

    def __init__(self) -> None:
        self.seen: OrderedDict[object, float] = OrderedDict()  # item -> last seen, oldest first
        self.fired = False

    def add(self, item: object, t: float, window: float, size: int) -> int:
        """Count ``item`` at ``t``; returns how many distinct items the window now holds."""
        seen = self.seen
        if seen:  # a packet read out of order may be older than the newest: time never goes back
            t = max(t, next(reversed(seen.values())))
        while seen and t - next(iter(seen.values())) > window:
            seen.popitem(last=False)
        if not seen:
            self.fired = False
        seen.pop(item, None)
        if len(seen) >= size:
            seen.popitem(last=False)
        seen[item] = t
        return len(seen)

    def span(self) -> float:
        """Seconds between the oldest and the newest item counted."""
        seen = self.seen
        return next(reversed(seen.values())) - next(iter(seen.values())) if seen else 0.0


MAX_DISTINCT = 1024  # items kept per key, whatever a limit says


class DistinctFailures:
    """A watch on failed attempts (see :func:`failed`): each counts ``item(session)`` under
    ``key(session)``; a key fires once ``most`` distinct items failed within ``window`` seconds,
    and again only after a whole window without a failed attempt. At most ``keys`` keys, the least
    recently seen evicted first, each holding at most ``most`` items (capped at MAX_DISTINCT)."""

    def __init__(self, name: str, most: float, window: float, keys: float, key: Callable[[Seen], Hashable],
                 item: Callable[[Seen], object], say: Callable[[Seen, int, float], str]) -> None:
        self.name, self.key, self.item, self.say = name, key, item, say
        self.most = max(1, min(int(most), MAX_DISTINCT))
        self.window = window
        self.keys: Recent[Hashable, Distinct] = Recent(int(keys), Distinct)

    def observe(self, session: Seen, now: float) -> Sequence[Threat]:
        if failed(session) is None:
            return ()
        key = self.keys.get(self.key(session))
        assert key is not None
        count = key.add(self.item(session), session.first_seen, self.window, self.most)
        if key.fired or count < self.most:
            return ()
        key.fired = True
        return (Threat(self.name, self.say(session, count, key.span()), "tcp.handshake"),)
