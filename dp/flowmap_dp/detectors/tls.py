"""TLS: a handshake record carrying a ClientHello or ServerHello (RFC 5246, RFC 8446).

The record header (content type 22, version 3.0–3.4, a bounded length) and the handshake header
inside it (type 1 or 2, its 24-bit length fitting the record, a legacy version 3.0–3.3) must all
agree. Records split over TCP segments are read from the joined stream. A session picked up
mid-stream matches when a side's first packet is exactly one or more whole records (content type
20–23, version 3.0–3.3, lengths chaining to the packet's end). DTLS (UDP) is a
different protocol and is not matched (l4 is TCP only).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flowmap_dp.detectors._wire import be, text
from flowmap_dp.detectors.base import Detector, Flow, Verdict

_HANDSHAKE = 22
_MAX_RECORD = 16384 + 2048
_VERSIONS = {0x0300: "SSL3.0", 0x0301: "TLS1.0", 0x0302: "TLS1.1", 0x0303: "TLS1.2", 0x0304: "TLS1.3"}


def _hello(data: bytes, hs_type: int) -> Verdict:
    if not data:
        return Verdict.MORE
    if data[0] != _HANDSHAKE:
        return Verdict.NO
    if len(data) < 11:
        consistent = (len(data) < 2 or data[1] == 3) and (len(data) < 3 or data[2] <= 4)
        return Verdict.MORE if consistent else Verdict.NO
    rec_ver, rec_len = be(data, 1, 2), be(data, 3, 2)
    if rec_ver not in _VERSIONS or rec_len is None or not 4 <= rec_len <= _MAX_RECORD:
        return Verdict.NO
    hs_len, legacy = be(data, 6, 3), be(data, 9, 2)
    if data[5] != hs_type or hs_len is None or legacy not in _VERSIONS or legacy == 0x0304:
        return Verdict.NO
    # Hello messages are at least 38 bytes (version, random, session id length); a handshake
    # message may continue in the next record but never starts shorter than that.
    if hs_len < 38 or hs_len > 0xFFFF:
        return Verdict.NO
    return Verdict.MATCH


def _records(packet: bytes) -> bool:
    """True when ``packet`` is one or more whole TLS records (content types 20–23) and nothing
    else: how a session picked up mid-stream shows itself."""
    off = count = 0
    while off < len(packet):
        if packet[off] not in (20, 21, 22, 23) or be(packet, off + 1, 2) not in _VERSIONS:
            return False
        n = be(packet, off + 3, 2)
        if n is None or not 1 <= n <= _MAX_RECORD:
            return False
        off += 5 + n
        count += 1
    return count > 0 and off == len(packet)


def _record_start(packet: bytes) -> bool:
    """True when ``packet`` starts with a plausible record header (its record may continue)."""
    n = be(packet, 3, 2)
    return n is not None and packet[0] in (20, 21, 23) and be(packet, 1, 2) in _VERSIONS and 1 <= n <= _MAX_RECORD


def detect(flow: Flow) -> Verdict:
    """MATCH when the client opens with a ClientHello or the server answers with a ServerHello,
    or (a session picked up mid-stream) a side's first packet is exactly a run of TLS records."""
    c = _hello(flow.stream(True), 1)
    if c is Verdict.MATCH:
        return c
    s = _hello(flow.stream(False), 2)
    if s is Verdict.MATCH:
        return s
    for side in (flow.c2s, flow.s2c):
        # A record may span segments: try the first packet, then the first two, and so on.
        for k in range(1, min(len(side), 4) + 1):
            if _records(b"".join(side[:k])):
                return Verdict.MATCH
    if any(_record_start(side[0]) for side in (flow.c2s, flow.s2c) if side) and flow.packets < 4:
        return Verdict.MORE
    # Whichever side spoke first and was not TLS settles it: the other cannot fix it later.
    if Verdict.NO in (c, s):
        return Verdict.NO
    return Verdict.MORE


def _handshake(data: bytes, hs_type: int) -> bytes:
    """The first handshake message of ``hs_type``, reassembled from consecutive records."""
    body = bytearray()
    off = 0
    while off + 5 <= len(data) and data[off] == _HANDSHAKE and len(body) < 65536:
        n = be(data, off + 3, 2) or 0
        body += data[off + 5 : off + 5 + n]
        off += 5 + n
        need = be(bytes(body), 1, 3)
        if need is not None and len(body) >= 4 + need:
            break
    if not body or body[0] != hs_type:
        return b""
    return bytes(body[4 : 4 + (be(bytes(body), 1, 3) or 0)])


def _extensions(hello: bytes, server: bool) -> dict[int, bytes]:
    off = 2 + 32
    sid = hello[off] if off < len(hello) else 0
    off += 1 + sid
    if server:
        off += 2 + 1  # cipher suite, compression method
    else:
        n = be(hello, off, 2) or 0
        off += 2 + n
        n = hello[off] if off < len(hello) else 0
        off += 1 + n
    total = be(hello, off, 2)
    out: dict[int, bytes] = {}
    if total is None or off + 2 + total != len(hello):
        return out  # the lengths before do not add up: read nothing rather than garbage
    off += 2
    end = min(len(hello), off + total)
    while off + 4 <= end:
        typ, n = be(hello, off, 2) or 0, be(hello, off + 2, 2) or 0
        out.setdefault(typ, hello[off + 4 : off + 4 + n])
        off += 4 + n
    return out


def _sni(ext: bytes) -> str | None:
    off = 2
    while off + 3 <= len(ext):
        typ, n = ext[off], be(ext, off + 1, 2) or 0
        if typ == 0:
            return text(ext[off + 3 : off + 3 + n])
        off += 3 + n
    return None


def _alpn(ext: bytes) -> list[str]:
    out: list[str] = []
    off = 2
    while off < len(ext) and len(out) < 16:
        n = ext[off]
        out.append(text(ext[off + 1 : off + 1 + n], 64))
        off += 1 + n
    return out


def extract(flow: Flow) -> Mapping[str, Any]:
    """SNI and ALPN from the ClientHello; the negotiated version and ALPN from the ServerHello."""
    meta: dict[str, Any] = {}
    ch = _handshake(flow.stream(True), 1)
    if len(ch) >= 35:
        ext = _extensions(ch, server=False)
        meta["client_version"] = _VERSIONS.get(be(ch, 0, 2) or 0, "unknown")
        if 0 in ext and (sni := _sni(ext[0])):
            meta["sni"] = sni
        if 16 in ext:
            meta["alpn"] = _alpn(ext[16])
    sh = _handshake(flow.stream(False), 2)
    if len(sh) >= 35:
        ext = _extensions(sh, server=True)
        version = be(sh, 0, 2) or 0
        if 43 in ext and len(ext[43]) == 2:  # supported_versions: the TLS 1.3 way to say it
            version = be(ext[43], 0, 2) or version
        meta["version"] = _VERSIONS.get(version, "unknown")
        if 16 in ext and (alpn := _alpn(ext[16])):
            meta["alpn_selected"] = alpn[0]
    return {"tls": meta}


def _settled(flow: Flow) -> bool:
    return len(_handshake(flow.stream(False), 2)) >= 35


DETECTOR = Detector(
    name="tls",
    l4=frozenset({"tcp"}),
    ports=frozenset({443, 853, 993, 995, 465, 636, 8443, 6443, 10250}),
    max_packets=6,
    detect=detect,
    extract=extract,
    linger=6,
    settled=_settled,
)
