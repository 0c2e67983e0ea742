"""SQL injection: a threat scanner, never a session's protocol.

It looks inside sessions another detector matched:
- http: each request's query string (URL-decoded, ``+`` as space) and form/body;
- mysql COM_QUERY, postgresql simple/extended queries, tds SQL batches (UTF-16LE);
- mongodb query filters (operator injection, below).

Web input is held to the broad signature set (tautologies, UNION SELECT, stacked statements,
comment-terminated quotes, time delays, catalogue probing). SQL sent by database clients is full
of legitimate UNIONs, comments and catalogue queries, so there only the shapes no hand-written
query has are flagged: a tautology right after a closing quote, a UNION SELECT of literals ended
by a comment, a stacked DROP/SHUTDOWN after a quote, a comment that swallows a quote, a delay
call after a quote.

MongoDB has no SQL: injection there is an operator object where the application meant a string
(a JSON body's ``{"password": {"$ne": null}}`` passed on as the filter). The client's OP_MSG and
OP_QUERY documents are read with ``detectors.mongodb``'s bounded BSON reader, and the filters of
``find``, ``count``, ``distinct``, ``findAndModify``, ``delete`` (each ``q``), ``update`` (each
``q``) and ``aggregate`` (each ``$match``), or a legacy OP_QUERY's query, are walked (through
``$and``/``$or``/``$nor``). A filter is flagged when:
- ``$where`` appears: JavaScript run by the server, the injection's classic vehicle (deprecated
  since MongoDB 4.4 in favour of ``$expr``, so an application rarely sends it);
- a credential field (its last path part holds ``pass``, ``pwd``, ``secret`` or ``token``, any
  case) is given a regular expression or an operator other than ``$eq``, ``$exists`` and
  ``$type``: a login compares a password with equality, never ``{"$ne": null}``, ``{"$gt": ""}``
  or ``{"$regex": ".*"}``.
Operators on other fields are ordinary queries (``{"age": {"$gt": 30}}``, ``{"deletedAt":
{"$ne": null}}``) and are never flagged; nor is an injection into a field not named like a
credential, which the wire cannot tell from a query.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from urllib.parse import unquote_plus

from typing import Any

from flowmap_dp.detectors import mongodb, mysql, postgresql, tds
from flowmap_dp.detectors.base import Detector, Flow, Threat, Verdict
from flowmap_dp.detectors.http import parse_request

NAME = "sqlinjection"
APPS = frozenset({"http", "mysql", "postgresql", "tds", "mongodb"})  # the protocols whose sessions it looks inside
SNIPPET_LIMIT = 128
_F = re.I | re.S

# A value compared with itself: 1=1, 'a'='a', "x" like "x", 2>1 is left out (too rare to matter).
# The closing quote of the right-hand value is often left for the application to add.
_TAUTOLOGY = r"(?:or|and|\|\||&&)\s*\(?\s*['\"]?(\w{1,32})['\"]?\s*(?:=|<=>|like)\s*['\"]?\1(?!\w)"
_WEB = [
    re.compile(r"['\")]\s*" + _TAUTOLOGY, _F),  # 1' and 1=1#   ' or '1'='1
    re.compile(r"['\"]\s*(?:or|and)\s+(?:true|false|\d+)\s*(?:--|#|/\*|;|$)", _F),  # ' or 1--
    re.compile(r"\bunion(?:\s+(?:all|distinct))?\s+select\b", _F),
    re.compile(r"['\")\d]\s*;\s*(?:drop|shutdown|truncate|exec(?:ute)?|declare|alter|create"
               r"|insert\s+into|delete\s+from|update\s+\w+\s+set)\b", _F),
    re.compile(r"\w['\"]\s*(?:--|#|/\*)", _F),  # admin'--
    re.compile(r"\b(?:sleep|benchmark|pg_sleep)\s*\(\s*\d", _F),
    re.compile(r"\bwaitfor\s+delay\s+'", _F),
    re.compile(r"\binformation_schema\b|\bsys(?:objects|columns)\b|\bxp_cmdshell\b|\bload_file\s*\("
               r"|\binto\s+(?:out|dump)file\b", _F),
    re.compile(r"@@version\b", _F),
]
_LITERAL = r"(?:null|\d+|'[^']{0,64}'|@@\w+|\w+\(\))"
_SQL = [
    re.compile(r"'\s*" + _TAUTOLOGY, _F),
    re.compile(r"\bunion(?:\s+all)?\s+select\s+" + _LITERAL + r"(?:\s*,\s*" + _LITERAL + r")*\s*(?:--|#|/\*)", _F),
    re.compile(r"'\s*;\s*(?:drop|shutdown|truncate)\b", _F),
    re.compile(r"=\s*'[^'\n]*'\s*(?:--|#)[^\n]*'", _F),
    re.compile(r"'\s*(?:and|or)\s+(?:sleep|benchmark|pg_sleep)\s*\(", _F),
    re.compile(r"'\s*;\s*waitfor\s+delay\s+'", _F),
]
_SCAN_LIMIT = 8192


def _hits(text: str, patterns: list[re.Pattern[str]], where: str) -> list[Threat]:
    text = re.sub(r"/\*.*?\*/", " ", text[:_SCAN_LIMIT], flags=re.S)  # inline comments hide keywords
    for pattern in patterns:
        m = pattern.search(text)
        if m:
            start = max(0, m.start() - 32)
            return [Threat(NAME, text[start : start + SNIPPET_LIMIT], where)]
    return []


def _http(flow: Flow) -> list[Threat]:
    out: list[Threat] = []
    data, off = flow.stream(True), 0
    for _ in range(8):
        req = parse_request(data[off:])
        if req is None:
            break
        method, target, headers, body = req
        _, _, query = target.partition("?")
        if query:
            out += _hits(unquote_plus(query), _WEB, "http.query")
        if body:
            raw = body.decode("latin-1")
            form = "x-www-form-urlencoded" in headers.get("content-type", "")
            # Form fields are web input like the query string; other bodies (JSON, XML, uploads)
            # are full of quotes and '#' in ordinary text, so only the strict SQL shapes count.
            out += _hits(unquote_plus(raw), _WEB, "http.body") if form else _hits(raw, _SQL, "http.body")
        if out:
            return out[:1]
        end = data.find(b"\r\n\r\n", off)
        if end < 0:
            break
        off = end + 4 + len(body)
    return out


_CREDENTIAL = re.compile(r"pass|pwd|secret|token", re.I)
_HARMLESS = frozenset({"$eq", "$exists", "$type"})
_LOGICAL = frozenset({"$and", "$or", "$nor"})


def _filters(where: str, doc: dict[str, Any]) -> list[Any]:
    """The query filters a client's MongoDB document carries (see the module docstring)."""
    if where in ("deletes", "updates"):  # an OP_MSG document sequence: one statement each
        return [doc.get("q")]
    if "." in where and not where.endswith(".$cmd"):  # a legacy OP_QUERY on a collection
        return [doc.get("$query", doc.get("query", doc))]
    if where != "msg" and not where.endswith(".$cmd"):  # inserted documents: data, not filters
        return []
    command = next(iter(doc), "").lower()
    if command == "find":
        return [doc.get("filter")]
    if command in ("count", "distinct", "findandmodify"):
        return [doc.get("query")]
    if command in ("delete", "update"):
        return [s.get("q") for s in (doc.get(command + "s") or {}).values() if isinstance(s, dict)]
    if command == "aggregate":
        return [s.get("$match") for s in (doc.get("pipeline") or {}).values() if isinstance(s, dict)]
    return []


