"""/metrics as served: the edge families written straight from their series, byte for byte what
prometheus_client writes of the same series, in every format it negotiates.

Plain objects (a Topology and its Ledger, as in test_metrics) and the served page, compared with
prometheus_client's own server over the same collectors.
"""

from __future__ import annotations

import gzip
import random
import threading
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter, make_wsgi_app, start_http_server
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

from flowmap_operator import exposition
from flowmap_operator.highwater import EdgeTotals
from flowmap_operator.ledger import Counters, EdgeKey
from flowmap_operator.metrics import EdgeCollector, number
from flowmap_operator.resolution import Peer
from tests.operator.test_metrics import API_EXT, API_PG, API_REDIS, WEB_API, Checkpointed, checkpoint, topology, write

EVIL: EdgeKey = ('evil"\\name\r\n', "shop.api", 8080, "TCP")

# What scrapers send: Prometheus 2 and 3, a browser, curl, and the escapings a client may ask for.
ACCEPTS = [
    None,
    "text/plain;version=0.0.4;q=1,*/*;q=0.1",
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,application/openmetrics-text;"
    "version=0.0.1;q=0.5,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2",
    "application/openmetrics-text",
    "text/plain;version=1.0.0;escaping=underscores",
    "text/plain;version=1.0.0;escaping=values",
    "text/plain;version=1.0.0;escaping=dots",
    "application/openmetrics-text;version=1.0.0;escaping=dots",
    "text/html,application/xhtml+xml,*/*;q=0.8",
]


def capped() -> tuple[EdgeCollector, CollectorRegistry]:
    """Five edges, two beyond a cap of three (one of them gone since), one of the three written by hand:
    every kind of series there is, and a registry of other metrics beside them."""
    topo = topology((WEB_API, "http"), (API_REDIS, "redis"), (API_PG, "postgresql"), (API_EXT, "tls"),
                    (EVIL, 'http"\\x'))
    collector = Checkpointed(topo, EdgeTotals(3))
    for n, key in enumerate((WEB_API, EVIL, API_REDIS, API_PG, API_EXT), start=1):
        write(topo, f"agent-{n}", 1, key, Counters(10 ** (n + 3), 2 ** 40, 999_999, 1_000_000, n), str(n))
    collector.series()
    topo.forget(API_PG)
    registry = CollectorRegistry(auto_describe=True)
    Counter("flowmap_operator_reports", "Report batches by outcome.", ("outcome",), registry=registry).labels(
        "ok").inc(3)
    return collector, registry


def reference(collector: EdgeCollector, registry: CollectorRegistry) -> CollectorRegistry:
    """What was served before: prometheus_client's rendering of the registry and the collector."""
    whole = CollectorRegistry(auto_describe=True)
    whole.register(registry)
    whole.register(collector)
    return whole


@pytest.mark.parametrize("accept", ACCEPTS)
def test_the_page_is_prometheus_clients_page_of_the_same_series(accept: str | None) -> None:
    collector, registry = capped()
    answer = exposition.page(registry, exposition.Edges(collector), accept)
    ours, kind = answer.text(), answer.content_type
    app = exposition.app(registry, exposition.Edges(collector))  # the same through the WSGI answer
    theirs = _wsgi(prometheus_wsgi(reference(collector, registry)), accept)
    assert (ours, kind) == (theirs[0], dict(theirs[1])["Content-Type"])
    got = _wsgi(app, accept)
    assert (got[0], [h for h in got[1] if h[0] != "Content-Length"]) == theirs
    assert ("Content-Length", str(len(ours))) in got[1]
    assert gzip.decompress(b"".join(answer.gzip())) == ours  # one gzip member: its CRC and length checked
    assert b"flowmap_edge_bytes_total" in ours or b"flowmap__edge__bytes__total" in ours


@pytest.mark.parametrize("names", [["flowmap_edge_bytes_total"], ["flowmap_edge_sessions_total",
                                                                  "flowmap_operator_reports_total"],
                                   ["flowmap_operator_edge_series_overflow"], ["nothing"]])
def test_a_page_of_some_names_is_prometheus_clients_too(names: list[str]) -> None:
    collector, registry = capped()
    query = "&".join(f"name[]={n}" for n in names)
    for accept in (None, ACCEPTS[2]):
        ours = exposition.page(registry, exposition.Edges(collector), accept, names).text()
        theirs = _wsgi(prometheus_wsgi(reference(collector, registry)), accept, query)[0]
        # prometheus_client's filter writes the families of several collectors in no set order.
        assert _families(ours) == _families(theirs) and ours.endswith(b"# EOF\n") == theirs.endswith(b"# EOF\n")


