"""``syn-flood``: many half-open TCP sessions, at a rate, most of a key's attempts.

**Rule.** Each TCP attempt is counted once, with its outcome (``attempts``: half-open, refused,
completed), under two keys: its **source** (VLAN, client address) and its **destination** (VLAN,
server address, server port). A flood from one source shows under both; a flood from random
spoofed sources (``hping3 --rand-source``) shows only under its destination, which is why that key
exists. A key fires when, over the last ``window`` seconds, its half-open attempts per second
exceed ``rate`` AND half-open attempts are more than ``ratio`` of its attempts. Refused attempts
(the server reset the SYN) count as attempts, not as half-open: a closed port holds no state. A
key is tracked from its first half-open attempt (its completed and refused ones count from then
on), so traffic that never fails keeps no state. The hit goes to the session that tipped the key
over, its snippet e.g. ``1002 half-open/s to 10.0.0.2:80 (100%, 501 in 0.5s)``: the half-open
attempts the window holds, over the time they took (from the key's first attempt, at most
``window``). Hysteresis: a key that fired fires again only once its rate stayed below
``rearm_rate`` for ``rearm_after`` seconds (no attempt at all counts as below).

The rate is a sliding window estimated from two buckets of ``window`` seconds (the previous
bucket weighted by how much of it the window still covers): 8 numbers a key. The clock is the
sessions' own first-seen times (a capture replays as it happened; a packet read out of order never
moves a key's clock back).

**Limits** (``--threat-limit syn-flood.KEY=VALUE``): ``rate`` 100 (half-open/s), ``ratio`` 0.8,
``window`` 5 (s), ``rearm_rate`` 20 (half-open/s), ``rearm_after`` 30 (s), ``keys`` 4096 (per key
kind: sources and destinations each).

**Memory.** At most ``keys`` sources and ``keys`` destinations, the least recently seen evicted
first (a spoofed flood churns the sources, its destination stays): about 300 bytes a key, 2.5 MB
per packet loop at the defaults with both maps full (``tests/dp/test_rates.py`` measures it and
holds it under 3 MB).

**Cannot see.** A spoofed flood spread over many destination ports (no key gets the rate); a
flood slower than ``rate``; attempts the table never reported (see ``attempts``). A half-open
session is one whose handshake was unfinished at its first report; the watch never waits for
later reports, so a flood is seen in the report that carries it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from flowmap_dp.decode import format_endpoint
from flowmap_dp.detectors.base import Threat
from flowmap_dp.threats.attempts import HALF_OPEN, Recent, address, outcome
from flowmap_dp.threats.base import TCP_OPENED, Limits, Seen, Watcher


NAME = "syn-flood"
LIMITS = {"rate": 100.0, "ratio": 0.8, "window": 5.0, "rearm_rate": 20.0, "rearm_after": 30.0, "keys": 4096.0}
WHERE = "tcp.handshake"


class Rate:
    """Half-open and all attempts over a sliding window, and the key's firing state."""

    __slots__ = ("start", "half", "all", "prev_half", "prev_all", "last", "since", "fired", "loud")

    def __init__(self) -> None:
        # Bucket start; newest time; start of this run of attempts; last time above rearm_rate.
        self.start = self.last = self.since = self.loud = -1.0
        self.half = self.all = self.prev_half = self.prev_all = 0
        self.fired = False

    def add(self, t: float, half_open: bool, window: float) -> tuple[float, float, float]:
        """Count one attempt at ``t``: (the time it counts at, half-open attempts in the window,
        their share of its attempts)."""
        if t < self.last:
            t = self.last
        self.last = t
        if self.start < 0:
            self.start = self.since = t
        elif t >= self.start + window:
            if t < self.start + 2 * window:  # the next bucket: the current one becomes the previous
                self.prev_half, self.prev_all = self.half, self.all
                self.start += window
            else:  # a whole window with nothing
                self.prev_half = self.prev_all = 0
                self.start = self.since = t
            self.half = self.all = 0
        self.half += half_open
        self.all += 1
        weight = 1.0 - (t - self.start) / window if window > 0 else 0.0
        half = self.half + self.prev_half * weight
        return t, half, half / (self.all + self.prev_all * weight)


class Watch:
    """One packet loop's syn-flood state: see the module docstring."""

    def __init__(self, limits: Limits) -> None:
        self.rate = limits["rate"]
        self.ratio = limits["ratio"]
        self.window = limits["window"]
        self.rearm_rate = limits["rearm_rate"]
        self.rearm_after = limits["rearm_after"]
        size = int(limits["keys"])
        self.sources: Recent[tuple[int, bytes], Rate] = Recent(size, Rate)
        self.destinations: Recent[tuple[int, bytes, int], Rate] = Recent(size, Rate)

    def observe(self, session: Seen, now: float) -> Sequence[Threat]:
        out = outcome(session)
        if out is None:
            return ()
        half_open = out == HALF_OPEN
        t = session.first_seen
        hits = []
        # A key is tracked from its first half-open attempt: traffic that never fails costs a lookup.
        to = self.destinations.get((session.vlan, session.server, session.server_port), half_open)
        if to is not None:
            hit = self._check(to, t, half_open, lambda: "to " + format_endpoint(session.server, session.server_port))
            if hit:
                hits.append(hit)
        src = self.sources.get((session.vlan, session.client), half_open)
        if src is not None:
            hit = self._check(src, t, half_open, lambda: "from " + address(session.client))
            if hit:
                hits.append(hit)
        return hits

    def _check(self, key: Rate, t: float, half_open: bool, where: Callable[[], str]) -> Threat | None:
        t, half, share = key.add(t, half_open, self.window)
        rate = half / self.window if self.window > 0 else half
        if rate >= self.rearm_rate:
            key.loud = t
        elif key.fired and t - key.loud >= self.rearm_after:
            key.fired = False
        if key.fired or not half_open or rate <= self.rate or share <= self.ratio:
            return None
        key.fired = True
        # What the window holds, over the time it took (a burst shows its own rate, not the window's).
        span = min(self.window, t - key.since)
        shown = half / span if span > 0 else half
        return Threat(NAME, f"{shown:.0f} half-open/s {where()} ({share:.0%}, {half:.0f} in {span:.1f}s)", WHERE)


WATCHER = Watcher(NAME, Watch, LIMITS, sees=TCP_OPENED)
