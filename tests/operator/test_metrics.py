"""The per-edge series: read at scrape time from the marks checkpointed from the ledger, capped.

Plain objects (a Topology and its Ledger, as the operator holds them; checkpoint rounds whose
writes land, as flowmap_operator.checkpointing makes them) and the real prometheus_client
rendering, parsed back as Prometheus would read it.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from flowmap_operator import highwater
from flowmap_operator.highwater import EdgeTotals
from flowmap_operator.ledger import Counters, EdgeKey
from flowmap_operator.metrics import EdgeCollector, EdgeSeries, label_value
from flowmap_operator.resolution import Peer, Resolver
from flowmap_operator.topology import GroupInfo, Topology

WEB_API: EdgeKey = ("shop.web", "shop.api", 8080, "TCP")
API_REDIS: EdgeKey = ("shop.api", "shop.redis", 6379, "TCP")
API_PG: EdgeKey = ("shop.api", "shop.postgres", 5432, "TCP")
API_EXT: EdgeKey = ("shop.api", "external", 0, "TCP")


def topology(*apps: tuple[EdgeKey, str]) -> Topology:
    topo = Topology(Resolver(), max_connections=100, max_ports=20)
    for name in ("shop.web", "shop.api", "shop.redis", "shop.postgres"):
        topo.groups[name] = GroupInfo(Peer(name, "Workload", "shop"))
    topo.groups["external"] = GroupInfo(Peer("external", "External"))
    for key, app in apps:
        topo.edge(key).apps.update(app.split(",") if app else ())
    return topo


def checkpoint(collector: EdgeCollector) -> None:
    """One checkpoint round whose writes all land: the marks of what the ledger counted, published."""
    totals = collector.totals
    for index, marks in totals.take(highwater.applied(collector.topology.ledger.edges.values())).items():
        totals.wrote(index, marks)
    totals.publish()


class Checkpointed(EdgeCollector):
    """An EdgeCollector whose every scrape follows a checkpoint round."""

    def series(self) -> EdgeSeries:
        checkpoint(self)
        return super().series()


def collector(topo: Topology, cap: int, checkpointed: bool = True) -> EdgeCollector:
    return (Checkpointed if checkpointed else EdgeCollector)(topo, EdgeTotals(cap))


def scrape(collector: EdgeCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(collector)  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def labels(key: EdgeKey, app: str, direction: str | None = None, ns: tuple[str, str] = ("shop", "shop")
           ) -> tuple[tuple[str, str], ...]:
    out = {"client_group": key[0], "client_namespace": ns[0], "server_group": key[1], "server_namespace": ns[1],
           "port": str(key[2]), "protocol": key[3], "app": app}
    if direction:
        out["direction"] = direction
    return tuple(sorted(out.items()))


def write(topo: Topology, agent: str, seq: int, key: EdgeKey, delta: Counters, version: str) -> None:
    """One batch of one agent applied and written, as the operator does it."""
    topo.ledger.begin_batch(agent, "node-a", seq, acked=seq - 1, previous=seq - 1)
    topo.ledger.apply(agent, seq, key, delta, now=float(seq))
    topo.ledger.written(topo.ledger.plan(key), version)


def test_the_series_are_what_was_counted_as_of_the_last_checkpoint_written_or_not() -> None:
    topo = topology((WEB_API, "http,unknown"), (API_EXT, ""))
    # As loaded from the Connections on start: the totals of earlier runs.
    topo.ledger.load(WEB_API, Counters(1000, 20000, 10, 20, 5), [("agent-a", "node-a", 7)], "41")
    edges = collector(topo, cap=10, checkpointed=False)
    assert not [k for k in scrape(edges) if k[0] == "flowmap_edge_bytes_total"], "nothing checkpointed yet"
    checkpoint(edges)
    got = scrape(edges)
    assert got[("flowmap_edge_bytes_total", labels(WEB_API, "http", "client_to_server"))] == 1000
    assert got[("flowmap_edge_bytes_total", labels(WEB_API, "http", "server_to_client"))] == 20000
    assert got[("flowmap_edge_packets_total", labels(WEB_API, "http", "client_to_server"))] == 10
    assert got[("flowmap_edge_packets_total", labels(WEB_API, "http", "server_to_client"))] == 20
    assert got[("flowmap_edge_sessions_total", labels(WEB_API, "http"))] == 5
    assert got[("flowmap_operator_edge_series_overflow", ())] == 0

    # A delta counted but not written yet shows at the next checkpoint, not before; an edge whose
    # Connection does not exist yet has no series.
    topo.ledger.begin_batch("agent-b", "node-b", 1, acked=0, previous=0)
    topo.ledger.apply("agent-b", 1, WEB_API, Counters(1, 2, 3, 4, 1), now=1.0)
    topo.ledger.apply("agent-b", 1, API_EXT, Counters(5, 6, 1, 1, 1), now=1.0)
    assert scrape(edges)[("flowmap_edge_bytes_total", labels(WEB_API, "http", "client_to_server"))] == 1000
    checkpoint(edges)
    got = scrape(edges)
    assert got[("flowmap_edge_bytes_total", labels(WEB_API, "http", "client_to_server"))] == 1001
    assert got[("flowmap_edge_sessions_total", labels(WEB_API, "http"))] == 6
    assert not [k for k in got if dict(k[1]).get("server_group") == "external"], "no Connection yet"

    topo.ledger.written(topo.ledger.plan(WEB_API), "42")
    topo.ledger.written(topo.ledger.plan(API_EXT), "43")
    checkpoint(edges)
    got = scrape(edges)
    assert got[("flowmap_edge_bytes_total", labels(WEB_API, "http", "client_to_server"))] == 1001
    assert got[("flowmap_edge_bytes_total", labels(API_EXT, "unknown", "server_to_client", ("shop", "")))] == 6


def test_only_the_leader_exports_edges() -> None:
    topo = topology((WEB_API, "http"))
    topo.ledger.load(WEB_API, Counters(1000, 20000, 10, 20, 5), [], "41")
    leading = [False]
    collector = Checkpointed(topo, EdgeTotals(10), leading=lambda: leading[0])
    assert not [k for k in scrape(collector) if k[0].startswith("flowmap_edge_")]
    leading[0] = True
    assert scrape(collector)[("flowmap_edge_bytes_total", labels(WEB_API, "http", "client_to_server"))] == 1000


def other(name: str, direction: str | None = None) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The "other" series: every label "other" but the direction."""
    return name, tuple((k, v if k == "direction" else "other") for k, v in labels(WEB_API, "", direction))


