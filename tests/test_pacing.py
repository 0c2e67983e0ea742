"""The one backoff and the one pause that the operator and the agent wait with (flowmap_api.pacing)."""

from __future__ import annotations

import asyncio
import time

import pytest

from flowmap_api.pacing import Backoff, pause


def test_the_backoff_doubles_to_its_bound_and_starts_again_after_a_success() -> None:
    b = Backoff(0.5, 4.0)
    assert [b.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    b.reset()
    assert (b.current, b.next(), b.current) == (0.5, 0.5, 1.0)
    jittered = Backoff(1.0, 30.0, jitter=0.5)
    waits = [jittered.next() for _ in range(4)]
    assert all(0.5 * base <= w <= 1.5 * base for w, base in zip(waits, (1, 2, 4, 8))), waits
    assert len({round(Backoff(1.0, 2.0, jitter=0.5).next(), 6) for _ in range(20)}) > 1  # not in step
    for first, most, jitter in ((0, 1, 0), (2, 1, 0), (1, 2, 1.0), (1, 2, -0.1)):
        with pytest.raises(ValueError):
            Backoff(first, most, jitter)


def test_a_pause_ends_at_its_time_or_at_once_when_stopped() -> None:
    async def run() -> tuple[bool, float, bool, float, bool]:
        stop = asyncio.Event()
        started = time.monotonic()
        timed_out = await pause(stop, 0.05)
        waited = time.monotonic() - started
        asyncio.get_running_loop().call_later(0.05, stop.set)
        started = time.monotonic()
        stopped = await pause(stop, 30.0)
        return timed_out, waited, stopped, time.monotonic() - started, await pause(stop, -1.0)

    timed_out, waited, stopped, cut, again = asyncio.run(run())
    assert not timed_out and waited >= 0.05
    assert stopped and cut < 10  # the stop, not the 30 s
    assert again  # already stopped: at once, whatever the time asked
