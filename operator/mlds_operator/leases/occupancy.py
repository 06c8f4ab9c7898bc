"""Stack occupancy per pool, from what continuous-stack workers report (issue 14).

The campaign service (:mod:`mlds_operator.leases.service`) feeds it every :class:`StackReport` that
arrives with a lease request or heartbeat; metrics (:mod:`mlds_operator.leases.metrics`), `mlds run`'s
summary and `mlds bench campaign` read :meth:`StackOccupancy.pools`. Pure bookkeeping, no I/O.

Two figures per pool: the occupancy now (live members / slots, over workers heard from recently) and
the mean over the campaign (the workers' time-weighted totals, ``memberSeconds / slotSeconds``), and
the same over the time units were pending only: the tail, when there is nothing left to refill slots
with, empties stacks by design. A worker's totals are cumulative, so the time between two of its
reports counts as "pending" when units were pending as the first of them arrived; a retry that turns
pending late (an attempt capped at the end) does not pull the lonely time before it into that figure.
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
    mean_while_pending: float | None  # over the time units were pending (see the module docstring)

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
    pending: int = 0  # units pending as its latest report arrived


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
            # Before its first report the worker was starting up, granted units: fed, when units were pending.
            fed = (report.member_seconds, report.slot_seconds) if pending > 0 else (0.0, 0.0)
            entry = self._workers[worker] = _Worker(pool, report, now, fed, pending)
        else:
            if entry.pending > 0:  # units were pending when this interval began
                member = report.member_seconds - entry.report.member_seconds
                slot = report.slot_seconds - entry.report.slot_seconds
                if member >= 0 and slot >= 0:  # totals only grow; a worker id reused by a fresh process restarts them
                    entry.fed = (entry.fed[0] + member, entry.fed[1] + slot)
            entry.pool, entry.report, entry.seen, entry.pending = pool, report, now, pending
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
