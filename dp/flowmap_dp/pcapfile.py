"""A small reader for pcap and pcapng capture files.

Why not dpkt: we need only the record framing (timestamps, link type, captured and original
length), not dpkt's protocol classes, and a reader of ~150 lines that tolerates a truncated last
record (common in captures cut short) is easier to keep exact than a dependency to pin. Decoding
is done by ``flowmap_dp.decode``, the same code the live path runs.

Supported: pcap (both byte orders, micro- and nanosecond magic) and pcapng (section header,
interface description with ``if_tsresol``, enhanced, simple and obsolete packet blocks, several
interfaces with different link types, several sections).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from struct import Struct
from typing import BinaryIO

from flowmap_dp.errors import CaptureFormatError

_PCAP_MAGIC = {
    b"\xd4\xc3\xb2\xa1": ("<", 1e-6),
    b"\xa1\xb2\xc3\xd4": (">", 1e-6),
    b"\x4d\x3c\xb2\xa1": ("<", 1e-9),
    b"\xa1\xb2\x3c\x4d": (">", 1e-9),
}
_PCAPNG_SHB = 0x0A0D0D0A
_IDB, _SPB, _OPB, _EPB = 1, 3, 2, 6


@dataclass(slots=True)
class Record:
    """One captured frame."""

    ts: float  # seconds since the epoch
    link: int  # pcap LINKTYPE_* of the interface
    data: bytes  # captured bytes
    wire_len: int  # length on the wire (>= len(data) when the snap length cut it)


def read_records(path: str | Path) -> Iterator[Record]:
    """Yield every frame of a pcap or pcapng file; a truncated last record ends the file."""
    with open(path, "rb") as f:
        head = f.read(4)
        if head in _PCAP_MAGIC:
            yield from _pcap(f, head)
        elif len(head) == 4 and int.from_bytes(head, "little") == _PCAPNG_SHB:
            yield from _pcapng(f, head)
        else:
            raise CaptureFormatError(f"{path}: not a pcap or pcapng file")


def _pcap(f: BinaryIO, magic: bytes) -> Iterator[Record]:
    order, unit = _PCAP_MAGIC[magic]
    rest = f.read(20)
    if len(rest) < 20:
        raise CaptureFormatError("truncated pcap header")
    link = Struct(order + "HHiIII").unpack(rest)[5] & 0xFFFF  # upper bits: FCS length flags
    rec = Struct(order + "IIII")
    while True:
        hdr = f.read(16)
        if len(hdr) < 16:
            return
        sec, frac, incl, orig = rec.unpack(hdr)
        data = f.read(incl)
        if len(data) < incl:
            return
        yield Record(sec + frac * unit, link, data, max(orig, incl))


def _tsresol(options: bytes, order: str) -> float:
    """The interface's timestamp unit from its options (default: microseconds)."""
    opt = Struct(order + "HH")
    pos = 0
    while pos + 4 <= len(options):
        code, length = opt.unpack_from(options, pos)
        if code == 0:
            break
        if code == 9 and length >= 1:
            v = options[pos + 4]
            return 2.0 ** -(v & 0x7F) if v & 0x80 else 10.0 ** -v
        pos += 4 + ((length + 3) & ~3)
    return 1e-6


def _pcapng(f: BinaryIO, first: bytes) -> Iterator[Record]:
    pending = first
    order = "<"
    ifaces: list[tuple[int, float, int]] = []  # (link type, ts unit, snap length)
    while True:
        head = pending + f.read(8 - len(pending))
        pending = b""
        if len(head) < 8:
            return
        btype_le = int.from_bytes(head[:4], "little")
        if btype_le == _PCAPNG_SHB:
            bom = f.read(4)
            if len(bom) < 4:
                return
            order = "<" if bom == b"\x4d\x3c\x2b\x1a" else ">"
            (blen,) = Struct(order + "I").unpack(head[4:8])
            body = bom + f.read(blen - 12) if blen >= 12 else b""
            if len(body) < blen - 8:
                return
            ifaces = []  # interface ids are per section
            continue
        btype, blen = Struct(order + "II").unpack(head)
        if blen < 12 or blen % 4:
            raise CaptureFormatError(f"bad pcapng block length {blen}")
        body = f.read(blen - 8)
        if len(body) < blen - 8:
            return
        body = body[:-4]  # trailing copy of the block length
        if btype == _IDB and len(body) >= 8:
            link, _, snap = Struct(order + "HHI").unpack_from(body)
            ifaces.append((link, _tsresol(body[8:], order), snap))
        elif btype == _EPB and len(body) >= 20:
            iface, hi, lo, cap, orig = Struct(order + "IIIII").unpack_from(body)
            if iface < len(ifaces):
                link, unit, _ = ifaces[iface]
                data = body[20 : 20 + cap]
                yield Record(((hi << 32) | lo) * unit, link, data, max(orig, len(data)))
        elif btype == _OPB and len(body) >= 20:
            iface, _, hi, lo, cap, orig = Struct(order + "HHIIII").unpack_from(body)
            if iface < len(ifaces):
                link, unit, _ = ifaces[iface]
                data = body[20 : 20 + cap]
                yield Record(((hi << 32) | lo) * unit, link, data, max(orig, len(data)))
        elif btype == _SPB and len(body) >= 4 and ifaces:
            (orig,) = Struct(order + "I").unpack_from(body)
            link, _, snap = ifaces[0]
            data = body[4 : 4 + min(orig, snap or orig)]
            yield Record(0.0, link, data, max(orig, len(data)))
