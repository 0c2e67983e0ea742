"""MongoDB wire protocol.

A 16-byte little-endian header (message length matching the data, request id, response-to,
opcode) where the opcode is one MongoDB defines, and a body that agrees with it:
- OP_MSG (2013): flag bits limited to the defined ones, a kind-0 section holding one BSON document;
- OP_QUERY (2004): a ``db.collection`` name, then skip/return counts and a BSON document;
- OP_REPLY (1) from the server: response flags, cursor, counts and a BSON document;
- OP_COMPRESSED (2012): a known original opcode and compressor id.
A BSON document must have a length that fits, end with NUL and start with a valid element.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flowmap_dp.detectors._wire import cstring, le, printable, text
from flowmap_dp.detectors.base import Detector, Flow, Verdict

_OPCODES = {1: "reply", 2001: "update", 2002: "insert", 2004: "query", 2005: "get_more", 2006: "delete",
            2007: "kill_cursors", 2012: "compressed", 2013: "msg"}
_BSON_TYPES = frozenset({*range(0x01, 0x14), 0x7F, 0xFF})


def _bson(data: bytes, off: int) -> str | None:
    """The first element name of the BSON document at ``off`` (document must fit), or None."""
    n = le(data, off, 4)
    if n is None or not 5 <= n <= 16 * 1024 * 1024:
        return None
    if off + n <= len(data) and data[off + n - 1] != 0:
        return None
    if n == 5:
        return ""
    t = data[off + 4] if off + 4 < len(data) else None
    name = cstring(data, off + 5, 128)
    if t not in _BSON_TYPES or name is None or not printable(name[0]):
        return None
    return text(name[0], 128)


def message(data: bytes) -> tuple[str, str | None] | None:
    """(opcode name, first command/field name) of the message at the start of ``data``, or None."""
    n, op = le(data, 0, 4), le(data, 12, 4)
    if n is None or op not in _OPCODES or not 16 < n <= 48 * 1024 * 1024:
        return None
    if op == 2013:
        flags = le(data, 16, 4)
        if flags is None or flags & ~0x00010003 or data[20:21] != b"\x00":
            return None
        first = _bson(data, 21)
        return ("msg", first) if first is not None else None
    if op == 2004:
        coll = cstring(data, 20, 256)
        if coll is None or b"." not in coll[0] or not printable(coll[0]):
            return None
        first = _bson(data, coll[1] + 8)
        return ("query", first) if first is not None else None
    if op == 1:
        first = _bson(data, 36)
        return ("reply", first) if first is not None and le(data, 32, 4) is not None else None
    if op == 2012:
        original, compressor = le(data, 16, 4), data[24] if len(data) > 24 else None
        return ("compressed", None) if original in _OPCODES and compressor in (0, 1, 2, 3) else None
    return None  # legacy write opcodes alone are too thin to decide on


def detect(flow: Flow) -> Verdict:
    """MATCH when the first message of either side is a well-formed MongoDB message."""
    for from_client in (True, False):
        data = flow.stream(from_client)
        if message(data) is not None:
            return Verdict.MATCH
    c2s = flow.stream(True)
    n, op = le(c2s, 0, 4), le(c2s, 12, 4)
    # A message still arriving: header so far consistent, declared length not reached yet.
    arriving = op in _OPCODES and n is not None and 16 < n <= 48 * 1024 * 1024 and len(c2s) < n
    if c2s and flow.packets < 4 and (len(c2s) < 16 or arriving):
        return Verdict.MORE
    return Verdict.NO if flow.packets else Verdict.MORE


def extract(flow: Flow) -> Mapping[str, Any]:
    """The opcode and command name of the client's first message."""
    m = message(flow.stream(True))
    return {"mongodb": {"opcode": m[0], "command": m[1]} if m else {}}


DETECTOR = Detector(
    name="mongodb",
    l4=frozenset({"tcp"}),
    ports=frozenset({27017, 27018, 27019}),
    max_packets=4,
    detect=detect,
    extract=extract,
)
