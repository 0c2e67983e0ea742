"""The operator's one door to the Kubernetes API server: its answers typed, its writes budgeted.

Every call the operator makes goes through :func:`call`, which turns the client's exceptions
(``ApiException`` with an HTTP status, aiohttp's and the socket's errors) into the kinds of
:mod:`flowmap_operator.errors` that say what to do: ``NotFound``, ``Conflict``, ``Throttled``,
``Rejected``, ``InDoubt``. No other module reads an HTTP status. Writes also go through
:class:`Writes`: one token from one bucket per write, counted by kind, verb and outcome.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import aiohttp
from kubernetes_asyncio.client.exceptions import ApiException

from flowmap_operator import metrics
from flowmap_operator.errors import ApiError, Conflict, InDoubt, NotFound, Rejected, Throttled

GROUP, VERSION = "flowmap.dev", "v1alpha1"
MERGE = "application/merge-patch+json"
FIELD_MANAGER = "flowmap-operator"  # one stable manager for everything the operator writes

T = TypeVar("T")


def typed(exc: ApiException) -> ApiError:
    """The kind of an API server's refusal, with its own words."""
    status = exc.status
    try:
        message = str(json.loads(exc.body or "{}").get("message") or exc.reason)
    except (ValueError, AttributeError):
        message = str(exc.reason)
    if status == 404:
        return NotFound(status, message)
    if status == 409:
        return Conflict(status, message)
    if status == 429:
        return Throttled(status, message)
    if status is not None and 400 <= status < 500:
        return Rejected(status, message)
    return InDoubt(status, message)


async def call(awaitable: Awaitable[T]) -> T:
    """Await one call of the API client; its failure raised as one of the typed ``ApiError`` kinds."""
    try:
        return await awaitable
    except ApiException as exc:
        raise typed(exc) from None
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        raise InDoubt(None, f"API server unreachable: {exc}") from None


class Bucket:
    """A token bucket without bursts: writes spaced ``1/rate`` apart, so that no window of the API
    server's sees more than ``rate`` per second (plus the one write an idle bucket holds)."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.clock = rate, clock
        self.tokens, self.stamp = min(rate, 1.0), clock()

    async def take(self) -> None:
        while True:
            now = self.clock()
            self.tokens = min(1.0, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                return
            await asyncio.sleep((1.0 - self.tokens) / self.rate)


class Writes:
    """Every write the operator makes, of any kind: one token of the shared budget, then the call,
    counted by kind, verb and outcome (the HTTP status, or "error" for no answer)."""

    def __init__(self, bucket: Bucket) -> None:
        self.bucket = bucket

    async def __call__(self, kind: str, verb: str, awaitable: Awaitable[T]) -> T:
        await self.bucket.take()
        started = time.monotonic()
        try:
            result = await call(awaitable)
        except ApiError as exc:
            metrics.API_WRITES.labels(kind, verb, str(exc.status) if exc.status else "error").inc()
            if isinstance(exc, Throttled):
                metrics.API_THROTTLED.inc()
            raise
        metrics.API_WRITES.labels(kind, verb, "ok").inc()
        metrics.API_WRITE_SECONDS.observe(time.monotonic() - started)
        return result
