"""The rate watches (syn-flood, port-scan, peer-scan) on crafted session reports: what counts as
a half-open, refused or completed attempt, the thresholds and the hysteresis, the keys, the
bounds of their state (memory measured), and hostile input (times going back, odd limits).

Real traffic is in the captures (tests/data/captures/syn-flood and scans, checked flow by flow by
test_own_captures.py) and in test_live.py (a flood through ``flowmap dp run``)."""

from __future__ import annotations

import random
import tracemalloc
from dataclasses import replace
from typing import Any

import pytest

from flowmap_dp.session import SessionDelta
from flowmap_dp.threats import Config, Watching, peerscan, portscan, synflood
from flowmap_dp.threats.attempts import COMPLETED, HALF_OPEN, REFUSED, Distinct, DistinctFailures, Recent, outcome

SERVER, CLIENT = bytes([10, 0, 0, 2]), bytes([10, 0, 0, 1])


def attempt(t: float, state: str = "syn_sent", c2s: int = 1, s2c: int = 0, **kw: Any) -> SessionDelta:
    base = SessionDelta("tcp", 6, 0, CLIENT, 40000, SERVER, 80, t, t, True, True, False, "", state, "unknown",
                        False, c2s, s2c, 40 * c2s, 40 * s2c, None, [])
    return replace(base, **kw)


def completed(t: float, **kw: Any) -> SessionDelta:
    return attempt(t, "closed", 5, 4, **kw)


@pytest.mark.parametrize("state, c2s, s2c, opened, proto, want", [
    ("syn_sent", 1, 0, True, 6, HALF_OPEN),  # no answer (yet)
    ("syn_recv", 1, 1, True, 6, HALF_OPEN),  # SYN-ACK unanswered (a spoofed source)
    ("closed", 2, 1, True, 6, HALF_OPEN),  # SYN-ACK answered by the client's reset (nmap -sS, hping3)
    ("closed", 2, 0, True, 6, HALF_OPEN),
    ("closed", 1, 1, True, 6, REFUSED),  # the server reset the SYN
    ("closed", 1, 0, True, 6, REFUSED),
    ("closed", 3, 1, True, 6, COMPLETED),  # SYN, ACK, RST: connected, then reset
    ("closed", 2, 2, True, 6, COMPLETED),  # SYN, ACK / SYN-ACK, RST
    ("closed", 5, 4, True, 6, COMPLETED),
    ("open", 2, 1, True, 6, COMPLETED),
    ("closing", 3, 1, True, 6, COMPLETED),
    ("syn_sent", 1, 0, False, 6, None),  # not the report of its opening: counted already, or never
    ("open", 1, 1, True, 17, None),  # not TCP
])
def test_an_attempts_outcome(state: str, c2s: int, s2c: int, opened: bool, proto: int, want: str | None) -> None:
    assert outcome(attempt(1.0, state, c2s, s2c, opened=opened, proto=proto)) == want


def _hits(watch: Any, sessions: list[SessionDelta]) -> list[tuple[int, str]]:
    return [(i, t.snippet) for i, s in enumerate(sessions) for t in watch.observe(s, 0.0)]


def _flood(n: int, rate: float, start: float = 0.0, spoofed: bool = False, **kw: Any) -> list[SessionDelta]:
    rnd = random.Random(n)
    return [attempt(start + i / rate, client=rnd.randbytes(4) if spoofed else CLIENT, client_port=1024 + i % 60000,
                    **kw) for i in range(n)]


def test_syn_flood_fires_once_on_the_session_that_tips_it_per_destination_and_per_source() -> None:
    watch = synflood.Watch(synflood.LIMITS)
    hits = _hits(watch, _flood(2000, 1000.0))
    # 100/s over 5 s: the 501st half-open attempt tips both keys.
    assert hits == [(500, "1002 half-open/s to 10.0.0.2:80 (100%, 501 in 0.5s)"),
                    (500, "1002 half-open/s from 10.0.0.1 (100%, 501 in 0.5s)")]


