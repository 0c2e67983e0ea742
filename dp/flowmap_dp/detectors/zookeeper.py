"""Apache ZooKeeper client protocol (jute records over TCP).

Evidence used: every session opens with a ConnectRequest — a 4-byte length of exactly 44 (45 with
the read-only flag) followed by protocolVersion 0, lastZxidSeen (int64, >= 0), timeOut (int32 ms,
1..24 h), sessionId (int64) and a password buffer whose length field is 16. The server answers a
ConnectResponse of length 36/37 (protocolVersion 0, negotiated timeout, session id, 16-byte
password). Either one alone is that exact a shape. Admin "four letter words" (``ruok``, ``srvr``,
``mntr`` …) match when the server answers them in text.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flowmap_dp.detectors._wire import be, printable
from flowmap_dp.detectors.base import Detector, Flow, Verdict

_FOUR_LETTER = frozenset({b"ruok", b"stat", b"srvr", b"mntr", b"conf", b"envi", b"cons", b"crst", b"dump",
                          b"wchs", b"wchc", b"wchp", b"dirs", b"isro", b"gtmk", b"srst", b"hash"})
_DAY_MS = 24 * 3600 * 1000


def connect_request(data: bytes) -> int | None:
    """The requested session timeout of a ConnectRequest at the start of ``data``, or None."""
    n, version, zxid, timeout, pw = be(data, 0, 4), be(data, 4, 4), be(data, 8, 8), be(data, 16, 4), be(data, 28, 4)
    if n not in (44, 45) or version != 0 or zxid is None or zxid >> 63 or timeout is None or pw != 16:
        return None
    if not 0 < timeout <= _DAY_MS or (n == 45 and data[48:49] not in (b"", b"\x00", b"\x01")):
        return None
    return timeout


def connect_response(data: bytes) -> int | None:
    """The negotiated session timeout of a ConnectResponse at the start of ``data``, or None."""
    n, version, timeout, pw = be(data, 0, 4), be(data, 4, 4), be(data, 8, 4), be(data, 20, 4)
    if n not in (36, 37) or version != 0 or timeout is None or timeout > _DAY_MS or pw != 16:
        return None
    return timeout


def detect(flow: Flow) -> Verdict:
    """MATCH on a ConnectRequest / ConnectResponse, or a four letter word answered in text."""
    c2s, s2c = flow.stream(True), flow.stream(False)
    if connect_request(c2s) is not None or (not c2s and connect_response(s2c) is not None):
        return Verdict.MATCH
    if c2s in _FOUR_LETTER:
        if not s2c:
            return Verdict.MORE
        return Verdict.MATCH if printable(s2c[:256]) and len(s2c) >= 4 else Verdict.NO
    if len(c2s) < 4 and flow.packets < 2:
        return Verdict.MORE
    if be(c2s, 0, 4) in (44, 45) and len(c2s) < 48 and flow.packets < 3:
        return Verdict.MORE
    return Verdict.NO


def extract(flow: Flow) -> Mapping[str, Any]:
    """Requested and negotiated session timeouts, or the four letter word."""
    c2s = flow.stream(True)
    if c2s in _FOUR_LETTER:
        return {"zookeeper": {"command": c2s.decode()}}
    meta: dict[str, Any] = {}
    if (t := connect_request(c2s)) is not None:
        meta["requested_timeout_ms"] = t
    if (t := connect_response(flow.stream(False))) is not None:
        meta["negotiated_timeout_ms"] = t
    return {"zookeeper": meta}


def _settled(flow: Flow) -> bool:
    return bool(flow.s2c)  # the ConnectResponse (or the four letter word's answer) is in


DETECTOR = Detector(
    name="zookeeper",
    l4=frozenset({"tcp"}),
    ports=frozenset({2181, 2182, 2281}),
    max_packets=3,
    detect=detect,
    extract=extract,
    linger=3,
    settled=_settled,
)
