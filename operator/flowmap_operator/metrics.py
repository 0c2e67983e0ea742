"""The operator's Prometheus metrics: per-edge counters (capped) and its own health."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

# A "_created" series beside every edge counter doubles /metrics for nothing Prometheus needs.
disable_created_metrics()

REGISTRY = CollectorRegistry(auto_describe=True)

EDGE_LABELS = ("client_group", "client_namespace", "server_group", "server_namespace", "port", "protocol", "app",
               "direction")
EDGE_BYTES = Counter("flowmap_edge_bytes", "Bytes between two groups (IP length), counted once per edge.",
                     EDGE_LABELS, registry=REGISTRY)
EDGE_PACKETS = Counter("flowmap_edge_packets", "Packets between two groups.", EDGE_LABELS, registry=REGISTRY)
EDGE_SESSIONS = Counter("flowmap_edge_sessions", "Sessions opened between two groups.", EDGE_LABELS[:-1],
                        registry=REGISTRY)
EDGE_SERIES_OVERFLOW = Counter("flowmap_operator_edge_series_overflow",
                               "Edge samples folded into the 'other' series because of the series cap.",
                               registry=REGISTRY)

REPORTS = Counter("flowmap_operator_reports", "Report batches by outcome.", ("outcome",), registry=REGISTRY)
LOST_DELTAS = Counter("flowmap_operator_lost_deltas",
                      "Deltas agents report they could not keep (a crash, the dp unable to hand over).",
                      ("node",), registry=REGISTRY)
REPORT_EDGES = Counter("flowmap_operator_report_edges", "Edge deltas by what became of them.", ("outcome",),
                       registry=REGISTRY)
BATCH_LAG = Histogram("flowmap_operator_batch_lag_seconds", "Time from an agent sending a batch to its arrival.",
                      registry=REGISTRY, buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60))
UNACKED_BATCHES = Gauge("flowmap_operator_unacked_batches", "Batches received but not yet written.",
                        registry=REGISTRY)
API_WRITES = Counter("flowmap_operator_api_writes", "Writes to the API server.", ("kind", "verb", "result"),
                     registry=REGISTRY)
API_CONFLICTS = Counter("flowmap_operator_api_conflicts", "Status updates refused for a stale resourceVersion.",
                        registry=REGISTRY)
API_THROTTLED = Counter("flowmap_operator_api_throttled", "API answers 429 Too Many Requests.", registry=REGISTRY)
API_WRITE_SECONDS = Histogram("flowmap_operator_api_write_seconds", "Latency of one API write.", registry=REGISTRY)
FLUSH_SECONDS = Histogram("flowmap_operator_flush_seconds", "Latency of one Connection status update.",
                          registry=REGISTRY)
DIRTY_OBJECTS = Gauge("flowmap_operator_dirty_objects", "Connections with counts not yet written.",
                      registry=REGISTRY)
CONNECTION_OVERFLOW = Counter("flowmap_operator_connection_overflow",
                              "Edge deltas dropped because the Connection cap is reached.", registry=REGISTRY)
RESOLUTION_MISSES = Counter("flowmap_operator_resolution_misses", "Addresses resolved to 'external'.",
                            registry=REGISTRY)
POLICY_VIOLATIONS = Counter("flowmap_policy_violations",
                            "Sessions no policy rule allows: let through (Violation) or blocked on the node (Denied).",
                            ("client_group", "client_namespace", "server_group", "server_namespace", "port",
                             "protocol", "action"), registry=REGISTRY)
POLICY_EVENTS = Counter("flowmap_operator_policy_events", "Kubernetes Events raised for connections no rule allows.",
                        ("reason",), registry=REGISTRY)
POLICY_PODS = Gauge("flowmap_operator_policy_pods", "Protected pods in the policy streamed to a node's agent.",
                    ("node",), registry=REGISTRY)
POLICY_WATCHERS = Gauge("flowmap_operator_policy_watchers", "Agents taking policy from this replica.",
                        registry=REGISTRY)
LEADER = Gauge("flowmap_operator_leader", "1 when this replica applies reports.", registry=REGISTRY)


class EdgeSeries:
    """Per-edge counters with a cap on distinct label sets; the rest goes to one 'other' series."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.seen: set[tuple[str, ...]] = set()

    def labels(self, values: tuple[str, ...]) -> tuple[str, ...]:
        if values in self.seen:
            return values
        if len(self.seen) < self.cap:
            self.seen.add(values)
            return values
        EDGE_SERIES_OVERFLOW.inc()
        return ("other",) * len(values)

    def add(self, client: tuple[str, str], server: tuple[str, str], port: int, protocol: str, app: str,
            bytes_c2s: int, bytes_s2c: int, packets_c2s: int, packets_s2c: int, sessions: int) -> None:
        base = (client[0], client[1], server[0], server[1], str(port), protocol, app)
        for direction, nbytes, npackets in (("client_to_server", bytes_c2s, packets_c2s),
                                            ("server_to_client", bytes_s2c, packets_s2c)):
            values = self.labels((*base, direction))
            if nbytes:
                EDGE_BYTES.labels(*values).inc(nbytes)
            if npackets:
                EDGE_PACKETS.labels(*values).inc(npackets)
        if sessions:
            EDGE_SESSIONS.labels(*self.labels((*base, "client_to_server"))[:-1]).inc(sessions)
