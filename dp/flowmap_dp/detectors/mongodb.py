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

import struct
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


# -- a bounded BSON reader (for the sqlinjection scanner's look at query filters) --------------

MAX_DEPTH = 8  # nesting of documents and arrays
MAX_ELEMENTS = 256  # elements read in one message's documents, all levels together


class Code(str):
    """A BSON JavaScript value (types 0x0D and 0x0F): a string the server would run."""


class Regex(str):
    """A BSON regular expression (type 0x0B): its pattern (the options are dropped)."""


_FIXED = {0x01: 8, 0x07: 12, 0x09: 8, 0x11: 8, 0x12: 8, 0x13: 16, 0x06: 0, 0x0A: 0, 0x7F: 0, 0xFF: 0}
MIN_KEY = object()  # type 0xFF: compares below everything, as "" does among strings


def document(data: bytes, off: int = 0, depth: int = 0, budget: list[int] | None = None) -> dict[str, Any] | None:
    """The BSON document at ``off`` as a dict (arrays as dicts keyed "0", "1"…), or None when it is
    malformed, does not fit, nests deeper than ``MAX_DEPTH`` or holds more than ``MAX_ELEMENTS``.
    Strings are cut at 1,024 characters; binary, ObjectId, dates and the like come back as None."""
    budget = [MAX_ELEMENTS] if budget is None else budget
    n = le(data, off, 4)
    if n is None or n < 5 or off + n > len(data) or data[off + n - 1] != 0 or depth > MAX_DEPTH:
        return None
    end, pos, out = off + n - 1, off + 4, {}
    while pos < end:
        budget[0] -= 1
        t, name = data[pos], cstring(data, pos + 1, 1024)
        if budget[0] < 0 or name is None or name[1] > end:
            return None
        key, pos = name[0].decode("utf-8", "replace"), name[1]
        value: Any = None
        if t in _FIXED:
            size = _FIXED[t]
            if t == 0x01 and pos + 8 <= end:
                value = struct.unpack_from("<d", data, pos)[0]
            elif t == 0x12:
                value = le(data, pos, 8)
            elif t == 0xFF:
                value = MIN_KEY
        elif t in (0x02, 0x0D, 0x0E):  # string, JavaScript, symbol: int32 length, bytes, NUL
            size = 4 + (le(data, pos, 4) or 0)
            raw = data[pos + 4 : pos + size - 1]
            value = (Code if t == 0x0D else str)(raw[:1024].decode("utf-8", "replace"))
        elif t in (0x03, 0x04):
            size = le(data, pos, 4) or 0
            value = document(data, pos, depth + 1, budget)
            if value is None:
                return None
        elif t == 0x05:
            size = 5 + (le(data, pos, 4) or 0)
        elif t == 0x08:
            size, value = 1, data[pos] == 1 if pos < end else None
        elif t == 0x0B:  # pattern and options, two C strings
            pattern = cstring(data, pos, 1024)
            options = cstring(data, pattern[1], 64) if pattern else None
            if pattern is None or options is None:
                return None
            size, value = options[1] - pos, Regex(pattern[0].decode("utf-8", "replace"))
        elif t == 0x0C:
            size = 4 + (le(data, pos, 4) or 0) + 12
        elif t == 0x0F:  # code with scope: total length, string, document
            size = le(data, pos, 4) or 0
            length = le(data, pos + 4, 4) or 0
            value = Code(text(data[pos + 8 : pos + 7 + min(length, 1025)], 1024))
        elif t == 0x10:
            size, value = 4, le(data, pos, 4)
            if value is not None and value >= 1 << 31:
                value -= 1 << 32
        else:
            return None
        if size < 0 or pos + size > end:
            return None
        out[key] = value
        pos += size
    return out if pos == end else None


def documents(data: bytes) -> list[tuple[str, dict[str, Any]]]:
    """The client's documents, message by message, up to 16 messages: (where, document) with
    ``where`` "msg" (an OP_MSG body), the identifier of an OP_MSG document sequence (pymongo's
    "updates", "deletes", "documents"), or the ``db.collection`` of an OP_QUERY."""
    out: list[tuple[str, dict[str, Any]]] = []
    off = 0
    for _ in range(16):
        n, op = le(data, off, 4), le(data, off + 12, 4)
        if n is None or op is None or n <= 16 or off + n > len(data):
            break
        msg = data[off : off + n]
        off += n
        if op == 2013:
            flags = le(msg, 16, 4) or 0
            end, pos = len(msg) - (4 if flags & 1 else 0), 20
            while pos < end and len(out) < 64:
                if msg[pos] == 0:
                    doc = document(msg, pos + 1)
                    if doc is None:
                        break
                    out.append(("msg", doc))
                    pos += 1 + (le(msg, pos + 1, 4) or 0)
                elif msg[pos] == 1:
                    size, ident = le(msg, pos + 1, 4) or 0, cstring(msg, pos + 5, 64)
                    if ident is None or size < 5 or pos + 1 + size > end:
                        break
                    at, stop = ident[1], pos + 1 + size
                    while at < stop and (doc := document(msg[:stop], at)) is not None and len(out) < 64:
                        out.append((text(ident[0], 64), doc))
                        at += le(msg, at, 4) or 0
                    pos = stop
                else:
                    break
        elif op == 2004 and (coll := cstring(msg, 20, 256)) is not None:
            doc = document(msg, coll[1] + 8)
            if doc is not None:
                out.append((text(coll[0], 256), doc))
    return out


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
    linger=10,  # queries are scanned for operator injection (sqlinjection)
)
