"""PostgreSQL frontend/backend protocol 3.0.

The client opens with a StartupMessage (length, protocol 3.0, NUL-terminated key/value pairs
including ``user``, a final NUL, the length matching exactly), or with an 8-byte SSLRequest /
GSSENCRequest or a 16-byte CancelRequest (their fixed magic codes). The server answers a startup
with an Authentication message ('R', length 8..4096, a known auth code).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flowmap_dp.detectors._wire import be, text
from flowmap_dp.detectors.base import Detector, Flow, Verdict

_PROTOCOL_3 = 0x00030000
_SSL, _GSSENC, _CANCEL = 80877103, 80877104, 80877102


def startup(data: bytes) -> dict[str, str] | None:
    """The key/value parameters of a StartupMessage at the start of ``data``, or None."""
    n = be(data, 0, 4)
    if n is None or be(data, 4, 4) != _PROTOCOL_3 or not 9 <= n <= 10000 or len(data) < n or data[n - 1] != 0:
        return None
    parts = data[8 : n - 1].split(b"\x00")[:-1]  # each value ends with NUL, then the final NUL
    if len(parts) < 2 or len(parts) % 2 or not all(parts[::2]):
        return None
    params = {text(k, 64): text(v) for k, v in zip(parts[::2], parts[1::2], strict=True)}
    return params if "user" in params else None


def _short_request(data: bytes) -> bool:
    n, code = be(data, 0, 4), be(data, 4, 4)
    return (n == 8 and code in (_SSL, _GSSENC)) or (n == 16 and code == _CANCEL)


def _auth(data: bytes) -> bool:
    n, code = be(data, 1, 4), be(data, 5, 4)
    return data[:1] == b"R" and n is not None and 8 <= n <= 4096 and code in (0, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12)


def detect(flow: Flow) -> Verdict:
    """MATCH on a startup, SSL/GSS-encryption or cancel request, or an authentication answer."""
    c2s = flow.stream(True)
    if _short_request(c2s[:16]) or startup(c2s) is not None:
        return Verdict.MATCH
    n = be(c2s, 0, 4)
    if c2s and (len(c2s) < 8 or (n is not None and n > len(c2s) and be(c2s, 4, 4) == _PROTOCOL_3)):
        return Verdict.MORE
    if not c2s and flow.s2c:
        return Verdict.MATCH if _auth(flow.stream(False)) else Verdict.NO
    return Verdict.NO if c2s else Verdict.MORE


def queries(data: bytes) -> list[str]:
    """SQL text of the simple ('Q') and extended ('P') queries after the startup phase."""
    out: list[str] = []
    off = 0
    if (n := be(data, 0, 4)) is not None and be(data, 4, 4) in (_PROTOCOL_3, _SSL, _GSSENC):
        off = n
    while off + 5 <= len(data) and len(out) < 16:
        typ, n = data[off : off + 1], be(data, off + 1, 4) or 0
        if n < 4:
            break
        body = data[off + 5 : off + 1 + n]
        if typ == b"Q":
            out.append(text(body.rstrip(b"\x00"), 4096))
        elif typ == b"P":
            name_end = body.find(b"\x00")
            if name_end >= 0:
                out.append(text(body[name_end + 1 :].split(b"\x00", 1)[0], 4096))
        off += 1 + n
    return out


# invalid_password, invalid_authorization_specification (no pg_hba.conf entry, unknown role).
_LOGIN_REFUSED = frozenset({b"28P01", b"28000"})


def auth_failures(c2s: bytes, s2c: bytes) -> int:
    """ErrorResponses ('E') with a login-refusing SQLSTATE in the server's stream (after its one-
    byte answer to an SSL or GSS-encryption request, if the client asked), up to 32 messages."""
    off = 1 if _short_request(c2s[:8]) and s2c[:1] in (b"N", b"S", b"G") else 0
    if s2c[:1] in (b"S", b"G") and off:
        return 0  # encrypted from here on
    failed = 0
    for _ in range(32):
        typ, n = s2c[off : off + 1], be(s2c, off + 1, 4)
        if n is None or n < 4:
            break
        if typ == b"E":
            body = s2c[off + 5 : off + 1 + n]
            for field in body.split(b"\x00"):
                if field[:1] == b"C" and field[1:] in _LOGIN_REFUSED:
                    failed += 1
                    break
        off += 1 + n
    return failed


def extract(flow: Flow) -> Mapping[str, Any]:
    """User, database and application name from the startup message, and the logins the server
    refused (``auth_failures``, when any)."""
    c2s = flow.stream(True)
    if _short_request(c2s[:8]):
        c2s = c2s[8:]
    params = startup(c2s) or {}
    meta: dict[str, Any] = {k: params[k] for k in ("user", "database", "application_name") if k in params}
    if _short_request(flow.stream(True)[:8]):
        meta["encryption_requested"] = True
    if failed := auth_failures(flow.stream(True), flow.stream(False)):
        meta["auth_failures"] = failed
    return {"postgresql": meta}


DETECTOR = Detector(
    name="postgresql",
    l4=frozenset({"tcp"}),
    ports=frozenset({5432}),
    max_packets=4,
    detect=detect,
    extract=extract,
    linger=10,  # queries are scanned for SQL injection
)
