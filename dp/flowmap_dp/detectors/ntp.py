"""NTP (RFC 5905) over UDP, including the mode 6 control and mode 7 private messages.

Modes 1–5: a 48-byte header (plus an optional MAC of 20 or 24 bytes, or extension fields in
4-byte multiples) with version 1–4, stratum <= 16, a poll exponent and precision in the ranges
real clocks use (precision: not for client requests). A server answer must echo the client's
transmit timestamp as its origin timestamp. Mode 6: 12-byte header, count fitting the datagram. Mode 7: 8-byte
header, implementation 0/2/3, items x item size fitting the datagram.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flowmap_dp.detectors._wire import be
from flowmap_dp.detectors.base import Detector, Flow, Verdict

# What may follow a control/private message: nothing, or a key id with an MD5 / SHA-1 digest.
_MAC_SIZES = frozenset({0, 20, 24})
_MODES = {1: "symmetric-active", 2: "symmetric-passive", 3: "client", 4: "server", 5: "broadcast",
          6: "control", 7: "private"}


def _valid(p: bytes, strict: bool = True) -> bool:
    if not p:
        return False
    version, mode = (p[0] >> 3) & 7, p[0] & 7
    if not 1 <= version <= 4 or mode == 0:
        return False
    if mode == 7:
        if len(p) < 8 or p[2] not in (0, 2, 3):
            return False
        items, size = (be(p, 4, 2) or 0) & 0x0FFF, (be(p, 6, 2) or 0) & 0x0FFF
        # Exactly the items announced, optionally followed by a key id and MAC.
        return len(p) - (8 + items * size) in _MAC_SIZES and (items == 0 or size > 0)
    if mode == 6:
        count = be(p, 10, 2)
        if len(p) < 12 or count is None or p[1] & 0x1F == 0 or count > 468:
            return False
        return len(p) - (12 + (count + 3) // 4 * 4) in _MAC_SIZES
    if len(p) < 48 or not (len(p) in (48, 68, 72) or (len(p) - 48) % 4 == 0 and len(p) <= 1024):
        return False
    stratum, poll, precision = p[1], p[2], p[3] - 256 if p[3] > 127 else p[3]
    # Clients need not say anything true about their clock (chrony sends precision +32 to
    # avoid fingerprinting), so the precision range is only asked of the other modes.
    if stratum > 16 or (poll != 0 and not 3 <= poll <= 17) or (mode != 3 and not -32 <= precision <= 0):
        return False
    # A zero transmit timestamp: minimal SNTP clients send that, but so does a lot of zero-filled
    # junk, so such a request only counts once a server answers it (``strict=False``).
    return not strict or p[40:48] != bytes(8)


def detect(flow: Flow) -> Verdict:
    """MATCH when the first datagram of each side that spoke is a valid NTP message."""
    first = [p[0] for p in (flow.c2s, flow.s2c) if p]
    if not first:
        return Verdict.MORE
    if not all(_valid(p, strict=False) for p in first):
        return Verdict.NO
    request, answer = (flow.c2s or [b""])[0], (flow.s2c or [b""])[0]
    # A client/server exchange: the answer's origin timestamp is the request's transmit one.
    pair = len(request) >= 48 and len(answer) >= 48 and request[0] & 7 == 3 and answer[0] & 7 == 4
    if pair and answer[24:32] != request[40:48]:
        return Verdict.NO
    if all(_valid(p) for p in first) or (pair and _valid(answer)):
        return Verdict.MATCH
    return Verdict.MORE if not flow.s2c else Verdict.NO


def extract(flow: Flow) -> Mapping[str, Any]:
    """Version, mode and (modes 1–5) stratum of the first message."""
    p = (flow.c2s or flow.s2c or [b""])[0]
    if not p:
        return {"ntp": {}}
    meta: dict[str, Any] = {"version": (p[0] >> 3) & 7, "mode": _MODES.get(p[0] & 7, str(p[0] & 7))}
    if p[0] & 7 <= 5 and len(p) >= 2:
        meta["stratum"] = p[1]
    return {"ntp": meta}


DETECTOR = Detector(
    name="ntp",
    l4=frozenset({"udp"}),
    ports=frozenset({123}),
    max_packets=2,
    detect=detect,
    extract=extract,
    linger=1,
)
