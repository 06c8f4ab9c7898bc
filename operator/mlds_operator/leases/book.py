"""The lease book: which worker trains which unit until when, and what became of every unit.

One lease server process (the operator, or `mlds run`) owns one book per campaign and calls it from its
lease HTTP API (DESIGN.md §2). The book is pure: no I/O, no threads, the clock injected (tests drive a
fake one). It is not thread-safe; the server calls it from one event loop.

Units are the indices ``0..total-1``. Per unit the book keeps a state (pending -> leased -> succeeded |
failed) and an attempt counter in numpy arrays (11 bytes a unit: a million units take ~11 MB); only live
leases are Python objects. The rules:

- **Grant**: up to K lowest-index pending units per lease, each with its attempt number (the counter;
  seeds derive from it). With expected costs (``costs``: one per block of ``block`` consecutive units,
  i.e. per target), the units come from the block of the highest expected cost first, lowest index
  within it, so slow targets start early and a campaign does not end on them (issue 14); the costs
  are learned from finished units (:meth:`LeaseBook.observe_cost`). A lease has an unguessable id and
  a deadline ``now + lease_seconds``. Grants first expire overdue leases. A paused book grants nothing.
- **Heartbeat** extends the lease to ``now + lease_seconds``; only its worker may (else :class:`NotHolder`).
  A lease is expired by :meth:`LeaseBook.expire` (which grants call), never by time alone, so a heartbeat
  that arrives a little late but before the sweep still saves its lease.
- **Expiry**: every unit of an overdue lease goes back to pending with its attempt counted. An attempt is
  counted by raising the counter to ``attempt + 1``, so each attempt number is counted once however many
  reports name it. A unit whose counter reaches ``max_attempts`` is failed. While the book is paused,
  expiry returns units without counting (the suspension stopped the workers, not the unit).
- **Complete** (the caller has verified the files in storage first): accepted once, while the unit is not
  succeeded, whoever sends it and under whatever lease: a finished network is never thrown away, even
  after its lease expired and was re-issued, after the unit failed, or after a restart made the lease id
  unknown. Completions are therefore keyed by unit and worker, not by lease id. Later completions of the
  unit are duplicates. ``converged=False`` is a failed attempt (retried with attempt + 1, new seeds).
- **Fail** ``retry=False`` counts the attempt; ``retry=True`` ("release") returns the unit uncounted.
  A failure report from a worker that no longer holds the unit counts only if that attempt was not counted
  yet and no other worker holds the unit; otherwise it is a duplicate.
- **Speculative leases** (opt-in per request): with nothing pending, an idle worker may get a copy of units
  other workers hold (soonest deadline first, at most one extra copy per unit, never of its own units),
  with the same attempt number, so either copy yields the result the campaign's seeds define. The first
  accepted completion wins and the other copy is revoked (its heartbeat lists it under ``cancel``, its
  completion is a duplicate). The revoked worker is also told at its next request of any kind
  (:meth:`LeaseBook.take_cancellations`): a continuous stack asks for top-ups and completes units far
  more often than it heartbeats, so a losing copy stops within a training round, not a third of a
  lease. A holder that fails, releases or expires while the other copy lives just drops out: the
  attempt is counted when its last holder gives up.
- **Checkpoint** (:meth:`LeaseBook.to_bytes`): states, attempts, per-pool counters and settings; no lease
  ids or deadlines (deadlines are read from a clock that does not survive a restart, and ids are bearer
  tokens we keep out of the bucket). Units leased at checkpoint time are restored as *orphans*: still
  leased, held by no known lease, for one lease duration. A live worker's heartbeat then re-establishes
  its lease under the same id (:meth:`LeaseBook.heartbeat` with ``units``), for its units that are pending
  or orphaned; units still orphaned at the end of the grace return to pending uncounted. So a restarted
  server honours the leases of live workers instead of expiring them all at once, and nobody else is
  granted their units meanwhile. Units leased after the last checkpoint come back pending and are
  granted again (the server checkpoints within seconds of a grant to keep that window short).
  Completions after the last checkpoint are lost from it; a worker's late completion is still accepted.
  ``unpublished`` units (succeeded, but their manifest rows not yet written by the caller) are written
  as if they had succeeded after the checkpoint: leased by no lease, not counted for their pool, so the
  server's recovery, which scans the published results for units the checkpoint does not count, adds
  their rows once (:meth:`LeaseBook.checkpoint`).

Workers are untrusted (DESIGN.md §2), so the book believes only what it issued:

- **Attempts**: a holder's fail, release or unconverged completion must name the attempt its lease was
  given for the unit, and any report must name an attempt the book has issued (at most the unit's
  counter); otherwise :class:`NotIssued`. A failure report from a worker that holds no lease on the unit
  counts only for a unit orphaned by a restart, at its current attempt: nobody can fail units they were
  never given.
- **Re-adoption** after a restart takes only what the checkpoint says that lease held: the checkpoint
  records, per leased unit, a 64-bit tag of its lease id (a truncated SHA-256: the id itself, a bearer
  token, stays out of the bucket), and a heartbeat re-establishes a lease only for orphaned units whose
  tag is its id's, at the attempt the checkpoint holds. Units leased after the last checkpoint are not
  re-adoptable: they come back pending and are granted again.
- **Pools** are fixed at construction when ``pools`` is given: a grant, report or heartbeat naming another
  pool raises :class:`UnknownPool`, so client-chosen names never grow the book, its stats or checkpoint.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import secrets
import struct
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from mlds_contract.campaign import UnitCounts
from mlds_contract.errors import MldsError
from mlds_contract.lease import Outcome, UnitState

from mlds_operator.leases.ranges import format_ranges

__all__ = [
    "CHECKPOINT_VERSION",
    "BookCheckpoint",
    "BookStats",
    "CheckpointError",
    "Clock",
    "HeartbeatResult",
    "LeaseBook",
    "LeaseError",
    "LeaseView",
    "NotHolder",
    "NotIssued",
    "PoolFigures",
    "UnitView",
    "UnknownLease",
    "UnknownPool",
    "UnknownUnit",
    "lease_tag",
]

#: Seconds, from any fixed origin; only differences matter. Default: ``time.monotonic``.
Clock = Callable[[], float]

#: Version written into checkpoints; :meth:`LeaseBook.from_bytes` reads this one and version 1 (no lease tags).
CHECKPOINT_VERSION = 2
_MAGIC = b"MLDSBOOK"
_HEADER = struct.Struct("<8sHI")  # magic, version, length of the JSON settings that follow

# Unit states as stored in the state array (uint8).
_PENDING, _LEASED, _DONE, _FAILED = 0, 1, 2, 3
_STATE_NAMES = (UnitState.pending, UnitState.leased, UnitState.succeeded, UnitState.failed)
# Holder slots: >= 0 is a live lease's slot; these mark "no holder" and "leased before a restart".
_NOBODY, _ORPHAN = -1, -2
_MAX_COUNTER = 0xFFFF  # the attempt counter is uint16


class LeaseError(MldsError):
    """A lease request that does not fit the book's state. The HTTP layer maps subclasses to 4xx answers."""


