"""Edge deltas no operator can count, set apart: each counted, and its edge logged once.

The agent sets such a delta apart before a batch (flowmap_agent.aggregation.admit) and the
operator names one in a refusal (flowmap_agent.errors.RefusedEdge); either way the count and the
log line are the same, and the delta is counted in ``lost_deltas`` too (by the outbox).
"""

from __future__ import annotations

import logging

from flowmap_agent.deltas import EdgeKey, edge_key
from flowmap_agent.metrics import QUARANTINED
from flowmap_api import report_pb2 as pb

log = logging.getLogger("flowmap.agent")
MAX_QUARANTINE_LOG = 4096  # edges whose quarantine was logged (each once), remembered


class Quarantine:
    """Counts what is set apart; remembers which edges it logged, up to a bound."""

    def __init__(self) -> None:
        self.logged: set[EdgeKey] = set()

    def add(self, d: pb.EdgeDelta, reason: str, *, by: str) -> None:
        """Count an edge delta no operator can count; log it the first time its edge is seen so."""
        QUARANTINED.labels(by).inc()
        key = edge_key(d)
        if key in self.logged or len(self.logged) >= MAX_QUARANTINE_LOG:
            return
        self.logged.add(key)
        protocol = pb.Protocol.Name(d.protocol) if d.protocol in pb.Protocol.values() else str(d.protocol)
        log.error("edge %r -> %r port %d %s cannot be counted (%s): its deltas are set apart and counted as lost "
                  "(%d bytes this time); logged once", d.client.ip[:64], d.server.ip[:64], d.server.port, protocol,
                  reason[:200], d.bytes_c2s + d.bytes_s2c)
