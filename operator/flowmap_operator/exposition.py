"""The operator's /metrics: prometheus_client's page for its registry, the edge families written here.

prometheus_client makes an object of every sample and formats every label of it at each scrape:
at 10,000 edges (50,000 samples) that took over a second of the operator's one CPU. The edge
families' samples are written instead in one pass over the published marks, from label sets made
once per edge (``metrics.EdgeCollector.samples``). All else is prometheus_client's, as its own server does it
(``make_wsgi_app``): the other families, the HELP and TYPE lines, which format a scraper gets (text
or OpenMetrics, and their escaping of names), gzip (at a faster level), the ``name[]`` filter.
Where it would write an edge's sample otherwise than we do (the ``dots`` escaping renames metrics
and labels; a ``name[]`` filter), it writes the edge families itself, from the same series.

The edge samples change only when a checkpoint publishes new marks (every few seconds), and they
are nearly all of the page (11 MB at 10,000 edges). So they are made once per published set of
marks, encoded (and deflated, once a scraper asks for gzip), on a thread of their own ahead of the
next scrape (:class:`Edges`); a scrape writes the rest of the page, a few KB, and sends the edges'
part as it is. A scrape thus holds the GIL for a few milliseconds, not for the 50 to 100 the whole
page took, which it had to share with the event loop while the operator ingests.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import Any, NamedTuple
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.registry import Collector

from flowmap_operator.ledger import Counters
from flowmap_operator.metrics import EdgeCollector, EdgeLabels, EdgeSeries

log = logging.getLogger("flowmap.operator.exposition")

Encoder = Callable[[Collector], bytes]

OPENMETRICS = "application/openmetrics-text"
EOF = b"# EOF\n"  # an OpenMetrics page's last line
# prometheus_client compresses at level 9: 0.3 s for the 11 MB of 10,000 edges, where level 1 takes
# a tenth of that for an answer 40% bigger (1.1 MB instead of 0.8 MB).
GZIP_LEVEL = 1
# A gzip member's header (RFC 1952): deflate, no name, no time, "fastest" (level 1), OS unknown.
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x04\xff"
AHEAD = 1.0  # seconds between two looks for newly published marks to make the edge samples of
IDLE = 300.0  # seconds without a scrape after which nothing is made ahead
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


class Block:
    """The samples of the three edge counter families for one set of published marks, encoded,
    and deflated once a scraper asks for gzip: what every scrape of these marks sends as it is.

    Each family's samples are deflated on their own to a byte boundary, so a scrape puts what it
    writes around them in one gzip stream without compressing them again (:meth:`Page.gzip`)."""

    def __init__(self, series: EdgeSeries) -> None:
        self.series = EdgeSeries([], series.overflow, series.marks)  # what it was made of, not its rows
        self.samples = tuple(text.encode("utf-8") for text in EdgeCollector.samples(series))
        self._deflated: tuple[bytes, ...] | None = None
        self._lock = threading.Lock()

    def deflated(self) -> tuple[bytes, ...]:
        """``samples``, each deflated; made once, by the first thread to ask (zlib lets go of the GIL)."""
        with self._lock:
            if self._deflated is None:
                self._deflated = tuple(_deflate(part) for part in self.samples)
            return self._deflated


class Edges:
    """The edge samples /metrics sends: a :class:`Block` kept while the published marks are the
    same (a checkpoint replaces them whole), made again on a thread of its own (:meth:`keep`)
    within ``AHEAD`` seconds of a checkpoint, so that a scrape finds it made.

    A label set that changes between two checkpoints (an edge's apps, a group's namespace) shows
    with the next marks: the edge part of the page is as old as the marks it exports."""

    def __init__(self, collector: EdgeCollector) -> None:
        self.collector = collector
        self._block: Block | None = None
        self._lock = threading.Lock()  # one block made at a time: a scrape meanwhile waits for it
        self.scraped = -IDLE  # time.monotonic() of the last scrape
        self.zipped = False  # a scraper asked for gzip: blocks are deflated ahead too

    @property
    def made(self) -> Block | None:
        """The block made last, if any."""
        return self._block

    def block(self) -> Block:
        """The block of the marks published now."""
        block = self._block  # read once: another thread may replace it meanwhile
        if block is not None and block.series.of(*self.collector.source()):
            return block
        with self._lock:
            block = self._block
            if block is None or not block.series.of(*self.collector.source()):
                block = self._block = Block(self.collector.series())
        return block

    def ahead(self) -> None:
        """Make the block of the marks published now, if anyone scraped lately."""
        if time.monotonic() - self.scraped < IDLE:
            block = self.block()
            if self.zipped:
                block.deflated()

    def keep(self, stop: threading.Event) -> None:
        """:meth:`ahead` every ``AHEAD`` seconds until ``stop`` is set: a thread's loop."""
        while not stop.wait(AHEAD):
            try:
                self.ahead()
            except Exception:  # noqa: BLE001 - the next scrape makes it, and answers 500 if it fails too
                log.exception("making the edge samples ahead of a scrape failed")


class Page(NamedTuple):
    """One scrape's answer: its parts in order, some of them a block's samples, and its content type."""

    parts: list[bytes]
    block: Block | None
    at: tuple[int, ...]  # where the block's samples are in ``parts``, in their order
    content_type: str

    def text(self) -> bytes:
        return b"".join(self.parts)

    def gzip(self) -> list[bytes]:
        """The page as one gzip member, in parts: the block's samples as deflated once, the rest
        deflated now (a few KB), one CRC over all."""
        deflated = dict(zip(self.at, self.block.deflated())) if self.block else {}
        out, fresh, crc, size = [_GZIP_HEADER], list[bytes](), 0, 0
        for index, part in enumerate(self.parts):
            crc, size = zlib.crc32(part, crc), size + len(part)  # zlib lets go of the GIL for big parts
            if index in deflated:
                out += [_deflate(b"".join(fresh)), deflated[index]] if fresh else [deflated[index]]
                fresh = []
            else:
                fresh.append(part)
        return [*out, _deflate(b"".join(fresh), zlib.Z_FINISH), struct.pack("<II", crc, size & 0xFFFFFFFF)]


