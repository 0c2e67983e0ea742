"""``port-scan``: one source trying many ports of one peer, and failing.

**Rule.** Each failed TCP attempt (``attempts``: refused, or half-open; counted once, in the
report of its opening) counts its server port under the key (VLAN, client address, server
address). A key fires when ``ports`` distinct ports failed within ``window`` seconds; the hit goes
to the session that made the count, its snippet e.g. ``40 ports of 10.0.0.2 failed in 1.2s``. It
fires again only after a whole window without a failed attempt. Completed attempts never count:
a client talking to many ports of a server that answers is no scan, and ``nmap -sT``'s open ports
complete while its closed ones, the many, are refused (``-sS``: half-open or refused).

**Limits** (``--threat-limit port-scan.KEY=VALUE``): ``ports`` 32, ``window`` 60 (s), ``keys``
1024 (source and peer pairs).

**Memory.** At most ``keys`` pairs, the least recently seen evicted first, each holding at most
``ports`` (capped at 1024) ports: at the defaults, at most 1024 x 32 ports, 3 MB per packet loop
measured, and a few hundred bytes a key in the common case of one port each
(``tests/dp/test_rates.py`` measures it and holds it under 3.5 MB).

**Cannot see.** UDP and ICMP scans (no attempt outcome is read from them); a scan slower than
``ports`` per ``window``, or spread over more than ``keys`` pairs at once; ports that answer
(completed attempts); attempts the table never reported (see ``attempts``).
"""

from __future__ import annotations

from flowmap_dp.threats.attempts import DistinctFailures, address
from flowmap_dp.threats.base import TCP_OPENED, Limits, Seen, Watcher

NAME = "port-scan"
LIMITS = {"ports": 32.0, "window": 60.0, "keys": 1024.0}


def _say(session: Seen, count: int, span: float) -> str:
    return f"{count} ports of {address(session.server)} failed in {span:.1f}s"


def watch(limits: Limits) -> DistinctFailures:
    return DistinctFailures(NAME, limits["ports"], limits["window"], limits["keys"],
                            key=lambda s: (s.vlan, s.client, s.server), item=lambda s: s.server_port, say=_say)


WATCHER = Watcher(NAME, watch, LIMITS, sees=TCP_OPENED)
