"""Couchbase Server: its key/value port speaks the memcached binary protocol with Couchbase
extensions; its management/query services speak HTTP REST.

Evidence used (KV): a 24-byte binary header — magic 0x80 (request) / 0x81 (response), or the
Couchbase-only "alternative" magics 0x08 / 0x18 with flexible framing extras — whose key, extras
and framing lengths fit in the body length, with a datatype <= 7. Plain memcached uses the same
header, so the header must be corroborated: a Couchbase-only magic, a Couchbase-only opcode
(HELLO 0x1f with its JSON agent key, SELECT_BUCKET 0x89, GET_CLUSTER_CONFIG 0xb5,
GET_ERROR_MAP 0xfe — every Couchbase SDK sends HELLO and GET_ERROR_MAP first), or the Couchbase
data ports 11210/11207 and its memcached-compatible port 11211 (memcached in binary mode on 11211
is therefore reported as couchbase: the bytes cannot tell them apart; the text protocol is not).
Evidence used (REST): an HTTP request for a path only Couchbase serves (``/pools``,
``/query/service``, ``/analytics/service`` …) — checked before the generic http detector.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flowmap_dp.detectors._wire import be
from flowmap_dp.detectors.base import Detector, Flow, Verdict
from flowmap_dp.detectors.http import request_line

_REQ, _RESP, _ALT_REQ, _ALT_RESP = 0x80, 0x81, 0x08, 0x18
_COUCHBASE_OPCODES = {0x1F: "HELLO", 0x89: "SELECT_BUCKET", 0xB5: "GET_CLUSTER_CONFIG", 0xFE: "GET_ERROR_MAP"}
# 11210/11207: the data service (plain/TLS). 11211: the memcached-compatible port Couchbase
# served for non-smart clients; a memcached server in binary mode there looks the same.
_DATA_PORTS = frozenset({11210, 11207, 11211})
_REST_PATHS = ("/pools", "/query/service", "/analytics/service", "/nodes/self", "/sampleBuckets", "/settings/web")


def header(data: bytes) -> tuple[int, int] | None:
    """(magic, opcode) of a consistent binary-protocol header at the start of ``data``."""
    if len(data) < 24 or data[0] not in (_REQ, _RESP, _ALT_REQ, _ALT_RESP):
        return None
    if data[0] in (_ALT_REQ, _ALT_RESP):
        framing, key = data[2], data[3]
    else:
        framing, key = 0, be(data, 2, 2) or 0
    extras, datatype, body = data[4], data[5], be(data, 8, 4) or 0
    if datatype > 7 or framing + key + extras > body or body > 20 * 1024 * 1024:
        return None
    return data[0], data[1]


def _rest(c2s: bytes) -> bool:
    line = request_line(c2s)
    return line is not None and line[1].startswith(_REST_PATHS)


def detect(flow: Flow) -> Verdict:
    """MATCH on a corroborated KV header from the client, or a Couchbase REST request."""
    c2s = flow.stream(True)
    h = header(c2s)
    if h is not None and h[0] in (_REQ, _ALT_REQ):
        couchbase_port = flow.server_port in _DATA_PORTS or flow.client_port in _DATA_PORTS
        if h[0] == _ALT_REQ or h[1] in _COUCHBASE_OPCODES or couchbase_port:
            return Verdict.MATCH
        return Verdict.NO
    if _rest(c2s):
        return Verdict.MATCH
    if c2s and len(c2s) < 24 and c2s[0] in (_REQ, _ALT_REQ) and flow.packets < 3:
        return Verdict.MORE
    if c2s[:1].isalpha() and b"\n" not in c2s and len(c2s) < 256:
        return Verdict.MORE  # an HTTP request line still arriving
    return Verdict.NO if c2s else Verdict.MORE


def extract(flow: Flow) -> Mapping[str, Any]:
    """The interface (kv or rest) and the first KV opcode or REST path."""
    c2s = flow.stream(True)
    h = header(c2s)
    if h is not None:
        return {"couchbase": {"interface": "kv", "opcode": _COUCHBASE_OPCODES.get(h[1], hex(h[1]))}}
    line = request_line(c2s)
    return {"couchbase": {"interface": "rest", "path": line[1][:256]} if line else {}}


DETECTOR = Detector(
    name="couchbase",
    l4=frozenset({"tcp"}),
    ports=frozenset({11210, 11207, 11211, 8091, 8092, 8093, 8094, 8095, 8096, 18091, 18093}),
    max_packets=4,
    detect=detect,
    extract=extract,
)
