"""DHCP (RFC 2131) over UDP: a BOOTP header (op 1/2, Ethernet-like hardware address length) with
the DHCP magic cookie at offset 236 and a well-formed option list containing a message type
(option 53). DHCPv6 is a different protocol and does not match.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flowmap_dp.detectors._wire import text
from flowmap_dp.detectors.base import Detector, Flow, Verdict

_COOKIE = b"\x63\x82\x53\x63"
_TYPES = {1: "DISCOVER", 2: "OFFER", 3: "REQUEST", 4: "DECLINE", 5: "ACK", 6: "NAK", 7: "RELEASE", 8: "INFORM"}


def options(msg: bytes) -> dict[int, bytes] | None:
    """The DHCP options of one message, or None when it is not a DHCP message."""
    if len(msg) < 240 or msg[0] not in (1, 2) or msg[2] == 0 or msg[2] > 16 or msg[3] > 16:
        return None
    if msg[236:240] != _COOKIE:
        return None
    out: dict[int, bytes] = {}
    off = 240
    while off < len(msg):
        code = msg[off]
        if code == 255:
            break
        if code == 0:
            off += 1
            continue
        if off + 2 > len(msg) or off + 2 + msg[off + 1] > len(msg):
            return None
        out.setdefault(code, msg[off + 2 : off + 2 + msg[off + 1]])
        off += 2 + msg[off + 1]
    else:
        return None  # no END option
    mtype = out.get(53)
    if mtype is None or len(mtype) != 1 or not 1 <= mtype[0] <= 18:
        return None
    return out


def detect(flow: Flow) -> Verdict:
    """MATCH when the first datagram of either side is a DHCP message."""
    first = [p[0] for p in (flow.c2s, flow.s2c) if p]
    if any(options(p) is not None for p in first):
        return Verdict.MATCH
    return Verdict.NO if first else Verdict.MORE


def extract(flow: Flow) -> Mapping[str, Any]:
    """Message types seen, and the client's host name and vendor class when it gives them."""
    meta: dict[str, Any] = {"messages": []}
    for payload in [*flow.c2s, *flow.s2c][:16]:
        opts = options(payload)
        if opts is None:
            continue
        meta["messages"].append(_TYPES.get(opts[53][0], str(opts[53][0])))
        if 12 in opts:
            meta.setdefault("hostname", text(opts[12], 64))
        if 60 in opts:
            meta.setdefault("vendor_class", text(opts[60], 64))
    return {"dhcp": meta}


DETECTOR = Detector(
    name="dhcp",
    l4=frozenset({"udp"}),
    ports=frozenset({67, 68}),
    max_packets=2,
    detect=detect,
    extract=extract,
    linger=4,
)
