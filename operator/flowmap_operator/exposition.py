"""The operator's /metrics: prometheus_client's page for its registry, the edge families written here.

prometheus_client makes an object of every sample and formats every label of it at each scrape:
at 10,000 edges (50,000 samples) that took over a second of the operator's one CPU. The edge
families' samples are written instead in one pass over the ledger, from label sets made once per
edge and lines made again only for the edges whose counters the ledger wrote since
(``metrics.EdgeCollector.samples``). All else is prometheus_client's, as its own server does it
(``make_wsgi_app``): the other families, the HELP and TYPE lines, which format a scraper gets (text
or OpenMetrics, and their escaping of names), gzip (at a faster level), the ``name[]`` filter.
Where it would write an edge's sample otherwise than we do (the ``dots`` escaping renames metrics
and labels; a ``name[]`` filter), it writes the edge families itself, from the same series.
"""

from __future__ import annotations

import gzip
import threading
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.registry import Collector

from flowmap_operator.ledger import Counters
from flowmap_operator.metrics import EdgeCollector, EdgeLabels, EdgeSeries

Encoder = Callable[[Collector], bytes]

OPENMETRICS = "application/openmetrics-text"
EOF = "# EOF\n"  # an OpenMetrics page's last line
# prometheus_client compresses at level 9: 0.3 s for the 11 MB of 10,000 edges, where level 1 takes
# a tenth of that for an answer 40% bigger (1.1 MB instead of 0.8 MB).
GZIP_LEVEL = 1
# One edge whose labels need escaping and whose counters Go writes with an exponent: where
# prometheus_client writes its samples as we do, it writes every edge's as we do.
_PROBE = EdgeSeries([(EdgeLabels.of(('a"\\b', "shop.api", 8080, "TCP"), frozenset({"http"}), ("shop", "shop")),
                      Counters(12_345_678, 1_000_000, 999_999, 3, 0))], 0)


class _Families:
    """Families collected already, for prometheus_client's encoders."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def page(registry: Collector, edges: EdgeCollector, accept: str | None, names: list[str] | None = None
         ) -> tuple[bytes, str]:
    """The page for one scrape and its content type: ``registry``'s families, then the edges'.

    ``accept`` is the scraper's Accept header; ``names`` the ``name[]`` parameters, if any (only
    the samples of these names, as prometheus_client's ``restricted_registry``).
    """
    encoder, content_type = choose_encoder(accept or "")
    openmetrics = content_type.startswith(OPENMETRICS)
    series = edges.series()
    restricted = registry if names is None else _Families(_restricted(registry, names))
    text = [_text(encoder, restricted, openmetrics)]
    written = _edge_text(encoder, series, openmetrics) if names is None else None
    if written is None:
        families = EdgeCollector.families(series)
        text.append(_text(encoder, _Families(families if names is None else _restricted(_Families(families), names)),
                          openmetrics))
    else:
        text.append(written)
    if openmetrics:
        text.append(EOF)
    return "".join(text).encode("utf-8"), content_type


def _edge_text(encoder: Encoder, series: EdgeSeries, openmetrics: bool) -> str | None:
    """The edge families, their HELP and TYPE lines written by ``encoder`` and their samples
    here; None if ``encoder`` writes the probe edge's samples otherwise."""
    bare = EdgeCollector.families(EdgeSeries([], series.overflow))  # and the overflow gauge whole
    heads = [_text(encoder, _Families([family]), openmetrics) for family in bare[:3]]
    probes = [_text(encoder, _Families([family]), openmetrics) for family in EdgeCollector.families(_PROBE)[:3]]
    if probes != [head + samples for head, samples in zip(heads, EdgeCollector.samples(_PROBE))]:
        return None
    samples = EdgeCollector.samples(series)
    return "".join((heads[0], samples[0], heads[1], samples[1], heads[2], samples[2],
                    _text(encoder, _Families(bare[3:]), openmetrics)))


def _text(encoder: Encoder, families: Collector, openmetrics: bool) -> str:
    """What ``encoder`` writes of ``families``, without the end of an OpenMetrics page."""
    text = encoder(families).decode("utf-8")
    return text[:-len(EOF)] if openmetrics and text.endswith(EOF) else text


def _restricted(collector: Collector, names: list[str]) -> list[Metric]:
    """The families of ``collector`` with only the samples named in ``names``: prometheus_client's filter."""
    if not isinstance(collector, CollectorRegistry):
        registry = CollectorRegistry(auto_describe=True)
        registry.register(collector)
        collector = registry
    return list(collector.restricted_registry(names).collect())


def app(registry: Collector, edges: EdgeCollector) -> WSGIApplication:
    """The WSGI application serving /metrics, answering as prometheus_client's ``make_wsgi_app``."""

    def metrics(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"]
        if method == "OPTIONS":
            status, headers, output = "200 OK", [("Allow", "OPTIONS,GET")], b""
        elif method != "GET":
            status, headers = "405 Method Not Allowed", [("Allow", "OPTIONS,GET")]
            output = f"# HTTP {status}: {method}; use OPTIONS or GET\n".encode()
        elif environ["PATH_INFO"] == "/favicon.ico":
            status, headers, output = "200 OK", [], b""
        else:  # any other path is /metrics, as in prometheus_client
            params = parse_qs(environ.get("QUERY_STRING", ""))
            output, content_type = page(registry, edges, environ.get("HTTP_ACCEPT"), params.get("name[]"))
            status, headers = "200 OK", [("Content-Type", content_type)]
            if gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING") or ""):
                output = gzip.compress(output, compresslevel=GZIP_LEVEL)
                headers.append(("Content-Encoding", "gzip"))
        start_response(status, headers)
        return [output]

    return metrics


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape under way does not hold up the operator's exit


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the name the base class gives it
        """Nothing: a scrape every few seconds is no news."""


def serve(port: int, registry: Collector, edges: EdgeCollector) -> WSGIServer:
    """Serve /metrics on ``port`` of every IPv4 address, each scrape on a thread of its own, as
    prometheus_client's ``start_http_server`` does."""
    server = make_server("0.0.0.0", port, app(registry, edges), _Server, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
