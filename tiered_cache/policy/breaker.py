"""Circuit breaker: after a tier fails, skip it for a while so an outage costs one timeout, not one per call."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from ..errors import ConfigurationError

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


class CircuitBreaker:
    """Closed -> open after `threshold` consecutive failures -> one half-open probe after `reset_after` seconds."""

    def __init__(self, threshold: int = 2, reset_after: float = 1.0, clock: Callable[[], float] = time.monotonic):
        if threshold < 1 or reset_after <= 0:
            raise ConfigurationError(f"breaker: threshold must be >= 1 and reset_after > 0, got {threshold}, {reset_after}")
        self.threshold = threshold
        self.reset_after = reset_after
        self.clock = clock
        self.state = CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self.trips = 0
        self._lock = threading.Lock()

    def _after_fork_in_child(self) -> None:
        """A lock another thread held at fork time would stay locked in the child: take a new one."""
        self._lock = threading.Lock()

    def allow(self) -> bool:
        """May a call go to the tier now? In half-open, exactly one caller is let through as the probe."""
        if self.state == CLOSED:
            return True
        with self._lock:
            # A probe that never reported back (its caller did not say) is replaced after reset_after.
            if self.clock() - self.opened_at >= self.reset_after:
                self.state = HALF_OPEN
                self.opened_at = self.clock()
                return True
            return False

    def success(self) -> None:
        """A call worked: close."""
        if self.state != CLOSED or self.failures:
            with self._lock:
                self.state = CLOSED
                self.failures = 0

    def failure(self) -> None:
        """A call failed: count it, and open when the threshold is reached or the probe failed."""
        with self._lock:
            self.failures += 1
            if self.state == HALF_OPEN or self.failures >= self.threshold:
                if self.state != OPEN:
                    self.trips += 1
                self.state = OPEN
                self.opened_at = self.clock()
