"""TDS, the Microsoft SQL Server protocol ([MS-TDS]).

Every message travels in packets with an 8-byte header: type, status, big-endian length
(8..32768, covering the header), SPID, packet id, window (always 0). The header alone is too
weak, so the body must agree with the type:
- pre-login (0x12): option tokens (type, offset, length) ending with 0xFF, offsets inside the body;
- login7 (0x10): its little-endian length field equals the packet body and TDS version is 7.x;
- SQL batch (0x01) / RPC (0x03): an ALL_HEADERS block (total length, first header length,
  header type 1..3), or, for old clients, UTF-16LE text (batch) / a procedure name or id (RPC);
- tabular result (0x04, from the server): a known first token.
Client-only captures are common (the server side unseen), so a client packet decides alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flowmap_dp.detectors._wire import be, le
from flowmap_dp.detectors.base import Detector, Flow, Verdict

_TYPES = {0x01: "sql_batch", 0x03: "rpc", 0x04: "response", 0x06: "attention", 0x07: "bulk_load",
          0x0E: "transaction_manager", 0x10: "login7", 0x11: "sspi", 0x12: "prelogin"}
_RESPONSE_TOKENS = frozenset({0x81, 0x79, 0xAA, 0xAB, 0xAC, 0xAD, 0xE3, 0xFD, 0xFE, 0xFF, 0xA9, 0xD1, 0xEE, 0xA5, 0xED})


def header(data: bytes) -> tuple[int, int, bytes] | None:
    """(type, length, body available) of the packet at the start of ``data``, if the header is sane."""
    if len(data) < 8 or data[0] not in _TYPES or data[1] > 0x1F or data[7] != 0:
        return None
    n = be(data, 2, 2) or 0
    if not 8 <= n <= 32768:
        return None
    return data[0], n, data[8:n]


def _utf16_text(body: bytes) -> bool:
    head = body[:32]
    head = head[: len(head) // 2 * 2]
    return len(head) >= 8 and all(head[i + 1] == 0 and 0x09 <= head[i] < 0x7F for i in range(0, len(head), 2))


def _all_headers(body: bytes) -> int | None:
    total, first = le(body, 0, 4), le(body, 4, 4)
    if total is None or first is None or not 18 <= total <= 1024 or not 6 <= first <= total:
        return None
    return total if le(body, 8, 2) in (1, 2, 3) else None


def _body_ok(typ: int, body: bytes) -> bool:
    if typ == 0x12:
        off = 0
        while off < len(body) and body[off] != 0xFF:
            start, n = be(body, off + 1, 2), be(body, off + 3, 2)
            if body[off] > 0x08 or start is None or n is None:
                return False
            off += 5
        return off < len(body) and off > 0
    if typ == 0x10:
        # LOGIN7: its own length, then the TDS version 7.0..7.4 (0x70..0x74 in the top byte).
        return 36 <= (le(body, 0, 4) or 0) <= 32768 and body[7:8] in (b"\x70", b"\x71", b"\x72", b"\x73", b"\x74")
    if typ == 0x01:
        skip = _all_headers(body)
        return _utf16_text(body[skip:] if skip else body)
    if typ == 0x03:
        skip = _all_headers(body) or 0
        name_len = le(body, skip, 2)
        if name_len == 0xFFFF:
            return (le(body, skip + 2, 2) or 99) <= 15  # well-known procedure id
        if name_len is None or not 1 <= name_len <= 128:
            return False
        # Pad short names with UTF-16 spaces: a 3-letter procedure is as good as a long one.
        return _utf16_text(body[skip + 2 : skip + 2 + 2 * name_len] + b"\x20\x00" * 4)
    if typ == 0x04:
        return bool(body) and body[0] in _RESPONSE_TOKENS
    return False


def detect(flow: Flow) -> Verdict:
    """MATCH when the client's first packet (or the server's) has a sane header and a body of its type."""
    for from_client in (True, False):
        data = flow.stream(from_client)
        h = header(data)
        if h and (h[0] == 0x04) != from_client and _body_ok(h[0], h[2]):
            return Verdict.MATCH
    c2s = flow.stream(True)
    h = header(c2s)
    arriving = h is not None and len(c2s) < h[1] and len(h[2]) < 40
    if flow.packets < 4 and (not c2s or (len(c2s) < 8 and c2s[0] in _TYPES) or arriving):
        return Verdict.MORE  # the first packet's header or the start of its body still arriving
    return Verdict.NO


def batches(data: bytes) -> list[str]:
    """SQL batch text (UTF-16LE) of the client's stream, packet by packet."""
    out: list[str] = []
    off = 0
    while off + 8 <= len(data) and len(out) < 16:
        h = header(data[off:])
        if h is None:
            break
        typ, n, body = h
        if typ == 0x01:
            skip = _all_headers(body) or 0
            out.append(body[skip:].decode("utf-16-le", "replace")[:4096])
        off += n
    return out


def extract(flow: Flow) -> Mapping[str, Any]:
    """The message types the client sent first."""
    seen: list[str] = []
    data, off = flow.stream(True), 0
    while off + 8 <= len(data) and len(seen) < 8:
        h = header(data[off:])
        if h is None:
            break
        if (name := _TYPES[h[0]]) not in seen:
            seen.append(name)
        off += h[1]
    return {"tds": {"messages": seen}}


DETECTOR = Detector(
    name="tds",
    l4=frozenset({"tcp"}),
    ports=frozenset({1433}),
    max_packets=4,
    detect=detect,
    extract=extract,
    linger=10,  # batches are scanned for SQL injection
)
