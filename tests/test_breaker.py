"""The circuit breaker, on a fake clock: pure policy, no servers."""

from __future__ import annotations

import pytest

from tiered_cache.policy.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_threshold_consecutive_failures() -> None:
    """Failures below the threshold keep calls flowing; the threshold-th opens the breaker."""
    clock = FakeClock()
    b = CircuitBreaker(threshold=3, reset_after=1.0, clock=clock)
    b.failure()
    b.failure()
    assert b.state == CLOSED and b.allow()
    b.failure()
    assert b.state == OPEN and not b.allow()
    assert b.trips == 1


def test_success_resets_the_failure_count() -> None:
    """Failures must be consecutive: one success in between starts the count again."""
    b = CircuitBreaker(threshold=2, reset_after=1.0, clock=FakeClock())
    b.failure()
    b.success()
    b.failure()
    assert b.state == CLOSED


def test_half_open_lets_exactly_one_probe_through() -> None:
    """After reset_after, one caller probes; the others keep skipping the tier until it answers."""
    clock = FakeClock()
    b = CircuitBreaker(threshold=1, reset_after=1.0, clock=clock)
    b.failure()
    clock.now += 0.99
    assert not b.allow()
    clock.now += 0.02
    assert b.allow()
    assert b.state == HALF_OPEN
    assert not b.allow()


def test_probe_success_closes_and_probe_failure_reopens() -> None:
    """A good probe closes the breaker; a bad one opens it for another full period."""
    clock = FakeClock()
    b = CircuitBreaker(threshold=1, reset_after=1.0, clock=clock)
    b.failure()
    clock.now += 1.0
    assert b.allow()
    b.failure()
    assert b.state == OPEN and b.trips == 2
    clock.now += 0.5
    assert not b.allow()
    clock.now += 0.5
    assert b.allow()
    b.success()
    assert b.state == CLOSED and b.allow()


@pytest.mark.parametrize("threshold,reset_after", [(0, 1.0), (1, 0.0), (1, -1.0)])
def test_rejects_unusable_settings(threshold: int, reset_after: float) -> None:
    """A breaker that could never close or never open is a configuration error."""
    with pytest.raises(ValueError):
        CircuitBreaker(threshold=threshold, reset_after=reset_after)


def test_a_forked_child_gets_a_lock_of_its_own() -> None:
    """A lock held (by another thread) at fork time would block the child forever: the fork hook replaces it."""
    b = CircuitBreaker(threshold=1, reset_after=1.0, clock=FakeClock())
    b._lock.acquire()  # as if another thread held it when the process forked
    b._after_fork_in_child()
    b.failure()
    assert b.state == OPEN
