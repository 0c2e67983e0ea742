"""The operator's one door to the Kubernetes API server: its answers typed, its writes budgeted.

Every call the operator makes goes through :func:`call`, which turns the client's exceptions
(``ApiException`` with an HTTP status, aiohttp's and the socket's errors) into the kinds of
:mod:`flowmap_operator.errors` that say what to do: ``NotFound``, ``Conflict``, ``Throttled``,
``Expired``, ``Rejected``, ``InDoubt``. No other module reads an HTTP status. Writes also go through
:class:`Writes`: one token from one bucket per write, counted by kind, verb and outcome, each
outcome told to the write budget (flowmap_operator.budget), whose rate the bucket then keeps.
Lists go through :func:`listed`, a page at a time.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
from kubernetes_asyncio.client import CustomObjectsApi
from kubernetes_asyncio.client.exceptions import ApiException

from flowmap_operator import metrics
from flowmap_operator.budget import Budget
from flowmap_operator.errors import ApiError, Conflict, Expired, InDoubt, NotFound, Rejected, Throttled

GROUP, VERSION = "flowmap.dev", "v1alpha1"
PAGE = 500  # objects per list call: what kubectl asks for, and a response the server builds without strain
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
    return by_status(status, message)


def by_status(status: int | None, message: str) -> ApiError:
    """The kind of a refusal by its HTTP status (a call's, or a watch's ERROR event's)."""
    if status == 404:
        return NotFound(status, message)
    if status == 409:
        return Conflict(status, message)
    if status == 429:
        return Throttled(status, message)
    if status == 410:
        return Expired(status, message)
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


async def listed(api: CustomObjectsApi, plural: str, page: int = PAGE) -> list[dict[str, Any]]:
    """Every object of a cluster-scoped custom resource of ours, read ``page`` at a time.

    The pages are one snapshot (the continue token carries its resourceVersion). A token that
    expired meanwhile (etcd compacted past it) starts the list over, for a snapshot again.
    """
    while True:
        items: list[dict[str, Any]] = []
        token = ""  # the next page's (empty: the first)
        try:
            while True:
                found = await call(api.list_cluster_custom_object(GROUP, VERSION, plural, limit=page, _continue=token))
                items += found.get("items", [])
                token = (found.get("metadata") or {}).get("continue") or ""
                if not token:
                    return items
        except Expired:
            continue


class Bucket:
    """A token bucket without bursts: writes spaced ``1/rate`` apart, so that no window of the API
    server's sees more than ``rate`` per second (plus the one write an idle bucket holds). The rate
    may change at any time (the budget's); the next token follows it.

    Each take reserves the next slot rather than polling for a token: with several writes waiting
    at once, each wakes once, at its own time, in the order it asked."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.clock = rate, clock
        self.next = clock()  # when the next token is there

    async def take(self) -> bool:
        """Take one token; True if it had to be waited for (there is more to write than the rate)."""
        now = self.clock()
        at = max(now, self.next)
        self.next = at + 1.0 / self.rate
        if at > now:
            await asyncio.sleep(at - now)
        return at > now


class Writes:
    """Every write the operator makes, of any kind: one token of the shared budget, then the call,
    counted by kind, verb and outcome (the HTTP status, or "error" for no answer). How it went
    (how soon, or a 429, or no answer) sets the budget's rate, which the bucket then keeps."""

    def __init__(self, budget: Budget, clock: Callable[[], float] = time.monotonic) -> None:
        self.budget, self.clock = budget, clock
        self.bucket = Bucket(budget.rate, clock)
        metrics.WRITE_BUDGET.set(budget.rate)

    def most(self, seconds: float) -> int:
        """The most paced writes that can start within ``seconds``: at the ceiling, plus the one an
        idle bucket holds."""
        return math.ceil(self.budget.ceiling * max(0.0, seconds)) + 1

    async def __call__(self, kind: str, verb: str, awaitable: Awaitable[T], paced: bool = True) -> T:
        """Make one write; ``paced=False`` for writes bounded by their caller (the checkpoints of
        flowmap_operator.checkpointing), which take no token and wait behind no other write."""
        waited = await self.bucket.take() if paced else False
        sent = self.clock()
        try:
            result = await call(awaitable)
        except ApiError as exc:
            metrics.API_WRITES.labels(kind, verb, str(exc.status) if exc.status else "error").inc()
            if isinstance(exc, Throttled):
                metrics.API_THROTTLED.inc()
            if isinstance(exc, (Throttled, InDoubt)):
                self.budget.refused(sent, self.clock())
            else:
                self.budget.answered(sent, self.clock(), waited)
            self._follow()
            raise
        self.budget.answered(sent, self.clock(), waited)
        self._follow()
        metrics.API_WRITES.labels(kind, verb, "ok").inc()
        metrics.API_WRITE_SECONDS.observe(self.clock() - sent)
        return result

    def _follow(self) -> None:
        if self.bucket.rate != self.budget.rate:
            self.bucket.rate = self.budget.rate
            metrics.WRITE_BUDGET.set(self.budget.rate)
