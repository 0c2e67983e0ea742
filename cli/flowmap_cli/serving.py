"""``flowmap graph --serve``: the map as a page that keeps itself up to date.

``/`` is the page (the picture inline, and a script that swaps in a fresh ``/map.svg`` every few
seconds), ``/map.svg`` the picture alone. Standard library only. However many tabs are open, the
API server is read and dot run at most once per half refresh interval (and 0.5 s): every request in that
window gets the same picture. The server listens on loopback unless told otherwise, answers only
GET and HEAD, and serves its page under a Content-Security-Policy that allows its one script.
What it serves is drawn by the function ``flowmap_cli.graph`` hands it: this module does not
import ``graph``, which imports it.
"""

from __future__ import annotations

import argparse
import re
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from collections.abc import Callable
from typing import Any

from flowmap_cli import kube, rendering

MAX_CLIENTS = 32  # requests served at once; more get 503 rather than one thread each
TEXT = "text/plain; charset=utf-8"


class Picture:
    """The latest SVG from ``draw``, redrawn when older than ``ttl`` seconds, by one thread at a time."""

    def __init__(self, draw: Callable[[], bytes], ttl: float) -> None:
        self.draw, self.ttl = draw, ttl
        self.lock = threading.Lock()
        self.svg, self.error, self.stamp = b"", "", float("-inf")

    def get(self) -> tuple[bytes, str]:
        """The picture and, when the last attempt failed, why (the picture is then the last good one)."""
        with self.lock:
            if time.monotonic() - self.stamp >= self.ttl:
                try:
                    self.svg, self.error = self.draw(), ""
                except (kube.ClusterError, rendering.RenderError) as exc:
                    self.error = str(exc)
                self.stamp = time.monotonic()
            return self.svg, self.error


def handler(picture: Picture, every: float, title: str) -> type[BaseHTTPRequestHandler]:
    slots = threading.BoundedSemaphore(MAX_CLIENTS)
    page_csp = (f"default-src 'none'; script-src {rendering.script_hash(every)}; style-src 'unsafe-inline'; "
                "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

    class Handler(BaseHTTPRequestHandler):
        server_version = "flowmap"
        timeout = 30  # a client that sends nothing for this long is dropped

        def do_GET(self) -> None:  # noqa: N802 - the standard library's name
            if not slots.acquire(blocking=False):
                self._send(503, b"busy\n", TEXT, "default-src 'none'")
                return
            try:
                path = self.path.split("?", 1)[0]
                if path not in ("/", "/map.svg"):
                    self._send(404, b"not found: try / or /map.svg\n", TEXT, "default-src 'none'")
                    return
                svg, error = picture.get()
                if not svg:
                    self._send(503, f"{error}\n".encode(), TEXT, "default-src 'none'")
                elif path == "/map.svg":
                    # The last good picture, even after a failed read; the header says it is stale.
                    self._send(200, svg, "image/svg+xml", "default-src 'none'; style-src 'unsafe-inline'",
                               {"X-Flowmap-Error": error[:500]} if error else {})
                else:
                    self._send(200, rendering.page(svg, title, every).encode(), "text/html; charset=utf-8", page_csp)
            finally:
                slots.release()

        def do_HEAD(self) -> None:  # noqa: N802
            self.do_GET()

        def _send(self, code: int, body: bytes, kind: str, csp: str, extra: dict[str, str] | None = None) -> None:
            self.send_response(code)
            for name, value in {"Content-Type": kind, "Content-Length": str(len(body)), "Cache-Control": "no-store",
                                "Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff",
                                **(extra or {})}.items():
                # An error message may hold anything: no line break may reach a header.
                self.send_header(name, re.sub(r"[^\x20-\x7e]", " ", value))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the standard library's name
            pass  # a request every few seconds per tab: not worth a line each

    return Handler


def serve(draw: Callable[[], bytes], title: str, args: argparse.Namespace) -> int:
    """Serve the SVG ``draw`` makes, under ``title``, until SIGINT or SIGTERM; a map that cannot be
    read at start is an error (kube.ClusterError), later a note."""
    # Half the page's interval keeps a tab at most that stale; never below 0.5 s, whatever --every says.
    picture = Picture(draw, max(0.5, args.every / 2))
    _, error = picture.get()
    if error:
        raise kube.ClusterError(error)
    server_class = type("Server", (ThreadingHTTPServer,), {
        "address_family": socket.AF_INET6 if ":" in args.address else socket.AF_INET, "daemon_threads": True})
    server = server_class((args.address, args.port), handler(picture, args.every, title))
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in str(host) else host
    print(f"flowmap graph: serving the map on http://{shown}:{port}/ (Ctrl-C to stop)", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
