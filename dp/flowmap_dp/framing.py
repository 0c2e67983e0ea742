"""The dp <-> agent wire contract: frame header, constants, and the pure decoding of one
connection's bytes into frames and reports. Both ends import it (the dp's exporter, the agent's
reader), so each rule of the framing is written once, here.

**Who connects.** The agent listens on a unix stream socket; each dp worker process connects
to it (``flowmap dp run --socket PATH``) and reconnects with backoff whenever the agent is not
there. So an agent restart never needs a dp restart, and N fanout workers are N independent
streams with no extra hop through a parent process; ``Report.worker`` tells them apart.

**Framing, version 1.** Each message is a 12-byte header followed by one protobuf message
from ``wire.proto`` (package ``flowmap.dp.v1``)::

    0      4         6        8             12
    | FMDP | version | kind   | length      | <length bytes of protobuf>
      magic  u16 BE    u16 BE   u32 BE

``kind`` 1 is a ``Report`` (dp -> agent), 2 a ``Control`` (agent -> dp: the full set of
interfaces to capture, the node's addresses, the overlay to drop on the underlay; the agent
sends it on every new connection and whenever it changes), 3
an ``Ack`` (agent -> dp: reports up to a sequence are saved on the agent's side).
A reader rejects a bad magic, an unknown version, lengths above ``MAX_FRAME`` (16 MiB; the dp
keeps its parts near a quarter of it) and a report body that does not parse by closing the
connection, and counts it: a corrupt stream cannot be resynchronised, a reconnect can.
"""

from __future__ import annotations

import struct

from google.protobuf.message import DecodeError

from flowmap_dp import wire_pb2
from flowmap_dp.errors import WireError

MAGIC = b"FMDP"
VERSION = 1
KIND_REPORT = 1
KIND_CONTROL = 2
KIND_ACK = 3
HEADER = struct.Struct(">4sHHI")
# A frame is one part of a report (flowmap_dp.reporting keeps each part's estimate under PART_BYTES): a
# reader never has to hold more than this for one connection, whoever is on the other end.
MAX_FRAME = 16 << 20


def frame(kind: int, payload: bytes) -> bytes:
    """Header + payload, ready for ``sendall``."""
    if len(payload) > MAX_FRAME:
        raise WireError("length", f"frame of {len(payload)} bytes exceeds {MAX_FRAME}")
    return HEADER.pack(MAGIC, VERSION, kind, len(payload)) + payload


class FrameDecoder:
    """Incremental decoder: feed bytes as they arrive, get complete (kind, payload) frames.

    Holds at most one incomplete frame and what arrived after it in the same ``feed`` (so at most
    ``HEADER.size + MAX_FRAME`` plus one read). After a WireError the stream is useless: close it.
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes held, waiting for the rest of their frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Append ``data``; return every frame now complete. Raises WireError on garbage."""
        self._buf += data
        out: list[tuple[int, bytes]] = []
        start = 0
        try:
            while len(self._buf) - start >= HEADER.size:
                magic, version, kind, length = HEADER.unpack_from(self._buf, start)
                if magic != MAGIC:
                    raise WireError("magic", f"bad magic {bytes(magic)!r}")
                if version != VERSION:
                    raise WireError("version", f"unsupported version {version}")
                if length > MAX_FRAME:
                    raise WireError("length", f"frame length {length} exceeds {MAX_FRAME}")
                end = start + HEADER.size + length
                if len(self._buf) < end:
                    break
                out.append((kind, bytes(self._buf[start + HEADER.size : end])))
                start = end
        finally:
            del self._buf[:start]  # once per feed: many small frames cost no quadratic copying
        return out


def parse_report(payload: bytes) -> wire_pb2.Report:
    """The ``Report`` in a frame's payload; WireError("payload") if it is not one."""
    try:
        report: wire_pb2.Report = wire_pb2.Report.FromString(payload)
    except DecodeError as exc:
        raise WireError("payload", f"a report frame whose body is not a Report: {exc}") from None
    return report



class Stream:
    """One connection's bytes as the reports they carry (pure): the framing, then each report's
    body. Raises WireError (and is then useless) on anything else."""

    def __init__(self) -> None:
        self.decoder = FrameDecoder()
        self.since = 0.0  # when its incomplete frame began (the caller's clock); 0: none

    @property
    def buffered(self) -> int:
        return self.decoder.buffered

    def feed(self, data: bytes, now: float = 0.0) -> list[wire_pb2.Report]:
        """The reports ``data`` completes (frames of other kinds are the agent's own: ignored)."""
        frames = self.decoder.feed(data)
        out = [parse_report(payload) for kind, payload in frames if kind == KIND_REPORT]
        if not self.decoder.buffered:
            self.since = 0.0
        elif frames or not self.since:
            self.since = now
        return out