def test_edges_beyond_the_cap_are_summed_into_other_and_no_series_goes_down() -> None:
    topo = topology((WEB_API, "http"), (API_REDIS, "redis"), (API_PG, "postgresql"), (API_EXT, "tls"))
    collector = Checkpointed(topo, EdgeTotals(2))
    for n, key in enumerate((WEB_API, API_REDIS, API_PG), start=1):
        write(topo, f"agent-{n}", 1, key, Counters(100 * n, 1, 1, 1, 1), str(n))
    got = scrape(collector)
    assert got[("flowmap_edge_bytes_total", labels(WEB_API, "http", "client_to_server"))] == 100
    assert got[("flowmap_edge_bytes_total", labels(API_REDIS, "redis", "client_to_server"))] == 200
    assert not [k for k in got if dict(k[1]).get("server_group") == "shop.postgres"]
    assert got[other("flowmap_edge_bytes_total", "client_to_server")] == 300
    assert got[other("flowmap_edge_sessions_total")] == 1
    assert got[("flowmap_operator_edge_series_overflow", ())] == 1

    # api -> redis's Connection is deleted (idle): its slot goes to the next new edge, while the
    # edge already in "other" stays there, so "other" never goes down.
    topo.forget(API_REDIS)
    write(topo, "agent-9", 1, API_EXT, Counters(7, 1, 1, 1, 1), "9")
    write(topo, "agent-3", 2, API_PG, Counters(50, 1, 1, 1, 1), "10")
    got = scrape(collector)
    assert not [k for k in got if dict(k[1]).get("server_group") == "shop.redis"]
    assert got[("flowmap_edge_bytes_total", labels(API_EXT, "tls", "client_to_server", ("shop", "")))] == 7
    assert got[other("flowmap_edge_bytes_total", "client_to_server")] == 350
    assert got[other("flowmap_edge_packets_total", "server_to_client")] == 2
    assert got[other("flowmap_edge_sessions_total")] == 2

    # The postgres Connection is deleted too: what it counted stays in "other".
    topo.forget(API_PG)
    got = scrape(collector)
    assert got[other("flowmap_edge_bytes_total", "client_to_server")] == 350
    assert got[("flowmap_operator_edge_series_overflow", ())] == 0


