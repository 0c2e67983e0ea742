"""An edge delta's key and the one merge of two deltas of the same edge (pure).

The outbox merges a new delta into one that waits (and a batch's surplus back into a newer one);
the aggregation folds one report's sessions into an edge's sums by the same rules, taken from here:
counters add and stop at their fields' widths, the first time seen is the earliest known (0 is
unknown), the last the latest, applications are kept once each in the order they came, at most
``MAX_THREATS`` threat hits are kept, and a gauge takes the latest value. The latest verdict wins,
except over a threat block (``denied_for``): a session reset for a threat stays shown so until the
operator has it, whatever later sessions of the edge were let through.
"""

from __future__ import annotations

from flowmap_api import report_pb2 as pb
from flowmap_api.validity import MAX_THREATS  # threat hits one edge delta carries: the contract's

U64, U32 = (1 << 64) - 1, (1 << 32) - 1

# What identifies one agent edge; counters of deltas with the same key add up.
EdgeKey = tuple[str, str, int, int, str, bool, bool]  # client ip, server ip, server port, protocol,
#                                                      client pod, client local, server local


def edge_key(d: pb.EdgeDelta) -> EdgeKey:
    return (d.client.ip, d.server.ip, d.server.port, d.protocol, d.client.pod, d.client.local, d.server.local)


def earliest(a: int, b: int) -> int:
    """The earlier of two first-seen times, where 0 is not known."""
    return b if b and (not a or b < a) else a


def merge(into: pb.EdgeDelta, d: pb.EdgeDelta) -> None:
    """Add ``d`` to ``into`` (same edge key): counters add, times widen, gauges take the latest."""
    # At the fields' widths, sums stop (a flood held for hours while the operator is away must not
    # stop the agent); the shared validity refuses counters that large, so the edge is set apart.
    into.bytes_c2s = min(into.bytes_c2s + d.bytes_c2s, U64)
    into.bytes_s2c = min(into.bytes_s2c + d.bytes_s2c, U64)
    into.packets_c2s = min(into.packets_c2s + d.packets_c2s, U64)
    into.packets_s2c = min(into.packets_s2c + d.packets_s2c, U64)
    into.sessions_opened = min(into.sessions_opened + d.sessions_opened, U32)
    into.sessions_closed = min(into.sessions_closed + d.sessions_closed, U32)
    into.sessions_active = d.sessions_active
    into.first_seen_unix_ms = earliest(into.first_seen_unix_ms, d.first_seen_unix_ms)
    into.last_seen_unix_ms = max(into.last_seen_unix_ms, d.last_seen_unix_ms)
    for app in d.apps:
        if app not in into.apps:
            into.apps.append(app)
    into.threats.extend(d.threats[:max(0, MAX_THREATS - len(into.threats))])
    if d.verdict and (d.denied_for or not into.denied_for):
        into.verdict, into.denied_for = d.verdict, d.denied_for
