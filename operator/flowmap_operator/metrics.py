"""The operator's Prometheus metrics: what the cluster's traffic did, and the operator's own health.

Two families of names, on purpose. What the traffic did is named after its subject, whichever
component counts it, since that is what a user queries: ``flowmap_edge_*`` (per edge, capped)
and ``flowmap_policy_violations_total``. How a component fares is named after the component:
``flowmap_operator_*`` here, ``flowmap_agent_*`` and ``flowmap_dp_*`` on the nodes.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from flowmap_operator import highwater
from flowmap_operator.highwater import EdgeTotals
from flowmap_operator.ledger import Counters, EdgeKey
from flowmap_operator.threats import severity
from flowmap_operator.topology import Topology, app_label

# A "_created" series beside every counter doubles /metrics for nothing Prometheus needs.
disable_created_metrics()

REGISTRY = CollectorRegistry(auto_describe=True)

REPORTS = Counter("flowmap_operator_reports", "Report batches by outcome.", ("outcome",), registry=REGISTRY)
LOST_DELTAS = Counter("flowmap_operator_lost_deltas",
                      "Deltas agents report they could not keep (a crash, the dp unable to hand over).",
                      ("node",), registry=REGISTRY)
DEFERRALS = Counter("flowmap_operator_report_deferrals",
                    "Batches refused for a moment (UNAVAILABLE, resent by the agent) because they name an address "
                    "inside the node's pod range that no known pod or node holds yet, by that node.", ("node",),
                    registry=REGISTRY)
REPORT_EDGES = Counter("flowmap_operator_report_edges", "Edge deltas by what became of them.", ("outcome",),
                       registry=REGISTRY)
BATCH_LAG = Histogram("flowmap_operator_batch_lag_seconds", "Time from an agent sending a batch to its arrival.",
                      registry=REGISTRY, buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60))
UNACKED_BATCHES = Gauge("flowmap_operator_unacked_batches", "Batches received but not yet written.",
                        registry=REGISTRY)
API_WRITES = Counter("flowmap_operator_api_writes", "Writes to the API server.", ("kind", "verb", "result"),
                     registry=REGISTRY)
WRITE_BUDGET = Gauge("flowmap_operator_write_budget", "API writes per second allowed now (between "
                     "FLOWMAP_OPERATOR_WRITE_BUDGET and FLOWMAP_OPERATOR_WRITE_BUDGET_MAX).",
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
THREAT_EVENTS = Counter("flowmap_operator_threat_events", "Kubernetes Events raised on Groups for threats "
                        "(at most one per Group and threat name every 10 minutes).", ["threat"], registry=REGISTRY)
POLICY_EVENTS = Counter("flowmap_operator_policy_events", "Kubernetes Events raised for connections no rule allows.",
                        ("reason",), registry=REGISTRY)
POLICY_PODS = Gauge("flowmap_operator_policy_pods", "Protected pods in the policy streamed to a node's agent.",
                    ("node",), registry=REGISTRY)
POLICY_WATCHERS = Gauge("flowmap_operator_policy_watchers", "Agents taking policy from this replica.",
                        registry=REGISTRY)
LEADER = Gauge("flowmap_operator_leader", "1 when this replica applies reports.", registry=REGISTRY)


EDGE_LABELS = ("client_group", "client_namespace", "server_group", "server_namespace", "port", "protocol", "app",
               "direction")
EDGE_FAMILIES = (("flowmap_edge_bytes", "Bytes between two groups (IP length), counted once per edge, as of the "
                  "last checkpoint: the Connection's status.bytes once written.", EDGE_LABELS),
                 ("flowmap_edge_packets", "Packets between two groups, as of the last checkpoint: the Connection's "
                  "status.packets once written.", EDGE_LABELS),
                 ("flowmap_edge_sessions", "Sessions opened between two groups, as of the last checkpoint: the "
                  "Connection's status.sessions.total once written.", EDGE_LABELS[:-1]))
SAMPLE_NAMES = tuple(f"{name}_total" for name, _, _ in EDGE_FAMILIES)
OTHER = "other"
MAX_LABEL = 256  # characters of a label value taken from an object (a group name is at most 253)
# Control characters (C0, DEL, C1) and the line and paragraph separators: a line-oriented reader of
# the text format takes any of them for the end of a sample, and a NUL ends a C string.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def label_value(value: str) -> str:
    """A label value taken from an object anyone with write access may have written (a Connection's
    spec, an app list): control characters replaced, the length bounded. Whatever was changed gets
    a short hash of the original, so two objects never share a series."""
    clean = _UNPRINTABLE.sub("?", value)
    if clean == value and len(value) <= MAX_LABEL:
        return value
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{clean[:MAX_LABEL - len(digest) - 1]}~{digest}"


def _label_text(values: tuple[str, ...]) -> tuple[str, str]:
    """An edge's labels as prometheus_client writes them, sorted by name, each value's backslash,
    newline and double quote escaped: those before the direction, those after it."""
    pairs = sorted(zip(EDGE_LABELS, values))
    head = [f'{name}="{_escaped(value)}"' for name, value in pairs if name < "direction"]
    tail = [f'{name}="{_escaped(value)}"' for name, value in pairs if name > "direction"]
    return ",".join(head), ",".join(tail)


def _escaped(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


class BoundsCollector:
    """What the operator's bounds turned away or forgot, read at scrape time from what it keeps."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology

    def describe(self) -> Iterator[Metric]:
        return self.collect()

    def collect(self) -> Iterator[Metric]:
        # Plain attribute reads and a copy of a two-key Counter: whole values under the GIL while
        # the event loop changes them.
        topology, resolver = self.topology, self.topology.resolver
        yield CounterMetricFamily("flowmap_operator_fqdn_group_overflow",
                                  "Edge ends named by DNS counted as 'external': a Group for the name would pass "
                                  "FLOWMAP_OPERATOR_MAX_FQDN_GROUPS.", value=topology.fqdn_overflow_total)
        yield GaugeMetricFamily("flowmap_operator_cidr_groups_ignored",
                                "CIDR Groups not used to resolve addresses: beyond FLOWMAP_OPERATOR_MAX_CIDR_GROUPS "
                                "(the newest).", value=resolver.cidr_groups_ignored_count)
        yield GaugeMetricFamily("flowmap_operator_dns_names", "Addresses whose name from a DNS answer is kept "
                                "(at most FLOWMAP_OPERATOR_MAX_DNS_NAMES).", value=len(resolver.names))
        forgotten = CounterMetricFamily("flowmap_operator_dns_names_forgotten",
                                        "Names from DNS answers forgotten: expired (TTL and grace passed), or full "
                                        "(the table was at its bound).", labels=("reason",))
        for reason, count in sorted(dict(resolver.names.forgotten).items()):
            forgotten.add_metric((reason,), count)
        yield forgotten
        yield CounterMetricFamily("flowmap_operator_threat_events_dropped",
                                  "Events for threats not raised: the queue waiting for the write budget was full.",
                                  value=topology.alerts.dropped)


