"""TNS, Oracle's Transparent Network Substrate (the Oracle Net protocol).

Packet header: big-endian length (equal to the packet), packet checksum, type, reserved byte,
header checksum. The client's CONNECT (type 1) carries protocol versions 300..320 (version and
lowest compatible version) and a connect descriptor in clear text, ``(DESCRIPTION=...)`` or
``(CONNECT_DATA=...)`` — inline, or in a DATA packet right after when it is long: both must be
there.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from flowmap_dp.detectors._wire import be, text
from flowmap_dp.detectors.base import Detector, Flow, Verdict

_CONNECT = 1
_DESCRIPTOR = re.compile(rb"\((DESCRIPTION|CONNECT_DATA|ADDRESS)\s*=", re.I)


def _connect_header(data: bytes) -> bool | None:
    """True for a CONNECT header, None while too short to tell, False otherwise."""
    if len(data) < 12:
        consistent = len(data) < 5 or (data[4] == _CONNECT and (len(data) < 6 or data[5] == 0))
        return None if consistent else False
    n, version, compatible = be(data, 0, 2) or 0, be(data, 8, 2) or 0, be(data, 10, 2) or 0
    if data[4] != _CONNECT or data[5] != 0 or not 34 <= n <= 8192:
        return False
    return 300 <= version <= 320 and 300 <= compatible <= version


def detect(flow: Flow) -> Verdict:
    """MATCH on a CONNECT packet and its connect descriptor (inline, or in the DATA packet that
    follows when the descriptor is too long for the CONNECT packet)."""
    c2s = flow.stream(True)
    header = _connect_header(c2s)
    if header is False:
        return Verdict.NO
    if header and _DESCRIPTOR.search(c2s[:4096]):
        return Verdict.MATCH
    return Verdict.MORE


def extract(flow: Flow) -> Mapping[str, Any]:
    """Service name / SID and program from the connect descriptor."""
    meta: dict[str, str] = {}
    c2s = flow.stream(True)[:4096]
    for key in ("SERVICE_NAME", "SID", "PROGRAM", "HOST"):
        m = re.search(rb"\(" + key.encode() + rb"\s*=\s*([^)]{1,128})\)", c2s, re.I)
        if m:
            meta[key.lower()] = text(m.group(1), 128)
    return {"tns": meta}


DETECTOR = Detector(
    name="tns",
    l4=frozenset({"tcp"}),
    ports=frozenset({1521, 1522, 1526, 2484}),
    max_packets=4,
    detect=detect,
    extract=extract,
)