class UnknownLease(LeaseError):
    """The book knows no lease with this id and the request gives no units to re-establish it (HTTP 404)."""


class NotHolder(LeaseError):
    """The worker does not hold this lease, or none of its units is free to re-establish it (HTTP 409).

    The worker stops training the lease; completions it already has are still worth sending.
    """


class UnknownUnit(LeaseError, IndexError):
    """A unit index outside the campaign (HTTP 404)."""


class NotIssued(LeaseError):
    """A report names an attempt the book never issued for that unit, or not the one its lease holds (HTTP 422)."""


class UnknownPool(LeaseError):
    """A request names a pool that is not one of the campaign's (HTTP 422)."""


def lease_tag(lease_id: str) -> int:
    """The 64-bit tag a checkpoint stores for a lease: the first 8 bytes of SHA-256 of its id (never 0)."""
    return int.from_bytes(hashlib.sha256(lease_id.encode()).digest()[:8], "little") or 1


class CheckpointError(MldsError):
    """Bytes that are not a lease-book checkpoint this version can read, or that do not fit the campaign."""


@dataclass(frozen=True, slots=True)
class LeaseView:
    """A lease as the book sees it now: the units it still holds, with their attempt numbers."""

    lease_id: str
    worker: str
    pool: str
    units: tuple[int, ...]  # ascending
    attempts: tuple[int, ...]  # attempt number of each unit, aligned with units
    deadline: float  # on the book's clock
    granted_at: float  # on the book's clock
    speculative: bool


@dataclass(frozen=True, slots=True)
class HeartbeatResult:
    """What a heartbeat did: the new deadline and the units the worker should stop training."""

    lease_id: str
    deadline: float  # on the book's clock
    cancel: tuple[int, ...]  # ascending
    readopted: bool  # the book did not know the lease and re-established it


@dataclass(frozen=True, slots=True)
class UnitView:
    """One unit's state, attempt counter and the ids of the leases that hold it (two with a speculative copy)."""

    unit: int
    state: UnitState
    attempts: int
    leases: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PoolFigures:
    """Per-pool counters: units completed, attempts failed (failures, non-convergence, expiry), live workers."""

    name: str
    succeeded: int
    failed: int
    workers: int


@dataclass(frozen=True, slots=True)
class BookStats:
    """Aggregates for a campaign's status and metrics."""

    total: int
    pending: int
    leased: int
    succeeded: int
    failed: int
    leases: int  # live leases
    pools: tuple[PoolFigures, ...]  # by name
    failed_units: str  # compressed ranges, e.g. "12,40-42" (cut with " (+N more)" when long)
    finished: bool  # nothing pending or leased: every unit succeeded or failed
    paused: bool

    def unit_counts(self) -> UnitCounts:
        """The counts as the campaign status model."""
        return UnitCounts(
            total=self.total, pending=self.pending, leased=self.leased, succeeded=self.succeeded, failed=self.failed
        )


@dataclass(frozen=True, slots=True)
class BookCheckpoint:
    """A book's checkpoint, copied out of the book but not yet compressed (:meth:`LeaseBook.checkpoint`).

    Copying takes milliseconds on the caller's thread (the book is not thread-safe); compressing takes
    ~80 ms for a million units in mid-campaign, so :meth:`to_bytes` may run in another thread.
    """

    head: bytes  # the JSON settings and per-pool counters
    body: bytes  # every unit's state (u8), then attempt counter (u16), then lease tag (u64); little-endian

    def to_bytes(self) -> bytes:
        """The checkpoint's bytes, as :meth:`LeaseBook.from_bytes` reads them."""
        return _HEADER.pack(_MAGIC, CHECKPOINT_VERSION, len(self.head)) + self.head + zlib.compress(self.body, 6)


@dataclass(eq=False, slots=True)
class _Lease:
    lease_id: str
    seq: int  # distinguishes this lease's entries in the expiry heap from a re-adopted lease with the same id
    slot: int  # index in LeaseBook._slots; what the holder arrays store
    worker: str
    pool: str
    units: npt.NDArray[np.int64]  # ascending; every unit granted, held or not any more
    attempts: npt.NDArray[np.int64]  # aligned with units
    granted_at: float
    deadline: float
    speculative: bool
    held: int  # units still held; the lease ends at 0
    revoked: list[int] = field(default_factory=list)  # units another worker completed


@dataclass(slots=True)
class _PoolCounter:
    succeeded: int = 0
    failed: int = 0


def _new_lease_id() -> str:
    # 144 random bits, URL-safe: a lease id is a bearer token for its units.
    return secrets.token_urlsafe(18)