def _operator_injection(query: Any, depth: int = 0) -> str | None:
    if not isinstance(query, dict) or depth > 4:
        return None
    for key, value in query.items():
        if key == "$where" and isinstance(value, str):
            return f"$where: {value}"
        if key in _LOGICAL and isinstance(value, dict):
            for part in value.values():
                if found := _operator_injection(part, depth + 1):
                    return found
        elif _CREDENTIAL.search(key.rsplit(".", 1)[-1]):
            if isinstance(value, mongodb.Regex):
                return f"{key}: /{value}/"
            if isinstance(value, dict) and any(op.startswith("$") and op not in _HARMLESS for op in value):
                shown = {op: (None if v is mongodb.MIN_KEY else v) for op, v in value.items()}
                return f"{key}: {shown}"
    return None


def _mongodb(flow: Flow) -> list[Threat]:
    for where, doc in mongodb.documents(flow.stream(True)):
        for query in _filters(where, doc):
            if found := _operator_injection(query):
                return [Threat(NAME, found[:SNIPPET_LIMIT], "mongodb.query")]
    return []


def scan(flow: Flow, app: str) -> Sequence[Threat]:
    """SQL injection hits in a session already recognised as ``app`` (at most one)."""
    try:
        if app == "http":
            return _http(flow)
        if app == "mongodb":
            return _mongodb(flow)
        if app == "mysql":
            statements, where = mysql.queries(flow.stream(True)), "mysql.query"
        elif app == "postgresql":
            statements, where = postgresql.queries(flow.stream(True)), "postgresql.query"
        elif app == "tds":
            statements, where = tds.batches(flow.stream(True)), "tds.batch"
        else:
            return []
    except (ValueError, IndexError, UnicodeError, struct.error):
        return []
    for sql in statements:
        if hits := _hits(sql, _SQL, where):
            return hits
    return []


def _never(flow: Flow) -> Verdict:
    """A threat is never a session's protocol."""
    return Verdict.NO


DETECTOR = Detector(
    name=NAME,
    l4=frozenset({"tcp"}),
    ports=frozenset(),
    max_packets=0,
    detect=_never,
    scan=scan,
)