def test_a_spoofed_flood_is_seen_by_its_destination_and_the_sources_stay_bounded() -> None:
    watch = synflood.Watch({**synflood.LIMITS, "keys": 64})
    hits = _hits(watch, _flood(3000, 2000.0, spoofed=True))
    assert [(i, s.split(" (")[0]) for i, s in hits] == [(500, "2004 half-open/s to 10.0.0.2:80")]
    assert len(watch.sources) == 64 and watch.sources.evicted == 3000 - 64 and len(watch.destinations) == 1


def test_syn_flood_needs_the_ratio_and_the_rate() -> None:
    # 400 attempts/s to one server, 1 in 2 half-open: 200 half-open/s, but only 50 %.
    mixed = [attempt(i / 400) if i % 2 else completed(i / 400) for i in range(4000)]
    assert _hits(synflood.Watch(synflood.LIMITS), mixed) == []
    # All half-open, but 90/s: below the rate.
    assert _hits(synflood.Watch(synflood.LIMITS), _flood(2000, 90.0)) == []
    # A burst of completed connections, and the refused ones of a closed port, are no flood.
    assert _hits(synflood.Watch(synflood.LIMITS), [completed(i / 5000) for i in range(5000)]) == []
    assert _hits(synflood.Watch(synflood.LIMITS), _flood(5000, 5000.0, state="closed", s2c=1)) == []


def test_syn_flood_fires_again_only_after_a_quiet_spell() -> None:
    watch = synflood.Watch(synflood.LIMITS)
    first = _hits(watch, _flood(3000, 1000.0))
    # Still flooding after a pause shorter than rearm_after: no second hit.
    assert _hits(watch, _flood(3000, 1000.0, start=20.0)) == []
    # Quiet for more than rearm_after (30 s) since the rate was last above rearm_rate: fires again.
    again = _hits(watch, _flood(3000, 1000.0, start=70.0))
    assert len(first) == 2 and len(again) == 2


def test_times_going_back_and_odd_limits_never_raise() -> None:
    rnd = random.Random(7)
    sessions = [attempt(rnd.uniform(-1e9, 1e9), rnd.choice(["syn_sent", "closed", "open", "syn_recv"]),
                        rnd.randrange(0, 5), rnd.randrange(0, 5), client=rnd.randbytes(rnd.choice([4, 16])),
                        server_port=rnd.randrange(65536)) for _ in range(3000)]
    for limits in (synflood.LIMITS, {**synflood.LIMITS, "window": 0.0, "keys": 0.0, "rate": 0.0, "ratio": 0.0}):
        _hits(synflood.Watch(limits), sessions)
    for mod in (portscan, peerscan):
        for limits in (mod.LIMITS, {k: 0.0 for k in mod.LIMITS}, {k: 1e12 for k in mod.LIMITS}):
            _hits(mod.watch(limits), sessions)


def _scan(n: int, rate: float, start: float = 0.0, peers: bool = False, **kw: Any) -> list[SessionDelta]:
    return [attempt(start + i / rate, "closed", 1, 1, server_port=80 if peers else 1 + i,
                    server=bytes([10, 0, 1, i % 256]) if peers else SERVER, **kw) for i in range(n)]


def test_port_scan_fires_at_the_32nd_failed_port_of_one_peer_and_again_after_a_quiet_window() -> None:
    watch = portscan.watch(portscan.LIMITS)
    assert _hits(watch, _scan(200, 1000.0)) == [(31, "32 ports of 10.0.0.2 failed in 0.0s")]
    assert _hits(watch, _scan(200, 1000.0, start=30.0)) == []  # the same scan goes on
    assert _hits(watch, _scan(200, 10.0, start=200.0)) == [(31, "32 ports of 10.0.0.2 failed in 3.1s")]


