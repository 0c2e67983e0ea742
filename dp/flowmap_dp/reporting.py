"""Session table deltas -> wire reports (pure): one interval's :class:`~flowmap_dp.session.Report`
as ``wire_pb2.Report`` parts, each far below the longest frame, with the interval's DNS answers,
threat hits and health.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from flowmap_dp import wire_pb2
from flowmap_dp.session import Report, SessionDelta

PART_BYTES = 4 << 20  # a part's estimated size at most: a quarter of flowmap_dp.framing.MAX_FRAME
RECORD_BYTES = 96  # a session record without metadata, with room to spare (about 70 on the wire)


def _ns(t: float) -> int:
    return int(t * 1e9)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str, sort_keys=True)


def _flat(metadata: Mapping[str, Any]) -> dict[str, str]:
    """Detectors nest per protocol: {"http": {"host": ...}} -> {"http.host": ...}; lists as JSON."""
    out: dict[str, str] = {}
    for k, v in metadata.items():
        if isinstance(v, dict):
            for k2, v2 in v.items():
                out[f"{k}.{k2}"] = _text(v2)
        else:
            out[k] = _text(v)
    return out


def _utf8(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "replace"))


def add_session(report: wire_pb2.Report, d: SessionDelta, metadata: dict[str, str] | None = None) -> wire_pb2.Session:
    """Append one table delta to ``report`` as a wire record (``metadata``: its flattened
    metadata, when the caller has it already).

    Built in place with ``add()`` (constructing a detached message and copying it into the
    report costs about twice as much; at 100k sessions per interval that matters).
    """
    rec: wire_pb2.Session = report.sessions.add(
        ip_proto=d.proto, client_ip=d.client, client_port=d.client_port, server_ip=d.server,
        server_port=d.server_port, vlan=d.vlan, new=d.new, opened=d.opened, closed=d.closed,
        close_reason=d.end_reason,
        app=d.app if d.app_decided or d.closed else "", bytes_c2s=d.bytes_c2s, bytes_s2c=d.bytes_s2c,
        packets_c2s=d.packets_c2s, packets_s2c=d.packets_s2c, first_seen_ns=int(d.first_seen * 1e9),
        last_seen_ns=int(d.last_seen * 1e9),
    )
    if metadata is None and d.metadata:
        metadata = _flat(d.metadata)
    if metadata:
        rec.metadata.update(metadata)
    return rec


def dns_answers(d: SessionDelta) -> list[wire_pb2.DnsAnswer]:
    """The answers in a decided DNS session's metadata (``{"dns": {"answers": [...]}}``, each
    ``{"name", "type", "ttl", "data"}``: an address for A/AAAA, a name for CNAME/NS/PTR)."""
    meta = d.metadata or {}
    dns = meta.get("dns")
    answers = dns.get("answers") if isinstance(dns, dict) else meta.get("answers")
    out: list[wire_pb2.DnsAnswer] = []
    for a in answers if isinstance(answers, list) else []:
        if not isinstance(a, dict) or not a.get("data"):
            continue
        kind, data = str(a.get("type", "")), a["data"]
        ans = wire_pb2.DnsAnswer(name=str(a.get("name", "")), type=kind, ttl=int(a.get("ttl") or 0),
                                 client_ip=d.client, server_ip=d.server)
        try:
            if kind in ("A", "AAAA"):
                ans.address = data if isinstance(data, bytes) else ipaddress.ip_address(str(data)).packed
            else:
                ans.target = str(data)
        except ValueError:
            continue  # a detector bug must not stop the report
        out.append(ans)
    return out


def build_reports(rep: Report, *, run_id: int, worker: int, workers: int, sequence: int, start: float,
                  health: wire_pb2.Health, part_size: int) -> list[wire_pb2.Report]:
    """One interval's table report as one or more wire reports (health on the last part)."""
    return list(iter_reports(rep, run_id=run_id, worker=worker, workers=workers, sequence=sequence, start=start,
                             health=health, part_size=part_size))


@dataclass
class _Part:
    """Which records, answers and hits one wire part of an interval's report holds."""

    first: int  # index of its first session record
    records: int = 0
    size: int = 0  # estimated bytes
    dns: list[wire_pb2.DnsAnswer] = field(default_factory=list)
    threats: list[wire_pb2.ThreatHit] = field(default_factory=list)

    def fits(self, size: int) -> bool:
        """Room for ``size`` more bytes (an empty part takes anything: one record is never too big)."""
        return self.size + size <= PART_BYTES or not self.size

    def add(self, size: int, record: bool = True) -> None:
        self.records += record
        self.size += size


def iter_reports(rep: Report, *, run_id: int, worker: int, workers: int, sequence: int, start: float,
                 health: wire_pb2.Health, part_size: int) -> Iterator[wire_pb2.Report]:
    """Like :func:`build_reports`, one part at a time: the caller offers each part before the
    next is built, so a large interval never holds all its wire records at once.

    A part holds at most ``part_size`` session records and, by estimate, at most ``PART_BYTES``
    (a quarter of ``MAX_FRAME``: whatever the detectors' metadata, no frame is too long for the
    reader); the interval's DNS answers and threat hits follow the last records, in parts of their
    own when they do not fit.
    """
    dns: list[wire_pb2.DnsAnswer] = []
    threats: list[wire_pb2.ThreatHit] = []
    items: list[tuple[SessionDelta, dict[str, str] | None]] = []
    parts = [_Part(0)]
    for d in rep.sessions:
        if d.app_decided and d.app == "dns":
            dns += dns_answers(d)
        for t in d.threats:
            threats.append(wire_pb2.ThreatHit(
                threat=t.name, ip_proto=d.proto, client_ip=d.client, client_port=d.client_port,
                server_ip=d.server, server_port=d.server_port, app=d.app, snippet=t.snippet,
                seen_ns=_ns(d.last_seen), where=t.where))
        meta = _flat(d.metadata) if d.metadata else None
        size = RECORD_BYTES + (sum(_utf8(k) + _utf8(v) + 8 for k, v in meta.items()) if meta else 0)
        if parts[-1].records >= part_size or not parts[-1].fits(size):
            parts.append(_Part(len(items)))
        items.append((d, meta))
        parts[-1].add(size)
    for answer in dns:
        if not parts[-1].fits(size := answer.ByteSize() + 8):
            parts.append(_Part(len(items)))
        parts[-1].dns.append(answer)
        parts[-1].add(size, record=False)
    for hit in threats:
        if not parts[-1].fits(size := hit.ByteSize() + 8):
            parts.append(_Part(len(items)))
        parts[-1].threats.append(hit)
        parts[-1].add(size, record=False)
    for i, part in enumerate(parts):
        r = wire_pb2.Report(run_id=run_id, worker=worker, workers=workers, sequence=sequence, part=i,
                            parts=len(parts), start_ns=_ns(start), end_ns=_ns(rep.time))
        for d, meta in items[part.first : part.first + part.records]:
            add_session(r, d, meta)
        r.dns.extend(part.dns)
        r.threats.extend(part.threats)
        if i == len(parts) - 1:
            r.health.CopyFrom(health)
        yield r
