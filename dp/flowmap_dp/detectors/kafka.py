"""Apache Kafka wire protocol.

Requests: a big-endian int32 size (equal to the rest of the message, or larger while it is still
arriving), then the request header v1/v2: api key (0..~80), api version (0..~20), correlation id,
and a client id (int16 length then printable bytes, or -1 for null). Every Kafka client sends
that header, which makes a single request distinctive enough: size, key, version and a printable
client id must all agree. Captures that start mid-stream are handled the same way, since each
message begins at a segment boundary in practice.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flowmap_dp.detectors._wire import be, printable, text
from flowmap_dp.detectors.base import Detector, Flow, Verdict

_API = {0: "Produce", 1: "Fetch", 2: "ListOffsets", 3: "Metadata", 8: "OffsetCommit", 9: "OffsetFetch",
        10: "FindCoordinator", 11: "JoinGroup", 12: "Heartbeat", 13: "LeaveGroup", 14: "SyncGroup",
        18: "ApiVersions", 19: "CreateTopics", 22: "InitProducerId", 32: "DescribeConfigs",
        36: "SaslAuthenticate", 17: "SaslHandshake", 60: "DescribeCluster"}
_MAX_API_KEY, _MAX_VERSION = 80, 20


def request(data: bytes) -> tuple[int, int, str] | None:
    """(api key, api version, client id) of the request at the start of ``data``, or None."""
    size, key, version, client_len = be(data, 0, 4), be(data, 4, 2), be(data, 6, 2), be(data, 12, 2)
    if size is None or key is None or version is None or client_len is None:
        return None
    if not 10 <= size <= 100 * 1024 * 1024 or key > _MAX_API_KEY or version > _MAX_VERSION:
        return None
    if size < len(data) - 4 and len(data) - 4 - size < 4:
        return None  # a stray tail that is not the next message's size
    if client_len == 0xFFFF:
        return key, version, ""
    client = data[14 : 14 + client_len]
    if not 1 <= client_len <= 256 or 10 + client_len > size or len(client) < client_len or not printable(client):
        return None
    return key, version, text(client, 256)


def _partial(data: bytes) -> bool:
    """True while ``data`` is a consistent start of a request that has not fully arrived."""
    size, key, version, client_len = be(data, 0, 4), be(data, 4, 2), be(data, 6, 2), be(data, 12, 2)
    if size is not None and (not 10 <= size <= 100 * 1024 * 1024 or len(data) >= 4 + size):
        return False
    if (key is not None and key > _MAX_API_KEY) or (version is not None and version > _MAX_VERSION):
        return False
    if client_len is not None and client_len != 0xFFFF:
        return 1 <= client_len <= 256 and printable(data[14 : 14 + client_len])
    return True


def _response_to(c2s: bytes, s2c: bytes) -> bool:
    """The server's first message echoes the request's correlation id and fits its size."""
    size = be(s2c, 0, 4)
    return size is not None and 4 <= size <= 100 * 1024 * 1024 and s2c[4:8] == c2s[8:12]


def detect(flow: Flow) -> Verdict:
    """MATCH on a well-formed request header with an exactly fitting size."""
    c2s = flow.stream(True)
    req = request(c2s)
    if req is not None:
        size = be(c2s, 0, 4) or 0
        # The whole first request is here, or the server has already answered it.
        if len(c2s) >= 4 + size or (flow.s2c and _response_to(c2s, flow.stream(False))):
            return Verdict.MATCH
        return Verdict.MORE if flow.packets < 4 else Verdict.NO
    if not c2s or (_partial(c2s) and flow.packets < 4):
        return Verdict.MORE
    return Verdict.NO


def extract(flow: Flow) -> Mapping[str, Any]:
    """Client id and the APIs of the first requests."""
    c2s, off = flow.stream(True), 0
    apis: list[str] = []
    client = None
    while off < len(c2s) and len(apis) < 8:
        req = request(c2s[off:])
        if req is None:
            break
        client = client if client is not None else req[2]
        apis.append(_API.get(req[0], str(req[0])))
        off += 4 + (be(c2s, off, 4) or 0)
    return {"kafka": {"client_id": client or "", "apis": apis}}


DETECTOR = Detector(
    name="kafka",
    l4=frozenset({"tcp"}),
    ports=frozenset({9092, 9093, 9094}),
    max_packets=6,
    detect=detect,
    extract=extract,
)
