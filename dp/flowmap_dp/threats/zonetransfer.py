"""dns-zone-transfer: a zone transfer asked for.

Rule: a settled ``dns`` session, over TCP or UDP, any of whose questions (the client's, or those
its answers repeat) has type AXFR (252) or IXFR (251). Whether the server agreed (it may answer
REFUSED or NOTAUTH) does not matter: asking is the reconnaissance. No thresholds.

What it cannot see: transfers over TLS (XoT) or on a port no detector knows as DNS; a transfer
after the inspector's first packets of a long-lived TCP session. A secondary server's own
transfers from its primary are reported too: switch the detection off (``--threats-off
dns-zone-transfer``) on a cluster that runs them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from flowmap_dp.detectors.base import Flow, Threat
from flowmap_dp.threats.base import Limits, Scanner

NAME = "dns-zone-transfer"
_TRANSFERS = frozenset({"AXFR", "IXFR"})


def scan(flow: Flow, app: str, metadata: Mapping[str, Any], limits: Limits) -> Sequence[Threat]:
    """A hit naming the zone when a question asks for a transfer (the dns detector's metadata)."""
    for q in (metadata.get("dns") or {}).get("questions", ()):
        if q.get("type") in _TRANSFERS:
            return [Threat(NAME, f"{q['type']} {str(q.get('name', ''))[:100]}", f"dns.{flow.l4}")]
    return []


SCANNER = Scanner(NAME, frozenset({"dns"}), scan)