class LeaseBook:
    """The lease book of one campaign (see the module docstring for the rules)."""

    def __init__(
        self,
        total: int,
        *,
        max_attempts: int = 3,
        lease_seconds: float = 600.0,
        clock: Clock = time.monotonic,
        pools: Iterable[str] = (),
        block: int = 0,
        costs: Iterable[float] | None = None,
    ) -> None:
        """A book of ``total`` pending units. ``pools`` are listed in stats even before any worker shows up.

        ``costs`` (with ``block``): the expected cost (epochs to converge, say) of a unit of each block of
        ``block`` consecutive units; grants hand out the most expensive blocks first (see the module docstring).
        """
        if total < 0:
            raise ValueError(f"total must be >= 0, got {total}")
        self._check_settings(max_attempts, lease_seconds)
        self._n = total
        self._max_attempts = max_attempts
        self._lease_seconds = float(lease_seconds)
        self._clock = clock
        self._state = np.zeros(total, dtype=np.uint8)
        self._attempts = np.zeros(total, dtype=np.uint16)
        self._holder = np.full(total, _NOBODY, dtype=np.int32)  # primary holder's slot, or _ORPHAN
        self._spare = np.full(total, _NOBODY, dtype=np.int32)  # speculative copy's slot
        self._counts = [total, 0, 0, 0]  # by state code
        self._low = 0  # no unit below this index is pending; grants scan from here
        self._leases: dict[str, _Lease] = {}
        self._slots: list[_Lease | None] = []
        self._free_slots: list[int] = []
        self._heap: list[tuple[float, int, str]] = []  # (deadline when pushed, lease seq, lease id)
        self._seq = itertools.count()
        self._pools: dict[str, _PoolCounter] = {name: _PoolCounter() for name in pools}
        #: Given pools are the only ones (see the module docstring); without any, pools appear as workers name them.
        self._fixed_pools = bool(self._pools)
        self._slot_tags = np.zeros(0, dtype=np.uint64)  # lease_tag of the lease in each slot (for checkpoints)
        self._orphan_tags = np.zeros(0, dtype=np.uint64)  # per unit, from the checkpoint; empty when none
        self._workers: dict[str, tuple[str, float]] = {}  # worker -> (pool, last seen)
        # worker -> its units another worker completed, not yet told (take_cancellations). At most one entry
        # per revoked copy, and a copy is revoked once, so this stays within the campaign's size.
        self._untold: dict[str, set[int]] = {}
        self._orphan_deadline: float | None = None
        self._paused = False
        self._cost: _CostOrder | None = None
        self._pending_mark = total  # pending units after the last cost-ordered take (more: some came back)
        if costs is not None:
            self.set_costs(block, costs)

    # ----------------------------------------------------------------------------------------- settings

    @staticmethod
    def _check_settings(max_attempts: int, lease_seconds: float) -> None:
        if not 1 <= max_attempts < _MAX_COUNTER:
            raise ValueError(f"max_attempts must be in 1..{_MAX_COUNTER - 1}, got {max_attempts}")
        if not lease_seconds > 0:
            raise ValueError(f"lease_seconds must be > 0, got {lease_seconds}")

    @property
    def total(self) -> int:
        """Number of units."""
        return self._n

    @property
    def max_attempts(self) -> int:
        """Attempts per unit before it fails."""
        return self._max_attempts

    @max_attempts.setter
    def max_attempts(self, value: int) -> None:
        """Lowering it fails pending units that have used it up; raising it does not revive failed units."""
        self._check_settings(value, self._lease_seconds)
        self._max_attempts = value
        used_up = np.flatnonzero((self._state == _PENDING) & (self._attempts >= value))
        self._state[used_up] = _FAILED
        self._counts[_PENDING] -= used_up.size
        self._counts[_FAILED] += used_up.size

    @property
    def lease_seconds(self) -> float:
        """Lease length; applies to leases granted or extended from now on."""
        return self._lease_seconds

    @lease_seconds.setter
    def lease_seconds(self, value: float) -> None:
        self._check_settings(self._max_attempts, value)
        self._lease_seconds = float(value)

    @property
    def paused(self) -> bool:
        """A paused book (campaign ``suspend: true``) grants nothing and counts no expiry."""
        return self._paused

    @paused.setter
    def paused(self, value: bool) -> None:
        self._paused = value

    @property
    def pending(self) -> int:
        """Units pending now."""
        return self._counts[_PENDING]

    @property
    def finished(self) -> bool:
        """Nothing pending or leased: every unit succeeded or failed."""
        return self._counts[_PENDING] == 0 and self._counts[_LEASED] == 0

    def now(self) -> float:
        """The book's clock (deadlines are on it); the HTTP layer turns ``deadline - now()`` into wire times."""
        return self._now()

    def _now(self) -> float:
        return float(self._clock())

    # ------------------------------------------------------------------------------------ the protocol

    def grant(self, worker: str, pool: str, max_units: int, *, speculative: bool = False) -> LeaseView | None:
        """Lease up to ``max_units`` units to ``worker``, lowest pending index first; None when there is nothing.

        Expires overdue leases first. With ``speculative`` and nothing pending, the lease may copy units
        other workers hold (``LeaseView.speculative``). A paused book returns None.
        """
        if max_units < 1:
            raise ValueError(f"max_units must be >= 1, got {max_units}")
        now = self._now()
        self.expire(now)
        self._seen(worker, pool, now)
        if self._paused:
            return None
        units = self._take_pending(max_units)
        if units.size:
            lease = self._new_lease(worker, pool, units, self._attempts[units].astype(np.int64), now, speculative=False)
            self._state[units] = _LEASED
            self._holder[units] = lease.slot
            self._counts[_PENDING] -= units.size
            self._counts[_LEASED] += units.size
            return self._view(lease, all_held=True)
        if speculative:
            return self._grant_speculative(worker, pool, max_units, now)
        return None

    def heartbeat(
        self, lease_id: str, worker: str, *, pool: str, units: Mapping[int, int] | None = None
    ) -> HeartbeatResult:
        """Extend ``lease_id`` to ``now + lease_seconds``; ``units`` maps the units the worker still trains to attempts.

        ``cancel`` lists the given units the lease no longer holds (or, without ``units``, the units other
        workers completed). For a lease the book does not know, re-establishes it under the same id for
        the given units that are pending or orphaned (``readopted=True``) and cancels the others.

        Raises :class:`NotHolder` when another worker holds the lease or none of the units is free, and
        :class:`UnknownLease` when the lease is unknown and no units are given.
        """
        now = self._now()
        self._seen(worker, pool, now)
        lease = self._leases.get(lease_id)
        if lease is None:
            if not units:
                raise UnknownLease(f"no lease {lease_id!r}, and no units were given to re-establish it")
            return self._readopt(lease_id, worker, pool, units, now)
        if lease.worker != worker:
            raise NotHolder(f"lease {lease_id!r} is held by another worker, not {worker!r}")
        lease.deadline = now + self._lease_seconds
        # Without a unit list, report what other workers completed; with one, everything the lease lost.
        cancel = sorted(set(lease.revoked)) if units is None else sorted(u for u in units if not self._holds(lease, u))
        return HeartbeatResult(lease_id, lease.deadline, tuple(cancel), readopted=False)

    def take_cancellations(self, worker: str) -> tuple[int, ...]:
        """The units of ``worker``'s leases that other workers completed since it was last told; ascending.

        Each revocation is handed out once (the server puts it in its next reply to the worker, whatever
        the request); heartbeats keep listing a lease's revoked units under ``cancel`` regardless, so a
        reply lost on the way only delays the cancellation to the next heartbeat.
        """
        untold = self._untold.pop(worker, None)
        return tuple(sorted(untold)) if untold else ()

    def complete(self, unit: int, *, worker: str, pool: str, attempt: int, converged: bool) -> Outcome:
        """Record a verified result of ``unit``; call only after checking its files in storage.

        ``converged=True``: accepted (the unit succeeded, counted for ``pool``) unless it already succeeded,
        then a duplicate. Any other holder's copy is revoked. ``converged=False``: a failed attempt, as
        :meth:`fail` with ``retry=False``.
        """
        self._check_unit(unit)
        self._seen(worker, pool, self._now())
        if not converged:
            return self._report_failure(unit, worker, pool, attempt)
        if self._state[unit] == _DONE:
            return Outcome.duplicate
        self._finish(unit, worker, pool)
        return Outcome.accepted

    def fail(self, unit: int, *, worker: str, pool: str, attempt: int, retry: bool) -> Outcome:
        """A worker gives ``unit`` back: ``retry=False`` counts ``attempt``, ``retry=True`` releases it uncounted.

        A release from a worker that does not hold the unit changes nothing (a duplicate), except that an
        orphaned unit (leased before a restart, not re-adopted) goes back to pending at once.
        """
        self._check_unit(unit)
        self._seen(worker, pool, self._now())
        if self._state[unit] in (_DONE, _FAILED):
            return Outcome.duplicate
        if not retry:
            return self._report_failure(unit, worker, pool, attempt)
        lease = self._holding_lease(unit, worker)
        if lease is not None:
            self._check_attempt(unit, attempt, lease)
            self._give_back(unit, lease, counted=False)
            return Outcome.accepted
        self._check_attempt(unit, attempt, None)
        if self._state[unit] == _LEASED and self._holder[unit] == _ORPHAN and attempt == int(self._attempts[unit]):
            # Leased before a restart and not re-adopted: its worker lets it go, so nobody need wait for the grace.
            self._holder[unit] = _NOBODY
            self._set_state(unit, _PENDING)
            return Outcome.accepted
        return Outcome.duplicate

    def release_lease(self, lease_id: str, worker: str) -> list[int]:
        """Give back every unit ``worker`` still holds under ``lease_id``, uncounted; returns them ascending.

        Raises :class:`UnknownLease` or :class:`NotHolder`.
        """
        lease = self._leases.get(lease_id)
        if lease is None:
            raise UnknownLease(f"no lease {lease_id!r}")
        if lease.worker != worker:
            raise NotHolder(f"lease {lease_id!r} is held by another worker, not {worker!r}")
        self._seen(worker, lease.pool, self._now())
        held: list[int] = self._give_back_all(lease, counted=False).tolist()
        return held

    def expire(self, now: float | None = None) -> list[LeaseView]:
        """Expire leases whose deadline is at or before ``now`` (default: the clock); returns them as they were.

        Also ends the grace of units orphaned by a restore. The server calls this periodically; grants
        call it too.
        """
        now = self._now() if now is None else now
        if self._orphan_deadline is not None and now >= self._orphan_deadline:
            self._orphan_deadline = None
            orphans = np.flatnonzero(self._holder == _ORPHAN)
            if orphans.size:
                self._holder[orphans] = _NOBODY
                self._state[orphans] = _PENDING
                self._counts[_LEASED] -= orphans.size
                self._counts[_PENDING] += orphans.size
                self._low = min(self._low, int(orphans[0]))
        expired: list[LeaseView] = []
        while self._heap and self._heap[0][0] <= now:
            _, seq, lease_id = heapq.heappop(self._heap)
            lease = self._leases.get(lease_id)
            if lease is None or lease.seq != seq:
                continue  # ended, or a re-adopted lease reusing the id (it has its own entry)
            if lease.deadline > now:
                # Heartbeats move deadlines without touching the heap; re-file the lease under its new one.
                heapq.heappush(self._heap, (lease.deadline, seq, lease_id))
                continue
            expired.append(self._view(lease))
            self._give_back_all(lease, counted=not self._paused)
        return expired

    # ---------------------------------------------------------------------------------------- queries

    def lease(self, lease_id: str) -> LeaseView | None:
        """A live lease, or None."""
        lease = self._leases.get(lease_id)
        return None if lease is None else self._view(lease)

    def leases(self) -> list[LeaseView]:
        """All live leases, soonest deadline first."""
        return [self._view(lease) for lease in sorted(self._leases.values(), key=lambda x: (x.deadline, x.seq))]

    def unit(self, unit: int) -> UnitView:
        """One unit's state, attempt counter and holders."""
        self._check_unit(unit)
        ids = tuple(
            lease.lease_id
            for slot in (int(self._holder[unit]), int(self._spare[unit]))
            if slot >= 0 and (lease := self._slots[slot]) is not None
        )
        return UnitView(unit, _STATE_NAMES[int(self._state[unit])], int(self._attempts[unit]), ids)

    def failed_units(self) -> npt.NDArray[np.int64]:
        """Indices of failed units, ascending."""
        return np.flatnonzero(self._state == _FAILED).astype(np.int64)

    def stats(self, *, active_seconds: float = 300.0, failed_max_chars: int | None = 4096) -> BookStats:
        """Counts by state, per-pool figures (workers seen in the last ``active_seconds``) and failed ranges."""
        now = self._now()
        if len(self._workers) > 1024:
            # Worker ids are client-chosen: forget the long gone, so invented names cannot grow the book.
            horizon = now - max(active_seconds, 3600.0)
            self._workers = {w: seen for w, seen in self._workers.items() if seen[1] >= horizon}
        workers: dict[str, int] = {}
        for pool, last_seen in self._workers.values():
            if last_seen >= now - active_seconds:
                workers[pool] = workers.get(pool, 0) + 1
        pools = tuple(
            PoolFigures(name, c.succeeded, c.failed, workers.get(name, 0)) for name, c in sorted(self._pools.items())
        )
        failed = format_ranges(self.failed_units(), max_chars=failed_max_chars) if self._counts[_FAILED] else ""
        pending, leased, done, n_failed = self._counts
        return BookStats(
            total=self._n,
            pending=pending,
            leased=leased,
            succeeded=done,
            failed=n_failed,
            leases=len(self._leases),
            pools=pools,
            failed_units=failed,
            finished=self.finished,
            paused=self._paused,
        )

    # ------------------------------------------------------------------------------------- checkpoint

    def to_bytes(self, *, unpublished: Mapping[int, str] | None = None) -> bytes:
        """A compact snapshot: settings, per-pool counters, and every unit's state and attempt counter.

        Live leases are not written; their units are written as leased and restored as orphans (see the
        module docstring). Layout: ``MLDSBOOK``, version (u16), JSON length (u32), JSON settings, then the
        zlib-compressed state bytes (u8 each) followed by the attempt counters (u16 little-endian each)
        and the lease tags (u64 little-endian each). ``unpublished``: see :meth:`checkpoint`.
        """
        return self.checkpoint(unpublished=unpublished).to_bytes()

    def checkpoint(self, *, unpublished: Mapping[int, str] | None = None) -> BookCheckpoint:
        """What :meth:`to_bytes` writes, copied out of the book; compress it with :meth:`BookCheckpoint.to_bytes`.

        ``unpublished`` maps succeeded units whose manifest rows the caller has not written yet to the pool
        each was counted for. They are written as if their results had been published after this
        checkpoint: leased by no lease (restored as orphans no heartbeat can re-establish), their attempt
        counters as they are (so the attempt that succeeded counts as issued), and not counted as
        succeeded for their pool. A server that restores the checkpoint and then recovers the published
        results (:meth:`complete` for each unit not succeeded) counts each of them once, and writes its
        row once. Raises ValueError for a unit that has not succeeded or a pool the book does not know.
        """
        pools = {name: [c.succeeded, c.failed] for name, c in sorted(self._pools.items())}
        state = self._state
        if unpublished:
            units = np.fromiter(unpublished, dtype=np.int64, count=len(unpublished))
            if int(units.min()) < 0 or int(units.max()) >= self._n or np.any(state[units] != _DONE):
                raise ValueError("only units that succeeded can be written as unpublished")
            state = state.copy()
            state[units] = _LEASED  # no holder: their tags stay 0, which no lease id has (lease_tag)
            for pool in unpublished.values():
                if pool not in pools:
                    raise ValueError(f"unpublished unit of pool {pool!r}, which the book does not count")
                pools[pool][0] -= 1
        settings = {
            "total": self._n,
            "maxAttempts": self._max_attempts,
            "leaseSeconds": self._lease_seconds,
            "paused": self._paused,
            "pools": pools,
        }
        head = json.dumps(settings, separators=(",", ":")).encode()
        tags = np.zeros(self._n, dtype=np.uint64)
        if self._orphan_tags.size:
            orphaned = self._holder == _ORPHAN
            tags[orphaned] = self._orphan_tags[orphaned]
        held = self._holder >= 0
        tags[held] = self._slot_tags[self._holder[held]]
        body = state.tobytes() + self._attempts.astype("<u2").tobytes() + tags.astype("<u8").tobytes()
        return BookCheckpoint(head=head, body=body)

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        *,
        clock: Clock = time.monotonic,
        total: int | None = None,
        max_attempts: int | None = None,
        lease_seconds: float | None = None,
        pools: Iterable[str] = (),
    ) -> LeaseBook:
        """Rebuild a book from :meth:`to_bytes`. Settings given here override the checkpoint's.

        Units leased at checkpoint time become orphans for one lease duration from now. Raises
        :class:`CheckpointError` for foreign, corrupt or newer-version bytes, or when ``total`` is given
        and differs.
        """
        if len(data) < _HEADER.size:
            raise CheckpointError("not a lease-book checkpoint: too short")
        magic, version, head_len = _HEADER.unpack_from(data)
        if magic != _MAGIC:
            raise CheckpointError("not a lease-book checkpoint: bad magic bytes")
        if version not in (1, CHECKPOINT_VERSION):
            raise CheckpointError(f"lease-book checkpoint version {version}; this mlds reads 1..{CHECKPOINT_VERSION}")
        try:
            settings: dict[str, Any] = json.loads(data[_HEADER.size : _HEADER.size + head_len])
            n = int(settings["total"])
            raw = zlib.decompress(data[_HEADER.size + head_len :])
            saved_pools = {str(k): (int(v[0]), int(v[1])) for k, v in settings["pools"].items()}
            pools = list(pools)
            if pools:  # names a client invented before pools were fixed are dropped, not carried forever
                saved_pools = {k: v for k, v in saved_pools.items() if k in pools}
            book = cls(
                n,
                max_attempts=int(settings["maxAttempts"]) if max_attempts is None else max_attempts,
                lease_seconds=float(settings["leaseSeconds"]) if lease_seconds is None else lease_seconds,
                clock=clock,
                pools=pools,
            )
        except (ValueError, KeyError, TypeError, IndexError, AttributeError, zlib.error) as exc:
            raise CheckpointError(f"corrupt lease-book checkpoint: {exc}") from exc
        if total is not None and n != total:
            raise CheckpointError(f"checkpoint holds {n} units but the campaign has {total}")
        per_unit = 3 if version == 1 else 11
        if len(raw) != per_unit * n:
            raise CheckpointError(f"corrupt lease-book checkpoint: {len(raw)} body bytes for {n} units")
        state = np.frombuffer(raw, dtype=np.uint8, count=n).copy()
        if n and int(state.max()) > _FAILED:
            raise CheckpointError("corrupt lease-book checkpoint: unknown unit state")
        book._state = state
        book._attempts = np.frombuffer(raw, dtype="<u2", count=n, offset=n).astype(np.uint16)
        book._paused = bool(settings.get("paused", False))
        for name, (succeeded, failed) in saved_pools.items():
            book._pools[name] = _PoolCounter(succeeded, failed)
        book._counts = np.bincount(state, minlength=4).tolist()
        leased = np.flatnonzero(state == _LEASED)
        book._holder[leased] = _ORPHAN
        book._orphan_tags = np.zeros(n, dtype=np.uint64)
        if version > 1:
            saved_tags = np.frombuffer(raw, dtype="<u8", count=n, offset=3 * n)
            book._orphan_tags[leased] = saved_tags[leased]
        if leased.size:
            book._orphan_deadline = clock() + book._lease_seconds
        pending = np.flatnonzero(state == _PENDING)
        book._low = int(pending[0]) if pending.size else n
        book.max_attempts = book._max_attempts  # fail pending units a lowered max_attempts has used up
        return book

    # -------------------------------------------------------------------------------------- internals

    def _check_unit(self, unit: int) -> None:
        if not 0 <= unit < self._n:
            raise UnknownUnit(f"unit {unit} is outside the campaign (0..{self._n - 1})")

    def _seen(self, worker: str, pool: str, now: float) -> None:
        if pool not in self._pools:
            if self._fixed_pools:
                raise UnknownPool(f"pool {pool!r} is not one of the campaign's ({', '.join(sorted(self._pools))})")
            self._pools[pool] = _PoolCounter()
        self._workers[worker] = (pool, now)

    def _check_attempt(self, unit: int, attempt: int, lease: _Lease | None) -> None:
        """Raise :class:`NotIssued` unless ``attempt`` is ``lease``'s for ``unit`` (without one: was ever issued)."""
        if lease is not None:
            if attempt != self._attempt_of(lease, unit):
                raise NotIssued(
                    f"unit {unit}: attempt {attempt} is not the attempt {self._attempt_of(lease, unit)} "
                    f"lease {lease.lease_id!r} was given"
                )
        elif not 0 <= attempt <= int(self._attempts[unit]):
            raise NotIssued(
                f"unit {unit}: attempt {attempt} was never issued (attempts so far: {int(self._attempts[unit])})"
            )

    @property
    def pools(self) -> tuple[str, ...]:
        """The pools the book counts for, by name."""
        return tuple(sorted(self._pools))

    def check_pool(self, pool: str) -> None:
        """Raise :class:`UnknownPool` unless ``pool`` is one of the book's (when its pools are fixed)."""
        if self._fixed_pools and pool not in self._pools:
            raise UnknownPool(f"pool {pool!r} is not one of the campaign's ({', '.join(sorted(self._pools))})")

    def issued(self, unit: int, attempt: int) -> bool:
        """Has the book ever issued ``attempt`` of ``unit`` (is it at most the unit's attempt counter)?"""
        self._check_unit(unit)
        return 0 <= attempt <= int(self._attempts[unit])

    def set_costs(self, block: int, costs: Iterable[float]) -> None:
        """Hand out the most expensive blocks of ``block`` units first; ``costs`` are their expected costs."""
        self._cost = _CostOrder(self._n, block, costs)
        self._pending_mark = self._counts[_PENDING]

    def observe_cost(self, unit: int, *, epochs: int, seconds: float) -> None:
        """A finished attempt of ``unit`` took ``epochs`` epochs and ``seconds`` of training: learn its block's cost."""
        if self._cost is not None and 0 <= unit < self._n:
            self._cost.observe(unit, epochs, seconds)

    def expected_costs(self) -> npt.NDArray[np.float64] | None:
        """Expected cost of a unit of each block (seconds once units finished, else reference); None without costs."""
        return None if self._cost is None else self._cost.expected()

    def _take_pending(self, k: int) -> npt.NDArray[np.int64]:
        """The ``k`` lowest pending units (fewer if fewer are pending); advances ``_low`` past them.

        With costs: from the most expensive blocks first (:class:`_CostOrder`).
        """
        if self._cost is not None:
            if self._counts[_PENDING] > self._pending_mark:
                self._cost.rewind()  # units came back (expiry, failure, release): look at every block again
            units = self._cost.take(self._state, min(k, self._counts[_PENDING]))
            self._pending_mark = self._counts[_PENDING] - units.size
            return units
        need = min(k, self._counts[_PENDING])
        found: list[npt.NDArray[np.int64]] = []
        lo = self._low
        if need and not self._state[lo : lo + need].any() and lo + need <= self._n:
            # The common case: the pending frontier is contiguous (pending is state 0).
            self._low = lo + need
            return np.arange(lo, lo + need, dtype=np.int64)
        chunk = 4096  # grows geometrically, so a scan across a long leased/done stretch stays cheap
        while need > 0 and lo < self._n:
            hi = min(self._n, lo + chunk)
            idx = np.flatnonzero(self._state[lo:hi] == _PENDING)
            if idx.size >= need:
                idx = idx[:need]
                found.append(idx + lo)
                lo += int(idx[-1]) + 1
                need = 0
                break
            if idx.size:
                found.append(idx + lo)
                need -= idx.size
            lo = hi
            chunk = min(chunk * 4, 1 << 20)
        self._low = lo  # the units below lo were not pending, or are being leased now
        if not found:
            return np.empty(0, dtype=np.int64)
        return np.concatenate(found).astype(np.int64, copy=False)

    def _grant_speculative(self, worker: str, pool: str, k: int, now: float) -> LeaseView | None:
        if not bool(np.any((self._holder >= 0) & (self._spare == _NOBODY))):
            return None  # every leased unit already has its copy: skip walking the leases (idle workers poll)
        picked_units: list[npt.NDArray[np.int64]] = []
        picked_attempts: list[npt.NDArray[np.int64]] = []
        got = 0
        for lease in sorted(self._leases.values(), key=lambda x: (x.deadline, x.seq)):
            if lease.worker == worker:
                continue
            # Units this lease holds as the only holder: candidates for the one extra copy.
            sel = np.flatnonzero((self._holder[lease.units] == lease.slot) & (self._spare[lease.units] == _NOBODY))
            sel = sel[: k - got]
            if sel.size:
                picked_units.append(lease.units[sel])
                picked_attempts.append(lease.attempts[sel])
                got += sel.size
                if got >= k:
                    break
        if not got:
            return None
        units = np.concatenate(picked_units)
        attempts = np.concatenate(picked_attempts)
        order = np.argsort(units)
        spec = self._new_lease(worker, pool, units[order], attempts[order], now, speculative=True)
        self._spare[spec.units] = spec.slot
        return self._view(spec)

    def _readopt(self, lease_id: str, worker: str, pool: str, units: Mapping[int, int], now: float) -> HeartbeatResult:
        ok_units: list[int] = []
        ok_attempts: list[int] = []
        cancel: list[int] = []
        tag = lease_tag(lease_id)
        tags = self._orphan_tags
        for unit, attempt in sorted(units.items()):
            # Only what the checkpoint says this lease held, at the attempt it held (module docstring).
            free = (
                0 <= unit < tags.size
                and self._state[unit] == _LEASED
                and self._holder[unit] == _ORPHAN
                and int(tags[unit]) == tag
                and attempt == int(self._attempts[unit])
            )
            if free:
                ok_units.append(unit)
                ok_attempts.append(attempt)
            else:
                cancel.append(unit)
        if not ok_units:
            raise NotHolder(
                f"lease {lease_id!r} is unknown and none of its units is free to re-establish it "
                "(they succeeded, failed, are leased to another worker, or were not this lease's at the last "
                "checkpoint)"
            )
        arr = np.asarray(ok_units, dtype=np.int64)
        att = np.asarray(ok_attempts, dtype=np.int64)
        lease = self._new_lease(worker, pool, arr, att, now, speculative=False, lease_id=lease_id)
        self._holder[arr] = lease.slot  # all were orphans: already counted as leased
        self._orphan_tags[arr] = 0
        return HeartbeatResult(lease_id, lease.deadline, tuple(cancel), readopted=True)

    def _new_lease(
        self,
        worker: str,
        pool: str,
        units: npt.NDArray[np.int64],
        attempts: npt.NDArray[np.int64],
        now: float,
        *,
        speculative: bool,
        lease_id: str | None = None,
    ) -> _Lease:
        if lease_id is None:
            lease_id = _new_lease_id()
            while lease_id in self._leases:
                lease_id = _new_lease_id()
        if self._free_slots:
            slot = self._free_slots.pop()
        else:
            slot = len(self._slots)
            self._slots.append(None)
        lease = _Lease(
            lease_id=lease_id,
            seq=next(self._seq),
            slot=slot,
            worker=worker,
            pool=pool,
            units=units,
            attempts=attempts,
            granted_at=now,
            deadline=now + self._lease_seconds,
            speculative=speculative,
            held=int(units.size),
        )
        if len(self._heap) > 2 * len(self._leases) + 1024:
            # Entries of ended leases stay until their deadline passes; with fast turnover they would pile up.
            self._heap = [(x.deadline, x.seq, x.lease_id) for x in self._leases.values()]
            heapq.heapify(self._heap)
        self._slots[slot] = lease
        if slot >= self._slot_tags.size:
            self._slot_tags = np.resize(self._slot_tags, max(64, 2 * (slot + 1)))
        self._slot_tags[slot] = lease_tag(lease_id)
        self._leases[lease_id] = lease
        heapq.heappush(self._heap, (lease.deadline, lease.seq, lease_id))
        return lease

    def _end(self, lease: _Lease) -> None:
        del self._leases[lease.lease_id]
        self._slots[lease.slot] = None
        self._free_slots.append(lease.slot)

    def _holds(self, lease: _Lease, unit: int) -> bool:
        return 0 <= unit < self._n and lease.slot in (self._holder[unit], self._spare[unit])

    def _holding_lease(self, unit: int, worker: str) -> _Lease | None:
        """The lease through which ``worker`` holds ``unit``, if any (a worker never holds a unit twice)."""
        for slot in (int(self._holder[unit]), int(self._spare[unit])):
            if slot >= 0:
                lease = self._slots[slot]
                if lease is not None and lease.worker == worker:
                    return lease
        return None

    def _attempt_of(self, lease: _Lease, unit: int) -> int:
        return int(lease.attempts[int(np.searchsorted(lease.units, unit))])

    def _view(self, lease: _Lease, *, all_held: bool = False) -> LeaseView:
        units, attempts = lease.units, lease.attempts
        if not all_held:
            mask = (self._holder[units] == lease.slot) | (self._spare[units] == lease.slot)
            units, attempts = units[mask], attempts[mask]
        return LeaseView(
            lease_id=lease.lease_id,
            worker=lease.worker,
            pool=lease.pool,
            units=tuple(units.tolist()),
            attempts=tuple(attempts.tolist()),
            deadline=lease.deadline,
            granted_at=lease.granted_at,
            speculative=lease.speculative,
        )

    def _set_state(self, unit: int, new: int) -> None:
        old = int(self._state[unit])
        self._state[unit] = new
        self._counts[old] -= 1
        self._counts[new] += 1
        if new == _PENDING and unit < self._low:
            self._low = unit

    def _detach(self, unit: int, lease: _Lease) -> bool:
        """Take ``unit`` out of ``lease`` (ending the lease when it holds nothing); True if no holder is left."""
        slot = lease.slot
        if self._holder[unit] == slot:
            spare = int(self._spare[unit])
            self._holder[unit] = spare if spare >= 0 else _NOBODY  # the speculative copy becomes the holder
            self._spare[unit] = _NOBODY
            last = spare < 0
        elif self._spare[unit] == slot:
            self._spare[unit] = _NOBODY
            last = False
        else:  # pragma: no cover - callers only detach held units
            raise AssertionError(f"lease {lease.lease_id} does not hold unit {unit}")
        lease.held -= 1
        if lease.held == 0:
            self._end(lease)
        return last

    def _give_back(self, unit: int, lease: _Lease, *, counted: bool) -> None:
        """``lease`` lets go of ``unit``; if it was the last holder the unit is pending again (or failed)."""
        attempt = self._attempt_of(lease, unit)
        last = self._detach(unit, lease)
        if counted:
            self._pools[lease.pool].failed += 1
        if last:
            if counted:
                self._count_failure(unit, attempt)
            else:
                self._set_state(unit, _PENDING)

    def _give_back_all(self, lease: _Lease, *, counted: bool) -> npt.NDArray[np.int64]:
        """:meth:`_give_back` for every unit ``lease`` holds, vectorised (a mass expiry after an outage); ends it."""
        u, a, slot = lease.units, lease.attempts, lease.slot
        as_primary = self._holder[u] == slot
        as_spare = self._spare[u] == slot
        held: npt.NDArray[np.int64] = u[as_primary | as_spare]
        self._spare[u[as_spare]] = _NOBODY
        primary, primary_attempts = u[as_primary], a[as_primary]
        spare = self._spare[primary]
        promote = spare >= 0  # the speculative copy carries on as the holder
        self._holder[primary[promote]] = spare[promote]
        self._spare[primary[promote]] = _NOBODY
        last, last_attempts = primary[~promote], primary_attempts[~promote]
        self._holder[last] = _NOBODY
        if counted:
            counter = np.maximum(self._attempts[last].astype(np.int64), last_attempts + 1)
            self._attempts[last] = np.minimum(counter, _MAX_COUNTER).astype(np.uint16)
            failed = counter >= self._max_attempts
            self._pools[lease.pool].failed += int(held.size)
        else:
            failed = np.zeros(last.size, dtype=bool)
        self._state[last] = np.where(failed, _FAILED, _PENDING).astype(np.uint8)
        n_failed = int(np.count_nonzero(failed))
        self._counts[_LEASED] -= int(last.size)
        self._counts[_FAILED] += n_failed
        self._counts[_PENDING] += int(last.size) - n_failed
        pending = last[~failed]
        if pending.size:
            self._low = min(self._low, int(pending[0]))  # units are ascending
        lease.held = 0
        self._end(lease)
        return held

    def _count_failure(self, unit: int, attempt: int) -> None:
        """Count ``attempt`` of a unit no live lease holds: pending with the next attempt, or failed."""
        counter = max(int(self._attempts[unit]), attempt + 1)
        self._attempts[unit] = min(counter, _MAX_COUNTER)
        self._holder[unit] = _NOBODY  # clears an orphan mark
        new = _FAILED if counter >= self._max_attempts else _PENDING
        if int(self._state[unit]) != new:
            self._set_state(unit, new)

    def _report_failure(self, unit: int, worker: str, pool: str, attempt: int) -> Outcome:
        state = int(self._state[unit])
        if state in (_DONE, _FAILED):
            return Outcome.duplicate
        lease = self._holding_lease(unit, worker)
        if lease is not None:
            self._check_attempt(unit, attempt, lease)
            self._give_back(unit, lease, counted=True)
            return Outcome.accepted
        self._check_attempt(unit, attempt, None)
        # Not a holder (its lease expired, or the server restarted). Count the attempt only for a unit
        # orphaned by a restart, at its current attempt: a unit nobody was given cannot be failed by a report.
        if not (state == _LEASED and self._holder[unit] == _ORPHAN and attempt == int(self._attempts[unit])):
            return Outcome.duplicate
        self._pools[pool].failed += 1
        self._count_failure(unit, attempt)
        return Outcome.accepted

    def _finish(self, unit: int, worker: str, pool: str) -> None:
        """``unit`` succeeded: revoke every copy (other workers are told on their next heartbeat)."""
        while (slot := int(self._holder[unit])) >= 0:
            lease = self._slots[slot]
            assert lease is not None
            if lease.worker != worker:
                lease.revoked.append(unit)
                self._untold.setdefault(lease.worker, set()).add(unit)
            self._detach(unit, lease)
        self._holder[unit] = _NOBODY  # clears an orphan mark
        self._set_state(unit, _DONE)
        self._pools[pool].succeeded += 1


