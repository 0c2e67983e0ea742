"""HTTP/2 framing and header decoding shared by the http and grpc detectors (private).

HPACK is decoded with the ``hpack`` package (python-hyper): it implements RFC 7541 in full —
static and dynamic tables, integer and Huffman decoding — is small, pure Python, MIT-licensed
and well kept. A hand-written decoder would need the 257-entry Huffman code table typed in by
hand, which is exactly the kind of code that hides one wrong bit.
"""

from __future__ import annotations

import logging

import hpack

from flowmap_dp.detectors._wire import be

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_HEADERS, _CONTINUATION = 0x1, 0x9
_PADDED, _PRIORITY, _END_HEADERS = 0x8, 0x20, 0x4
_MAX_BLOCKS = 8

# hpack logs each decoded header at DEBUG; keep hostile payloads out of application logs.
logging.getLogger("hpack").setLevel(logging.WARNING)

Headers = list[tuple[str, str]]


def frames(data: bytes, start: int = 0) -> list[tuple[int, int, int, bytes]] | None:
    """(type, flags, stream id, payload) of each complete frame; None when framing is broken."""
    out: list[tuple[int, int, int, bytes]] = []
    off = start
    while off + 9 <= len(data) and len(out) < 64:
        length = be(data, off, 3) or 0
        typ, flags = data[off + 3], data[off + 4]
        stream = (be(data, off + 5, 4) or 0) & 0x7FFFFFFF
        if typ > 0x20:  # extension frame types exist (ALTSVC 0xA, ORIGIN 0xC, 0x10), not this high
            return None
        if off + 9 + length > len(data):
            break
        out.append((typ, flags, stream, data[off + 9 : off + 9 + length]))
        off += 9 + length
    return out


def header_blocks(data: bytes, start: int) -> list[Headers] | None:
    """Decode the header blocks of ``data`` (frames from ``start``) in order, sharing one
    dynamic table as the peer's decoder would. None when framing or HPACK is broken."""
    fr = frames(data, start)
    if fr is None:
        return None
    decoder = hpack.Decoder()
    blocks: list[Headers] = []
    pending = b""
    open_block = False
    for typ, flags, _stream, payload in fr:
        if typ == _HEADERS:
            off, end = 0, len(payload)
            if flags & _PADDED:
                if not payload:
                    return None
                end -= payload[0]
                off = 1
            if flags & _PRIORITY:
                off += 5
            if end < off:
                return None
            pending, open_block = payload[off:end], True
        elif typ == _CONTINUATION and open_block:
            pending += payload
        else:
            continue
        if flags & _END_HEADERS:
            open_block = False
            try:
                decoded = decoder.decode(pending, raw=False)
            except Exception:  # hpack raises several error types on hostile input
                return None
            blocks.append([(str(k), str(v)) for k, v in decoded][:64])
            if len(blocks) >= _MAX_BLOCKS:
                break
    return blocks


def client_blocks(c2s: bytes) -> list[Headers] | None:
    """Request header blocks of a prior-knowledge HTTP/2 connection, or None if it is not one."""
    if not c2s.startswith(PREFACE):
        return None
    return header_blocks(c2s, len(PREFACE))


def preface_prefix(c2s: bytes) -> bool:
    """True while ``c2s`` could still become the HTTP/2 connection preface."""
    n = min(len(c2s), len(PREFACE))
    return c2s[:n] == PREFACE[:n]


def get(headers: Headers, name: str) -> str | None:
    """The first value of header ``name``."""
    for k, v in headers:
        if k == name:
            return v
    return None