def page(registry: Collector, edges: Edges, accept: str | None, names: list[str] | None = None) -> Page:
    """The page for one scrape: ``registry``'s families, then the edges'.

    ``accept`` is the scraper's Accept header; ``names`` the ``name[]`` parameters, if any (only
    the samples of these names, as prometheus_client's ``restricted_registry``).
    """
    encoder, content_type = choose_encoder(accept or "")
    openmetrics = content_type.startswith(OPENMETRICS)
    parts = [_text(encoder, registry if names is None else _Families(_restricted(registry, names)), openmetrics)]
    block, at = None, tuple[int, ...]()
    if names is None and _writes_as_we_do(encoder, openmetrics):
        block = edges.block()
        bare = EdgeCollector.families(EdgeSeries([], block.series.overflow))  # and the overflow gauge whole
        for family, samples in zip(bare[:3], block.samples):
            parts += [_text(encoder, _Families([family]), openmetrics), samples]
            at += (len(parts) - 1,)
        parts.append(_text(encoder, _Families(bare[3:]), openmetrics))
    else:
        families = EdgeCollector.families(edges.collector.series())
        parts.append(_text(encoder, _Families(families if names is None else _restricted(_Families(families), names)),
                           openmetrics))
    if openmetrics:
        parts.append(EOF)
    return Page(parts, block, at, content_type)


def _writes_as_we_do(encoder: Encoder, openmetrics: bool) -> bool:
    """Whether ``encoder`` writes the probe edge's samples as ``EdgeCollector.samples`` does."""
    bare = EdgeCollector.families(EdgeSeries([], 0))
    heads = [_text(encoder, _Families([family]), openmetrics) for family in bare[:3]]
    probes = [_text(encoder, _Families([family]), openmetrics) for family in EdgeCollector.families(_PROBE)[:3]]
    return probes == [head + samples.encode() for head, samples in zip(heads, EdgeCollector.samples(_PROBE))]


def _text(encoder: Encoder, families: Collector, openmetrics: bool) -> bytes:
    """What ``encoder`` writes of ``families``, without the end of an OpenMetrics page."""
    text = encoder(families)
    return text[:-len(EOF)] if openmetrics and text.endswith(EOF) else text


def _deflate(data: bytes, mode: int = zlib.Z_SYNC_FLUSH) -> bytes:
    """``data`` as raw deflate blocks that refer to nothing before them, ending on a byte boundary
    (``Z_SYNC_FLUSH``: more may follow) or ending the stream (``Z_FINISH``)."""
    deflate = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
    return deflate.compress(data) + deflate.flush(mode)


def _restricted(collector: Collector, names: list[str]) -> list[Metric]:
    """The families of ``collector`` with only the samples named in ``names``: prometheus_client's filter."""
    if not isinstance(collector, CollectorRegistry):
        registry = CollectorRegistry(auto_describe=True)
        registry.register(collector)
        collector = registry
    return list(collector.restricted_registry(names).collect())


def app(registry: Collector, edges: Edges) -> WSGIApplication:
    """The WSGI application serving /metrics, answering as prometheus_client's ``make_wsgi_app``."""

    def metrics(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"]
        output: list[bytes]
        if method == "OPTIONS":
            status, headers, output = "200 OK", [("Allow", "OPTIONS,GET")], []
        elif method != "GET":
            status, headers = "405 Method Not Allowed", [("Allow", "OPTIONS,GET")]
            output = [f"# HTTP {status}: {method}; use OPTIONS or GET\n".encode()]
        elif environ["PATH_INFO"] == "/favicon.ico":
            status, headers, output = "200 OK", [], []
        else:  # any other path is /metrics, as in prometheus_client
            edges.scraped = time.monotonic()
            params = parse_qs(environ.get("QUERY_STRING", ""))
            answer = page(registry, edges, environ.get("HTTP_ACCEPT"), params.get("name[]"))
            status, headers, output = "200 OK", [("Content-Type", answer.content_type)], answer.parts
            if gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING") or ""):
                edges.zipped = True
                output = [b"".join(answer.gzip())]  # a tenth of the page: one send, one wait for the GIL after it
                headers.append(("Content-Encoding", "gzip"))
        # The text sent part by part: the page (megabytes) is not copied once more to be joined.
        headers.append(("Content-Length", str(sum(map(len, output)))))
        start_response(status, headers)
        return output

    return metrics


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape under way does not hold up the operator's exit

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.closed = threading.Event()  # ends the thread that makes the edge samples ahead

    def server_close(self) -> None:
        self.closed.set()
        super().server_close()


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the name the base class gives it
        """Nothing: a scrape every few seconds is no news."""


def serve(port: int, registry: Collector, edges: EdgeCollector) -> WSGIServer:
    """Serve /metrics on ``port`` of every IPv4 address, each scrape on a thread of its own, as
    prometheus_client's ``start_http_server`` does; the edge samples made ahead on one more."""
    kept = Edges(edges)
    server = make_server("0.0.0.0", port, app(registry, kept), _Server, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    threading.Thread(target=kept.keep, args=(server.closed,), name="metrics-ahead", daemon=True).start()
    return server
