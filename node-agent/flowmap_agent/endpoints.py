"""The agent's HTTP endpoints: ``/healthz`` (the loop turns), ``/readyz`` (the dp reports) and
``/metrics`` (flowmap_agent.metrics). No access log: a line per kubelet probe and scrape is noise."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import generate_latest

from flowmap_agent.metrics import REGISTRY


async def serve(port: int, alive: Callable[[], bool], ready: Callable[[], bool]) -> web.AppRunner:
    """Serve the endpoints on ``port`` until the returned runner is cleaned up."""
    async def healthz(_: web.Request) -> web.Response:
        ok = alive()
        return web.Response(status=200 if ok else 503, text="ok" if ok else "stalled")

    async def readyz(_: web.Request) -> web.Response:
        ok = ready()
        return web.Response(status=200 if ok else 503, text="ok" if ok else "not ready")

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(REGISTRY), content_type="text/plain")

    app = web.Application()
    app.add_routes([web.get("/healthz", healthz), web.get("/readyz", readyz), web.get("/metrics", metrics)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, port=port).start()
    return runner
