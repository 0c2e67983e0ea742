"""http-smuggling: an HTTP/1.x request whose length two servers may read differently (request
smuggling, RFC 9112 section 6.3 and 11.2).

Rule: a request in the client's stream (up to ``MAX_REQUESTS``, each found after the previous
one's body) with any of
- **Content-Length and Transfer-Encoding** together (RFC 9112: a sender MUST NOT; a proxy that
  honours one and a server the other disagree on where the next request starts);
- **conflicting Content-Length**: two or more values (in several headers or one comma list) that
  differ (identical repeats, which RFC 9110 lets a recipient accept, are no hit);
- **a Content-Length that is not a number**: negative, signed, hexadecimal, empty or with words;
- **an obfuscated Transfer-Encoding**: a coding that is not one of chunked, gzip, deflate,
  compress (x-gzip, x-compress), chunked not last or twice (``xchunked``, ``chunked, identity``),
  a control character or a byte beyond ASCII in the value (``\\x0bchunked``), the header twice,
  its value folded onto the next line, or a name that only whitespace or an underscore makes
  differ from Content-Length/Transfer-Encoding (``Transfer-Encoding :``, `` Transfer-Encoding``,
  ``Transfer_Encoding``).
Spaces and tabs around a value are optional whitespace (RFC 9110) and no hit. The headers are
the ``http`` detector's (``header_lines``: as sent, not merged). One hit per session, ``where`` =
``http.headers``, the snippet the offending header lines (control characters escaped).

Thresholds: none (``limits`` is empty).

Cannot see: requests past the first 16 KiB of the client's stream or past the packets the
``http`` detector lingers for; a request after a body whose length cannot be read; HTTP/2
(whose frames carry lengths); TLS (encrypted).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from flowmap_dp.detectors.base import Flow, Threat
from flowmap_dp.detectors.http import header_lines, request_line, split_head
from flowmap_dp.threats.base import Limits, Scanner

NAME = "http-smuggling"
MAX_REQUESTS = 8
CL, TE = "content-length", "transfer-encoding"
CODINGS = frozenset({"chunked", "gzip", "deflate", "compress", "x-gzip", "x-compress"})
_OWS = " \t"
_ODD = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\xff]")  # control characters and bytes beyond ASCII (not HTAB)
_DIGITS = re.compile(r"[0-9]{1,19}")
_SNIPPET = 128
_MAX_CHUNKS = 64


def _shown(name: str, value: str | None) -> str:
    text = name if value is None else f"{name}:{value}"
    return _ODD.sub(lambda m: f"\\x{ord(m.group()):02x}", text)[:64]


def _problem(lines: list[tuple[str, str | None]]) -> tuple[str, list[str]] | None:
    """What makes a request head's length ambiguous, and the header lines that show it."""
    lengths: list[tuple[str, str]] = []
    codings: list[tuple[str, str]] = []
    previous = ""
    for name, value in lines:
        if value is None:  # a folded continuation: of a length header, it hides the value
            if name[:1] in (" ", "\t") and previous in (CL, TE):
                return "folded header", [_shown(name, None)]
            previous = ""
            continue
        key = name.lower()
        previous = key
        if key == CL:
            lengths.append((name, value))
        elif key == TE:
            codings.append((name, value))
        elif re.sub(r"\s", "", key).replace("_", "-") in (CL, TE):
            return "obfuscated header name", [_shown(name, value)]
    if lengths and codings:
        return "Content-Length with Transfer-Encoding", [_shown(*lengths[0]), _shown(*codings[0])]
    if len(codings) > 1:
        return "Transfer-Encoding twice", [_shown(*c) for c in codings[:2]]
    if codings:
        name, value = codings[0]
        found = [c.strip(_OWS).lower() for c in value.strip(_OWS).split(",")]
        if (_ODD.search(value) or not set(found) <= CODINGS or "chunked" in found[:-1]):
            return "obfuscated Transfer-Encoding", [_shown(name, value)]
    numbers = set()
    for name, value in lengths:
        for part in value.strip(_OWS).split(","):
            part = part.strip(_OWS)
            if not _DIGITS.fullmatch(part):
                return "Content-Length not a number", [_shown(name, value)]
            numbers.add(int(part))
    if len(numbers) > 1:
        return "conflicting Content-Length", [_shown(*x) for x in lengths[:2]]
    return None


def _chunked_end(body: bytes) -> int | None:
    """Where a well-formed chunked body (and its trailers) ends, or None."""
    off = 0
    for _ in range(_MAX_CHUNKS):
        end = body.find(b"\r\n", off, off + 64)
        if end < 0:
            return None
        size_text = body[off:end].split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            return None
        off = end + 2
        if size == 0:
            trailers = body.find(b"\r\n\r\n", off - 2)
            return None if trailers < 0 else trailers + 4
        off += size + 2
    return None


def scan(flow: Flow, app: str, metadata: Mapping[str, Any], limits: Limits) -> Sequence[Threat]:
    """A hit for the first request whose length is ambiguous (see the module docstring)."""
    data = flow.stream(True)
    for _ in range(MAX_REQUESTS):
        if request_line(data) is None:
            return []
        head, body = split_head(data)
        lines = header_lines(head)
        problem = _problem(lines)
        if problem is not None:
            what, shown = problem
            return [Threat(NAME, f"{what}: {' | '.join(shown)}"[:_SNIPPET], "http.headers")]
        if len(head) == len(data):  # no blank line: the head is not complete
            return []
        headers = {name.strip(_OWS).lower(): (value or "").strip(_OWS) for name, value in lines}
        if TE in headers:
            size = _chunked_end(body)
            if size is None:
                return []
        else:
            length = headers.get(CL, "0")
            size = int(length) if _DIGITS.fullmatch(length) else 0
        if size >= len(body):
            return []
        data = body[size:]
    return []


SCANNER = Scanner(NAME, frozenset({"http"}), scan)
