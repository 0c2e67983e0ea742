"""syn-with-data: a TCP SYN carrying payload.

Rule: a session whose SYN (no ACK) carried payload bytes raises it once, in the report that
carries that SYN, unless the SYN also held a TCP Fast Open cookie. Severity Info: data in a SYN
is legitimate TCP (RFC 793 allows it; the receiver holds it until the handshake completes), and
TCP Fast Open (RFC 7413) sends a request in the SYN on purpose. What is worth a note is data in
a SYN *without* Fast Open: no common stack sends it, while scanners, IDS evasion (a payload some
monitors skip because it rides the SYN) and covert channels do.

Fast Open is decided by the option, not by the data: a SYN whose options hold a Fast Open cookie
(kind 34 with a cookie, or the experimental kind 254 with magic 0xF989 and a cookie; the decoder
reads at most the 40 bytes of options, ``decode._fast_open``) is Fast Open and is not raised
unless the limit ``fast_open`` is 1. A cookie *request* (kind 34, empty) with data is not Fast
Open: a server must not take data without a valid cookie, so it is raised. Linux's
``tcp_fastopen`` 0x4 (data without any cookie, for servers set to need none) is raised too:
the wire cannot tell it from a crafted SYN.

Thresholds (``--threat-limit syn-with-data.KEY=VALUE``): ``fast_open`` (default 0): 1 raises
Fast Open SYNs too.

What it cannot see: payload past the capture's snap length (the default 1,024 bytes keeps any
SYN's options and first data bytes); whether the cookie is valid (the server alone knows); a SYN
whose payload a capture cut off entirely.
"""

from __future__ import annotations

from collections.abc import Sequence

from flowmap_dp.decode import MARK_FAST_OPEN, MARK_SYN_DATA, PROTO_TCP
from flowmap_dp.detectors.base import Threat
from flowmap_dp.threats.base import MARKED, Limits, Seen, Watcher

NAME = "syn-with-data"
LIMITS: Limits = {"fast_open": 0.0}
_PLAIN = (Threat(NAME, "SYN with payload, no TCP Fast Open cookie", "tcp.syn"),)
_TFO = (Threat(NAME, "SYN with payload and a TCP Fast Open cookie", "tcp.syn"),)


class SynWithData:
    """Stateless: each report's marks are the hit."""

    def __init__(self, limits: Limits) -> None:
        self.fast_open = limits["fast_open"] >= 1

    def observe(self, session: Seen, now: float) -> Sequence[Threat]:
        marks = session.marks
        if session.proto != PROTO_TCP:
            return ()
        if marks & MARK_SYN_DATA:
            return _PLAIN
        if marks & MARK_FAST_OPEN and self.fast_open:
            return _TFO
        return ()


WATCHER = Watcher(NAME, SynWithData, LIMITS, sees=MARKED)