def test_the_edge_samples_exact_text_escaped_labels_other_and_the_cap() -> None:
    collector, _ = capped()
    bytes_, packets, sessions = EdgeCollector.samples(collector.series())
    web = 'client_group="shop.web",client_namespace="shop",{}port="8080",protocol="TCP",server_group="shop.api",' \
          'server_namespace="shop"'
    # Backslash and double quote escaped as the text format does; CR and LF, never sent raw, made
    # printable by label_value (the hash keeps the original apart).
    evil = ('client_group="evil\\"\\\\name??~80d436e092",client_namespace="",{}port="8080",protocol="TCP",'
            'server_group="shop.api",server_namespace="shop"')
    other = 'client_group="other",client_namespace="other",{}port="other",protocol="other",server_group="other",' \
            'server_namespace="other"'

    def line(name: str, app: str, labels: str, direction: str | None, value: str) -> str:
        where = f'direction="{direction}",' if direction else ""
        return f'{name}{{app="{app}",{labels.format(where)}}} {value}\n'

    b, p, s = "flowmap_edge_bytes_total", "flowmap_edge_packets_total", "flowmap_edge_sessions_total"
    c2s, s2c = "client_to_server", "server_to_client"
    redis = ('client_group="shop.api",client_namespace="shop",{}port="6379",protocol="TCP",server_group="shop.redis",'
             'server_namespace="shop"')
    assert bytes_ == "".join([
        line(b, "http", web, c2s, "10000.0"), line(b, "http", web, s2c, "1.099511627776e+12"),
        line(b, 'http\\"\\\\x', evil, c2s, "100000.0"), line(b, 'http\\"\\\\x', evil, s2c, "1.099511627776e+12"),
        line(b, "redis", redis, c2s, "1e+06"), line(b, "redis", redis, s2c, "1.099511627776e+12"),
        # API_PG (gone: retired) and API_EXT beyond the cap: 1e7 + 1e8 in "other"
        line(b, "other", other, c2s, "1.1e+08"), line(b, "other", other, s2c, "2.199023255552e+12")])
    assert packets.splitlines()[-2:] == [line(p, "other", other, c2s, "1.999998e+06").rstrip("\n"),
                                         line(p, "other", other, s2c, "2e+06").rstrip("\n")]
    assert sessions == "".join([line(s, "http", web, None, "1.0"), line(s, 'http\\"\\\\x', evil, None, "2.0"),
                                line(s, "redis", redis, None, "3.0"), line(s, "other", other, None, "9.0")])
    assert collector.series().overflow == 1  # API_EXT; API_PG's counts stay in "other" without it


def test_label_sets_are_made_again_when_the_app_or_a_namespace_changes_and_lines_say_the_counters() -> None:
    topo = topology((WEB_API, "http"))
    collector = Checkpointed(topo, EdgeTotals(10))
    write(topo, "agent-a", 1, WEB_API, Counters(1, 1, 1, 1, 1), "1")
    first, counters = collector.series().rows[0]
    assert collector.series().rows[0][0] is first  # kept
    assert first.lines(counters)[2].endswith("} 1.0\n")
    write(topo, "agent-a", 2, WEB_API, Counters(1, 1, 1, 1, 1), "2")
    assert collector.series().rows[0][0] is first
    assert first.lines(collector.series().rows[0][1])[2].endswith("} 2.0\n")  # the ledger's new counters
    topo.edge(WEB_API).apps.add("grpc")
    second = collector.series().rows[0][0]
    assert second.values[-1] == "grpc,http" and 'app="grpc,http"' in second.text[0]
    topo.groups["shop.api"].peer = Peer("shop.api", "Workload", "store")
    assert 'server_namespace="store"' in collector.series().rows[0][0].text[1]
    topo.forget(WEB_API)
    assert not collector.series().rows and not collector.labels


def test_only_the_leaders_page_has_edges() -> None:
    collector, registry = capped()
    collector.leading = lambda: False
    text = exposition.page(registry, exposition.Edges(collector), None).text().decode()
    assert "# TYPE flowmap_edge_bytes_total counter" in text and "flowmap_edge_bytes_total{" not in text
    assert "flowmap_operator_edge_series_overflow 0.0" in text


