"""Following one of the operator's streams (``PolicyService.Watch``, ``CaptureService.Watch``):
the one way the agent keeps a stream open, with TLS and the bearer token as reports use, and
the one backoff (jittered, from 0.5 s to 30 s) when it breaks or cannot open; and the one way a
follower runs beside what acts on it (:func:`alongside`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import grpc
from prometheus_client import Counter

from flowmap_agent.errors import failure
from flowmap_agent.settings import Settings
from flowmap_api.pacing import Backoff, pause

log = logging.getLogger("flowmap.agent.following")
# The server's default minimum ping interval: pinging more often on an idle stream gets it closed.
KEEPALIVE_MS = 300_000
Metadata = tuple[tuple[str, str], ...]
T = TypeVar("T")


def secure_channel(settings: Settings, max_receive: int | None = None) -> grpc.aio.Channel:
    """A channel to the operator, trusting its CA (read again each time: it may be rotated)."""
    creds = grpc.ssl_channel_credentials(root_certificates=Path(settings.ca_file).read_bytes())
    options: list[tuple[str, int]] = [("grpc.keepalive_time_ms", KEEPALIVE_MS)]
    if max_receive is not None:
        options.append(("grpc.max_receive_message_length", max_receive))
    return grpc.aio.secure_channel(settings.operator, creds, options=options)


def bearer(settings: Settings) -> Metadata:
    """The call's credentials: the projected token, read again each time (it rotates)."""
    return (("authorization", f"Bearer {Path(settings.token_file).read_text().strip()}"),)


async def follow(settings: Settings, open_stream: Callable[[grpc.aio.Channel, Metadata], AsyncIterable[T]],
                 receive: Callable[[T], None], breaks: Counter, stop: asyncio.Event, *, what: str, stays: str,
                 max_receive: int) -> None:
    """Until ``stop``: open the stream, hand each message to ``receive``; when it ends or breaks,
    count it in ``breaks`` by code, say that ``stays``, and open it again after the backoff."""
    backoff = Backoff(0.5, 30.0, jitter=0.5)
    while not stop.is_set():
        channel: grpc.aio.Channel | None = None
        try:
            channel = secure_channel(settings, max_receive)
            async for message in open_stream(channel, bearer(settings)):
                backoff.reset()
                receive(message)
            breaks.labels("ended").inc()
            log.warning("the %s stream ended; %s", what, stays)
        except (grpc.RpcError, OSError) as exc:
            failed = failure(exc)  # whatever the code, the stream is opened again after the backoff
            breaks.labels(failed.label).inc()
            log.warning("%s stream broken (%s); %s, reconnecting in %.1f s", what, failed.code, stays, backoff.current)
        finally:
            if channel is not None:
                await channel.close()
        await pause(stop, backoff.next())


async def alongside(stop: asyncio.Event, *jobs: Coroutine[Any, Any, None]) -> None:
    """Run ``jobs`` (a follower and what acts on what it follows) until ``stop``, then cancel them."""
    tasks = [asyncio.create_task(job) for job in jobs]
    try:
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