C2S, S2C = "client_to_server", "server_to_client"


class EdgeLabels:
    """An edge's label set, made once and kept while what it is made of stays the same."""

    __slots__ = ("apps", "namespaces", "values", "text")

    def __init__(self, apps: frozenset[str] | None, namespaces: tuple[str, str], values: tuple[str, ...]) -> None:
        self.apps, self.namespaces = apps, namespaces  # what it was made of: the edge's apps, its groups' namespaces
        self.values = values  # EDGE_LABELS but direction, cleaned by label_value
        self.text = _label_text(values)

    @staticmethod
    def of(key: EdgeKey, apps: frozenset[str] | None, namespaces: tuple[str, str]) -> EdgeLabels:
        app = app_label(apps) if apps is not None else "unknown"
        # Every value but the port may come from a Connection or Group someone wrote by hand.
        return EdgeLabels(apps, namespaces, tuple(label_value(v) for v in (
            key[0], namespaces[0], key[1], namespaces[1], str(key[2]), key[3], app)))

    def lines(self, counters: Counters) -> tuple[str, str, str]:
        """The edge's samples of the three counter families at ``counters``, as prometheus_client
        writes them in either text format. Not kept: /metrics keeps the page they make
        (flowmap_operator.exposition), and at 10,000 busy edges nearly every edge's counters are new
        at each checkpoint, so kept lines were 12 MiB of a second copy of the page."""
        (bytes_, packets, sessions), (head, tail) = SAMPLE_NAMES, self.text
        c2s, s2c = f'{{{head},direction="{C2S}",{tail}}}', f'{{{head},direction="{S2C}",{tail}}}'
        return (f"{bytes_}{c2s} {number(counters.bytes_c2s)}\n{bytes_}{s2c} {number(counters.bytes_s2c)}\n",
                f"{packets}{c2s} {number(counters.packets_c2s)}\n{packets}{s2c} {number(counters.packets_s2c)}\n",
                f"{sessions}{{{head},{tail}}} {number(counters.sessions)}\n")


