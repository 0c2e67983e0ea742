"""Waiting, the one way the operator and the agent do it: a backoff between tries, and a pause that
a stop ends at once.

Here rather than in each component because both need exactly the same rule, and this package is
the one both import (it stays a leaf: the standard library only).
"""

from __future__ import annotations

import asyncio
import contextlib
import random


class Backoff:
    """Exponential backoff: ``first`` seconds after a failure, doubled after each one up to ``most``,
    back to ``first`` after a success (:meth:`reset`). With ``jitter`` (0 to 1) each wait is drawn
    within that share of it either way, so that many agents broken together do not retry in step."""

    def __init__(self, first: float = 0.5, most: float = 30.0, jitter: float = 0.0) -> None:
        if not (0 < first <= most and 0 <= jitter < 1):
            raise ValueError(f"backoff first={first} most={most} jitter={jitter}")
        self.first, self.most, self.jitter = first, most, jitter
        self.current = first  # the base of the next wait

    def next(self) -> float:
        """The wait to take now; the one after is twice as long (up to ``most``)."""
        wait = self.current * (random.uniform(1 - self.jitter, 1 + self.jitter) if self.jitter else 1)
        self.current = min(self.current * 2, self.most)
        return wait

    def reset(self) -> None:
        """It worked: the next failure waits ``first`` again."""
        self.current = self.first


async def pause(stop: asyncio.Event, seconds: float) -> bool:
    """Wait ``seconds``, or less if ``stop`` is set meanwhile; True when stopped."""
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=max(0.0, seconds))
    return stop.is_set()
