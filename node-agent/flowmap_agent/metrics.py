"""What the agent exports at ``/metrics``: its own series, in one registry, and the dp's health.

The series are module-level (one agent a process); the collectors of a part that a test makes
several of (the dp socket's, Protect mode's, the captures') go to the registry the agent is given.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from flowmap_dp import wire_pb2

REGISTRY = CollectorRegistry(auto_describe=True)
REPORT_SECONDS = Histogram("flowmap_agent_report_seconds", "Latency of one report call to the operator.",
                           registry=REGISTRY)
REPORTS = Counter("flowmap_agent_reports", "Report calls by result.", ("result",), registry=REGISTRY)
RECONNECTS = Counter("flowmap_agent_reconnects", "New connections to the operator.", registry=REGISTRY)
DP_RESTARTS = Counter("flowmap_agent_dp_restarts", "dp restarts seen (a new run id): their last interval is lost.",
                      registry=REGISTRY)
NAT_SESSIONS = Counter("flowmap_agent_nat_sessions",
                       "Source-NATed sessions of the node: translated back to their pod, or dropped as the kernel's "
                       "plumbing of a session counted where it entered.", ("outcome",), registry=REGISTRY)
REPORT_GAPS = Counter("flowmap_agent_dp_report_gaps",
                      "dp reports that never reached the agent (a gap in their sequence).", registry=REGISTRY)
UNCLEAN = Counter("flowmap_agent_unclean_restarts",
                  "Starts after a run that did not stop cleanly (with the dp a child, it died too: its last "
                  "interval and what passed until the next dp captured are lost).", registry=REGISTRY)
LOST = Counter("flowmap_agent_lost_sessions", "Session records lost between the dp and the operator.",
               registry=REGISTRY)
UNACKED = Gauge("flowmap_agent_unacked_edges", "Edge deltas held until the operator acknowledges them.",
                registry=REGISTRY)
LAG = Gauge("flowmap_agent_report_lag_seconds", "Age of the oldest unacknowledged batch.", registry=REGISTRY)
NORMALISED = Counter("flowmap_agent_normalised", "Metadata of deltas and names normalised or dropped before a batch "
                     "(flowmap_api.validity), by field and reason: the counts still go.", ("field", "reason"),
                     registry=REGISTRY)
QUARANTINED = Counter("flowmap_agent_quarantined_edges",
                      "Edge deltas no operator can count (an address that is not one, a port above 65535...), set "
                      "apart before a batch (agent) or named by the operator's refusal (operator); each is counted "
                      "in lost_deltas too.", ("by",), registry=REGISTRY)
SPLITS = Counter("flowmap_agent_split_batches",
                 "Batches over the contract's limits (from an older agent's state), refused whole and cut down.",
                 registry=REGISTRY)


class DpHealth:
    """The dp's cumulative health counters, summed over its workers, exported as-is."""

    def __init__(self) -> None:
        self.by_worker: dict[int, wire_pb2.Health] = {}

    def collect(self) -> Iterator[Metric]:
        def total(field: str) -> float:
            return float(sum(getattr(h, field) for h in self.by_worker.values()))

        for field, help_text in (("packets", "Frames taken from the rings."),
                                 ("kernel_drops", "Frames the kernel dropped: ring full."),
                                 ("evictions", "Sessions evicted at the table bound."),
                                 ("lost_reports", "dp reports not handed to the agent.")):
            yield CounterMetricFamily(f"flowmap_agent_dp_{field}", help_text, value=total(field))
        malformed = CounterMetricFamily("flowmap_agent_dp_malformed", "Frames refused by reason.",
                                        labels=("reason",))
        reasons: dict[str, int] = {}
        for h in self.by_worker.values():
            for reason, n in h.malformed.items():
                reasons[reason] = reasons.get(reason, 0) + n
        for reason, n in sorted(reasons.items()):
            malformed.add_metric((reason,), float(n))
        yield malformed
        yield GaugeMetricFamily("flowmap_agent_dp_sessions", "Sessions in the dp's tables.", value=total("table_size"))
        attached = {i for h in self.by_worker.values() for i in h.interfaces}
        yield GaugeMetricFamily("flowmap_agent_dp_interfaces", "Interfaces the dp captures on.", value=len(attached))
