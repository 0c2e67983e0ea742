"""``peer-scan``: one source trying many peers, and failing.

**Rule.** Each failed TCP attempt (``attempts``: refused, or half-open; counted once, in the
report of its opening) counts its server address under the key (VLAN, client address), whatever
the port. A key fires when ``peers`` distinct peers failed within ``window`` seconds; the hit goes
to the session that made the count, its snippet e.g. ``32 peers failed from 10.0.0.9 in 2.0s (last
10.0.1.40:80)``. It fires again only after a whole window without a failed attempt. Completed
attempts never count: a client of many servers that answer (a scraper, a load balancer's health
checks) is no scan.

**Limits** (``--threat-limit peer-scan.KEY=VALUE``): ``peers`` 32, ``window`` 60 (s), ``keys``
1024 (sources).

**Memory.** At most ``keys`` sources, the least recently seen evicted first, each holding at most
``peers`` (capped at 1024) addresses: at the defaults 3 MB per packet loop measured at the worst,
a few hundred bytes a source in the common case (``tests/dp/test_rates.py`` measures it and holds
it under 3.5 MB).

**Cannot see.** UDP and ICMP sweeps (``nmap -sn``'s pings: no attempt outcome is read from
them); peers that answer on the port tried; a sweep slower than ``peers`` per ``window``;
attempts the table never reported (see ``attempts``).
"""

from __future__ import annotations

from flowmap_dp.decode import format_endpoint
from flowmap_dp.threats.attempts import DistinctFailures, address
from flowmap_dp.threats.base import TCP_OPENED, Limits, Seen, Watcher

NAME = "peer-scan"
LIMITS = {"peers": 32.0, "window": 60.0, "keys": 1024.0}


def _say(session: Seen, count: int, span: float) -> str:
    return (f"{count} peers failed from {address(session.client)} in {span:.1f}s "
            f"(last {format_endpoint(session.server, session.server_port)})")


def watch(limits: Limits) -> DistinctFailures:
    return DistinctFailures(NAME, limits["peers"], limits["window"], limits["keys"],
                            key=lambda s: (s.vlan, s.client), item=lambda s: s.server, say=_say)


WATCHER = Watcher(NAME, watch, LIMITS, sees=TCP_OPENED)
