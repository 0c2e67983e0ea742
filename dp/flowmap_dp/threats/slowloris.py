"""slowloris: an HTTP request whose headers are still incomplete a while after the client began
it (Slowloris keeps a server's connections busy by trickling header lines, never the blank line
that ends them).

Rule: the session's first request (an HTTP/1.x request line, the ``http`` detector's) has no
blank line after its headers yet, and ``seconds`` (limit, default 10) or more have passed from
the client's first payload to the last moment the session is known in that state: the client's
latest payload packet, or, live, the report at which the idle session was looked at
(``Flow.quiet_at``). While the head is incomplete and the limit not reached, the scanner asks
the tables not to settle the idle session (``wait``), so a client that sends a line every 15 s is
still watched when the limit passes. One hit per session, ``where`` = ``http.headers``.

Thresholds: ``seconds`` (10).

Cannot see: a request line trickled over more packets than the ``http`` detector waits for (6,
then the session is ``unknown``); a slow
request after the first on a kept-alive connection; a client that trickles faster than the
``http`` detector lingers (8 packets after the request line, ``limit / 8`` seconds a line);
headers past the first 16 KiB (``STREAM_LIMIT``); a slow body (the headers were complete);
HTTP/2 and TLS. Offline (``classify``) only packet times count: a client that stops sending
is judged by its last packet.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from flowmap_dp.detectors.base import Flow, Threat
from flowmap_dp.detectors.http import request_line, split_head
from flowmap_dp.threats.base import Limits, Scanner

NAME = "slowloris"


def _incomplete(flow: Flow) -> str | None:
    """The first request's head, when the client began one and has not ended it."""
    data = flow.stream(True)
    if request_line(data) is None:
        return None
    head, _ = split_head(data)
    return data.decode("latin-1") if len(head) == len(data) else None


def wait(flow: Flow, app: str, limits: Limits) -> float:
    """Until when an idle session should stay open: its timeout, while its head is incomplete."""
    return flow.client_first + limits["seconds"] if _incomplete(flow) is not None else 0.0


def scan(flow: Flow, app: str, metadata: Mapping[str, Any], limits: Limits) -> Sequence[Threat]:
    """A hit when the first request's head is still incomplete ``seconds`` after it began."""
    head = _incomplete(flow)
    if head is None:
        return []
    elapsed = max(flow.client_last, flow.quiet_at) - flow.client_first
    if elapsed < limits["seconds"]:
        return []
    lines = head.count("\n")
    first = head.split("\n", 1)[0].strip()[:48]
    return [Threat(NAME, f"headers incomplete after {elapsed:.1f} s ({lines} lines, {len(head)} bytes): {first}",
                   "http.headers")]


SCANNER = Scanner(NAME, frozenset({"http"}), scan, {"seconds": 10.0}, wait=wait)
