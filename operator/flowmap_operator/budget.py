"""The write budget: how many API writes a second, adapted to what the API server accepts (pure).

A fixed rate is wrong both ways: too low, and counters age for minutes on a server that would take
ten times as much; too high, and the operator crowds out everything else the server does. So the
rate moves between a floor and a ceiling the user sets, the way TCP finds a link's capacity
(additive increase, multiplicative decrease):

* it grows by a step each period in which there was a backlog (a write waited for its token) and
  the server answered quickly, so that it reaches the ceiling in :data:`RAMP` periods of those;
* it is halved at once on a 429 or on no answer at all: the server, or its API Priority and
  Fairness, says it has enough;
* it is cut by :data:`EASE` when a period's median latency rises well above the lowest seen
  lately: APF queues requests before it rejects them, so a slower answer is the earlier sign.

After a cut, answers to writes sent before it are not held against the new rate (they were queued
at the old one): one cut per round trip, as in TCP. Idle, the rate stays where it was; the first
busy period corrects it. The clock is handed in; flowmap_operator.kubeapi feeds every write's
outcome and gives the rate to its bucket.
"""

from __future__ import annotations

import statistics
from collections import deque

PERIOD = 1.0  # seconds over which answers are judged, and between two steps up
RAMP = 10  # clean busy periods from the floor to the ceiling
HALVE, EASE = 0.5, 0.75  # the cut on a refusal, and on a slow period
RISE, SLACK = 2.0, 0.05  # a period is slow when its median is twice the lowest, and 50 ms above it
BASELINE_PERIODS = 300  # how far back (in busy periods) the lowest median is remembered


class Budget:
    """The rate of API writes, between ``floor`` and ``ceiling`` writes per second."""

    def __init__(self, floor: float, ceiling: float, now: float) -> None:
        if not 0 < floor <= ceiling:
            raise ValueError(f"write budget floor {floor} and ceiling {ceiling}: 0 < floor <= ceiling")
        self.floor, self.ceiling = floor, ceiling
        self.rate = floor
        self.step = max((ceiling - floor) / RAMP, 0.0)
        self.cut_at = float("-inf")  # answers to writes sent before this say nothing of the rate
        self.period_start = now
        self.latencies: list[float] = []  # this period's answers, in seconds
        self.backlog = False  # in this period some write waited for its token
        self.medians: deque[float] = deque(maxlen=BASELINE_PERIODS)

    def answered(self, sent: float, now: float, waited: bool) -> None:
        """A write sent at ``sent`` was answered (accepted, or refused for what it was) at ``now``;
        ``waited``: it had waited for its token, so there was more to write than the rate allowed."""
        self._roll(now)
        if sent < self.cut_at:
            return
        self.latencies.append(now - sent)
        self.backlog = self.backlog or waited

    def refused(self, sent: float, now: float) -> None:
        """A write sent at ``sent`` was throttled (429) or not answered at all: the server has enough."""
        self._roll(now)
        if sent >= self.cut_at:
            self._cut(HALVE, now)

    def _roll(self, now: float) -> None:
        """Close the period if it is over: a step up, a cut, or nothing."""
        if now - self.period_start < PERIOD:
            return
        if self.latencies:
            median = statistics.median(self.latencies)
            lowest = min(self.medians, default=median)
            self.medians.append(median)
            if median > max(RISE * lowest, lowest + SLACK):
                self._cut(EASE, now)
            elif self.backlog:
                self.rate = min(self.ceiling, self.rate + self.step)
        self.period_start, self.latencies, self.backlog = now, [], False

    def _cut(self, factor: float, now: float) -> None:
        self.rate = max(self.floor, self.rate * factor)
        self.cut_at = self.period_start = now
        self.latencies, self.backlog = [], False
