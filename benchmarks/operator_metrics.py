"""The operator's /metrics at 1,000 and 10,000 edges: prints numbers, asserts nothing.

A Topology as the operator holds it once its Connections are loaded (flowmap_operator.topology,
built as tests/operator build theirs): --workloads workload Groups in ten namespaces, --edges
edges between random pairs on the ports of benchmarks/operator_ingest (each with its application,
a twentieth to the ``external`` group and to names learned from DNS), counters in the millions to
billions, two observers' watermarks each. The series cap is --cap (the default of
FLOWMAP_OPERATOR_METRICS_SERIES_CAP): more edges than that fill the ``other`` series.

/metrics is served on a local port as the operator serves it (flowmap_operator.exposition's
application over the operator's registry, the BoundsCollector of the Topology and the
EdgeCollector, in prometheus_client's threading WSGI server) and scraped over HTTP --scrapes times
each way: as curl and benchmarks/operator_ingest do (text format, no gzip) and as Prometheus does
(OpenMetrics, gzip). Between two scrapes a hundredth of the edges get new counters, as a flush
writes them. Two times, median and p95: the GET's, from the request to the last byte, and the CPU
time of the server's thread for the answer (the page and its gzip), which the rest of the
machine's load does not stretch. Each way starts by checking that every server sends the same page.

The reference, in the same run and on the same Topology: prometheus_client's make_wsgi_app over the
same registry with the EdgeCollector registered in it (every sample made an object and formatted
by prometheus_client, gzip at level 9), the way /metrics was served until this benchmark's change;
with --against REV, the EdgeCollector of that revision's metrics.py (``git show``) served so too.

The operator makes the edge families' samples once per checkpoint on a thread of its own
(flowmap_operator.exposition.Edges); here they are made so after each flush, before the scrape,
and that CPU time is printed apart ("made ahead"). --no-ahead leaves it to the scrape.

--busy keeps a thread running Python beside the server, as the operator's event loop does while it
ingests reports: a scrape then shares the GIL (the switch interval is 5 ms).

Usage (from the repo root):
    .venv/bin/python benchmarks/operator_metrics.py [--edges 1000,10000] [--scrapes 20] [--busy]
        [--against main] [--cap 10000] [--no-ahead] [--ours-only]
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import random
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from wsgiref.simple_server import WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from prometheus_client import CollectorRegistry, make_wsgi_app  # noqa: E402
from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler  # noqa: E402

from flowmap_operator import exposition, highwater, metrics  # noqa: E402
from flowmap_operator.highwater import EdgeTotals  # noqa: E402
from flowmap_operator.ledger import Counters, EdgeKey  # noqa: E402
from flowmap_operator.resolution import Peer, Resolver, group_name  # noqa: E402
from flowmap_operator.topology import GroupInfo, Topology  # noqa: E402

PORTS = {80: "http", 443: "tls", 5432: "postgresql", 6379: "redis", 8080: "http", 9090: "http", 3306: "mysql",
         27017: "mongodb"}
# What Prometheus 2 sends; Prometheus 3 asks for escaping=allow-utf-8 besides, which writes the same page.
PROMETHEUS = {"Accept": "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
              "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1", "Accept-Encoding": "gzip"}
WAYS: tuple[tuple[str, dict[str, str]], ...] = (("text", {}), ("OpenMetrics+gzip", PROMETHEUS))


def make_topology(workloads: int, edges: int, seed: int) -> Topology:
    rnd = random.Random(seed)
    topo = Topology(Resolver(), max_connections=max(edges, 10_000), max_ports=20)
    names = []
    for d in range(workloads):
        ns = f"bench-{d % 10}"
        name = group_name(ns, f"service-{d}")
        topo.groups[name] = GroupInfo(Peer(name, "Workload", ns, "Deployment", f"service-{d}"), exists=True)
        names.append(name)
    topo.groups["external"] = GroupInfo(Peer("external", "External"), exists=True)
    fqdns = [f"api-{i}.example.com" for i in range(50)]
    for fqdn in fqdns:
        topo.groups[fqdn] = GroupInfo(Peer(fqdn, "FQDN", member=fqdn), exists=True)
    keys: set[EdgeKey] = set()
    while len(keys) < edges:
        client, port = rnd.choice(names), rnd.choice(list(PORTS))
        server = rnd.choice(names) if rnd.random() < 0.95 else rnd.choice(["external", *fqdns])
        if client == server or (client, server, port, "TCP") in keys:
            continue
        key = (client, server, port if server != "external" else rnd.choice((443, 0)), "TCP")
        if key in keys:
            continue
        keys.add(key)
        topo.key_for(*key)
        topo.edge(key).apps.add(PORTS.get(key[2], "unknown") if rnd.random() < 0.9 else "unknown")
        topo.ledger.load(key, counters(rnd), [("agent-a", "node-1", 41), ("agent-b", "node-2", 17)],
                         str(rnd.randrange(10 ** 6)))
    return topo


def counters(rnd: random.Random, at_least: Counters | None = None) -> Counters:
    base = at_least or Counters()
    return Counters(base.bytes_c2s + rnd.randrange(10 ** 6, 10 ** 10),
                    base.bytes_s2c + rnd.randrange(10 ** 6, 10 ** 12),
                    base.packets_c2s + rnd.randrange(10 ** 3, 10 ** 8),
                    base.packets_s2c + rnd.randrange(10 ** 3, 10 ** 9),
                    base.sessions + rnd.randrange(1, 10 ** 6))


def flush(topo: Topology, rnd: random.Random, share: float = 0.01) -> None:
    """What a flush of the writer does to the ledger: some edges' counters written anew; and a
    checkpoint round of the edge series (flowmap_operator.checkpointing) whose writes land."""
    keys = list(topo.ledger.edges)
    for key in rnd.sample(keys, max(1, int(len(keys) * share))):
        edge = topo.ledger.edges[key]
        topo.ledger.load(key, counters(rnd, edge.persisted), [("agent-a", "node-1", 42)], "1")
    for totals in TOTALS:
        for index, marks in totals.take(highwater.applied(topo.ledger.edges.values())).items():
            totals.wrote(index, marks)
        totals.publish()
    for edges in AHEAD:  # what the operator's thread does within a second of a checkpoint
        start = time.thread_time()
        edges.ahead()
        MADE.append(time.thread_time() - start)


TOTALS: list[EdgeTotals] = []  # the marks of the collectors served
AHEAD: list[exposition.Edges] = []  # the operator's edge samples, made ahead of scrapes (not with --no-ahead)
MADE: list[float] = []  # CPU seconds of each block made ahead (the page's edge part, deflated if asked)


def edge_collector(topo: Topology, cap: int) -> metrics.EdgeCollector:
    """The operator's collector, its marks taken from the ledger at each flush."""
    TOTALS.append(EdgeTotals(cap))
    flush(topo, random.Random(0), share=0)
    return metrics.EdgeCollector(topo, TOTALS[-1])


