"""A pcapng writer for packet captures on demand: pure block encoders and a bounded writer.

Why our own: the format's writing side is a handful of fixed layouts (the reader next door,
``pcapfile``, is its counterpart), and a capture must never grow past its byte bound, which
means knowing each block's size before a byte of it is written.

What a file holds (little-endian, one section): a Section Header Block (``shb_userappl`` and an
``opt_comment`` naming the capture), one Interface Description Block per interface (``if_name``,
``if_description``, ``if_tsresol`` = 9: nanoseconds, and the snap length), then Enhanced Packet
Blocks carrying the captured bytes and the packet's original length. The section length is
left "unknown" (-1), which every reader accepts, so nothing is ever rewritten in place and the
sha256 can be computed as the bytes go out.
"""

from __future__ import annotations

import hashlib
from struct import Struct
from collections.abc import Callable
from typing import BinaryIO

LINKTYPE_ETHERNET = 1
TSRESOL_NS = 9  # if_tsresol: 10^-9 s
MAX_STRING = 256  # bytes of one string option (names, descriptions, comments): every size bounded

_SHB, _IDB, _EPB = 0x0A0D0D0A, 1, 6
_BYTE_ORDER_MAGIC = 0x1A2B3C4D
_OPT_END, _OPT_COMMENT = 0, 1
_SHB_USERAPPL = 4
_IF_NAME, _IF_DESCRIPTION, _IF_TSRESOL = 2, 3, 9

_HEAD = Struct("<II")  # block type, block total length
_U32 = Struct("<I")
_OPT = Struct("<HH")
_SHB_BODY = Struct("<IHHq")  # byte-order magic, major, minor, section length
_IDB_BODY = Struct("<HHI")  # link type, reserved, snap length
_EPB_BODY = Struct("<IIIII")  # interface id, timestamp high, low, captured length, original length


def _pad(n: int) -> int:
    return (4 - n % 4) % 4


def _text(value: str) -> bytes:
    """UTF-8, cut to MAX_STRING bytes at a character boundary."""
    raw = value.encode("utf-8", "replace")[:MAX_STRING]
    return raw.decode("utf-8", "ignore").encode("utf-8")


def _options(*options: tuple[int, bytes]) -> bytes:
    """Encoded options, empty values left out, closed by opt_endofopt (no block when none)."""
    out = b"".join(_OPT.pack(code, len(v)) + v + bytes(_pad(len(v))) for code, v in options if v)
    return out + _OPT.pack(_OPT_END, 0) if out else b""


def _block(block_type: int, body: bytes) -> bytes:
    total = 12 + len(body)
    return _HEAD.pack(block_type, total) + body + _U32.pack(total)


def section_header(application: str = "flowmap", comment: str = "") -> bytes:
    """A Section Header Block, version 1.0, length unknown."""
    return _block(_SHB, _SHB_BODY.pack(_BYTE_ORDER_MAGIC, 1, 0, -1)
                  + _options((_OPT_COMMENT, _text(comment)), (_SHB_USERAPPL, _text(application))))


def interface_description(name: str, description: str, snaplen: int, link_type: int = LINKTYPE_ETHERNET) -> bytes:
    """An Interface Description Block with nanosecond timestamps."""
    if not 0 <= snaplen <= 0xFFFFFFFF or not 0 <= link_type <= 0xFFFF:
        raise ValueError("snap length and link type must fit their fields")
    return _block(_IDB, _IDB_BODY.pack(link_type, 0, snaplen)
                  + _options((_IF_NAME, _text(name)), (_IF_DESCRIPTION, _text(description)),
                             (_IF_TSRESOL, bytes([TSRESOL_NS]))))


def enhanced_packet(interface: int, ts_ns: int, data: bytes | memoryview, original_length: int,
                    comment: str = "") -> bytes:
    """An Enhanced Packet Block: ``data`` as captured, ``original_length`` as it was on the wire."""
    cap = len(data)
    if original_length < cap or not 0 <= ts_ns < 1 << 64 or original_length > 0xFFFFFFFF:
        raise ValueError("original length below the captured length, or a field out of range")
    return _block(_EPB, _EPB_BODY.pack(interface, ts_ns >> 32, ts_ns & 0xFFFFFFFF, cap, original_length)
                  + bytes(data) + bytes(_pad(cap)) + _options((_OPT_COMMENT, _text(comment))))


def enhanced_packet_size(captured: int, comment: str = "") -> int:
    """The size of :func:`enhanced_packet`'s block, without building it."""
    opts = len(_options((_OPT_COMMENT, _text(comment))))
    return 12 + _EPB_BODY.size + captured + _pad(captured) + opts


class Writer:
    """Writes blocks to ``out``, never past ``max_bytes`` in all; keeps the size and the sha256.

    A block that would not fit is not written at all (the file stays a valid pcapng ending on a
    whole block) and ``full`` turns true: the caller stops there and reports the bound. With
    ``reserve`` (a budget shared with other files: the node's disk), each block also takes its
    size from it first; when it cannot, nothing is written and ``starved`` turns true.
    """

    def __init__(self, out: BinaryIO, max_bytes: int, reserve: Callable[[int], bool] | None = None) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.out = out
        self.max_bytes = max_bytes
        self.reserve = reserve
        self.size = 0
        self.packets = 0
        self.snaplens: list[int] = []  # per described interface (0: none)
        self.full = False
        self.starved = False
        self._sha = hashlib.sha256()

    def fits(self, size: int) -> bool:
        """Would a block of ``size`` bytes still fit?"""
        return self.size + size <= self.max_bytes

    def write(self, block: bytes) -> bool:
        """Write one encoded block; False (and ``full`` or ``starved``) when it does not fit."""
        if not self.fits(len(block)):
            self.full = True
            return False
        if self.reserve is not None and not self.reserve(len(block)):
            self.starved = True
            return False
        self.out.write(block)
        self._sha.update(block)
        self.size += len(block)
        return True

    def section(self, application: str = "flowmap", comment: str = "") -> bool:
        """Start the file with its section header."""
        return self.write(section_header(application, comment))

    def interface(self, name: str, description: str, snaplen: int, link_type: int = LINKTYPE_ETHERNET) -> int | None:
        """Describe one interface; its id for :meth:`packet`, or None when it did not fit."""
        if not self.write(interface_description(name, description, snaplen, link_type)):
            return None
        self.snaplens.append(snaplen)
        return len(self.snaplens) - 1

    def packet(self, interface: int, ts_ns: int, data: bytes | memoryview, original_length: int,
               comment: str = "") -> bool:
        """Write one packet of a described interface; False when it did not fit.

        More captured bytes than the interface's snap length is a caller's bug (readers such as
        libpcap refuse the file from that packet on), so it raises rather than writes."""
        if not 0 <= interface < len(self.snaplens):
            raise ValueError(f"interface {interface} was not described")
        if 0 < self.snaplens[interface] < len(data):
            raise ValueError(f"{len(data)} bytes captured on an interface with snap length {self.snaplens[interface]}")
        if not self.write(enhanced_packet(interface, ts_ns, data, original_length, comment)):
            return False
        self.packets += 1
        return True

    def hexdigest(self) -> str:
        """The sha256 of every byte written so far."""
        return self._sha.hexdigest()
