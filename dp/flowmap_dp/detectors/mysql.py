"""MySQL / MariaDB client/server protocol.

The server speaks first: packet header (3-byte little-endian length matching, sequence 0),
protocol version 10, a printable server version starting with a digit, and the NUL filler after
the first scramble part. A refusal (0xff error with a code in 1000..9999) also counts. For sessions
picked up later, a client COM_QUERY (sequence 0, command 3, printable SQL starting with a
keyword) is enough.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from flowmap_dp.detectors._wire import cstring, le, printable, text
from flowmap_dp.detectors.base import Detector, Flow, Verdict

_SQL_START = re.compile(rb"\s*(select|insert|update|delete|set|show|use|create|drop|alter|begin|commit|rollback|call|"
                        rb"start|describe|explain|replace|grant|flush|kill|lock|unlock|truncate|/\*)\b", re.I)


def greeting(data: bytes) -> str | None:
    """The server version of a handshake packet at the start of ``data``, or None."""
    n = le(data, 0, 3)
    if n is None or data[3:4] != b"\x00" or not 30 <= n <= 1024 or len(data) < 4 + n or data[4] != 10:
        return None
    v = cstring(data, 5, 64)
    if v is None or not v[0][:1].isdigit() or not printable(v[0]):
        return None
    # connection id (4), scramble part 1 (8), then a NUL filler.
    return text(v[0], 64) if data[v[1] + 12 : v[1] + 13] == b"\x00" else None


def _refusal(data: bytes) -> bool:
    n, code = le(data, 0, 3), le(data, 5, 2)
    return (n is not None and data[3:5] == b"\x00\xff" and code is not None and 1000 <= code <= 9999
            and len(data) >= 4 + n and printable(data[7 : 4 + n]))


def _query(data: bytes) -> bool:
    n = le(data, 0, 3)
    return (n is not None and 2 <= n <= len(data) - 4 and data[3:5] == b"\x00\x03"
            and _SQL_START.match(data, 5) is not None and printable(data[5 : 4 + n]))


def detect(flow: Flow) -> Verdict:
    """MATCH on the server greeting (or refusal), or on a client COM_QUERY."""
    s2c, c2s = flow.stream(False), flow.stream(True)
    if greeting(s2c) or _refusal(s2c) or _query(c2s):
        return Verdict.MATCH
    n = le(s2c, 0, 3)
    if s2c and (len(s2c) < 5 or (n is not None and len(s2c) < 4 + n <= 1028 and s2c[3:5] == b"\x00\x0a")):
        return Verdict.MORE
    if s2c or (c2s and (len(c2s) >= 5 or flow.packets >= 2)):
        return Verdict.NO
    return Verdict.MORE


def queries(data: bytes) -> list[str]:
    """SQL text of the COM_QUERY packets in the client's stream."""
    out: list[str] = []
    off = 0
    while off + 5 <= len(data) and len(out) < 16:
        n = le(data, off, 3) or 0
        if n == 0:
            break
        if data[off + 4] == 3:
            out.append(text(data[off + 5 : off + 4 + n], 4096))
        off += 4 + n
    return out


# ER_ACCESS_DENIED_ERROR (bad user or password), ER_DBACCESS_DENIED_ERROR (no right to the database).
_LOGIN_REFUSED = frozenset({1044, 1045})


def auth_failures(data: bytes) -> int:
    """ERR packets (0xff) refusing a login (1044, 1045) in the server's stream, up to 32 packets."""
    n_failed, off = 0, 0
    for _ in range(32):
        n = le(data, off, 3)
        if n is None or n == 0:
            break
        if data[off + 4 : off + 5] == b"\xff" and le(data, off + 5, 2) in _LOGIN_REFUSED:
            n_failed += 1
        off += 4 + n
    return n_failed


def extract(flow: Flow) -> Mapping[str, Any]:
    """The server version, when the client sends it in clear the user name, and the logins the
    server refused (``auth_failures``, when any)."""
    meta: dict[str, Any] = {}
    if failed := auth_failures(flow.stream(False)):
        meta["auth_failures"] = failed
    if v := greeting(flow.stream(False)):
        meta["server_version"] = v
    c2s = flow.stream(True)
    caps = le(c2s, 4, 2)
    # HandshakeResponse41: caps(4) max packet(4) charset(1) filler(23) then the user name.
    if caps is not None and caps & 0x0200 and c2s[3:4] == b"\x01" and (le(c2s, 0, 3) or 0) >= 32:
        if caps & 0x0800 == 0 and (u := cstring(c2s, 36, 64)) and printable(u[0]):
            meta["user"] = text(u[0], 64)
        elif caps & 0x0800:
            meta["tls"] = True
    return {"mysql": meta}


DETECTOR = Detector(
    name="mysql",
    l4=frozenset({"tcp"}),
    ports=frozenset({3306, 33060}),
    max_packets=4,
    detect=detect,
    extract=extract,
    linger=10,  # queries are scanned for SQL injection
)
