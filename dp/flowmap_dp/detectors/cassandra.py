"""Cassandra: the CQL native protocol (v1–v6) and the internode messaging protocol.

CQL frames have a 9-byte header (8 for v1/v2): version (0x0v request, 0x8v response), flags,
stream id, opcode, body length. The client opens with OPTIONS (empty body) or STARTUP (a string
map holding ``CQL_VERSION``); the server answers SUPPORTED, READY, AUTHENTICATE or
ERROR (a known error code: drivers probe versions the server refuses, DSE's 0x41/0x42 included)
with its direction bit set and the same stream id. STARTUP alone, or OPTIONS with its answer, decides.
Internode connections (7000/7001) start with Cassandra's protocol magic 0xCA552DFA.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flowmap_dp.detectors._wire import be, text
from flowmap_dp.detectors.base import Detector, Flow, Verdict

_INTERNODE_MAGIC = b"\xca\x55\x2d\xfa"
_STARTUP, _OPTIONS = 0x01, 0x05
_ANSWERS = frozenset({0x00, 0x02, 0x03, 0x06})
# Native protocol v1..v6, and DataStax Enterprise's DSE_V1/DSE_V2 (0x41/0x42) that drivers probe.
_VERSIONS = frozenset({1, 2, 3, 4, 5, 6, 0x41, 0x42})
_ERROR_CODES = frozenset({0x0000, 0x000A, 0x0100, 0x1000, 0x1001, 0x1002, 0x1003, 0x1100, 0x1200, 0x1300,
                          0x1400, 0x1500, 0x1600, 0x2000, 0x2100, 0x2200, 0x2300, 0x2400, 0x2500})


def frame(data: bytes) -> tuple[int, int, int, bytes] | None:
    """(version, stream, opcode, body) of the frame at the start of ``data``."""
    if not data:
        return None
    version = data[0] & 0x7F
    if version not in _VERSIONS:
        return None
    hlen = 9 if version >= 3 else 8
    if len(data) < hlen or data[1] > 0x1F:
        return None
    stream = be(data, 2, 2 if hlen == 9 else 1) or 0
    opcode, n = data[hlen - 5], be(data, hlen - 4, 4) or 0
    if opcode > 0x10 or n > 256 * 1024 * 1024:
        return None
    return version, stream, opcode, data[hlen : hlen + n]


def _string_map(body: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    count, off = be(body, 0, 2) or 0, 2
    for _ in range(min(count, 32)):
        kn = be(body, off, 2)
        if kn is None:
            break
        key = body[off + 2 : off + 2 + kn]
        vn = be(body, off + 2 + kn, 2)
        if vn is None:
            break
        out[text(key, 64)] = text(body[off + 4 + kn : off + 4 + kn + vn], 64)
        off += 4 + kn + vn
    return out


def detect(flow: Flow) -> Verdict:
    """MATCH on STARTUP, on OPTIONS answered in kind, or on the internode magic."""
    c2s, s2c = flow.stream(True), flow.stream(False)
    if c2s.startswith(_INTERNODE_MAGIC):
        return Verdict.MATCH
    req = frame(c2s)
    if req is None or req[0] != c2s[0]:  # requests have the direction bit clear
        return Verdict.MORE if len(c2s) < 9 and flow.packets < 2 else Verdict.NO
    version, stream, opcode, body = req
    if opcode == _STARTUP and "CQL_VERSION" in _string_map(body):
        return Verdict.MATCH
    if opcode != _OPTIONS or body or be(c2s, 5 if version >= 3 else 4, 4) != 0:
        return Verdict.NO
    resp = frame(s2c)
    if resp is None:
        return Verdict.MORE if len(s2c) < 9 else Verdict.NO
    # The server answers with its own version (a refused probe is answered in the version it
    # speaks), the direction bit set and the request's stream id.
    if not s2c[0] & 0x80 or resp[1] != stream or resp[2] not in _ANSWERS:
        return Verdict.NO
    if resp[2] == 0x00 and (be(resp[3], 0, 4) not in _ERROR_CODES or be(resp[3], 4, 2) is None):
        return Verdict.NO
    return Verdict.MATCH


def extract(flow: Flow) -> Mapping[str, Any]:
    """Protocol version and, from STARTUP, the CQL version and driver."""
    c2s = flow.stream(True)
    if c2s.startswith(_INTERNODE_MAGIC):
        return {"cassandra": {"internode": True}}
    meta: dict[str, Any] = {}
    off = 0
    for _ in range(3):
        f = frame(c2s[off:])
        if f is None:
            break
        meta.setdefault("protocol_version", f[0])
        if f[2] == _STARTUP:
            opts = _string_map(f[3])
            meta.update({k.lower(): v for k, v in opts.items() if k in ("CQL_VERSION", "DRIVER_NAME")})
            break
        off += (9 if f[0] >= 3 else 8) + len(f[3])
    return {"cassandra": meta}


DETECTOR = Detector(
    name="cassandra",
    l4=frozenset({"tcp"}),
    ports=frozenset({9042, 9142, 7000, 7001}),
    max_packets=4,
    detect=detect,
    extract=extract,
    linger=2,
)