# The sum of the edges beyond the cap: every label "other" but the direction.
OTHER_LABELS = EdgeLabels(None, (OTHER, OTHER), (OTHER,) * (len(EDGE_LABELS) - 1))


class EdgeSeries(NamedTuple):
    """One scrape's edge series, read in one pass over the ledger: each edge with series of its own
    and its counters (whole values: the ledger replaces them), then "other" when it has a series."""

    rows: list[tuple[EdgeLabels, Counters]]
    overflow: int  # edges counted in "other"
    marks: Mapping[EdgeKey, Counters] | None = None  # the published marks read, None when not leading

    def of(self, marks: Mapping[EdgeKey, Counters] | None, overflow: int) -> bool:
        """Whether these are the series of ``marks`` and ``overflow`` (``EdgeCollector.source``):
        the same marks, not only equal ones (published marks are replaced whole, never changed)."""
        return self.marks is marks and self.overflow == overflow


class EdgeCollector:
    """Per-edge counters read at scrape time from the marks ``totals`` publishes: what the operator
    has counted, checkpointed so that no series goes back across a restart or a change of leader
    (flowmap_operator.highwater says how), and within the cap (the edges beyond it in ``other``).

    Only the leader exports them: a second set of series would double every sum over the replicas.

    Two renderings of one ``series()``: prometheus_client's families (``collect``, the reference)
    and the text of their samples (``samples``), which /metrics serves (flowmap_operator.exposition).
    """

    def __init__(self, topology: Topology, totals: EdgeTotals, leading: Callable[[], bool] = lambda: True) -> None:
        self.topology, self.totals, self.leading = topology, totals, leading
        self.labels: dict[EdgeKey, EdgeLabels] = {}  # each exported edge's label set
        self.lock = threading.Lock()  # the metrics server answers each scrape on a thread of its own

    def describe(self) -> Iterator[Metric]:
        yield from self.families(EdgeSeries([], 0))

    def collect(self) -> Iterator[Metric]:
        yield from self.families(self.series())

    def source(self) -> tuple[Mapping[EdgeKey, Counters] | None, int]:
        """What ``series`` would read now: the published marks (None when not leading) and the
        overflow count. Series made from the same marks differ only if an edge's label set changed."""
        if not self.leading():
            return None, 0
        return self.totals.published, self.totals.overflow

    def series(self) -> EdgeSeries:
        """The edges' series as published now, each with its label set."""
        if not self.leading():
            return EdgeSeries([], 0)
        # Scrapes run on the metrics server's threads while the event loop publishes and changes
        # the topology. The published marks and the overflow count are replaced whole; the groups
        # and edges read here are single dict lookups under the GIL.
        published, overflow = self.totals.published, self.totals.overflow
        groups, infos = self.topology.groups, self.topology.edges
        rows: list[tuple[EdgeLabels, Counters]] = []
        with self.lock:
            kept = self.labels
            for key in kept.keys() - published.keys():
                del kept[key]
            for key, counters in published.items():
                if key == highwater.OTHER:
                    continue
                # The label set changes only when the edge's apps or a group's namespace do.
                labels = kept.get(key)
                client, server, info = groups.get(key[0]), groups.get(key[1]), infos.get(key)
                apps = info.apps if info else None
                namespaces = (client.peer.namespace if client else "", server.peer.namespace if server else "")
                if labels is None or labels.apps != apps or labels.namespaces != namespaces:
                    labels = kept[key] = EdgeLabels.of(key, frozenset(apps) if apps is not None else None, namespaces)
                rows.append((labels, counters))
        if highwater.OTHER in published:
            rows.append((OTHER_LABELS, published[highwater.OTHER]))
        return EdgeSeries(rows, overflow, published)

    @staticmethod
    def families(series: EdgeSeries) -> tuple[CounterMetricFamily, CounterMetricFamily, CounterMetricFamily,
                                              GaugeMetricFamily]:
        """The series as prometheus_client's families: the three counters, then the overflow gauge."""
        bytes_, packets, sessions = (CounterMetricFamily(name, documentation, labels=labels)
                                     for name, documentation, labels in EDGE_FAMILIES)
        for labels, counters in series.rows:
            bytes_.add_metric((*labels.values, C2S), counters.bytes_c2s)
            bytes_.add_metric((*labels.values, S2C), counters.bytes_s2c)
            packets.add_metric((*labels.values, C2S), counters.packets_c2s)
            packets.add_metric((*labels.values, S2C), counters.packets_s2c)
            sessions.add_metric(labels.values, counters.sessions)
        return bytes_, packets, sessions, GaugeMetricFamily(
            "flowmap_operator_edge_series_overflow",
            "Edges beyond the series cap (FLOWMAP_OPERATOR_METRICS_SERIES_CAP), counted in the 'other' series.",
            value=series.overflow)

    @staticmethod
    def samples(series: EdgeSeries) -> tuple[str, str, str]:
        """The sample lines of the three counter families, as prometheus_client writes them in
        either text format (a counter's samples are written alike in both)."""
        lines = [labels.lines(counters) for labels, counters in series.rows]
        return "".join([x[0] for x in lines]), "".join([x[1] for x in lines]), "".join([x[2] for x in lines])


