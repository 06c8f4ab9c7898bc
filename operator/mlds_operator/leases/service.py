"""One campaign's lease service: the lease book, the store, verification, checkpoints and the dataset files.

The lease API (:mod:`mlds_operator.leases.http`) calls one :class:`CampaignService` per campaign; the operator
and ``mlds run`` create them, drive :meth:`CampaignService.tick` periodically, and read
:meth:`CampaignService.snapshot` for status and progress. Nothing here knows HTTP or kopf.

**Results go through staging.** A grant hands out presigned PUT URLs for
``_mlds/staging/<unit>-<attempt>-<worker>/<file>`` (one folder per attempt), and to workers that ask for
it one more for the unit's files in one body, ``_mlds/staging/<unit>-<attempt>-<worker>~bundle`` (``~``
is in no worker id, so a bundle never collides with an attempt folder); never for the final folder (the
stores refuse to sign anything else). On completion the service reads each staged object once, bounded
by the declared sizes, against the sizes and SHA-256 the worker declared
(:meth:`~mlds_operator.storage.store.Store.check`, which also claims the version it read, or
:meth:`~mlds_operator.storage.store.Store.check_parts` for a bundle), runs the checks of
:mod:`mlds_operator.leases.checks` (meta.json strictly parsed and bounded, the model's safetensors header
against the unit's architecture), builds the manifest row from the plan plus the worker's measured
fields, has the store publish exactly the bytes it checked to ``<target>/<replica:05d>/``
(:meth:`~mlds_operator.storage.store.Store.publish`: per-file uploads by a server-side copy on S3 or a
rename in a folder, no bytes passing through the server twice; a bundle's files written from the
checked bytes) with *that row* as meta.json last (a folder with a meta.json is a whole, verified
result), and only then tells the book. A result that cannot become a row is a 422 and the unit goes
back to pending. A worker whose lease expired while it trained can therefore never overwrite a
verified result: the final keys are written by the server alone, once per unit, and a staged file
replaced after its check is refused, not published. Staged objects of published results are deleted
in batches when the rows are flushed; other leftovers on failure, every attempt's when the unit
succeeds, and at start-up those of units already done (not on lease expiry: a late completion of an
expired lease is still accepted). Non-converged attempts are kept for research under
``unconverged/<target>/<replica:05d>/attempt-<n>/`` and are not in the manifest.
:meth:`CampaignService.complete_many` completes a stack's worth of units in one call (the
``completeBatch`` route), each exactly as alone.

**Durability.** Verified rows accumulate in memory and are flushed as a manifest part, followed by a
lease-book checkpoint, every ``checkpoint_seconds`` (and at the end). After a crash, the checkpoint
restores the book and :meth:`CampaignService.recover` scans the final result folders for units verified
after it, so no finished network is trained twice or lost from the manifest. A lease is honoured after
a restart only if the checkpoint knows it (its worker's heartbeat re-establishes it), so a grant is also
checkpointed on its own, ``grant_checkpoint_seconds`` after it (:meth:`CampaignService.checkpoint_leases`,
which :meth:`~CampaignService.tick` calls): the book only, no manifest part (parts stay few), with the
units whose rows are still buffered written as not yet succeeded
(:meth:`~mlds_operator.leases.book.LeaseBook.checkpoint`'s ``unpublished``), so that recovery, which
re-adds the rows of units the checkpoint does not count, adds theirs exactly once.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from mlds_contract.campaign import CampaignSpec, Dataset, Phase, campaign_phase
from mlds_contract.errors import MldsError, StorageUnavailable, UserError
from mlds_contract.lease import (
    CompleteReply,
    CompleteRequest,
    FailKind,
    FailReply,
    FailRequest,
    HeartbeatReply,
    HeartbeatRequest,
    LeasedUnit,
    LeaseGrant,
    LeaseRequest,
    NoLease,
    NoLeaseReason,
    Outcome,
    RejectReason,
    ReleaseReply,
    ReleaseRequest,
)
from mlds_contract.plan import Target, UnitSpec, campaign_targets, unit_spec
from mlds_contract.results import META_FILE, MODEL_FILE, SNAPSHOTS_FILE, UNCONVERGED_PREFIX, result_files_for
from mlds_workloads import input_files, save_data, target_data

from mlds_operator.leases import checks
from mlds_operator.leases.book import BookStats, CheckpointError, Clock, LeaseBook, NotIssued
from mlds_operator.leases.checks import ResultRejected
from mlds_operator.leases.costs import reference_costs
from mlds_operator.leases.occupancy import PoolOccupancy, StackOccupancy
from mlds_operator.storage import manifest as mf
from mlds_operator.storage.store import STAGING_PREFIX, Checked, Store

__all__ = [
    "CampaignService",
    "InputsMissing",
    "ResultRejected",
    "ServiceObserver",
    "ServiceSettings",
    "Snapshot",
    "UnknownInput",
    "bearer_matches",
    "missing_inputs",
]

log = logging.getLogger(__name__)

STAGING = STAGING_PREFIX.rstrip("/")
#: Ends the staging key of a unit's files uploaded in one body (``LeasedUnit.bundle_upload``).
BUNDLE_SUFFIX = "~bundle"
#: Rejections that mean "this result can never become a manifest row": the unit goes back to pending. The
#: others are about the staged copy, which the worker uploads afresh (RejectReason.cured_by_upload).
_UNUSABLE = frozenset(reason for reason in RejectReason if not reason.cured_by_upload)


def bearer_matches(header: str | None, token: str) -> bool:
    """Constant-time check of an ``Authorization: Bearer <token>`` header against ``token``."""
    if not header or not header.startswith("Bearer "):
        return False
    # aiohttp decodes header bytes as UTF-8 with surrogateescape: encode them back the same way, or a
    # non-UTF-8 header would raise (a 500) instead of being just a wrong token.
    return hmac.compare_digest(header[7:].strip().encode("utf-8", "surrogateescape"), token.encode())


class UnknownInput(MldsError):
    """Not one of the campaign's input files, or not under its storage prefix (HTTP 404)."""


