"""Offline classification of a capture file: the live decode, session and inspector code, run
over pcap/pcapng records instead of a ring.

Offline, nothing expires on idle time (a capture's gaps say nothing about the sessions), the
table is effectively unbounded, and a TCP 5-tuple reused after a full close (FIN both ways, or
RST) starts a new flow, exactly as in the live table.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

from flowmap_dp.pcapfile import read_records
from flowmap_dp.detection import Inspector
from flowmap_dp.session import InspectorFactory, SessionDelta, SessionTable
from flowmap_dp.threats import Config, Watching, bind

OFFLINE_MAX_SESSIONS = 10_000_000  # bounded only to keep a hostile file from exhausting memory


def classify_file(path: str | Path, inspector_factory: InspectorFactory | None = None,
                  threats: Config = Config()) -> list[dict[str, Any]]:
    """One dict per flow of the capture at ``path``, in order of each flow's first packet; the
    threat detections ``threats`` leaves on, with its thresholds (``inspector_factory``, when
    given, makes the inspectors instead)."""
    if inspector_factory is None and threats != Config():
        inspector_factory = partial(Inspector, scanners=bind(threats))
    table = classify_table(path, inspector_factory)
    report = table.collect(0.0)
    Watching(threats).observe(report.time, report.sessions)
    return [flow_dict(d) for d in report.sessions]


def classify_table(path: str | Path, inspector_factory: InspectorFactory | None = None) -> SessionTable:
    """Run a capture through a fresh offline table and close every session; ``collect()`` is left
    to the caller (one delta per flow, plus the decode counters in ``health``)."""
    table = SessionTable(OFFLINE_MAX_SESSIONS, timeouts=None, inspector_factory=inspector_factory)
    feed_frames(((rec.data, rec.link, rec.wire_len, rec.ts) for rec in read_records(path)), table)
    table.close_all()
    return table


def feed_frames(frames: Iterable[tuple[bytes, int, int, float]], table: SessionTable) -> None:
    """Capture-file records — (frame, link type, length on the wire, timestamp) — into ``table``,
    one at a time: the reference of ``CompiledTable.feed_frames``."""
    count, decode, packet = table.stats.count, table.fragments.decode, table.packet
    for frame, link, wire_len, ts in frames:
        out = decode(frame, 0, len(frame), link, 0, wire_len, ts)
        count(out)
        if type(out) is not str:
            packet(out, ts, frame)  # type: ignore[arg-type]


def flow_dict(d: SessionDelta) -> dict[str, Any]:
    """The JSON shape of one flow (``flowmap dp classify --json``)."""
    out: dict[str, Any] = {
        "l4": d.l4,
        "client": d.client_text,
        "server": d.server_text,
    }
    if d.vlan:
        out["vlan"] = d.vlan
    out.update(
        app=d.app,
        bytes_c2s=d.bytes_c2s,
        bytes_s2c=d.bytes_s2c,
        packets_c2s=d.packets_c2s,
        packets_s2c=d.packets_s2c,
        first_seen=d.first_seen,
        last_seen=d.last_seen,
        state=d.state,
        metadata=dict(d.metadata or {}),
        threats=[asdict(t) for t in d.threats],
    )
    return out