def test_scrapes_on_another_thread_while_reports_are_written() -> None:
    topo = topology((WEB_API, "http"), (API_REDIS, "redis"))
    collector = Checkpointed(topo, EdgeTotals(10))
    stop, seen, errors = threading.Event(), [0.0], []

    def scraper() -> None:
        try:
            while not stop.is_set():
                value = scrape(collector).get(("flowmap_edge_bytes_total", labels(WEB_API, "http", "client_to_server")),
                                              0.0)
                assert value >= seen[-1], (value, seen[-1])
                seen.append(value)
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    thread = threading.Thread(target=scraper)
    thread.start()
    try:
        for seq in range(1, 3001):
            for key in (WEB_API, API_REDIS):
                write(topo, "agent-a", seq, key, Counters(1, 1, 1, 1, 1), str(seq))
            if seq % 100 == 0:  # edges come and go while the scraper reads
                topo.forget(API_REDIS)
                topo.edge(API_REDIS).apps.add("redis")
    finally:
        stop.set()
        thread.join()
    assert not errors, errors
    assert len(seen) > 2 and seen[-1] <= 3000
    assert scrape(collector)[("flowmap_edge_bytes_total", labels(WEB_API, "http", "client_to_server"))] == 3000


def test_a_connection_written_by_hand_with_control_characters_cannot_break_the_page() -> None:
    # As found: an admin's Connection with CR and NUL in spec.client was exported raw.
    evil: EdgeKey = ("evil\r\nname\x00\x1b[2J", "shop.api", 8080, "TCP")
    long: EdgeKey = ("shop.web", "x" * 5000, 443, "TCP")
    topo = topology((WEB_API, "http"), (evil, "http\u2028tls"), (long, "tls"))
    collector = Checkpointed(topo, EdgeTotals(10))
    for n, key in enumerate((WEB_API, evil, long), start=1):
        write(topo, f"agent-{n}", 1, key, Counters(100 * n, 1, 1, 1, 1), str(n))
    registry = CollectorRegistry(auto_describe=True)
    registry.register(collector)  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    # A line-oriented reader of the text format sees one sample per line, whatever it takes for one.
    assert text.splitlines() == text.split("\n")[:-1]
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    assert len([s for s in samples if s.name == "flowmap_edge_bytes_total"]) == 6  # every edge, both directions
    for s in samples:
        for value in s.labels.values():
            assert value.isprintable() and len(value) <= 256, repr(value)
    by_bytes = {s.value: s.labels for s in samples if s.name == "flowmap_edge_bytes_total"
                and s.labels["direction"] == "client_to_server"}
    assert by_bytes[100] == dict(labels(WEB_API, "http", "client_to_server"))  # the others are untouched
    assert by_bytes[200]["client_group"].startswith("evil??name??[2J~") and by_bytes[200]["app"].startswith("http?tls~")
    assert by_bytes[300]["server_group"].startswith("x" * 200) and len(by_bytes[300]["server_group"]) == 256
    # Two names that differ only where they were cleaned are still two series.
    assert label_value("a\rb") != label_value("a\nb") and label_value("shop.web") == "shop.web"
