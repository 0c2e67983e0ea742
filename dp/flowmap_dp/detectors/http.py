"""HTTP/1.x (a request line with a registered method, or a status line) and cleartext HTTP/2
that is not gRPC (the prior-knowledge preface followed by request headers).

Only TCP: SSDP and other HTTP-like UDP protocols are different protocols.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from flowmap_dp.detectors import _h2
from flowmap_dp.detectors.base import Detector, Flow, Verdict

# RFC 9110 methods plus WebDAV (RFC 4918, 3253), CalDAV and PATCH.
METHODS = frozenset(
    b"GET HEAD POST PUT DELETE CONNECT OPTIONS TRACE PATCH PROPFIND PROPPATCH MKCOL COPY MOVE "
    b"LOCK UNLOCK REPORT SEARCH MKCALENDAR CHECKOUT CHECKIN MERGE VERSION-CONTROL".split()
)
# Targets are ASCII by the RFC, but clients do send raw UTF-8: accept any non-space byte.
_REQUEST = re.compile(rb"([A-Z-]{3,17}) ([\x21-\x7e\x80-\xff]{1,8192}) HTTP/(1\.[01])\r?\n")
_STATUS = re.compile(rb"HTTP/1\.[01] ([1-5][0-9][0-9])( [\x09\x20-\x7e\x80-\xff]*)?\r?\n")
# A request target and the start of " HTTP/1.x\r", cut anywhere.
_TARGET_PREFIX = re.compile(rb"[\x21-\x7e\x80-\xff]*( (H(T(T(P(/(1(\.[01]?)?)?)?)?)?)?\r?)?)?")
PATH_LIMIT = 256


def request_line(data: bytes) -> tuple[str, str] | None:
    """(method, target) of the HTTP/1.x request at the start of ``data``."""
    m = _REQUEST.match(data, 0, 8300)
    if not m or m.group(1) not in METHODS:
        return None
    return m.group(1).decode(), m.group(2).decode("latin-1")


def _request_prefix(data: bytes) -> bool:
    """True while ``data`` could still grow into a request line (no line end yet)."""
    head = data[:8300]
    if b"\n" in head or len(head) >= 8300:
        return False
    method, space, rest = head.partition(b" ")
    if not space:
        return any(m.startswith(method) for m in METHODS)
    return method in METHODS and _TARGET_PREFIX.fullmatch(rest) is not None


def _status_prefix(data: bytes) -> bool:
    """True while ``data`` could still grow into a status line."""
    if b"\n" in data or len(data) >= 1024:
        return False
    n = min(len(data), 8)
    return data[:n] in (b"HTTP/1.1"[:n], b"HTTP/1.0"[:n])


def _h2_verdict(c2s: bytes) -> Verdict:
    blocks = _h2.client_blocks(c2s)
    if blocks is None:
        return Verdict.MORE if len(c2s) < len(_h2.PREFACE) and _h2.preface_prefix(c2s) else Verdict.NO
    if not blocks:
        return Verdict.MORE
    ctype = _h2.get(blocks[0], "content-type") or ""
    return Verdict.NO if ctype.startswith("application/grpc") else Verdict.MATCH


def detect(flow: Flow) -> Verdict:
    """MATCH on a request line with a known method, a status line, or non-gRPC HTTP/2 headers."""
    c2s, s2c = flow.stream(True), flow.stream(False)
    if request_line(c2s) or (not c2s and _STATUS.match(s2c, 0, 1100)):
        return Verdict.MATCH
    if c2s.startswith(b"PRI "):
        return _h2_verdict(c2s)
    if c2s and not _request_prefix(c2s):
        return Verdict.NO
    if not c2s and s2c and not _status_prefix(s2c):
        return Verdict.NO
    return Verdict.MORE


MAX_HEADER_LINES = 63  # header lines read after the start line
_ASCII_SPACE = " \t\n\r\x0b\x0c"  # what bytes.strip() strips (str.strip() strips more: \x85, \xa0 ...)


def header_lines(head: bytes) -> list[tuple[str, str | None]]:
    """The header lines of a message head (its start line skipped) as sent: ``(name, value)``
    split at the first colon, neither stripped nor merged (a line's final CR dropped), in order;
    ``(line, None)`` for a line without a colon (an obsolete folded continuation, or garbage)."""
    out: list[tuple[str, str | None]] = []
    for line in head.split(b"\n")[1 : 1 + MAX_HEADER_LINES]:
        text = line.removesuffix(b"\r").decode("latin-1")
        name, sep, value = text.partition(":")
        out.append((name, value) if sep else (text, None))
    return out


def _headers(block: bytes) -> dict[str, str]:
    """Header names (lower case) to their first value, stripped."""
    out: dict[str, str] = {}
    for name, value in header_lines(block):
        if value is not None:
            out.setdefault(name.strip(_ASCII_SPACE).lower(), value.strip(_ASCII_SPACE))
    return out


def split_head(data: bytes) -> tuple[bytes, bytes]:
    """(head, what follows the blank line) of the message at the start of ``data``; the head is
    all of ``data`` when no blank line ends it yet."""
    head, blank, body = data.partition(b"\r\n\r\n")
    if not blank:
        head, blank, body = data.partition(b"\n\n")
    return head, body


def parse_request(data: bytes) -> tuple[str, str, dict[str, str], bytes] | None:
    """(method, target, headers, body) of the first HTTP/1.x request in ``data``."""
    line = request_line(data)
    if line is None:
        return None
    head, body = split_head(data)
    headers = _headers(head)
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        length = 0
    return line[0], line[1], headers, body[: max(0, min(length, len(body)))]


def extract(flow: Flow) -> Mapping[str, Any]:
    """Method, host, path (truncated) and the response status."""
    meta: dict[str, Any] = {}
    req = parse_request(flow.stream(True))
    if req:
        version = _REQUEST.match(flow.stream(True), 0, 8300)
        meta.update(method=req[0], path=req[1][:PATH_LIMIT], version=version.group(3).decode() if version else "1.1")
        if "host" in req[2]:
            meta["host"] = req[2]["host"][:PATH_LIMIT]
        if "user-agent" in req[2]:
            meta["user_agent"] = req[2]["user-agent"][:PATH_LIMIT]
    else:
        blocks = _h2.client_blocks(flow.stream(True)) or []
        if blocks:
            h = blocks[0]
            path = (_h2.get(h, ":path") or "")[:PATH_LIMIT]
            meta.update(version="2", method=_h2.get(h, ":method") or "", path=path)
            if (host := _h2.get(h, ":authority")) is not None:
                meta["host"] = host[:PATH_LIMIT]
    status = _STATUS.match(flow.stream(False), 0, 1100)
    if status:
        meta["status"] = int(status.group(1))
    return {"http": meta}


DETECTOR = Detector(
    name="http",
    l4=frozenset({"tcp"}),
    ports=frozenset({80, 8080, 8000, 8008, 8888, 3128}),
    max_packets=6,
    detect=detect,
    extract=extract,
    linger=8,  # keep going after the match: later requests are scanned for SQL injection
)
