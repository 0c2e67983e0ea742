"""gRPC over cleartext HTTP/2: the prior-knowledge connection preface, then a HEADERS frame whose
HPACK-decoded fields say ``content-type: application/grpc[+proto|+json…]`` (the gRPC wire spec
requires it on every call). The ``:path`` is ``/package.Service/Method``.

gRPC over TLS is TLS on the wire and is matched by the tls detector (ALPN ``h2``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flowmap_dp.detectors import _h2
from flowmap_dp.detectors.base import Detector, Flow, Verdict


def _is_grpc(headers: _h2.Headers) -> bool:
    return (_h2.get(headers, "content-type") or "").startswith("application/grpc")


def detect(flow: Flow) -> Verdict:
    """MATCH when the first request headers of an HTTP/2 connection carry a gRPC content-type."""
    c2s = flow.stream(True)
    if not c2s:
        return Verdict.MORE
    blocks = _h2.client_blocks(c2s)
    if blocks is None:
        return Verdict.MORE if len(c2s) < len(_h2.PREFACE) and _h2.preface_prefix(c2s) else Verdict.NO
    if not blocks:
        return Verdict.MORE
    return Verdict.MATCH if _is_grpc(blocks[0]) else Verdict.NO


def extract(flow: Flow) -> Mapping[str, Any]:
    """Service and method of each call seen (from ``:path``), and the authority."""
    calls: list[dict[str, str]] = []
    meta: dict[str, Any] = {}
    for headers in _h2.client_blocks(flow.stream(True)) or []:
        path = _h2.get(headers, ":path")
        if not path or not _is_grpc(headers):
            continue
        service, _, method = path.lstrip("/").partition("/")
        calls.append({"service": service[:256], "method": method[:256]})
        if "authority" not in meta and (authority := _h2.get(headers, ":authority")):
            meta["authority"] = authority[:256]
    if calls:
        meta.update(service=calls[0]["service"], method=calls[0]["method"], calls=calls)
    return {"grpc": meta}


DETECTOR = Detector(
    name="grpc",
    l4=frozenset({"tcp"}),
    ports=frozenset({50051, 8080, 9090}),
    max_packets=8,
    detect=detect,
    extract=extract,
    linger=4,
)
