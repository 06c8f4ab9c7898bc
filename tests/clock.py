"""The tests' one fake clock: time that moves only when a test says so.

Who uses it: the lease-book and campaign-service unit tests, the local store's signed-URL tests, and
the lease-API harness (tests/api_fixtures.py). Production code takes its clocks as plain callables, so
a test passes :class:`FakeClock` itself where a monotonic clock is wanted (the lease book, the service)
and :meth:`FakeClock.wall` where Unix seconds are wanted (the service's wall clock, a store's URL
expiry). Both read one time line, so one ``clock.advance(s)`` moves lease deadlines, checkpoint
intervals and presigned-URL expiry together and no test sleeps.

The benchmarks (mlds_operator.bench) keep a clock of their own: they are product code, not tests.
"""

from __future__ import annotations

__all__ = ["START", "WALL_EPOCH", "FakeClock"]

#: Where the monotonic reading starts (any origin works for the code under test: only differences matter).
START = 1000.0
#: Unix seconds of the monotonic origin on the wall clock (2026-01-01T00:00:00Z): wall = WALL_EPOCH + now.
WALL_EPOCH = 1_767_225_600.0


class FakeClock:
    """A monotonic clock (call it) and a wall clock (:meth:`wall`) on one time line, moved by :meth:`advance`."""

    def __init__(self, start: float = START) -> None:
        self.now = start

    def __call__(self) -> float:
        """Monotonic seconds: what ``time.monotonic`` would say."""
        return self.now

    def wall(self) -> float:
        """Unix seconds on the same time line: what ``time.time`` would say."""
        return WALL_EPOCH + self.now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a monotonic clock does not go back")  # a test bug, not a scenario
        self.now += seconds
