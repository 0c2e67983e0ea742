"""DNS (RFC 1035) over UDP, and over TCP with its two-byte length prefix.

A message matches only when it parses completely: a sane header (opcode QUERY/IQUERY/STATUS/
NOTIFY/UPDATE, bounded section counts, at least one question), every name well formed
(labels <= 63, names <= 255, compression pointers pointing backwards), and every record fitting
the message exactly. mDNS (5353), LLMNR (5355) and NetBIOS-NS (137) reuse the format but are
other protocols: flows on those ports are not DNS.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from flowmap_dp.detectors._wire import be
from flowmap_dp.detectors.base import Detector, Flow, Verdict

_OTHER_PROTOCOL_PORTS = frozenset({5353, 5355, 137})
_TYPES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 10: "NULL", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA", 33: "SRV",
          41: "OPT", 43: "DS", 46: "RRSIG", 48: "DNSKEY", 64: "SVCB", 65: "HTTPS", 251: "IXFR", 252: "AXFR", 255: "ANY"}
_RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}
_MAX_ANSWERS = 64
_MAX_BLOBS = 8


def _name(msg: bytes, off: int) -> tuple[str, int] | None:
    """A (possibly compressed) name at ``off``: (dotted name, offset after it in place)."""
    labels: list[str] = []
    end = -1
    total = 0
    for _ in range(128):
        if off >= len(msg):
            return None
        n = msg[off]
        if n == 0:
            return ".".join(labels), (end if end >= 0 else off + 1)
        if n & 0xC0 == 0xC0:
            ptr = (be(msg, off, 2) or 0) & 0x3FFF
            if off + 2 > len(msg) or ptr >= off:
                return None  # only backwards pointers: no loops, no forward references
            if end < 0:
                end = off + 2
            off = ptr
            continue
        if n > 63 or off + 1 + n > len(msg):
            return None
        total += n + 1
        if total > 255:
            return None
        labels.append(msg[off + 1 : off + 1 + n].decode("ascii", "replace"))
        off += 1 + n
    return None


def parse(msg: bytes) -> dict[str, Any] | None:
    """The message as a dict (id, response, rcode, questions, answers, blobs), or None if malformed.

    ``blobs``: the raw data of the first TXT and NULL answers, (type, rdata), for the dns-tunnel
    scanner; they are not metadata."""
    if len(msg) < 12:
        return None
    ident, flags, qd, an, ns, ar = (be(msg, i, 2) or 0 for i in range(0, 12, 2))
    opcode = (flags >> 11) & 0xF
    if opcode not in (0, 1, 2, 4, 5) or not 1 <= qd <= 4 or an > 256 or ns > 256 or ar > 256:
        return None
    off = 12
    questions: list[dict[str, Any]] = []
    for _ in range(qd):
        r = _name(msg, off)
        if r is None:
            return None
        name, off = r
        qtype, qclass = be(msg, off, 2), be(msg, off + 2, 2)
        if qtype is None or qclass is None or qclass & 0x7FFF not in (1, 3, 4, 254, 255):
            return None
        questions.append({"name": name, "type": _TYPES.get(qtype, str(qtype))})
        off += 4
    answers: list[dict[str, Any]] = []
    blobs: list[tuple[str, bytes]] = []
    for i in range(an + ns + ar):
        r = _name(msg, off)
        if r is None:
            return None
        name, off = r
        rtype, ttl, rdlen = be(msg, off, 2), be(msg, off + 4, 4), be(msg, off + 8, 2)
        if rtype is None or ttl is None or rdlen is None or off + 10 + rdlen > len(msg):
            return None
        rdata_off = off + 10
        off = rdata_off + rdlen
        if i >= an:
            continue
        if rtype in (10, 16) and len(blobs) < _MAX_BLOBS:
            blobs.append((_TYPES[rtype], msg[rdata_off:off]))
        if len(answers) >= _MAX_ANSWERS:
            continue
        data: str | None = None
        if rtype == 1 and rdlen == 4:
            data = str(ipaddress.IPv4Address(msg[rdata_off:off]))
        elif rtype == 28 and rdlen == 16:
            data = str(ipaddress.IPv6Address(msg[rdata_off:off]))
        elif rtype in (2, 5, 12):
            target = _name(msg, rdata_off)
            data = target[0] if target else None
        if data is not None:
            answers.append({"name": name, "type": _TYPES.get(rtype, str(rtype)), "ttl": ttl, "data": data})
    if off != len(msg):
        return None
    return {"id": ident, "response": bool(flags & 0x8000), "rcode": _RCODES.get(flags & 0xF, str(flags & 0xF)),
            "questions": questions, "answers": answers, "blobs": blobs}


def messages(flow: Flow, from_client: bool) -> list[dict[str, Any]]:
    """Every parseable DNS message of one direction (datagrams, or length-prefixed over TCP)."""
    out: list[dict[str, Any]] = []
    if flow.l4 == "udp":
        for payload in flow.c2s if from_client else flow.s2c:
            if (m := parse(payload)) is not None:
                out.append(m)
        return out
    data, off = flow.stream(from_client), 0
    while off + 2 <= len(data) and len(out) < 32:
        n = be(data, off, 2) or 0
        if off + 2 + n > len(data) or (m := parse(data[off + 2 : off + 2 + n])) is None:
            break
        out.append(m)
        off += 2 + n
    return out


def detect(flow: Flow) -> Verdict:
    """MATCH when the first message of each side that spoke parses completely as DNS."""
    if flow.client_port in _OTHER_PROTOCOL_PORTS or flow.server_port in _OTHER_PROTOCOL_PORTS:
        return Verdict.NO
    if flow.l4 == "udp":
        first = [p[0] for p in (flow.c2s, flow.s2c) if p]
        if not first:
            return Verdict.MORE
        return Verdict.MATCH if all(parse(p) is not None for p in first) else Verdict.NO
    for from_client in (True, False):
        if messages(flow, from_client):
            return Verdict.MATCH
    if flow.l4 == "tcp":
        for from_client in (True, False):
            data = flow.stream(from_client)
            if len(data) == 1:
                return Verdict.MORE  # half a length prefix
            n = be(data, 0, 2)
            if n is not None and 12 <= n <= 65535 and len(data) < 2 + n:
                return Verdict.MORE  # a message still arriving
        return Verdict.NO if flow.c2s or flow.s2c else Verdict.MORE
    return Verdict.NO  # pragma: no cover - l4 is udp or tcp


def extract(flow: Flow) -> Mapping[str, Any]:
    """First question (qname, qtype), first response code, all questions and A/AAAA/CNAME/NS/PTR
    answers with their TTL (the node agent learns IP -> name from them)."""
    queries = messages(flow, True)
    responses = messages(flow, False)
    first_q = next((q for m in queries + responses for q in m["questions"]), None)
    meta: dict[str, Any] = {}
    if first_q:
        meta.update(qname=first_q["name"], qtype=first_q["type"])
    if responses:
        meta["rcode"] = responses[0]["rcode"]
    seen: list[dict[str, Any]] = []
    for m in queries + responses:
        for q in m["questions"]:
            if q not in seen and len(seen) < 16:
                seen.append(q)
    meta["questions"] = seen
    meta["answers"] = [a for m in responses for a in m["answers"]][:_MAX_ANSWERS]
    return {"dns": meta}


def settled(flow: Flow) -> bool:
    """Every query seen so far has its response."""
    asked = {m["id"] for m in messages(flow, True) if not m["response"]}
    answered = {m["id"] for m in messages(flow, False) if m["response"]}
    return bool(answered) and asked <= answered


DETECTOR = Detector(
    name="dns",
    l4=frozenset({"udp", "tcp"}),
    ports=frozenset({53}),
    max_packets=4,
    detect=detect,
    extract=extract,
    linger=12,
    settled=settled,
    new_exchange_after=1.0,
)