class InputsMissing(UserError):
    """Input files the campaign reads (ds4 on MNIST) are under none of their names in its store: nothing could train.

    Raised by :meth:`CampaignService.open` before anything is served, so no worker fails a unit on it; the
    operator says so in a condition and opens the campaign once the files are there.
    """


def missing_inputs(spec: CampaignSpec, store: Store) -> dict[str, tuple[str, ...]]:
    """The input files of ``spec`` (:func:`mlds_workloads.input_files`) that none of their names finds in ``store``.

    File -> the names it may have, in the order :func:`~mlds_workloads.input_files` gives them.
    """
    files = input_files(spec.workload.dataset, spec.workload.images)
    return {name: names for name, names in files.items() if not any(store.stat(n) is not None for n in names)}


@dataclass(frozen=True)
class ServiceSettings:
    """Tunables of a campaign service; defaults suit a cluster, tests shrink them."""

    #: Seconds between manifest-part flushes + checkpoints. A crash loses no result (recovery scans the
    #: results), only the work of re-reading a few meta.json files; 30 s keeps bucket writes negligible.
    checkpoint_seconds: float = 30.0
    #: Seconds after a grant by which the book alone is checkpointed (at the next tick), so that a restart
    #: honours that lease too; at most one such checkpoint per interval. Cheap: no manifest part, and the
    #: book's copy takes milliseconds on the event loop (~4 ms for a million units; compression runs in a
    #: thread). Needs :meth:`CampaignService.checkpoint_leases` called at least this often: ``mlds run``'s
    #: ticks come every 0.5 s; the operator's every status interval (5 s), so it calls it every second too.
    grant_checkpoint_seconds: float = 2.0
    #: Flush early when this many verified rows are buffered (bounds memory and part size).
    part_rows: int = 5000
    #: Lifetime of presigned upload URLs. Longer than any sane training time of one lease; the URL only
    #: reaches this unit's staging keys, so a long life exposes nothing else.
    upload_url_seconds: float = 24 * 3600.0
    #: Window over which the networks-per-hour rate is measured.
    rate_window_seconds: float = 600.0
    #: Retry-After hint when nothing is pending (units may come back through expiry) or the campaign is paused.
    idle_retry_seconds: float = 5.0


@dataclass(frozen=True)
class Snapshot:
    """What status, metrics and progress bars show: book aggregates plus rates."""

    stats: BookStats
    phase: Phase
    networks_per_hour: float | None
    eta: datetime | None
    training_seconds: float  # summed over verified networks
    rejected: dict[RejectReason, int]  # rejected completions by reason
    occupancy: dict[str, PoolOccupancy] = field(default_factory=dict)  # continuous stacks, by pool (issue 14)
    unreadable: tuple[str, ...] = ()  # result folders recovery skipped (unreadable meta.json), first 100


class ServiceObserver(Protocol):
    """What a service reports as it happens; :class:`mlds_operator.leases.metrics.CampaignMetrics` implements it.

    Called on the event loop, after the book has changed; ``pool`` is the worker's (or the lease's) pool.
    """

    def lease_granted(self, pool: str, *, units: int, reissued: int) -> None:
        """A lease of ``units`` units, ``reissued`` of them on a later attempt after one ended without a result."""

    def lease_extended(self, pool: str) -> None:
        """A heartbeat extended (or re-established) a lease."""

    def lease_expired(self, pool: str, *, units: int, counted: bool) -> None:
        """A lease ran out holding ``units`` units; ``counted``: their attempts were counted (book not paused)."""

    def attempt_failed(self, pool: str, reason: str) -> None:
        """An attempt ended without a result: ``error`` (the worker said so) or ``unconverged`` (epoch cap)."""

    def result_published(self, pool: str, size: int) -> None:
        """Verified result files of ``size`` bytes were written to their final folder."""

    def result_verified(self, pool: str, *, training_seconds: float, epochs: int) -> None:
        """A converged result was verified and counted (the unit succeeded)."""

    def result_duplicate(self, pool: str) -> None:
        """A completion of a unit that had already succeeded (dropped)."""

    def result_rejected(self, pool: str, reason: RejectReason) -> None:
        """A completion failed verification (:attr:`ResultRejected.reason`)."""


@dataclass
class _Verified:
    files: dict[str, bytes]
    row: dict[str, Any]  # the manifest row, published as meta.json
    #: File name -> (staged key, version) of the files the store claimed when it checked them (Store.check,
    #: Store.check_parts), which publish() moves into place; the other files are written from ``files``.
    claimed: dict[str, tuple[str, str]]


