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

from collections.abc import Sequence

from flowmap_dp.detectors.base import Threat
from flowmap_dp.threats.attempts import Distinct, Recent, address, failed
from flowmap_dp.threats.base import TCP_OPENED, Limits, Seen, Watcher


NAME = "port-scan"
LIMITS = {"ports": 32.0, "window": 60.0, "keys": 1024.0}
MAX_DISTINCT = 1024  # ports kept per key, whatever ``ports`` says
WHERE = "tcp.handshake"


class Watch:
    """One packet loop's port-scan state: see the module docstring."""

    def __init__(self, limits: Limits) -> None:
        self.ports = max(1, min(int(limits["ports"]), MAX_DISTINCT))
        self.window = limits["window"]
        self.pairs: Recent[tuple[int, bytes, bytes], Distinct] = Recent(int(limits["keys"]), Distinct)

    def observe(self, session: Seen, now: float) -> Sequence[Threat]:
        if failed(session) is None:
            return ()
        key = self.pairs.get((session.vlan, session.client, session.server))
        assert key is not None
        count = key.add(session.server_port, session.first_seen, self.window, self.ports)
        if key.fired or count < self.ports:
            return ()
        key.fired = True
        return (Threat(NAME, f"{count} ports of {address(session.server)} failed in {key.span():.1f}s", WHERE),)


WATCHER = Watcher(NAME, Watch, LIMITS, sees=TCP_OPENED)
