"""A consecutive-failure circuit breaker: closed, open, half-open (as Envoy's outlier ejection
or any textbook breaker), used for the engine and, through the gateway, for Redis.

Guarantees: closed until `threshold` failures in a row (a success in between starts the count
again); then open — `allow()` is False — for `cooldown` seconds; then half-open: one caller at a
time is let through as a trial (another after `cooldown` if a trial never reports back); the
trial's success closes the breaker, its failure opens it for another cooldown. Pure: no I/O, no
tasks; time comes from an injected monotonic clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

State = Literal["closed", "open", "half_open"]


class Breaker:
    def __init__(
        self,
        *,
        threshold: int = 5,
        cooldown: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if threshold < 1 or cooldown <= 0:
            raise ValueError("threshold must be >= 1 and cooldown > 0")
        self.threshold = threshold
        self.cooldown = cooldown
        self._clock = clock
        self._failures = 0
        self._opened_at = 0.0
        self._trial_at: float | None = None  # when the half-open trial was let through
        self.state: State = "closed"
        self.opened = 0  # times it opened

    def allow(self) -> bool:
        if self.state == "closed":
            return True
        now = self._clock()
        if self.state == "open":
            if now - self._opened_at < self.cooldown:
                return False
            self.state = "half_open"
        if self._trial_at is not None and now - self._trial_at < self.cooldown:
            return False  # a trial is out; wait for its answer
        self._trial_at = now
        return True

    def retry_in(self) -> float:
        """Seconds until the next trial may go through (0 when calls go through now)."""
        if self.state == "closed":
            return 0.0
        since = self._clock() - (self._opened_at if self.state == "open" else self._trial_at or 0)
        return max(0.0, self.cooldown - since)

    def success(self) -> None:
        self._failures = 0
        self._trial_at = None
        self.state = "closed"

    def failure(self) -> None:
        self._failures += 1
        if self.state == "half_open" or self._failures >= self.threshold:
            if self.state != "open":
                self.opened += 1
            self.state = "open"
            self._opened_at = self._clock()
            self._trial_at = None