def test_port_scan_ignores_completed_sessions_other_peers_and_slow_probes() -> None:
    many_ports = [completed(i / 100, server_port=9000 + i % 40) for i in range(400)]
    assert _hits(portscan.watch(portscan.LIMITS), many_ports) == []
    spread = _scan(200, 1000.0, peers=True)  # one port on many peers: a peer scan, not a port scan
    assert _hits(portscan.watch(portscan.LIMITS), spread) == []
    slow = _scan(100, 0.5)  # one failed port every 2 s: 31 in any 60 s
    assert _hits(portscan.watch(portscan.LIMITS), slow) == []


def test_peer_scan_fires_at_the_32nd_failed_peer() -> None:
    watch = peerscan.watch(peerscan.LIMITS)
    hits = _hits(watch, _scan(200, 1000.0, peers=True))
    assert hits == [(31, "32 peers failed from 10.0.0.1 in 0.0s (last 10.0.1.31:80)")]
    assert _hits(peerscan.watch(peerscan.LIMITS), _scan(200, 1000.0)) == []  # one peer, many ports
    many_peers = [completed(i / 100, server=bytes([10, 0, 1, i % 200])) for i in range(400)]
    assert _hits(peerscan.watch(peerscan.LIMITS), many_peers) == []


def test_bounded_keys_and_items() -> None:
    recent: Recent[int, Distinct] = Recent(3, Distinct)
    for k in range(10):
        recent.get(k)
    assert list(recent.items) == [7, 8, 9] and recent.evicted == 7
    assert recent.get(99, create=False) is None and len(recent) == 3
    d = Distinct()
    counts = [d.add(i, i * 0.1, 60.0, 5) for i in range(20)]
    assert counts == [1, 2, 3, 4] + [5] * 16 and list(d.seen) == [15, 16, 17, 18, 19]
    assert d.add(0, 5.0, 1.0, 5) == 1  # the older ones left the window


def _footprint(make: Any, feed: list[SessionDelta]) -> int:
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        watch = make()
        for s in feed:
            watch.observe(s, 0.0)
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_the_memory_bound_the_docstrings_state() -> None:
    """Worst cases at the default limits: every key full. syn-flood: 4096 sources and 4096
    destinations (spoofed sources, random ports); port-scan: 1024 pairs with 32 ports each;
    peer-scan: 1024 sources with 32 peers each."""
    rnd = random.Random(3)
    flood = [attempt(i * 1e-4, client=rnd.randbytes(4), server_port=rnd.randrange(65536)) for i in range(20000)]
    syn = _footprint(lambda: synflood.Watch(synflood.LIMITS), flood)
    pairs = [attempt(i * 1e-4, "closed", 1, 1, client=(i % 1024).to_bytes(4, "big"),
                     server=bytes([10, 0, 0, 2]), server_port=i // 1024) for i in range(1024 * 32)]
    ports = _footprint(lambda: portscan.watch(portscan.LIMITS), pairs)
    sweeps = [replace(s, server=(s.server_port).to_bytes(4, "big"), server_port=80) for s in pairs]
    peers = _footprint(lambda: peerscan.watch(peerscan.LIMITS), sweeps)
    print(f"\nworst-case state: syn-flood {syn / 1e6:.2f} MB, port-scan {ports / 1e6:.2f} MB, "
          f"peer-scan {peers / 1e6:.2f} MB")
    assert syn < 3e6 and ports < 3.5e6 and peers < 3.5e6, (syn, ports, peers)


def test_the_watches_are_registered_with_their_limits_and_switches() -> None:
    names = [name for name, _ in Watching()._watches]
    assert {"syn-flood", "port-scan", "peer-scan"} <= set(names)
    left = [name for name, _ in Watching(Config.parse(["syn-flood,peer-scan"]))._watches]
    assert left == [n for n in names if n not in ("syn-flood", "peer-scan")]
    (watch,) = [w for n, w in Watching(Config.parse([], ["port-scan.ports=4"]))._watches if n == "port-scan"]
    assert isinstance(watch, DistinctFailures) and watch.name == "port-scan" and watch.most == 4