def _scan_pending(state: npt.NDArray[np.uint8], lo: int, hi: int, need: int) -> tuple[npt.NDArray[np.int64], int]:
    """Up to ``need`` pending units in ``[lo, hi)``, ascending, and where the next scan may start."""
    found: list[npt.NDArray[np.int64]] = []
    chunk = 4096  # grows geometrically, as in LeaseBook._take_pending
    while need > 0 and lo < hi:
        top = min(hi, lo + chunk)
        idx = np.flatnonzero(state[lo:top] == _PENDING)
        if idx.size >= need:
            idx = idx[:need]
            found.append(idx + lo)
            return np.concatenate(found).astype(np.int64, copy=False), lo + int(idx[-1]) + 1
        if idx.size:
            found.append(idx + lo)
            need -= idx.size
        lo = top
        chunk = min(chunk * 4, 1 << 20)
    return (np.concatenate(found).astype(np.int64, copy=False) if found else np.empty(0, dtype=np.int64)), lo


def _by_octave(costs: npt.NDArray[np.float64]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Blocks by expected cost, highest first, costs within one octave (a factor of 2) counted as equal.

    Order only pays where costs differ a lot (EightBit's 1,300 epochs against SingleDirect's 70); within an
    octave the blocks keep index order, so units of one target stay together (members of a stack share
    their target's data) and noise in the learned costs does not reshuffle the campaign.
    """
    octave: npt.NDArray[np.float64] = np.floor(np.log2(np.maximum(costs, 1e-9)))
    order: npt.NDArray[np.int64] = np.argsort(-octave, kind="stable").astype(np.int64)
    return order, octave


class _CostOrder:
    """Which pending units a grant takes when targets differ in cost: most expensive block first.

    Blocks are ``block`` consecutive units (a target's replicas). A block's expected cost is its expected
    epochs (the reference figure, counted as two observations, averaged with the epochs of its finished
    attempts) times its seconds per epoch (its own finished attempts', else the campaign's, else 1), so
    before anything finishes the order is the reference epochs', and afterwards the campaign's own
    measurements take over. The order is re-sorted when an observation moves its block's cost to another
    octave, and after every ``_RESORT`` observations (the book must stay fast). Per block a scan pointer
    skips units already taken; when a unit comes back
    (expiry, failure, release), a grant that finds fewer units than are pending rescans from the start.
    """

    _PRIOR = 2.0  # observations the reference figure counts for
    _RESORT = 1024

    def __init__(self, total: int, block: int, costs: Iterable[float]) -> None:
        reference = np.asarray(list(costs), dtype=np.float64)
        blocks = -(-total // block) if block > 0 else 0
        if block <= 0 or reference.size != blocks or not np.all(np.isfinite(reference)) or np.any(reference < 0):
            raise ValueError(f"costs must be {blocks} finite non-negative numbers, one per block of {block} units")
        self._n, self._block = total, block
        self._reference = reference
        self._epochs = np.zeros(blocks)  # summed over finished attempts
        self._seconds = np.zeros(blocks)
        self._count = np.zeros(blocks)
        self._starts = np.arange(blocks, dtype=np.int64) * block
        self._low = self._starts.copy()  # per block: no pending unit below this
        self._order, self._octave = _by_octave(reference)
        self._pos = 0  # blocks before this position in the order have nothing pending
        self._unsorted = 0

    def expected(self) -> npt.NDArray[np.float64]:
        epochs = (self._reference * self._PRIOR + self._epochs) / (self._PRIOR + self._count)
        total_epochs = float(self._epochs.sum())
        overall = float(self._seconds.sum()) / total_epochs if total_epochs > 0 else 1.0
        own = np.divide(self._seconds, self._epochs, out=np.full_like(self._seconds, overall), where=self._epochs > 0)
        expected: npt.NDArray[np.float64] = epochs * own
        return expected

    def observe(self, unit: int, epochs: int, seconds: float) -> None:
        b = unit // self._block
        self._epochs[b] += max(0, epochs)
        self._seconds[b] += max(0.0, seconds)
        self._count[b] += 1
        self._unsorted += 1
        # Re-sort when this block's cost left its octave (cheap to check), or now and then for the rest
        # (blocks without finished units follow the campaign's seconds per epoch).
        mine = (self._reference[b] * self._PRIOR + self._epochs[b]) / (self._PRIOR + self._count[b])
        mine *= self._seconds[b] / self._epochs[b] if self._epochs[b] > 0 else 1.0
        if np.floor(np.log2(max(mine, 1e-9))) != self._octave[b] or self._unsorted >= self._RESORT:
            self._unsorted = 0
            self._order, self._octave = _by_octave(self.expected())
            self._pos = 0

    def rewind(self) -> None:
        """Scan every block from its start again (units came back to pending somewhere)."""
        self._low = self._starts.copy()
        self._pos = 0

    def take(self, state: npt.NDArray[np.uint8], need: int) -> npt.NDArray[np.int64]:
        got = self._walk(state, need)
        if got.size < need:
            # Units came back below the scan pointers unnoticed: rescan every block once, in order.
            self.rewind()
            more = self._walk(state, need - got.size)
            got = np.concatenate([got, more]) if got.size else more
        return np.sort(got)

    def _walk(self, state: npt.NDArray[np.uint8], need: int) -> npt.NDArray[np.int64]:
        found: list[npt.NDArray[np.int64]] = []
        order = self._order
        while need > 0 and self._pos < order.size:
            b = int(order[self._pos])
            hi = min(self._n, int(self._starts[b]) + self._block)
            units, self._low[b] = _scan_pending(state, int(self._low[b]), hi, need)
            if units.size:
                found.append(units)
                need -= units.size
            if need > 0:
                self._pos += 1  # the block is exhausted
        return np.concatenate(found) if found else np.empty(0, dtype=np.int64)
