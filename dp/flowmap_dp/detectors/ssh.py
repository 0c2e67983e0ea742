"""SSH: the identification string ``SSH-protoversion-softwareversion`` (RFC 4253 §4.2).

Either side's banner decides: servers send it first, but a capture may hold only one side.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from flowmap_dp.detectors._wire import text
from flowmap_dp.detectors.base import Detector, Flow, Verdict

# Protocol versions that exist (2.0, and 1.99 / 1.5 from old servers); software version is
# printable US-ASCII without spaces or '-', optionally followed by comments.
_BANNER = re.compile(rb"SSH-(2\.0|1\.99|1\.5)-[\x21-\x2c\x2e-\x7e][\x21-\x7e]*( [\x20-\x7e]*)?\r?\n")
_PREFIX = b"SSH-"


def _banner(data: bytes) -> bytes | None:
    m = _BANNER.match(data[:255])
    return m.group(0).rstrip(b"\r\n") if m else None


def _side(data: bytes) -> Verdict:
    if not data:
        return Verdict.MORE
    if _banner(data):
        return Verdict.MATCH
    # A banner still arriving: its prefix so far is consistent and has no line end yet.
    n = min(len(data), len(_PREFIX))
    if data[:n] == _PREFIX[:n] and b"\n" not in data and len(data) < 255:
        return Verdict.MORE
    return Verdict.NO


def detect(flow: Flow) -> Verdict:
    """MATCH on a complete SSH identification string from either side."""
    verdicts = (_side(flow.stream(False)), _side(flow.stream(True)))
    if Verdict.MATCH in verdicts:
        return Verdict.MATCH
    if Verdict.MORE in verdicts:
        return Verdict.MORE
    return Verdict.NO


def extract(flow: Flow) -> Mapping[str, Any]:
    """Both identification strings (the software versions are useful for inventory)."""
    out: dict[str, str] = {}
    for key, from_client in (("client", True), ("server", False)):
        b = _banner(flow.stream(from_client))
        if b:
            out[key] = text(b)
    return {"ssh": out}


DETECTOR = Detector(
    name="ssh",
    l4=frozenset({"tcp"}),
    ports=frozenset({22, 2222}),
    max_packets=4,
    detect=detect,
    extract=extract,
    linger=2,
)
