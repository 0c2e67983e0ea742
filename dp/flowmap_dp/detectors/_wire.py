"""Bounds-checked readers shared by the detectors (private: not a detector module).

Every reader returns ``None`` instead of raising when the bytes run out, so a detector written
with them cannot be crashed by a short or hostile payload.
"""

from __future__ import annotations

import string

_PRINTABLE = frozenset(string.printable.encode())


def u8(buf: bytes, off: int) -> int | None:
    """The byte at ``off``, or None past the end."""
    return buf[off] if 0 <= off < len(buf) else None


def be(buf: bytes, off: int, size: int) -> int | None:
    """Big-endian unsigned integer of ``size`` bytes at ``off``, or None past the end."""
    if off < 0 or off + size > len(buf):
        return None
    return int.from_bytes(buf[off : off + size], "big")


def le(buf: bytes, off: int, size: int) -> int | None:
    """Little-endian unsigned integer of ``size`` bytes at ``off``, or None past the end."""
    if off < 0 or off + size > len(buf):
        return None
    return int.from_bytes(buf[off : off + size], "little")


def cstring(buf: bytes, off: int, limit: int = 256) -> tuple[bytes, int] | None:
    """A NUL-terminated string at ``off`` (at most ``limit`` bytes): (value, offset after NUL)."""
    end = buf.find(b"\x00", off, off + limit + 1)
    if end < 0:
        return None
    return buf[off:end], end + 1


def printable(data: bytes) -> bool:
    """True when every byte is printable ASCII (tab, CR and LF included)."""
    return all(b in _PRINTABLE for b in data)


def text(data: bytes, limit: int = 256) -> str:
    """Bytes as a bounded, lossless-enough string for metadata."""
    return data[:limit].decode("utf-8", "replace")
