"""The threat registry: every scanner and watch (``base``), and what one dp was told of them.

``SCANNERS`` look inside a settled session (run by ``detection.Inspector``), ``WATCHERS`` see
every session's report (run by ``Watching`` after each ``collect``, for both parsers). The
``sqlinjection`` scanner predates this package: it is also a detector name (one of the 21 the
registry and the CRDs list) and lives with the detectors. A test checks that every name here is
one of ``flowmap_api.threats``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from flowmap_dp.detectors import sqlinjection
from flowmap_dp.detectors.base import Flow, Threat
from flowmap_dp.threats import (bruteforce, deprecated_tls, dnstunnel, heartbleed, icmptunnel, peerscan, pingofdeath,
                                portscan, slowloris, smuggling, splithandshake, syndata, synflood, zonetransfer)
from flowmap_dp.decode import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP
from flowmap_dp.threats.base import (EVERY, ICMP, MARKED, TCP_OPENED, WITH_METADATA, Limits, Scanner, Seen, Watch,
                                     Watcher)



def _sqlinjection(flow: Flow, app: str, metadata: Mapping[str, Any], limits: Limits) -> Sequence[Threat]:
    return sqlinjection.scan(flow, app)


SCANNERS: tuple[Scanner, ...] = (
    Scanner(sqlinjection.NAME, sqlinjection.APPS, _sqlinjection),
    deprecated_tls.SCANNER,
    heartbleed.SCANNER,
    smuggling.SCANNER,
    slowloris.SCANNER,
    dnstunnel.SCANNER,
    zonetransfer.SCANNER,
)
WATCHERS: tuple[Watcher, ...] = (
    dnstunnel.WATCHER,
    bruteforce.WATCHER,
    splithandshake.WATCHER,
    syndata.WATCHER,
    icmptunnel.WATCHER,
    pingofdeath.WATCHER,
    synflood.WATCHER,
    portscan.WATCHER,
    peerscan.WATCHER,
)
# Threat hits one session carries (the inspector's and the watches' together).
MAX_HITS = 4


def _all_limits() -> dict[str, Limits]:
    # A detection may be a scanner and a watch under one name (dns-tunnel): one switch, their
    # limits side by side (their keys differ).
    out: dict[str, dict[str, float]] = {}
    for name, limits in [*((s.name, s.limits) for s in SCANNERS), *((w.name, w.limits) for w in WATCHERS)]:
        out.setdefault(name, {}).update(limits)
    return dict(out)


@dataclass(frozen=True)
class Config:
    """What ``flowmap dp run`` was told of threats: the detections switched off, the thresholds
    changed. Anything unknown is refused here, naming it."""

    off: frozenset[str] = frozenset()
    limits: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # name -> key -> value

    def __post_init__(self) -> None:
        known = _all_limits()
        names = set(known)
        for name in self.off:
            if name not in names:
                raise ValueError(f"--threats-off: no threat detection is called {name!r}: one of {', '.join(sorted(names))}")
        for name, values in self.limits.items():
            if name not in known:
                raise ValueError(f"--threat-limit: no threat detection is called {name!r}")
            for key, value in values.items():
                if key not in known[name]:
                    keys = f"one of {', '.join(sorted(known[name]))}" if known[name] else "it has none"
                    raise ValueError(f"--threat-limit: {name} has no limit {key!r}: {keys}")
                if not value >= 0:
                    raise ValueError(f"--threat-limit: {name}.{key} cannot be negative or NaN, not {value}")

    @classmethod
    def parse(cls, off: Iterable[str] = (), limits: Iterable[str] = ()) -> Config:
        """From the command line: ``off`` as ``NAME[,NAME...]``, ``limits`` as ``NAME.KEY=VALUE``."""
        names = frozenset(n.strip() for item in off for n in item.split(",") if n.strip())
        values: dict[str, dict[str, float]] = {}
        for item in limits:
            target, sep, text = item.partition("=")
            name, dot, key = target.strip().partition(".")
            if not sep or not dot:
                raise ValueError(f"--threat-limit: {item!r} is not NAME.KEY=VALUE")
            try:
                values.setdefault(name, {})[key] = float(text)
            except ValueError:
                raise ValueError(f"--threat-limit: {item!r}: {text!r} is not a number") from None
        return cls(names, values)

    def on(self, name: str) -> bool:
        return name not in self.off

    def limits_of(self, name: str, defaults: Limits) -> Limits:
        return {**defaults, **self.limits.get(name, {})}


@dataclass(frozen=True)
class Bound:
    """A scanner with this dp's thresholds."""

    name: str
    apps: frozenset[str]
    linger: int
    scan: Callable[[Flow, str, Mapping[str, Any]], Sequence[Threat]]
    wait: Callable[[Flow, str], float] | None = None


def bind(config: Config = Config()) -> tuple[Bound, ...]:
    """The scanners this dp runs, with its thresholds."""
    out = []
    for s in SCANNERS:
        if config.on(s.name):
            limits = config.limits_of(s.name, s.limits)
            wait = None if s.wait is None else partial(_wait, s.wait, limits)
            out.append(Bound(s.name, s.apps, s.linger, partial(_call, s, limits), wait))
    return tuple(out)


def _call(s: Scanner, limits: Limits, flow: Flow, app: str, metadata: Mapping[str, Any]) -> Sequence[Threat]:
    return s.scan(flow, app, metadata, limits)


def _wait(wait: Callable[[Flow, str, Limits], float], limits: Limits, flow: Flow, app: str) -> float:
    return wait(flow, app, limits)


DEFAULT_SCANNERS = bind()


class Watching:
    """This packet loop's watches: each report's sessions shown to each, in order, their hits
    added to the session that tipped them over (at most ``MAX_HITS`` per session). A watch that
    raises is a bug: counted, the report goes on."""

    def __init__(self, config: Config = Config()) -> None:
        self._watches: list[tuple[str, Watch]] = []
        self._sees: dict[str, list[Watch]] = {kind: [] for kind in (TCP_OPENED, MARKED, WITH_METADATA, ICMP, EVERY)}
        for w in WATCHERS:
            if config.on(w.name):
                watch = w.make(config.limits_of(w.name, w.limits))
                self._watches.append((w.name, watch))
                self._sees[w.sees].append(watch)
        self.errors = 0

    def observe(self, now: float, sessions: Iterable[Seen]) -> None:
        """One report of the session table: its time and its sessions."""
        if not self._watches:
            return
        sees = self._sees
        opened, marked, decided, icmp, every = (sees[k] for k in (TCP_OPENED, MARKED, WITH_METADATA, ICMP, EVERY))
        for s in sessions:
            proto = s.proto
            if every:
                self._show(every, s, now)
            if opened and proto == PROTO_TCP and s.opened:
                self._show(opened, s, now)
            if marked and s.marks:
                self._show(marked, s, now)
            if decided and s.metadata:
                self._show(decided, s, now)
            if icmp and (proto == PROTO_ICMP or proto == PROTO_ICMPV6):
                self._show(icmp, s, now)

    def _show(self, watches: list[Watch], s: Seen, now: float) -> None:
        for watch in watches:
            try:
                hits: Sequence[Threat] = watch.observe(s, now)
            except Exception:
                self.errors += 1
                continue
            for hit in hits:
                if len(s.threats) < MAX_HITS and hit not in s.threats:
                    s.threats.append(hit)


__all__ = ["Config", "Bound", "Scanner", "Seen", "Watch", "Watcher", "Watching", "SCANNERS", "WATCHERS",
           "MAX_HITS", "bind", "DEFAULT_SCANNERS"]