def test_the_edge_samples_are_made_once_per_checkpoint_ahead_of_the_scrape_and_sent_as_made() -> None:
    topo = topology((WEB_API, "http"))
    collector = EdgeCollector(topo, EdgeTotals(10))  # checkpointed only when this test says
    edges, registry = exposition.Edges(collector), CollectorRegistry(auto_describe=True)
    app, prometheus = exposition.app(registry, edges), prometheus_wsgi(reference(collector, registry))
    write(topo, "agent-a", 1, WEB_API, Counters(1, 1, 1, 1, 1), "1")
    checkpoint(collector)
    edges.ahead()
    assert edges.made is None  # nobody scraped yet: nothing made ahead

    def scraped() -> bytes:
        body, headers = _wsgi(app, ACCEPTS[2], encoding="gzip")
        assert ("Content-Encoding", "gzip") in headers and ("Content-Length", str(len(body))) in headers
        page = gzip.decompress(body)
        assert page == _wsgi(prometheus, ACCEPTS[2])[0]  # prometheus_client's page of the same marks
        return page

    assert b'direction="client_to_server",port="8080",protocol="TCP",server_group="shop.api",' \
           b'server_namespace="shop"} 1.0' in scraped()
    first = edges.made
    assert first is not None and edges.zipped
    scraped()
    assert edges.made is first  # the same marks: sent as made
    write(topo, "agent-a", 2, WEB_API, Counters(1, 1, 1, 1, 1), "2")
    topo.edge(WEB_API).apps.add("grpc")
    edges.ahead()
    assert edges.made is first  # nothing published since: the page keeps its marks and its labels
    assert b'app="http"' in gzip.decompress(b"".join(exposition.page(registry, edges, ACCEPTS[2]).gzip()))
    checkpoint(collector)
    edges.ahead()  # as the thread does within a second of the checkpoint
    second = edges.made
    assert second is not None and second is not first and b'app="grpc,http"' in second.samples[2]
    assert b"} 2.0\n" in second.samples[2] and second.deflated()
    assert b'app="grpc,http"' in scraped() and edges.made is second


def test_the_server_stops_making_samples_ahead_when_closed() -> None:
    collector, registry = capped()
    server = exposition.serve(0, registry, collector)
    ahead = [t for t in threading.enumerate() if t.name == "metrics-ahead"]
    assert ahead and all(t.is_alive() for t in ahead)
    server.shutdown()
    server.server_close()
    for thread in ahead:
        thread.join(timeout=2 * exposition.AHEAD + 1)
    assert not any(t.name == "metrics-ahead" for t in threading.enumerate())


def test_a_count_is_written_as_prometheus_client_writes_it() -> None:
    rnd = random.Random(7)
    values = [0, 1, 9, 999_999, 1_000_000, 1_000_001, 1_200_000, 9_999_999, 10 ** 15, 10 ** 16, (1 << 53) - 1,
              1 << 53, (1 << 53) + 1, 2 ** 64 - 1, -1, -1_000_000]
    values += [rnd.randrange(10 ** rnd.randrange(1, 20)) for _ in range(20_000)]
    for value in values:
        assert number(value) == floatToGoString(value), value


def test_the_server_answers_as_prometheus_clients() -> None:
    collector, registry = capped()
    ours = exposition.serve(0, registry, collector)
    theirs, _ = start_http_server(0, registry=reference(collector, registry))
    try:
        prometheus = {"Accept": str(ACCEPTS[3]), "Accept-Encoding": "gzip"}
        for headers in ({}, prometheus, {"Accept-Encoding": "br, gzip;q=0.5"}):
            got, want = (_get(server.server_port, headers) for server in (ours, theirs))
            assert got == want
            assert ("gzip" in headers.get("Accept-Encoding", "")) == (got[1].get("Content-Encoding") == "gzip")
        for method in ("OPTIONS", "POST", "HEAD"):
            assert _status(ours.server_port, method) == _status(theirs.server_port, method)
    finally:
        for server in (ours, theirs):
            server.shutdown()
            server.server_close()


def prometheus_wsgi(registry: CollectorRegistry) -> exposition.WSGIApplication:
    return make_wsgi_app(registry)


def _wsgi(app: exposition.WSGIApplication, accept: str | None, query: str = "", encoding: str | None = None
          ) -> tuple[bytes, list[tuple[str, str]]]:
    answer: list[tuple[str, list[tuple[str, str]]]] = []
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "QUERY_STRING": query}
    if accept is not None:
        environ["HTTP_ACCEPT"] = accept
    if encoding is not None:
        environ["HTTP_ACCEPT_ENCODING"] = encoding
    body = b"".join(app(environ, lambda status, headers, exc_info=None: answer.append((status, headers))))
    assert answer[0][0] == "200 OK"
    return body, answer[0][1]


def _families(page: bytes) -> list[Metric]:
    return sorted(text_string_to_metric_families(page.decode()), key=lambda family: family.name)


def _get(port: int, headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=headers)
    with urllib.request.urlopen(request, timeout=5) as r:
        body, got = r.read(), {k: v for k, v in r.headers.items() if k in ("Content-Type", "Content-Encoding")}
    return (gzip.decompress(body) if got.get("Content-Encoding") == "gzip" else body), got


def _status(port: int, method: str) -> tuple[int, str | None]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status, r.headers.get("Allow")
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Allow")
