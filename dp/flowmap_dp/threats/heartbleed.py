"""heartbleed: a TLS heartbeat that claims more than its record holds (CVE-2014-0160, RFC 6520).

A HeartbeatMessage is ``type (1) | payload_length (2) | payload | padding (>= 16)`` inside a
record of content type 24, so a well-formed request has ``payload_length + 3 + 16 <= record
length``. A vulnerable server answers a request that claims more with that much of its memory.

Rules, on the records of both directions (read from the start of each direction's stream, one
record header after another, while they chain; the ``tls`` detector matched the session):

1. **In the clear**: a heartbeat *request* (type 1) sent before its sender's ChangeCipherSpec,
   whose ``payload_length + 19`` exceeds its record's length. The classic exploit sends it so,
   right after the ServerHello, before the handshake ends. Either side can be the attacker (a
   malicious server reads a client's memory the same way).
2. **Encrypted** (after the sender's ChangeCipherSpec the message cannot be read): one side's
   largest heartbeat record is more than ``response_excess`` bytes (limit, default 256)
   longer than the largest the other side sent: the answer of a server that leaked. A
   well-formed answer has the size of its request (padding may differ; 256 covers the most a
   block cipher's padding adds).

One hit per session, ``where`` = ``tls.heartbeat``. The scanner asks the inspector to keep
feeding ``LINGER`` (10) payload packets after the ClientHello matched (the tls detector alone
stops at the ServerHello), so a heartbeat within the first packets of a session is seen.

Cannot see: a heartbeat later than that, or past the first 16 KiB of a direction
(``STREAM_LIMIT``); a session picked up mid-stream whose records do not start a packet; TLS 1.3
(which has no heartbeats); DTLS (UDP).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from flowmap_dp.detectors._wire import be
from flowmap_dp.detectors.base import Flow, Threat
from flowmap_dp.threats.base import Limits, Scanner

NAME = "heartbleed"
LINGER = 10
CHANGE_CIPHER_SPEC, HEARTBEAT = 20, 24
_REQUEST = 1
_OVERHEAD = 1 + 2 + 16  # type, payload_length, the least padding
_MAX_RECORD = 16384 + 2048  # any record but a heartbeat (a leaking answer may be longer)
_MAX_RECORDS = 64  # record headers read per direction


def records(stream: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(content type, record length, the record's bytes as far as ``stream`` holds them) of each
    record from the start of ``stream``, while the headers are plausible and chain."""
    off = 0
    for _ in range(_MAX_RECORDS):
        n = be(stream, off + 3, 2)
        if n is None:
            return
        typ = stream[off]
        if stream[off + 1] != 3 or not 20 <= typ <= 24 or (n > _MAX_RECORD and typ != HEARTBEAT):
            return
        yield typ, n, stream[off + 5 : off + 5 + n]
        off += 5 + n


def _side(stream: bytes) -> tuple[str | None, int]:
    """What one direction's records say: a cleartext request claiming too much (as a snippet),
    and the length of its largest encrypted heartbeat record (0: none)."""
    encrypted, largest = False, 0
    for typ, n, body in records(stream):
        if typ == CHANGE_CIPHER_SPEC:
            encrypted = True
        elif typ == HEARTBEAT:
            if encrypted:
                largest = max(largest, n)
                continue
            claimed = be(body, 1, 2)
            if body[:1] == bytes([_REQUEST]) and claimed is not None and claimed + _OVERHEAD > n:
                return f"heartbeat request claims {claimed} bytes of payload in a {n}-byte record", largest
    return None, largest


def scan(flow: Flow, app: str, metadata: Mapping[str, Any], limits: Limits) -> Sequence[Threat]:
    """A hit for a cleartext heartbeat request claiming more than its record, or an encrypted
    heartbeat answered far larger than asked (see the module docstring)."""
    c_hit, c_largest = _side(flow.stream(True))
    if c_hit is not None:
        return [Threat(NAME, "client: " + c_hit, "tls.heartbeat")]
    s_hit, s_largest = _side(flow.stream(False))
    if s_hit is not None:
        return [Threat(NAME, "server: " + s_hit, "tls.heartbeat")]
    excess = limits["response_excess"]
    for who, asked, answered in (("server", c_largest, s_largest), ("client", s_largest, c_largest)):
        if asked and answered > asked + excess:
            return [Threat(NAME, f"{who} answered an encrypted {asked}-byte heartbeat with {answered} bytes",
                           "tls.heartbeat")]
    return []


SCANNER = Scanner(NAME, frozenset({"tls"}), scan, {"response_excess": 256.0}, linger=LINGER)
