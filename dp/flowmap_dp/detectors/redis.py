"""Redis serialization protocol (RESP2/RESP3).

A client command is an array of bulk strings, ``*<n>\\r\\n$<len>\\r\\n<name>\\r\\n...``, whose
counts and lengths must agree and whose first element is a command name (letters, at most 32).
Inline commands (``PING\\r\\n``) are too plain to decide alone: they match only when the server
answers with a RESP reply (``+``, ``-``, ``:``, ``$``, ``*``, ``%``, ``_``…) ended by CRLF.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from flowmap_dp.detectors.base import Detector, Flow, Verdict

_ARRAY = re.compile(rb"\*([1-9][0-9]{0,5})\r\n\$([1-9][0-9]{0,5})\r\n")
# The start of an array command cut anywhere before the end of its first element.
_ARRAY_PREFIX = re.compile(rb"\*([1-9][0-9]{0,5}(\r(\n(\$([1-9][0-9]{0,5}(\r(\n[A-Za-z_-]{0,32}\r?)?)?)?)?)?)?)?")
_INLINE = re.compile(
    rb"(PING|AUTH|HELLO|INFO|SELECT|GET|SET|KEYS|CLIENT|COMMAND|QUIT|MONITOR|DBSIZE)( [^\r\n]*)?\r\n", re.I)
_INLINE_PREFIX = re.compile(rb"(P(I(NG?)?)?|A(U(TH?)?)?|I(N(FO?)?)?)", re.I)
_REPLY = re.compile(
    rb"([+\-][^\r\n]{0,256}|:-?[0-9]{1,20}|\$-?[0-9]{1,9}|\*-?[0-9]{1,9}|%[0-9]{1,9}|_|#[tf])\r\n")


def command(data: bytes) -> str | None:
    """The command name of the RESP array command at the start of ``data``, or None."""
    m = _ARRAY.match(data)
    if not m:
        return None
    n = int(m.group(2))
    name = data[m.end() : m.end() + n]
    if not 1 <= n <= 32 or len(name) < n or not name.replace(b"_", b"").replace(b"-", b"").isalpha():
        return None
    if data[m.end() + n : m.end() + n + 2] != b"\r\n":
        return None
    return name.decode().upper()


def detect(flow: Flow) -> Verdict:
    """MATCH on a RESP array command, or an inline command answered with a RESP reply."""
    c2s, s2c = flow.stream(True), flow.stream(False)
    if command(c2s):
        return Verdict.MATCH
    if _INLINE.match(c2s):
        if not s2c:
            return Verdict.MORE
        return Verdict.MATCH if _REPLY.match(s2c) else Verdict.NO
    if _ARRAY_PREFIX.fullmatch(c2s[:64]) or _INLINE_PREFIX.fullmatch(c2s[:32]):
        return Verdict.MORE
    # The client speaks first: a reply seen before its command (read from another ring first)
    # cannot rule Redis out.
    return Verdict.NO if c2s else Verdict.MORE


# A refused AUTH or HELLO (Redis 6+, and before 6), and a command refused for want of one.
_REFUSED = re.compile(rb"(?:^|\r\n)-(WRONGPASS|ERR invalid password|NOAUTH)\b")


def auth_failures(s2c: bytes) -> int:
    """Refused logins among the server's replies: each WRONGPASS or ``invalid password`` error;
    a session whose client never tried a password but was told NOAUTH counts one (a refused
    AUTH is usually followed by NOAUTH for the next command: that one is not counted again). The
    replies are not walked: a bulk value holding such a line would count too."""
    found = [m.group(1) for m in _REFUSED.finditer(s2c[:4096])]
    refused = sum(1 for f in found if f != b"NOAUTH")
    return refused or (1 if found else 0)


def extract(flow: Flow) -> Mapping[str, Any]:
    """The first command's name, and the logins the server refused (``auth_failures``, when any)."""
    c2s = flow.stream(True)
    name = command(c2s)
    if name is None and (m := _INLINE.match(c2s)):
        name = m.group(1).decode().upper()
    meta: dict[str, Any] = {"command": name or ""}
    if failed := auth_failures(flow.stream(False)):
        meta["auth_failures"] = failed
    return {"redis": meta}


def answered(flow: Flow) -> bool:
    """The server has replied: its first reply says whether a login was refused."""
    return bool(flow.s2c)


DETECTOR = Detector(
    name="redis",
    l4=frozenset({"tcp"}),
    ports=frozenset({6379, 6380, 26379}),
    max_packets=4,
    detect=detect,
    extract=extract,
    linger=4,  # until the server's first reply (auth-brute-force counts refused logins)
    settled=answered,
)