@dataclass
class CampaignService:
    """The lease service of one campaign (see the module docstring)."""

    name: str
    spec: CampaignSpec
    store: Store
    token: str
    book: LeaseBook
    settings: ServiceSettings = field(default_factory=ServiceSettings)
    wall: Callable[[], float] = time.time
    _targets: list[Target] = field(init=False)
    _rows: list[dict[str, Any]] = field(init=False, default_factory=list)
    _part_seq: int = field(init=False, default=1)
    _last_flush: float = field(init=False, default=0.0)
    _granted_at: float | None = field(init=False, default=None)  # first grant since the last checkpoint's copy
    _finishing: dict[int, asyncio.Lock] = field(init=False, default_factory=dict)
    _recent: collections.deque[float] = field(init=False, default_factory=collections.deque)
    _training_seconds: float = field(init=False, default=0.0)
    _rejected: collections.Counter[RejectReason] = field(init=False, default_factory=collections.Counter)
    _finalized: bool = field(init=False, default=False)
    _flush_lock: asyncio.Lock = field(init=False, default_factory=asyncio.Lock)
    _presign_inline: bool = field(init=False, default=False)  # see grant()
    _staged: list[str] = field(init=False, default_factory=list)  # staged keys of published results, to delete
    _stale: list[str] = field(init=False, default_factory=list)  # staging prefixes to delete (expired leases)
    _unreadable: list[str] = field(init=False, default_factory=list)  # result folders recovery skipped
    #: Told of leases, results and failures as they happen (the metrics layer: mlds_operator.leases.metrics.instrument).
    observer: ServiceObserver | None = None
    #: What continuous-stack workers report of their stacks (issue 14).
    occupancy: StackOccupancy = field(init=False, default_factory=StackOccupancy)

    def __post_init__(self) -> None:
        self._targets = campaign_targets(self.spec)
        self._last_flush = self.book.now()

    # ------------------------------------------------------------------------------------------- opening

    @classmethod
    async def open(
        cls,
        name: str,
        spec: CampaignSpec,
        store: Store,
        *,
        token: str | None = None,
        pools: list[str] | None = None,
        clock: Clock = time.monotonic,
        settings: ServiceSettings | None = None,
    ) -> CampaignService:
        """Open a campaign: restore the book from the store's checkpoint (if any) and recover later results."""
        total = len(campaign_targets(spec)) * spec.networks_per_target
        pools = pools if pools is not None else [p.name for p in spec.pools]
        saved = await asyncio.to_thread(mf.get_checkpoint, store)
        book: LeaseBook | None = None
        if saved is not None:
            try:
                book = LeaseBook.from_bytes(
                    saved,
                    clock=clock,
                    total=total,
                    max_attempts=spec.leases.max_attempts,
                    lease_seconds=spec.leases.duration_seconds,
                    pools=pools,
                )
            except CheckpointError as exc:
                log.warning("campaign=%s checkpoint unusable, recovering from results: %s", name, exc)
        if book is None:
            book = LeaseBook(
                total,
                max_attempts=spec.leases.max_attempts,
                lease_seconds=spec.leases.duration_seconds,
                clock=clock,
                pools=pools,
            )
        service = cls(
            name=name,
            spec=spec,
            store=store,
            token=token or secrets.token_urlsafe(32),
            book=book,
            settings=settings or ServiceSettings(),
        )
        if not book.finished and (missing := await asyncio.to_thread(missing_inputs, spec, store)):
            first = next(iter(missing.values()))
            raise InputsMissing(
                f"{spec.workload.dataset.value} with images: {spec.workload.images.value} reads "
                f"{', '.join(missing)} from the campaign's storage ({store.url}), and none of their names is "
                f"there (each may be plain or gzipped: {', '.join(first)}); the campaign starts once they are there"
            )
        service.book.paused = spec.suspend
        # Longest expected first (issue 14): slow targets start early, the campaign does not end on them.
        service.book.set_costs(spec.networks_per_target, reference_costs(spec, service._targets))
        service._part_seq = await asyncio.to_thread(mf.next_part_seq, store)
        recovered = await service.recover()
        await asyncio.to_thread(service._drop_finished_staging)
        if saved is not None or recovered:
            log.info(
                "campaign=%s resumed: %d/%d succeeded (%d recovered from results)",
                name,
                book.stats().succeeded,
                total,
                recovered,
            )
        return service

    async def recover(self) -> int:
        """Mark done every unit whose verified result folder exists but the book does not count. Returns how many."""
        index = {t.name: i for i, t in enumerate(self._targets)}
        n = self.spec.networks_per_target
        recovered = 0
        folders = await asyncio.to_thread(lambda: list(mf.find_results(self.store)))
        pools = self.book.pools
        for folder in folders:
            target, _, replica = folder.partition("/")
            if target not in index or not (replica.isascii() and replica.isdigit()) or int(replica) >= n:
                continue
            unit = index[target] * n + int(replica)
            if self.book.unit(unit).state.value == "succeeded":
                continue
            raw = await asyncio.to_thread(self.store.get_bytes, f"{folder}/{META_FILE}")
            read = checks.read_published(raw, unit=unit, target=target)
            if read is None or not self.book.issued(unit, read.attempt):
                # Skipped and reported, never fatal: one damaged object must not stop the campaign.
                log.warning(
                    "campaign=%s result %s has an unreadable meta.json; skipped (not counted)", self.name, folder
                )
                if len(self._unreadable) < 100:
                    self._unreadable.append(folder)
                continue
            pool = read.pool if read.pool in pools or not pools else pools[0]
            self.book.complete(unit, worker="recovered", pool=pool, attempt=read.attempt, converged=True)
            spec = self.unit_spec(unit, read.attempt)
            self._rows.append(checks.manifest_row(spec, read.measured, sha256=read.sha256, pool=pool, key=folder))
            recovered += 1
        if recovered:
            await self.flush()
        return recovered

    # --------------------------------------------------------------------------------------------- auth

    def authorized(self, header: str | None) -> bool:
        """Constant-time check of an ``Authorization: Bearer <token>`` header."""
        return bearer_matches(header, self.token)

    # ------------------------------------------------------------------------------------------ protocol

    def _wall_deadline(self, deadline: float) -> tuple[datetime, float]:
        seconds = max(deadline - self.book.now(), 0.001)
        return datetime.fromtimestamp(self.wall() + seconds, tz=UTC), seconds

    def unit_spec(self, unit: int, attempt: int) -> UnitSpec:
        return unit_spec(self.spec, unit, attempt, campaign=self.name, targets=self._targets)

    @staticmethod
    def staging_prefix(unit: int, attempt: int, worker: str) -> str:
        """The folder of one attempt's per-file uploads (one level: one mkdir and one rmdir per attempt)."""
        return f"{STAGING}/{unit}-{attempt}-{worker}"

    @staticmethod
    def bundle_key(unit: int, attempt: int, worker: str) -> str:
        """Where one attempt's files uploaded in one body go (a file beside the attempt folders: no mkdir)."""
        return f"{STAGING}/{unit}-{attempt}-{worker}{BUNDLE_SUFFIX}"

    async def grant(self, req: LeaseRequest) -> LeaseGrant | NoLease:
        reply = await self._grant(req)
        # Whatever the answer, it tells the worker which of its units others completed (a continuous stack
        # asks for top-ups every round it has a free slot: a losing speculative copy stops within a round).
        reply.cancel = list(self.book.take_cancellations(req.worker))
        return reply

    async def _grant(self, req: LeaseRequest) -> LeaseGrant | NoLease:
        # The pool first, whatever the answer would be: a stack report of an invented pool must not become
        # an occupancy series (issue 13: client-chosen names grow no state), and "finished" is no excuse.
        self.book.check_pool(req.pool)
        if req.stack is not None:
            self.occupancy.report(req.worker, req.pool, req.stack, pending=self.book.pending)
        if self.book.finished:
            return NoLease(reason=NoLeaseReason.finished, retry_after_seconds=0)
        self._expire()  # the grant would expire overdue leases itself, unseen by the observer
        view = self.book.grant(req.worker, req.pool, req.max_units, speculative=req.allow_speculative)
        if view is None:
            if self.book.finished:
                return NoLease(reason=NoLeaseReason.finished, retry_after_seconds=0)
            reason = NoLeaseReason.paused if self.book.paused else NoLeaseReason.busy
            return NoLease(reason=reason, retry_after_seconds=self.settings.idle_retry_seconds)
        expires = timedelta(seconds=self.settings.upload_url_seconds)

        def presign() -> list[LeasedUnit]:
            out = []
            for unit, attempt in zip(view.units, view.attempts, strict=True):
                spec = self.unit_spec(unit, attempt)
                prefix = self.staging_prefix(unit, attempt, req.worker)
                uploads = {
                    f: self.store.presign_put(f"{prefix}/{f}", expires, scope=view.lease_id)
                    for f in result_files_for(spec.dataset)
                }
                bundle = None
                if req.bundle_uploads:
                    key = self.bundle_key(unit, attempt, req.worker)
                    bundle = self.store.presign_put(key, expires, scope=view.lease_id)
                out.append(LeasedUnit(spec=spec, uploads=uploads, bundle_upload=bundle))
            return out

        try:
            if self._presign_inline:
                units = presign()
            else:
                # The first grant signs in a thread: an S3 store without a configured region looks the bucket's
                # region up once (network I/O). After that, signing is pure computation (an HMAC per URL,
                # microseconds), and a thread hop per lease cost more than the signing and halved the grant
                # rate under load (`mlds bench leases`), so later grants sign on the event loop.
                units = await asyncio.to_thread(presign)
                self._presign_inline = True
        except Exception:
            # Presigning is local computation for both backends, but never strand the units if it fails.
            self.book.release_lease(view.lease_id, req.worker)
            raise
        if not view.speculative and self._granted_at is None:  # a speculative copy is never re-adopted
            self._granted_at = self.book.now()
        if self.observer is not None:
            reissued = 0 if view.speculative else sum(1 for a in view.attempts if a > 0)
            self.observer.lease_granted(req.pool, units=len(view.units), reissued=reissued)
        deadline, seconds = self._wall_deadline(view.deadline)
        return LeaseGrant(
            lease_id=view.lease_id,
            deadline=deadline,
            lease_seconds=seconds,
            heartbeat_seconds=max(seconds / 3.0, 0.5),
            speculative=view.speculative,
            units=units,
        )

    def heartbeat(self, lease_id: str, req: HeartbeatRequest) -> HeartbeatReply:
        units = {u.unit: u.attempt for u in req.units}
        self.book.check_pool(req.pool)  # before the stack report is recorded (see _grant)
        if req.stack is not None:
            self.occupancy.report(req.worker, req.pool, req.stack, pending=self.book.pending)
        result = self.book.heartbeat(lease_id, req.worker, pool=req.pool, units=units)
        if self.observer is not None:
            self.observer.lease_extended(req.pool)
        deadline, seconds = self._wall_deadline(result.deadline)
        return HeartbeatReply(
            deadline=deadline, lease_seconds=seconds, cancel=list(result.cancel), readopted=result.readopted
        )

    def release(self, lease_id: str, req: ReleaseRequest) -> ReleaseReply:
        return ReleaseReply(released=self.book.release_lease(lease_id, req.worker))

    def upload_allowed(self, key: str, scope: str) -> bool:
        """May a PUT of staging ``key`` under lease ``scope`` land now? (The local store's upload route asks.)

        Yes only while that lease is live, its worker is the key's, and it holds the key's unit at the
        key's attempt, for one of the unit's result files: an upload right dies with its lease.
        """
        if not key.startswith(STAGING_PREFIX):
            return False
        owner, slash, name = key.removeprefix(STAGING_PREFIX).partition("/")
        if slash:  # <unit>-<attempt>-<worker>/<file>: one of the unit's result files
            if name not in result_files_for(self.spec.workload.dataset):
                return False
        elif owner.endswith(BUNDLE_SUFFIX):  # <unit>-<attempt>-<worker>~bundle: all of them in one body
            owner = owner.removesuffix(BUNDLE_SUFFIX)
        else:
            return False
        unit_text, _, rest = owner.partition("-")
        attempt_text, _, worker = rest.partition("-")
        if not (unit_text.isascii() and unit_text.isdigit() and attempt_text.isascii() and attempt_text.isdigit()):
            return False
        lease = self.book.lease(scope)
        if lease is None or lease.worker != worker:
            return False
        unit, attempt = int(unit_text), int(attempt_text)
        held = dict(zip(lease.units, lease.attempts, strict=True))
        return held.get(unit) == attempt

    async def input_file(self, name: str) -> bytes:
        """One of the files the campaign's data is read from (:func:`mlds_workloads.input_files`), for a worker.

        Workers hold no storage credentials, so the server reads the file from the store, under the
        campaign's prefix, by the first of its names found. Raises :class:`UnknownInput`.
        """
        workload = self.spec.workload
        names = input_files(workload.dataset, workload.images).get(name)
        if names is None:
            raise UnknownInput(f"{name!r} is not an input file of this campaign")
        for candidate in names:
            data = await asyncio.to_thread(self.store.get_bytes, candidate)
            if data is not None:
                return data
        raise UnknownInput(
            f"{name} is not under the campaign's storage prefix (looked for {', '.join(names)}); "
            f"{workload.dataset.value} with images: {workload.images.value} reads it from there"
        )

    def fail(self, req: FailRequest) -> FailReply:
        outcome = self.book.fail(
            req.unit, worker=req.worker, pool=req.pool, attempt=req.attempt, retry=req.kind is FailKind.release
        )
        if outcome is Outcome.accepted:
            self._drop_attempt_later(req.unit, req.attempt, req.worker)
        if req.kind is FailKind.fail and outcome is Outcome.accepted and self.observer is not None:
            self.observer.attempt_failed(req.pool, "error")
        if req.kind is FailKind.fail:
            log.info(
                "campaign=%s unit=%d attempt=%d worker=%s failed: %s",
                self.name,
                req.unit,
                req.attempt,
                req.worker,
                req.reason or "no reason given",
            )
        return FailReply(status=outcome, state=self.book.unit(req.unit).state)

    async def complete(self, req: CompleteRequest) -> CompleteReply:
        """Verify a unit's staged files, publish them, then count the unit. Raises :class:`ResultRejected`.

        The reply also lists the worker's other units that other workers completed (``cancel``).
        """
        reply = await self._complete(req)
        reply.cancel = list(self.book.take_cancellations(req.worker))
        return reply

    async def _complete(self, req: CompleteRequest) -> CompleteReply:
        self.book.unit(req.unit)  # UnknownUnit for an index outside the campaign
        self.book.check_pool(req.pool)
        if not self.book.issued(req.unit, req.attempt):
            raise NotIssued(f"unit {req.unit}: attempt {req.attempt} was never issued")
        # One completion of a unit at a time: verify -> publish -> count must not interleave with another
        # copy's (a speculative twin, a late worker), or two attempts could both write the final folder.
        lock = self._finishing.setdefault(req.unit, asyncio.Lock())
        async with lock:
            reply = await self._complete_locked(req)
        if reply.state.value == "succeeded" and not lock.locked():
            # Later arrivals are duplicates that publish nothing, so they need no lock. Not so for a failed
            # unit: a late converged copy is still accepted, and a copy already queued on this lock would
            # run beside a new arrival's fresh lock (locked() is False while waiters are queued).
            self._finishing.pop(req.unit, None)
        return reply

    async def complete_many(self, reqs: Sequence[CompleteRequest]) -> list[CompleteReply | MldsError]:
        """Complete several units at once (one per unit), each exactly as :meth:`complete` would.

        One item per request, in order: the reply, or the :class:`~mlds_contract.errors.MldsError` that
        refused it (:class:`ResultRejected`, an unknown unit, a storage outage): one bad result never
        refuses the others. Anything else is a bug and propagates.
        """
        done = await asyncio.gather(*(self.complete(req) for req in reqs), return_exceptions=True)
        out: list[CompleteReply | MldsError] = []
        for item in done:
            if isinstance(item, BaseException) and not isinstance(item, MldsError):
                raise item
            out.append(item)
        return out

    async def _complete_locked(self, req: CompleteRequest) -> CompleteReply:
        observer = self.observer
        if self.book.unit(req.unit).state.value == "succeeded":
            await asyncio.to_thread(self._drop_staging, req)
            if observer is not None:
                observer.result_duplicate(req.pool)
            return CompleteReply(status=Outcome.duplicate, state=self.book.unit(req.unit).state)
        spec = self.unit_spec(req.unit, req.attempt)
        final = spec.key if req.converged else f"{UNCONVERGED_PREFIX}{spec.key}/attempt-{req.attempt}"
        try:
            # One thread hop for both: a hop costs more CPU than a small result's reads and renames.
            verified = await asyncio.to_thread(self._verify_and_publish, req, spec, final)
        except ResultRejected as exc:
            self._rejected[exc.reason] += 1
            if observer is not None:
                observer.result_rejected(req.pool, exc.reason)
            if exc.reason in _UNUSABLE:
                # Never a row: the holder lets the unit go (uncounted), so another worker trains it.
                self.book.fail(req.unit, worker=req.worker, pool=req.pool, attempt=req.attempt, retry=True)
            raise
        if observer is not None:
            observer.result_published(req.pool, sum(len(data) for data in verified.files.values()))
        outcome = self.book.complete(
            req.unit, worker=req.worker, pool=req.pool, attempt=req.attempt, converged=req.converged
        )
        if outcome is Outcome.accepted:  # converged or capped: what a unit of its target costs (issue 14)
            self.book.observe_cost(req.unit, epochs=req.epochs, seconds=req.training_seconds)
        if outcome is Outcome.accepted and req.converged:
            self._rows.append(verified.row)
            self._recent.append(self.wall())
            self._training_seconds += req.training_seconds
            if observer is not None:
                observer.result_verified(req.pool, training_seconds=req.training_seconds, epochs=req.epochs)
        elif outcome is Outcome.accepted and observer is not None:
            observer.attempt_failed(req.pool, "unconverged")
        # The staged objects are garbage now (locally, publishing moved them away): deleted in batches by flush().
        if req.bundled:
            self._staged.append(self.bundle_key(req.unit, req.attempt, req.worker))
        else:
            prefix = self.staging_prefix(req.unit, req.attempt, req.worker)
            self._staged.extend(f"{prefix}/{name}" for name in req.files)
        return CompleteReply(status=outcome, state=self.book.unit(req.unit).state)

    def _verify_and_publish(self, req: CompleteRequest, spec: UnitSpec, folder: str) -> _Verified:
        verified = self._verify(req, spec, folder)
        claimed = verified.claimed
        moves = [(src, f"{folder}/{n}", version) for n, (src, version) in sorted(claimed.items())]
        # What the store did not claim is written from the bytes checked (a bundle's other files, or all on S3).
        writes = [(f"{folder}/{n}", data) for n, data in verified.files.items() if n not in claimed and n != META_FILE]
        # meta.json last, and the server's own row: a folder with a meta.json is a whole result (recovery).
        writes.append((f"{folder}/{META_FILE}", verified.files[META_FILE]))
        changed = self.store.publish(moves, writes)
        if changed is not None:
            raise ResultRejected(
                f"unit {req.unit}: {changed.rpartition('/')[2]} changed after it was verified",
                reason=RejectReason.sha_mismatch,
            )
        return verified

    def _verify(self, req: CompleteRequest, spec: UnitSpec, final: str) -> _Verified:
        """The checks of :mod:`~mlds_operator.leases.checks`, in order; raises :class:`ResultRejected`."""
        checks.check_file_names(req, spec)
        files, claimed = self._read_staged(req)
        try:
            measured = checks.check_meta(files[META_FILE], req, spec)
            checks.check_model(files[MODEL_FILE], req, spec)
            if SNAPSHOTS_FILE in files:
                checks.check_snapshots(files[SNAPSHOTS_FILE], req, spec, measured.epochs)
        except ResultRejected:
            self.store.release(list(claimed.values()))  # a refused result leaves nothing behind
            raise
        row = checks.manifest_row(spec, measured, sha256=req.files[MODEL_FILE].sha256, pool=req.pool, key=final)
        files[META_FILE] = checks.row_json(row)
        return _Verified(files=files, row=row, claimed=claimed)

    def _read_staged(self, req: CompleteRequest) -> tuple[dict[str, bytes], dict[str, tuple[str, str]]]:
        """Each staged file exactly as declared (one bounded, streaming read: what is published is what was checked).

        The worker's meta.json is only read (its measured fields go into the server's own row, which is
        what gets published); every other file is claimed at the version read, for :meth:`Store.publish`.
        """
        if req.bundled:
            return self._read_bundle(req)
        prefix = self.staging_prefix(req.unit, req.attempt, req.worker)
        files: dict[str, bytes] = {}
        claimed: dict[str, tuple[str, str]] = {}
        for name, digest in req.files.items():
            key = f"{prefix}/{name}"
            got: Checked | bytes | RejectReason = (
                self.store.verify(key, digest.size, digest.sha256)
                if name == META_FILE
                else self.store.check(key, digest.size, digest.sha256)
            )
            if isinstance(got, RejectReason):
                self.store.release(list(claimed.values()))
                raise ResultRejected(f"unit {req.unit}: {name} {_WHY[got].format(size=digest.size)}", reason=got)
            if isinstance(got, Checked):
                files[name], claimed[name] = got.data, (key, got.version)
            else:
                files[name] = got
        return files, claimed

    def _read_bundle(self, req: CompleteRequest) -> tuple[dict[str, bytes], dict[str, tuple[str, str]]]:
        """A bundle's files: its bytes split at the declared sizes, in the grant's ``uploads`` order.

        The model comes first in that order, and the store may have kept it in place (CheckedParts.first).
        """
        names = result_files_for(self.spec.workload.dataset)  # check_file_names: exactly req.files' names
        key = self.bundle_key(req.unit, req.attempt, req.worker)
        got = self.store.check_parts(key, [(req.files[n].size, req.files[n].sha256) for n in names])
        if isinstance(got, RejectReason):
            total = sum(d.size for d in req.files.values())
            raise ResultRejected(f"unit {req.unit}: the bundle {_WHY_BUNDLE[got].format(size=total)}", reason=got)
        claimed = {names[0]: (key, got.first)} if got.first is not None else {}
        return dict(zip(names, got.parts, strict=True)), claimed

    def _drop_staging(self, req: CompleteRequest) -> None:
        if self.book.unit(req.unit).state.value == "succeeded":
            # Every attempt's leftovers of a finished unit (expired leases, rejected copies) go with it.
            self._drop_prefix(f"{STAGING}/{req.unit}-")
        else:
            self._drop_prefix(self.staging_prefix(req.unit, req.attempt, req.worker) + "/")
            self._drop_prefix(self.bundle_key(req.unit, req.attempt, req.worker))

    def _drop_prefix(self, prefix: str) -> None:
        """Delete every object under a staging prefix (whatever names a worker uploaded there)."""
        try:
            for key in list(self.store.list(prefix)):
                self.store.delete(key)
        except (StorageUnavailable, ValueError) as exc:  # staging is garbage; a leftover costs bytes only
            log.warning("campaign=%s could not delete staging %s: %s", self.name, prefix, exc)

    def _drop_finished_staging(self) -> None:
        """At startup: delete staged uploads of units that are done (succeeded or failed) or not units at all.

        Not those of pending or leased units: a worker that uploaded while the server was down completes them
        once it is back (its upload is not repeated), and a late result of a live unit is still accepted.
        """
        try:
            keys = list(self.store.list(STAGING_PREFIX))
        except (StorageUnavailable, ValueError) as exc:
            log.warning("campaign=%s could not list staging: %s", self.name, exc)
            return
        total = self.book.total
        for key in keys:
            # <unit>-<attempt>-<worker>/<file>, <unit>-<attempt>-<worker>~bundle (or, before them, <unit>/...)
            unit_text = key.removeprefix(STAGING_PREFIX).partition("/")[0].partition("-")[0]
            unit = int(unit_text) if unit_text.isascii() and unit_text.isdigit() else -1
            if 0 <= unit < total and self.book.unit(unit).state.value in ("pending", "leased"):
                continue
            try:
                self.store.delete(key)
            except (StorageUnavailable, ValueError) as exc:
                log.warning("campaign=%s could not delete staging %s: %s", self.name, key, exc)

    def _drop_prefixes(self, prefixes: list[str]) -> None:
        for prefix in prefixes:
            self._drop_prefix(prefix)

    def _drop_attempt_later(self, unit: int, attempt: int, worker: str) -> None:
        """Queue an attempt's staging for deletion by the next :meth:`tick` (callers here run on the event loop)."""
        if len(self._stale) < 100_000:
            self._stale.append(self.staging_prefix(unit, attempt, worker) + "/")
            self._stale.append(self.bundle_key(unit, attempt, worker))

    # ------------------------------------------------------------------------------------- housekeeping

    async def tick(self) -> None:
        """Periodic work: expire leases, flush rows + checkpoint when due (the book alone after a grant), finalize."""
        self._expire()
        if self._stale:
            stale, self._stale = self._stale, []
            await asyncio.to_thread(self._drop_prefixes, stale)
        due = self.book.now() - self._last_flush >= self.settings.checkpoint_seconds
        if due or len(self._rows) >= self.settings.part_rows:
            await self.flush()
        else:
            try:
                await self.checkpoint_leases()
            except StorageUnavailable as exc:  # nothing is lost meanwhile, only fresh leases go unhonoured
                log.warning(
                    "campaign=%s could not checkpoint fresh leases (retried at the next tick): %s", self.name, exc
                )
        if self.book.finished and not self._finalized:
            await self.finalize()

    def _expire(self) -> None:
        paused = self.book.paused
        for lease in self.book.expire():
            # Its staged uploads stay: a late completion of an expired lease is still accepted (see the
            # book). They go when the unit finishes, or at the next start once it has.
            if self.observer is not None:
                self.observer.lease_expired(lease.pool, units=len(lease.units), counted=not paused)

    async def flush(self) -> None:
        """Write buffered manifest rows as a part, then the book's checkpoint (in that order).

        Rows verified while the part is written go into the checkpoint as unpublished (see the module docstring).
        """
        async with self._flush_lock:
            rows, self._rows = self._rows, []
            staged, self._staged = self._staged, []
            try:
                if rows:
                    await asyncio.to_thread(mf.write_part, self.store, self._part_seq, rows)
                    self._part_seq += 1
            except BaseException:
                self._rows = rows + self._rows  # keep them for the next try
                self._staged = staged + self._staged
                raise
            try:
                # Rows written, whatever happens next: a later checkpoint counts their units as published.
                await self._put_checkpoint()
            except BaseException:
                self._staged = staged + self._staged
                raise
            if staged:
                try:
                    await asyncio.to_thread(self.store.delete_many, staged)
                except StorageUnavailable as exc:  # garbage once published; a leftover costs bytes only
                    log.warning("campaign=%s could not delete %d staged objects: %s", self.name, len(staged), exc)
            self._last_flush = self.book.now()

    async def checkpoint_leases(self) -> bool:
        """Checkpoint the book alone if a lease was granted ``grant_checkpoint_seconds`` ago and not since.

        No manifest part: the units whose rows are still buffered are written as not yet succeeded (see
        the module docstring). Returns whether a checkpoint was written. The operator calls this every
        second besides :meth:`tick` (its ticks follow the status interval).
        """
        granted = self._granted_at
        if granted is None or self.book.now() - granted < self.settings.grant_checkpoint_seconds:
            return False
        async with self._flush_lock:
            if self._granted_at is None:  # a flush checkpointed the grant meanwhile
                return False
            await self._put_checkpoint()
        return True

    async def _put_checkpoint(self) -> None:
        """Write the book's checkpoint as it is now; hold ``_flush_lock``. Compression and the write run in a thread.

        Under the lock no part is being written, so the succeeded units whose rows are in no part are
        exactly those of the buffered rows: they go in as ``unpublished`` (see the module docstring).
        """
        unpublished = {int(row["unit"]): str(row["pool"]) for row in self._rows}
        checkpoint = self.book.checkpoint(unpublished=unpublished)
        granted, self._granted_at = self._granted_at, None  # this copy holds every lease granted so far
        try:
            await asyncio.to_thread(lambda: mf.put_checkpoint(self.store, checkpoint.to_bytes()))
        except BaseException:
            if granted is not None:
                self._granted_at = granted  # the earliest grant still unwritten
            raise

    async def finalize(self) -> str:
        """Write manifest.parquet, README.md and the per-target data; returns the manifest's URL."""
        await self.flush()
        stats = self.book.stats()
        await asyncio.to_thread(mf.compact, self.store)
        readme = mf.campaign_readme(
            self.name,
            self.spec,
            succeeded=stats.succeeded,
            failed_units=stats.failed_units or None,
            created=datetime.now(UTC),
        )
        await asyncio.to_thread(mf.put_readme, self.store, readme)
        await asyncio.to_thread(self._write_target_data)
        self._finalized = True
        return self.manifest_url

    def _write_target_data(self) -> None:
        # The same generators the workers train on (mlds_workloads: numpy and the contract only), so the
        # stored file holds exactly the arrays every network of the target saw.
        for i, target in enumerate(self._targets):
            if target.dataset is Dataset.ds4 and self.spec.workload.images.value == "mnist":
                continue  # MNIST's own files already sit in the store; nothing generated to record
            if self.store.stat(mf.target_data_key(target.name)) is not None:
                continue
            data = target_data(self.unit_spec(i * self.spec.networks_per_target, 0))
            mf.put_target_data(self.store, target.name, save_data(data))

    @property
    def finalized(self) -> bool:
        return self._finalized

    @property
    def manifest_url(self) -> str:
        return f"{self.store.url.rstrip('/')}/{mf.MANIFEST_KEY}"

    # -------------------------------------------------------------------------------------------- views

    def snapshot(self) -> Snapshot:
        stats = self.book.stats()
        now = self.wall()
        window = self.settings.rate_window_seconds
        while self._recent and self._recent[0] < now - window:
            self._recent.popleft()
        rate: float | None = None
        eta: datetime | None = None
        if len(self._recent) >= 2:
            span = max(now - self._recent[0], 1.0)
            rate = len(self._recent) * 3600.0 / span
            remaining = stats.pending + stats.leased
            if rate > 0 and remaining:
                eta = datetime.fromtimestamp(now + remaining * 3600.0 / rate, tz=UTC)
        return Snapshot(
            stats=stats,
            phase=campaign_phase(stats.unit_counts(), paused=stats.paused, finalized=self._finalized),
            networks_per_hour=rate,
            eta=eta,
            training_seconds=self._training_seconds,
            rejected=dict(self._rejected),
            occupancy=self.occupancy.pools(),
            unreadable=tuple(self._unreadable),
        )


#: How a file that failed :meth:`Store.verify` is described in the 422's detail.
_WHY = {
    RejectReason.missing: "was not uploaded",
    RejectReason.size_mismatch: "is not the declared {size} bytes in storage",
    RejectReason.sha_mismatch: "sha256 does not match",
}
#: How a bundle that failed :meth:`Store.check_parts` is described in the 422's detail.
_WHY_BUNDLE = {
    RejectReason.missing: "was not uploaded",
    RejectReason.size_mismatch: "is not the declared files' {size} bytes in storage",
    RejectReason.sha_mismatch: "holds a file whose sha256 does not match",
}
