"""Stack occupancy per pool, from what continuous-stack workers report (issue 14).

The campaign service (:mod:`mlds_operator.leases.service`) feeds it every :class:`StackReport` that
arrives with a lease request or heartbeat; metrics (:mod:`mlds_operator.leases.metrics`), `mlds run`'s
summary and `mlds bench campaign` read :meth:`StackOccupancy.pools`. Pure bookkeeping, no I/O.

Two figures per pool: the occupancy now (live members / slots, over workers heard from recently) and
the mean over the campaign (the workers' time-weighted totals, ``memberSeconds / slotSeconds``), also
as it stood while units were still pending (the tail, when there is nothing left to refill slots
with, empties stacks by design; a report that arrives while units are pending freezes that figure).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from mlds_contract.lease import StackReport

__all__ = ["MAX_WORKERS", "PoolOccupancy", "StackOccupancy"]

#: Workers remembered one by one. Past it, those not heard from for an hour are folded into their pool's
#: totals, so invented worker ids cannot grow the server's memory without bound (the lease book does the same).
MAX_WORKERS = 1024


@dataclass(frozen=True, slots=True)
class PoolOccupancy:
    """One pool's stacks: workers reporting, live members and slots now, and mean occupancies (None: no data)."""

    pool: str
    workers: int
    live: int
    slots: int
    mean: float | None  # over the campaign so far
    mean_while_pending: float | None  # up to the last report made while units were pending

    @property
    def now(self) -> float | None:
        """Live members / slots now."""
        return self.live / self.slots if self.slots else None


@dataclass(slots=True)
class _Worker:
    pool: str
    report: StackReport
    seen: float
    fed: tuple[float, float] = (0.0, 0.0)  # (member seconds, slot seconds) while units were pending


class StackOccupancy:
    """The latest stack report of every worker (a worker's totals are cumulative, so the latest is enough)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, active_seconds: float = 300.0) -> None:
        self._clock = clock
        self._active = active_seconds
        self._workers: dict[str, _Worker] = {}
        #: Totals (member s, slot s, and both while pending) of forgotten workers, per pool: the means keep them.
        self._gone: dict[str, list[float]] = {}

    def report(self, worker: str, pool: str, report: StackReport, *, pending: int) -> None:
        """Record ``worker``'s report; ``pending`` is the number of units pending as it arrived."""
        now = self._clock()
        entry = self._workers.get(worker)
        if entry is None:
            entry = self._workers[worker] = _Worker(pool, report, now)
        entry.pool, entry.report, entry.seen = pool, report, now
        if pending > 0:
            entry.fed = (report.member_seconds, report.slot_seconds)
        if len(self._workers) > MAX_WORKERS:
            self._forget(now)

    def _forget(self, now: float) -> None:
        """Fold workers not heard from for an hour into their pool's totals (worker ids are client-chosen)."""
        horizon = now - max(self._active, 3600.0)
        for name, w in list(self._workers.items()):
            if w.seen < horizon:
                gone = self._gone.setdefault(w.pool, [0.0, 0.0, 0.0, 0.0])
                for i, value in enumerate((w.report.member_seconds, w.report.slot_seconds, *w.fed)):
                    gone[i] += value
                del self._workers[name]

    def pools(self) -> dict[str, PoolOccupancy]:
        """Figures per pool that has reported."""
        now = self._clock()
        sums: dict[str, list[float]] = {pool: [0, 0, 0, *gone] for pool, gone in self._gone.items()}
        for w in self._workers.values():
            s = sums.setdefault(w.pool, [0, 0, 0, 0.0, 0.0, 0.0, 0.0])
            if w.seen >= now - self._active:
                s[0] += 1
                s[1] += w.report.live
                s[2] += w.report.slots
            s[3] += w.report.member_seconds
            s[4] += w.report.slot_seconds
            s[5] += w.fed[0]
            s[6] += w.fed[1]
        return {
            pool: PoolOccupancy(
                pool,
                int(s[0]),
                int(s[1]),
                int(s[2]),
                s[3] / s[4] if s[4] > 0 else None,
                s[5] / s[6] if s[6] > 0 else None,
            )
            for pool, s in sorted(sums.items())
        }