def old_metrics(rev: str) -> ModuleType:
    """flowmap_operator.metrics as it was at ``rev``, its own registry and all."""
    source = subprocess.run(["git", "show", f"{rev}:operator/flowmap_operator/metrics.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader(f"metrics_at_{rev}", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    exec(compile(source, f"{rev}:metrics.py", "exec"), module.__dict__)  # noqa: S102 - our own file at a revision
    return module


@contextmanager
def busy(on: bool) -> Iterator[None]:
    stop = threading.Event()

    def spin() -> None:
        total = 0
        while not stop.is_set():
            total += sum(range(1000))

    thread = threading.Thread(target=spin, daemon=True)
    if on:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        if on:
            thread.join()


def get(port: int, headers: dict[str, str]) -> tuple[float, bytes, int]:
    """One scrape: seconds from the request to the last byte, the page, the bytes sent."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=headers)
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=60) as r:
        body = r.read()
        zipped = r.headers.get("Content-Encoding") == "gzip"
    took = time.perf_counter() - start
    return took, gzip.decompress(body) if zipped else body, len(body)


class Timed:
    """A WSGI application, and the CPU time its thread spent on each answer (the page and its gzip):
    what a scrape costs the operator whatever else the machine runs."""

    def __init__(self, app: WSGIApplication) -> None:
        self.app = app
        self.cpu: list[float] = []

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        start = time.thread_time()
        answer = list(self.app(environ, start_response))
        self.cpu.append(time.thread_time() - start)
        return answer

    def serve(self) -> WSGIServer:
        """Served as prometheus_client's start_http_server serves an application."""
        server = make_server("127.0.0.1", 0, self, ThreadingWSGIServer, handler_class=_SilentHandler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(server: WSGIServer, app: Timed, topo: Topology, headers: dict[str, str], scrapes: int, seed: int
            ) -> tuple[float, float, float, float, int]:
    """Median and p95 of --scrapes scrapes, a flush's writes before each, as the scraper waits and
    in CPU time of the server's thread; the bytes sent."""
    rnd = random.Random(seed)
    get(server.server_port, headers)  # the first scrape makes the label sets
    app.cpu.clear()
    times, sent = [], 0
    for _ in range(scrapes):
        flush(topo, rnd)
        took, _, sent = get(server.server_port, headers)
        times.append(took)
    return statistics.median(times), pct(times, 0.95), statistics.median(app.cpu), pct(app.cpu, 0.95), sent


def scenario(args: argparse.Namespace, edges: int) -> None:
    t = time.perf_counter()
    topo = make_topology(args.workloads, edges, args.seed)
    print(f"\n--- {edges:,} edges, cap {args.cap:,}, {len(topo.groups):,} groups (built in "
          f"{time.perf_counter() - t:.1f} s){'; a busy thread beside the server' if args.busy else ''} ---", flush=True)
    registry = metrics.REGISTRY
    bounds = metrics.BoundsCollector(topo)
    operators = CollectorRegistry(auto_describe=True)  # the operator's REGISTRY, its BoundsCollector in it
    operators.register(registry)
    operators.register(bounds)
    ours = exposition.Edges(edge_collector(topo, args.cap))
    AHEAD[:] = [] if args.no_ahead else [ours]
    apps = [("flowmap_operator.exposition", Timed(exposition.app(operators, ours)))]
    if not args.ours_only:
        reference = CollectorRegistry(auto_describe=True)
        for collector in (registry, bounds, edge_collector(topo, args.cap)):
            reference.register(collector)
        apps.append(("prometheus_client, EdgeCollector", Timed(make_wsgi_app(reference))))
    if args.against:
        old = old_metrics(args.against)
        before = CollectorRegistry(auto_describe=True)
        for collector in (registry, bounds, old.EdgeCollector(topo, args.cap)):
            before.register(collector)
        apps.append((f"prometheus_client, {args.against}'s collector", Timed(make_wsgi_app(before))))
    servers = [(name, app.serve(), app) for name, app in apps]
    try:
        for way, headers in WAYS:
            pages = [get(server.server_port, headers)[1] for _, server, _ in servers]
            print(f"{way}: a {len(pages[0]) / 2 ** 20:.1f} MiB page, "
                  f"{'the same from every server' if len(set(pages)) == 1 else 'NOT THE SAME from every server'}")
            print(f"  {'served by':<40} {'as the scraper waits':>27}  {'CPU of the answer':>27}")
            with busy(args.busy):
                results = [(name, measure(server, app, topo, headers, args.scrapes, args.seed))
                           for name, server, app in servers]
            ours = results[0][1]
            if MADE:
                print(f"  made ahead of the scrapes (each checkpoint, another thread): median "
                      f"{statistics.median(MADE) * 1000:.1f} ms CPU (p95 {pct(MADE, 0.95) * 1000:.1f})")
                MADE.clear()
            for name, (median, p95, cpu, cpu95, sent) in results:
                print(f"  {name:<40} {median * 1000:7.1f} ms (p95 {p95 * 1000:7.1f})  {cpu * 1000:7.1f} ms "
                      f"(p95 {cpu95 * 1000:7.1f})  {cpu / ours[2]:5.1f}x  {sent / 2 ** 20:5.2f} MiB sent", flush=True)
    finally:
        for _, server, _ in servers:
            server.shutdown()
            server.server_close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--edges", default="1000,10000", help="comma-separated edge counts (one scenario each)")
    p.add_argument("--workloads", type=int, default=300)
    p.add_argument("--cap", type=int, default=10_000, help="the series cap (FLOWMAP_OPERATOR_METRICS_SERIES_CAP)")
    p.add_argument("--scrapes", type=int, default=20, help="scrapes per server and way")
    p.add_argument("--against", help="also serve the EdgeCollector of this git revision (e.g. main) as before")
    p.add_argument("--busy", action="store_true", help="a thread running Python beside the server")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--ours-only", action="store_true", help="serve no reference (prometheus_client's own page)")
    p.add_argument("--no-ahead", action="store_true", help="make no edge samples ahead: each scrape makes them")
    args = p.parse_args()
    print(f"python {sys.version.split()[0]}; {args.scrapes} scrapes per server and way", flush=True)
    for edges in [int(n) for n in args.edges.split(",") if n]:
        scenario(args, edges)


if __name__ == "__main__":
    main()
