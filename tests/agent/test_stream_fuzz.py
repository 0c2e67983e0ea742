"""Hostile bytes on the dp socket: whatever a connection sends, only a counted WireError leaves
the reader's framing, what it holds stays bounded, intact streams give back exactly their
reports, and every report that parses goes through the agent's own path (positions, aggregation,
the shared validity, the outbox) without an exception. The same loop at 1,000,000 streams is
``benchmarks/socket_fuzz.py``."""

from __future__ import annotations

import logging
from pathlib import Path

from prometheus_client import CollectorRegistry

from flowmap_agent.receiving import admissible
from flowmap_agent.running import Agent
from flowmap_agent.settings import Settings
from flowmap_dp.framing import HEADER, MAX_FRAME, Stream, WireError
from tests.dp.synth import wire_streams

REASONS = {"magic", "version", "length", "payload"}


def consume(chunks: list[bytes], agent: Agent) -> tuple[int, str | None]:
    """Feed one connection's reads to the reader's framing and the reports to the agent: (reports
    parsed, the reason the connection would be closed)."""
    stream, parsed = Stream(), 0
    for chunk in chunks:
        try:
            got = stream.feed(chunk)
        except WireError as exc:
            return parsed, exc.reason
        assert stream.buffered <= HEADER.size + MAX_FRAME + len(chunk)
        parsed += len(got)
        agent.intake.record(admissible(got)[0])
    return parsed, None


def test_hostile_streams_never_escape_the_reader_nor_the_agent(tmp_path: Path) -> None:
    logging.getLogger("flowmap.agent").setLevel(logging.CRITICAL)  # gaps and set-apart edges are expected here
    try:
        agent = Agent(Settings(node="node-a", state_file=str(tmp_path / "state")), registry=CollectorRegistry())
        closed: dict[str, int] = {}
        intact = 0
        for chunks, reports in wire_streams(3_000, seed=11):
            parsed, reason = consume(chunks, agent)
            if reason is not None:
                assert reason in REASONS
                closed[reason] = closed.get(reason, 0) + 1
            if reports is not None:
                intact += 1
                assert reason is None and parsed == reports
        agent.intake.conntrack.shutdown()
    finally:
        logging.getLogger("flowmap.agent").setLevel(logging.NOTSET)
    assert intact > 300 and set(closed) == REASONS, closed
    assert agent.outbox.pending and agent.outbox.lost_deltas  # reports were taken, bad edges set apart
