"""The write budget finds what the API server accepts: up while it answers quickly and there is
more to write, down at once when it throttles, stops answering, or answers slower; never outside
the floor and the ceiling the user set. Then the door that feeds it, and the lists read a page
at a time."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from kubernetes_asyncio.client.exceptions import ApiException

from flowmap_operator import kubeapi
from flowmap_operator.budget import PERIOD, RAMP, Budget
from flowmap_operator.errors import Throttled


def busy(budget: Budget, start: float, periods: int, latency: float = 0.005, per_period: int = 10) -> float:
    """``periods`` periods of writes that waited for their tokens, each answered in ``latency``."""
    now = start
    for _ in range(periods):
        for i in range(per_period):
            sent = now + i * PERIOD / per_period
            budget.answered(sent, sent + latency, waited=True)
        now += PERIOD
    budget.answered(now + PERIOD, now + PERIOD + latency, waited=True)  # closes the last period
    return now + PERIOD


def test_it_starts_at_the_floor_and_grows_to_the_ceiling_while_quick_answers_leave_a_backlog() -> None:
    budget = Budget(20, 200, now=0.0)
    assert budget.rate == 20
    busy(budget, 0.0, 1)
    assert budget.rate == pytest.approx(20 + 180 / RAMP)  # additive: one step a period
    busy(budget, 10.0, 2 * RAMP)
    assert budget.rate == 200  # and no further


def test_without_a_backlog_it_does_not_grow() -> None:
    budget = Budget(20, 200, now=0.0)
    for i in range(100):  # every write found its token waiting: the rate is not what limits
        budget.answered(i * 0.1, i * 0.1 + 0.005, waited=False)
    assert budget.rate == 20


def test_a_429_halves_it_at_once_but_only_once_for_the_writes_already_sent() -> None:
    budget = Budget(20, 200, now=0.0)
    now = busy(budget, 0.0, 3 * RAMP)
    assert budget.rate == 200
    budget.refused(sent=now - 0.05, now=now)
    assert budget.rate == 100
    budget.refused(sent=now - 0.04, now=now + 0.01)  # sent before the cut: said nothing new
    budget.answered(now - 0.03, now + 0.5, waited=True)  # queued at the old rate: not held against it
    assert budget.rate == 100
    budget.refused(sent=now + 0.1, now=now + 0.2)  # sent after it: the server still has enough
    assert budget.rate == 50


def test_it_never_goes_below_the_floor() -> None:
    budget = Budget(20, 200, now=0.0)
    for i in range(10):
        budget.refused(sent=float(i), now=i + 0.1)
    assert budget.rate == 20


def test_answers_slower_than_the_lowest_seen_cut_it_before_anything_is_refused() -> None:
    budget = Budget(20, 200, now=0.0)
    now = busy(budget, 0.0, 3 * RAMP, latency=0.005)
    assert budget.rate == 200
    # Priority and Fairness queues the writes: each answer takes 100 ms instead of 5.
    busy(budget, now, 1, latency=0.1)
    assert budget.rate == pytest.approx(150)
    rate = budget.rate
    busy(budget, now + 10, 1, latency=0.02)  # slower than 5 ms, but within the slack: noise
    assert budget.rate > rate


def test_a_floor_at_the_ceiling_is_a_fixed_rate_and_a_ceiling_below_it_is_refused() -> None:
    budget = Budget(20, 20, now=0.0)
    busy(budget, 0.0, 50)
    budget.refused(sent=60.0, now=60.1)
    assert budget.rate == 20
    with pytest.raises(ValueError, match="floor"):
        Budget(20, 10, now=0.0)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_door_feeds_every_outcome_to_the_budget_and_the_bucket_keeps_its_rate() -> None:
    clock = Clock()
    budget = Budget(10, 100, now=0.0)
    writes = kubeapi.Writes(budget, clock)
    clock.now = busy(budget, 0.0, 3 * RAMP)
    assert budget.rate == 100

    async def answer(value: Any = None, error: ApiException | None = None) -> Any:
        clock.now += 0.01
        if error is not None:
            raise error
        return value

    async def run() -> None:
        clock.now += 1.0  # a token is there: the bucket does not wait on this clock
        assert await writes("connection", "status", answer("ok")) == "ok"
        assert writes.bucket.rate == 100  # the budget's, taken at the first answer
        throttled = ApiException(status=429, reason="Too Many Requests")
        throttled.body = json.dumps({"message": "too many requests, please try again later"})
        clock.now += 1.0
        with pytest.raises(Throttled):
            await writes("connection", "status", answer(error=throttled))
        assert budget.rate == writes.bucket.rate == 50

    asyncio.run(run())


def test_a_token_waited_for_says_there_is_more_to_write_than_the_rate() -> None:
    async def run() -> list[bool]:
        bucket = kubeapi.Bucket(200.0)
        return [await bucket.take() for _ in range(3)]

    assert asyncio.run(run()) == [False, True, True]  # the one an idle bucket holds, then a wait each


class Pages:
    """A CustomObjectsApi listing ``items`` two at a time; its first continue token expires once."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items, self.calls, self.expired = items, [], False

    async def _page(self, plural: str, limit: int, token: str) -> dict[str, Any]:
        self.calls.append((plural, limit, token))
        if token and not self.expired:
            self.expired = True
            raise ApiException(status=410, reason="Gone")
        start = int(token or 0)
        more = str(start + limit) if start + limit < len(self.items) else ""
        return {"items": self.items[start:start + limit], "metadata": {"continue": more}}

    def list_cluster_custom_object(self, group: str, version: str, plural: str, limit: int,
                                   _continue: str) -> Any:
        return self._page(plural, limit, _continue)


def test_a_list_is_read_a_page_at_a_time_and_started_over_when_its_token_expires() -> None:
    objects = [{"metadata": {"name": f"c{i}"}} for i in range(5)]
    api = Pages(objects)
    assert asyncio.run(kubeapi.listed(api, "connections", page=2)) == objects  # type: ignore[arg-type]
    assert api.calls == [("connections", 2, ""), ("connections", 2, "2"),  # expired: from the start
                         ("connections", 2, ""), ("connections", 2, "2"), ("connections", 2, "4")]
