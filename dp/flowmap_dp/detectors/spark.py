"""Apache Spark RPC and block transfer (the ``network-common`` transport used by the driver,
executors, the standalone master/workers and the shuffle service).

Evidence used: every message is a frame — int64 big-endian frame length (counting itself), one
message type byte (0..12), the type's header, then the body. The first message of a connection
is an RpcRequest (type 3: int64 request id, int32 body size) or a OneWayMessage (type 9: int32
body size); for both the frame length must equal 8 + 1 + header + body size exactly, which a
random 8-byte prefix almost never does. A ChunkFetchRequest (type 0) is a fixed 21-byte frame.
The server's RpcResponse (type 4) echoing the request id confirms; without it, the request body
must start like a Spark RPC payload (Java serialization ``ACED0005``, Spark's NettyRpcEnv
RequestMessage which starts with a boolean then a UTF host, or the auth/SASL tags 0xFB/0xEA).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flowmap_dp.detectors._wire import be
from flowmap_dp.detectors.base import Detector, Flow, Verdict

_TYPES = {0: "ChunkFetchRequest", 3: "RpcRequest", 6: "StreamRequest", 9: "OneWayMessage", 10: "UploadStream"}
_MAX_FRAME = 1 << 31


def frame(data: bytes) -> tuple[int, int, int | None] | None:
    """(frame length, message type, request id) of the client frame at the start of ``data``."""
    length, typ = be(data, 0, 8), data[8] if len(data) > 8 else None
    if length is None or typ is None or not 9 <= length < _MAX_FRAME:
        return None
    if typ == 3:
        rid, body = be(data, 9, 8), be(data, 17, 4)
        return (length, typ, rid) if body is not None and length == 21 + body and body > 0 else None
    if typ == 9:
        body = be(data, 9, 4)
        return (length, typ, None) if body is not None and length == 13 + body and body > 0 else None
    if typ == 0:
        return (length, typ, None) if length == 21 else None
    return None


def _payload_looks_spark(body: bytes) -> bool:
    if body[:4] == b"\xac\xed\x00\x05" or body[:1] in (b"\xfb", b"\xea"):
        return True
    # NettyRpcEnv RequestMessage: hasSenderAddress (0/1), then a Java modified-UTF host name.
    if body[:1] in (b"\x00", b"\x01"):
        n = be(body, 1, 2)
        return n is not None and 1 <= n <= 255 and body[3 : 3 + n].replace(b".", b"").replace(b"-", b"").isalnum()
    return False


def detect(flow: Flow) -> Verdict:
    """MATCH on a well-framed first request whose body or answer confirms Spark."""
    c2s, s2c = flow.stream(True), flow.stream(False)
    f = frame(c2s)
    if f is None:
        # Frame lengths are int64 but small: the top four bytes are zero.
        short = len(c2s) < 21 and flow.packets < 2 and (be(c2s, 0, 4) == 0 or len(c2s) < 4)
        return Verdict.MORE if short else Verdict.NO
    length, typ, rid = f
    if typ == 0:
        # A ChunkFetchRequest has no body to vouch for it: the answer must name the same chunk.
        if s2c[8:9] in (b"\x01", b"\x02") and s2c[9:21] == c2s[9:21] and len(s2c) >= 21:
            return Verdict.MATCH
        return Verdict.MORE if not s2c and flow.packets < 4 else Verdict.NO
    if rid is not None and s2c[8:9] in (b"\x04", b"\x05") and be(s2c, 9, 8) == rid:
        return Verdict.MATCH
    header = 21 if typ == 3 else 13
    body = c2s[header:length]
    if len(body) >= 8 and _payload_looks_spark(body):
        return Verdict.MATCH
    return Verdict.MORE if flow.packets < 4 else Verdict.NO


def extract(flow: Flow) -> Mapping[str, Any]:
    """The first message type."""
    f = frame(flow.stream(True))
    return {"spark": {"message": _TYPES.get(f[1], str(f[1]))} if f else {}}


DETECTOR = Detector(
    name="spark",
    l4=frozenset({"tcp"}),
    ports=frozenset({7077, 7078, 7337, 4040}),
    max_packets=4,
    detect=detect,
    extract=extract,
)