def number(value: int) -> str:
    """A counter's value as prometheus_client writes it (``floatToGoString``), without its detour
    through a float and its repr for the counts a float holds exactly."""
    if 0 <= value < 1_000_000:
        return f"{value}.0"
    if 0 < value < 1 << 53:
        digits = str(value)  # Go's exponent form from seven digits on: 1234567 is 1.234567e+06
        return f"{digits[0]}.{digits[1:]}".rstrip("0.") + f"e+{len(digits) - 1:02d}"
    return str(floatToGoString(value))


# What reports said that the contract normalised or dropped (flowmap_api.validity): the edges still count.
NORMALISED = Counter("flowmap_operator_report_normalised",
                     "Report metadata normalised or dropped while its edges still count, by field and reason "
                     "(e.g. name/invalid: a DNS name dropped; name/idna: converted to punycode; app/unknown).",
                     ("field", "reason"), registry=REGISTRY)
TOKEN_REVIEWS = Counter("flowmap_operator_token_reviews", "TokenReviews made to authenticate agents, by result "
                        "(accepted, refused, error).", ("result",), registry=REGISTRY)
TOKENS_UNREVIEWED = Counter("flowmap_operator_tokens_unreviewed",
                            "Unknown tokens refused without a TokenReview: their address had too many refused lately.",
                            registry=REGISTRY)


THREAT_LABELS = ("name", "severity", "client_group", "client_namespace", "server_group", "server_namespace", "port",
                 "protocol")


class ThreatCollector:
    """``flowmap_threats_total``: each edge's threat hits by name (flowmap_operator.threats), for the
    edges whose series the cap keeps (``EdgeCollector``'s); the others' hits summed by name under
    "other". Only the leader exports them.

    The counts are those the leader holds. It starts from the Connections' status, so a restart
    continues them, less the hits not yet written then (Prometheus takes the step back for a reset).
    """

    def __init__(self, topology: Topology, totals: EdgeTotals, leading: Callable[[], bool] = lambda: True) -> None:
        self.topology, self.totals, self.leading = topology, totals, leading

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily("flowmap_threats", THREATS_HELP, labels=THREAT_LABELS)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("flowmap_threats", THREATS_HELP, labels=THREAT_LABELS)
        if not self.leading():
            yield family
            return
        published, groups = self.totals.published, self.topology.groups
        other: dict[str, int] = {}
        # Copies made in one step under the GIL, as the event loop changes the map meanwhile: a
        # dict's copy() runs no Python code, while list(d.items()) makes a tuple per item and so
        # may run the garbage collector, whose finalizers let the event loop's thread in (seen:
        # "dictionary changed size during iteration", a scrape answered 500, at 10,000 edges).
        for key, info in self.topology.edges.copy().items():
            if not info.threats:
                continue
            if key not in published:
                for name, t in info.threats.copy().items():
                    other[name] = other.get(name, 0) + t.count
                continue
            client, server = groups.get(key[0]), groups.get(key[1])
            namespaces = (client.peer.namespace if client else "", server.peer.namespace if server else "")
            values = [label_value(v) for v in (key[0], namespaces[0], key[1], namespaces[1], str(key[2]), key[3])]
            for name, t in info.threats.copy().items():
                family.add_metric((name, severity(name), *values), t.count)
        for name, count in sorted(other.items()):
            family.add_metric((name, severity(name), *(OTHER,) * 6), count)
        yield family


THREATS_HELP = ("Threat hits on an edge by threat name and severity (flowmap_api.threats), as the Connection's "
                "status.threats counts them.")
