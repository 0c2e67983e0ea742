"""TFTP (RFC 1350, options RFC 2347–2349, 7440) over UDP.

A read/write request: opcode 1/2, a printable non-empty file name, a transfer mode
(netascii/octet/mail) and optional name/value options, all NUL-terminated and filling the
datagram. The transfer itself runs between ephemeral ports, so it is recognised too: an option
acknowledgement (opcode 6) listing known options, or DATA block n (4 + up to 65464 bytes) from one
side answered by ACK of block n or n-1 (4 bytes) from the other, or an ERROR (opcode 5) with a
known code and a printable message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flowmap_dp.detectors._wire import be, printable, text
from flowmap_dp.detectors.base import Detector, Flow, Verdict

_MODES = frozenset({b"netascii", b"octet", b"mail"})
_OPTIONS = frozenset({b"blksize", b"tsize", b"timeout", b"windowsize", b"multicast", b"utimeout"})


def _strings(p: bytes) -> list[bytes] | None:
    if not p.endswith(b"\x00"):
        return None
    parts = p[2:-1].split(b"\x00")
    return parts if all(printable(s) for s in parts) else None


def request(p: bytes) -> dict[str, Any] | None:
    """The RRQ/WRQ in ``p``, or None."""
    if be(p, 0, 2) not in (1, 2):
        return None
    parts = _strings(p)
    if not parts or len(parts) % 2 or not parts[0] or parts[1].lower() not in _MODES:
        return None
    if any(name.lower() not in _OPTIONS for name in parts[2::2]):
        return None
    return {"op": "read" if p[1] == 1 else "write", "file": text(parts[0]), "mode": parts[1].lower().decode()}


def _oack(p: bytes) -> bool:
    parts = _strings(p) if be(p, 0, 2) == 6 else None
    if not parts or len(parts) % 2:
        return False
    return all(n.lower() in _OPTIONS and v.isdigit() for n, v in zip(parts[::2], parts[1::2], strict=True))


def _error(p: bytes) -> bool:
    code = be(p, 2, 2)
    return be(p, 0, 2) == 5 and code is not None and code <= 8 and p.endswith(b"\x00") and printable(p[4:-1])


def _ack(p: bytes) -> int | None:
    # Some stacks pad short datagrams with zeros; the ACK itself is 4 bytes.
    if be(p, 0, 2) == 4 and len(p) >= 4 and not any(p[4:]):
        return be(p, 2, 2)
    return None


def _data(p: bytes) -> int | None:
    return be(p, 2, 2) if be(p, 0, 2) == 3 and 4 <= len(p) <= 65468 else None


def detect(flow: Flow) -> Verdict:
    """MATCH on a request, an option acknowledgement, an error, or a DATA/ACK exchange."""
    first = [p[0] for p in (flow.c2s, flow.s2c) if p]
    if not first:
        return Verdict.MORE
    if any(request(p) or _oack(p) or _error(p) for p in first):
        return Verdict.MATCH
    for data_side, ack_side in ((flow.c2s, flow.s2c), (flow.s2c, flow.c2s)):
        blocks = {b for p in data_side[:3] if (b := _data(p)) is not None}
        acks = {a for p in ack_side[:3] if (a := _ack(p)) is not None}
        if any(a in blocks or a + 1 in blocks for a in acks):
            return Verdict.MATCH
    looks = all(_data(p) is not None or _ack(p) is not None for p in first)
    return Verdict.MORE if looks and flow.packets < 4 else Verdict.NO


def extract(flow: Flow) -> Mapping[str, Any]:
    """The request (operation, file, mode) when the flow carries it."""
    for p in [*flow.c2s[:1], *flow.s2c[:1]]:
        if (req := request(p)) is not None:
            return {"tftp": req}
    return {"tftp": {}}


DETECTOR = Detector(
    name="tftp",
    l4=frozenset({"udp"}),
    ports=frozenset({69}),
    answers_from_new_port=True,
    max_packets=4,
    detect=detect,
    extract=extract,
)
