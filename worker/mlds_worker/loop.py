"""The worker loop: lease -> train -> upload -> complete, heartbeating meanwhile (`mlds worker`).

Runs in every worker pod (and as the worker processes of ``mlds run``). One loop per process; training
runs in a thread so the event loop keeps heartbeating. A lease of one unit is trained with
:func:`~mlds_worker.train.train_unit`; a lease of K > 1 units is trained as one stacked model
(:func:`~mlds_worker.batched.train_batch`, the same weights as alone, several times faster per network),
each member's result delivered as soon as that member is done. What happens when:

- **Nothing to lease**: ``busy``/``paused`` -> ask again after the server's Retry-After; ``finished``
  -> exit 0 (a Job whose pods all exit 0 completes). A refused token exits ``ExitCode.unauthorized`` (3),
  a refused lease request ``ExitCode.config`` (2, which fails the Job; see :class:`mlds_contract.errors.ExitCode`).
- **Lease server unreachable** (restart, network): retry with capped exponential backoff and jitter. A
  lease survives a server restart: the next heartbeat re-establishes it, so training goes on meanwhile.
- **Cancel** (another worker finished the unit first; said by a heartbeat, and by the reply to any
  top-up or completion) or **409** on a heartbeat (the lease is lost): stop training those units at the
  next epoch; a result already trained is still reported (it is verified and accepted if the unit is not
  done yet). In the campaign's tail (the server said ``busy``, or the worker holds a speculative copy)
  heartbeats come every ``TAIL_HEARTBEAT_SECONDS``, so a losing copy stops within seconds even when
  the worker has nothing to complete or top up.
- **Upload or storage outage**: retry the upload and the completion with backoff; results live in
  memory until acknowledged. An upload refused because a restarted server does not know the lease yet
  waits the same way, for the next heartbeat to re-establish it.
- **Result rejected**: a staged copy the server found missing or torn (size or sha256) is uploaded
  afresh, once per reason; any other rejection (or the same one again) fails the attempt. Network
  retries and fresh uploads are counted apart (:meth:`Worker._deliver`).
- **Training error** (a bug, NaN, out of memory): the unit is reported ``fail`` (the attempt counts).
- **Input files** (ds4 on MNIST: IDX files only the store holds): fetched from the lease server once per
  worker, before the first such unit, into a folder of the worker's own (removed at exit); an
  unreachable server is waited for, a file the server does not have fails the unit (the attempt counts).
- **SIGTERM/SIGINT**: stop at the next epoch, release the lease's remaining units (not counted as
  failures) and exit 0; the units go straight back to pending for other workers. A result still waiting
  for an unreachable server is given one more try, then dropped (its lease expires; it is retrained).
- **Orphaned** (``--parent-pid``, set by ``mlds run``): ``mlds run`` starts its workers in their
  own sessions so that they outlive a crash of it and deliver what they are training to the restarted
  server; once their parent is gone they finish and deliver the lease in hand, then exit instead of
  leasing more (the restarted run has workers of its own).

Every log line carries campaign, lease, unit and device as key=value.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from mlds_contract.campaign import Accelerator
from mlds_contract.errors import ExitCode, UserError
from mlds_contract.lease import (
    CompleteRequest,
    FailKind,
    FailRequest,
    FileDigest,
    HeartbeatRequest,
    LeasedUnit,
    LeaseGrant,
    LeaseRequest,
    NoLease,
    NoLeaseReason,
    RejectReason,
    ReleaseRequest,
    StackReport,
    UnitAttempt,
)
from mlds_contract.plan import UnitSpec
from mlds_contract.results import MAX_RESULT_FILE_BYTES
from mlds_workloads import input_files, target_data

from .batched import train_batch
from .client import LeaseApiError, LeaseClient, NotHeld, Rejected, Unauthorized, Unreachable, upload
from .device import describe_device, resolve_device
from .results import result_files, sha256_hex
from .stack import ContinuousStack, fit_width
from .train import EpochRecord, ImageArrays, SequenceArrays, TrainResult, train_unit

__all__ = ["WorkerConfig", "run_worker", "worker_command"]

log = logging.getLogger("mlds.worker")

#: Backoff for an unreachable server or store: first delay, cap (seconds). The cap stays well under a
#: lease's duration so a worker reconnects before its lease could expire.
BACKOFF_FIRST, BACKOFF_CAP = 0.5, 15.0
#: How long results are retried before the unit is given up (released, uncounted): an outage longer than
#: this means the lease has expired anyway and the unit is someone else's.
DELIVERY_PATIENCE_SECONDS = 3600.0
#: The same for a worker whose ``mlds run`` is gone (``--parent-pid``): time enough to start the run
#: again (it re-adopts the lease and takes the result), short enough that forgotten workers do not linger.
ORPHAN_PATIENCE_SECONDS = 600.0
#: Heartbeat period in the campaign's tail (nothing pending, speculative copies about): one of two copies
#: of a unit is wasted work from the moment the other completes, so its worker should hear of it within
#: seconds, not a third of a lease (200 s by default). Few workers are in the tail at once, so the extra
#: requests cost the server little.
TAIL_HEARTBEAT_SECONDS = 10.0


class _Stop(Exception):
    """Raised from the training callback to abandon a unit (shutdown, or the unit was cancelled)."""


@dataclass
class WorkerConfig:
    url: str
    token: str
    pool: str
    worker_id: str
    accelerator: Accelerator = Accelerator.cpu
    device: str = "auto"
    max_units: int = 1
    speculative: bool = True
    exit_when_idle: bool = False
    #: Take no new lease once this process (the `mlds run` that started the worker) is no longer our parent.
    parent_pid: int | None = None
    #: With max_units > 1: train each lease as one fixed stack that drains (before issue 14; kept for
    #: `mlds bench campaign`'s comparison) instead of a continuous stack of max_units slots.
    fixed_stacks: bool = False


@dataclass
class _LeaseState:
    grant: LeaseGrant
    remaining: dict[int, int]  # unit -> attempt, not yet completed or failed
    cancelled: set[int] = field(default_factory=set)
    lost: bool = False


class Worker:
    def __init__(self, cfg: WorkerConfig) -> None:
        self.cfg = cfg
        self.stop = asyncio.Event()
        self._orphaned_at: float | None = None
        self._device: Any = None
        self._device_name = "unknown"
        self._device_type = cfg.accelerator.value
        self._held: dict[str, _LeaseState] = {}  # lease id -> its state, for cancellations in any reply
        #: The server said ``busy`` (nothing pending) since the last grant of pending units: heartbeat faster.
        self._in_tail = False
        #: Where the campaign's input files are fetched to (see :meth:`_data`); made on first need.
        self._inputs: Path | None = None

    def _log(self, level: int, msg: str, **kv: object) -> None:
        fields = " ".join(f"{k}={v}" for k, v in {"pool": self.cfg.pool, "device": self._device_type, **kv}.items())
        log.log(level, "%s %s", msg, fields)

    async def _backoff(self, attempt: int, hint: float | None = None) -> None:
        delay = hint if hint is not None else min(BACKOFF_CAP, BACKOFF_FIRST * 2**attempt)
        delay *= random.uniform(0.8, 1.2)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), timeout=delay)

    def _cancel(self, units: list[int]) -> None:
        """Units other workers completed (listed in a top-up or completion reply): stop them at the next epoch."""
        if not units:
            return
        told = set(units)
        for state in self._held.values():
            hit = told.intersection(state.remaining) - state.cancelled
            if hit:
                state.cancelled.update(hit)
                self._log(logging.INFO, "completed elsewhere; stopping", lease=state.grant.lease_id, units=sorted(hit))

    def _noted(self, reply: LeaseGrant | NoLease) -> None:
        """What any lease reply says besides its units: cancellations, and whether the campaign is in its tail."""
        self._cancel(reply.cancel)
        if isinstance(reply, NoLease):
            self._in_tail = reply.reason is NoLeaseReason.busy
        elif not reply.speculative:
            self._in_tail = False

    def _orphaned(self) -> bool:
        # Compared with the pid we were given, not one read at start-up: the parent may die while torch loads.
        return self.cfg.parent_pid is not None and os.getppid() != self.cfg.parent_pid

    def _orphan_gave_up(self) -> bool:
        """Orphaned for longer than ORPHAN_PATIENCE_SECONDS: stop delivering and training the lease in hand."""
        if not self._orphaned():
            return False
        if self._orphaned_at is None:
            self._orphaned_at = time.monotonic()
        return time.monotonic() - self._orphaned_at > ORPHAN_PATIENCE_SECONDS

    def _setup_device(self) -> None:
        self._device = resolve_device(self.cfg.device)
        info = describe_device(self._device)
        self._device_name, self._device_type = info.name, info.type

    async def run(self) -> ExitCode:
        """The loop. Returns the process exit status (the Job's podFailurePolicy reads it)."""
        await asyncio.to_thread(self._setup_device)
        try:
            async with LeaseClient(self.cfg.url, self.cfg.token) as client:
                if self.cfg.max_units > 1 and not self.cfg.fixed_stacks:
                    return await self._continuous(client)
                return await self._lease_loop(client)
        finally:
            if self._inputs is not None:
                shutil.rmtree(self._inputs, ignore_errors=True)

    async def _lease_loop(self, client: LeaseClient) -> ExitCode:
        """One lease at a time: one network, or a fixed stack of the lease's units (``--fixed-stacks``)."""
        failures = 0
        while not self.stop.is_set():
            if self._orphaned():
                self._log(logging.WARNING, "the process that started this worker is gone; exiting")
                return ExitCode.ok
            request = LeaseRequest(
                worker=self.cfg.worker_id,
                pool=self.cfg.pool,
                accelerator=self.cfg.accelerator,
                device_name=self._device_name[:200],
                max_units=self.cfg.max_units,
                allow_speculative=self.cfg.speculative,
                bundle_uploads=True,
            )
            try:
                reply = await client.lease(request)
            except Unauthorized as exc:
                self._log(logging.ERROR, "lease refused; check the token and campaign", error=exc)
                return ExitCode.unauthorized
            except Unreachable as exc:
                self._log(logging.WARNING, "lease server unreachable; retrying", error=exc)
                await self._backoff(failures, exc.retry_after)
                failures += 1
                continue
            except Rejected as exc:
                self._log(logging.ERROR, "lease request rejected", error=exc)
                return ExitCode.config
            failures = 0
            self._noted(reply)
            if isinstance(reply, NoLease):
                if reply.reason is NoLeaseReason.finished:
                    self._log(logging.INFO, "campaign finished; exiting")
                    return ExitCode.ok
                if self.cfg.exit_when_idle:
                    return ExitCode.ok
                await self._backoff(0, reply.retry_after_seconds)
                continue
            await self._work(client, reply)
        return ExitCode.ok

    # ------------------------------------------------------------------------------------------ a lease

    async def _work(self, client: LeaseClient, grant: LeaseGrant) -> None:
        state = _LeaseState(grant, {u.spec.unit: u.spec.attempt for u in grant.units})
        campaign = grant.units[0].spec.campaign
        self._log(
            logging.INFO,
            "leased",
            campaign=campaign,
            lease=grant.lease_id,
            units=len(grant.units),
            speculative=grant.speculative,
        )
        beats = asyncio.create_task(self._heartbeats(client, state))
        self._held[grant.lease_id] = state
        try:
            if len(grant.units) > 1:
                await self._batch(client, state, list(grant.units))
            elif not self._abandon_lease(state):
                await self._one(client, state, grant.units[0])
        finally:
            self._held.pop(grant.lease_id, None)
            beats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beats
        if state.remaining and not state.lost:
            # Shutting down (or cancelled): give the rest back so nobody waits for the lease to expire.
            try:
                released = await client.release(
                    grant.lease_id, ReleaseRequest(worker=self.cfg.worker_id, reason="worker stopping")
                )
                self._log(
                    logging.INFO, "released", campaign=campaign, lease=grant.lease_id, units=len(released.released)
                )
            except LeaseApiError as exc:
                self._log(logging.WARNING, "release failed; the lease will expire", lease=grant.lease_id, error=exc)

    # ------------------------------------------------------------------------------------------ continuous

    async def _continuous(self, client: LeaseClient) -> ExitCode:
        """Keep a stack of ``max_units`` slots full (issue 14; :class:`_StackRun`); returns the exit status."""
        run = _StackRun(self, client)
        self._log(logging.INFO, "training a continuous stack", slots=run.slots, device_name=self._device_name)
        return await run.run()

    async def _heartbeats(
        self, client: LeaseClient, state: _LeaseState, stack: Callable[[], StackReport] | None = None
    ) -> None:
        interval = state.grant.heartbeat_seconds
        clock = asyncio.get_running_loop().time  # the clock asyncio.sleep runs on (one clock, not two)
        last = clock()
        while True:
            # Wake at least every TAIL_HEARTBEAT_SECONDS to see whether the campaign entered its tail.
            await asyncio.sleep(min(interval, TAIL_HEARTBEAT_SECONDS) * random.uniform(0.9, 1.0))
            tail = self._in_tail or state.grant.speculative
            if not state.remaining or (clock() - last < 0.9 * interval and not tail):
                continue
            last = clock()
            body = HeartbeatRequest(
                worker=self.cfg.worker_id,
                pool=self.cfg.pool,
                units=[UnitAttempt(unit=u, attempt=a) for u, a in sorted(state.remaining.items())],
                stack=stack() if stack is not None else None,
            )
            try:
                reply = await client.heartbeat(state.grant.lease_id, body)
            except NotHeld as exc:
                self._log(logging.WARNING, "lease lost; stopping its units", lease=state.grant.lease_id, error=exc)
                state.lost = True
                state.cancelled.update(state.remaining)
                return
            except LeaseApiError as exc:
                self._log(logging.WARNING, "heartbeat failed; retrying", lease=state.grant.lease_id, error=exc)
                interval = min(max(1.0, state.grant.heartbeat_seconds / 4), 5.0)
                continue
            interval = reply.lease_seconds / 3.0
            if reply.readopted:
                self._log(logging.INFO, "lease re-established after a server restart", lease=state.grant.lease_id)
            if reply.cancel:
                state.cancelled.update(reply.cancel)

    async def _one(self, client: LeaseClient, state: _LeaseState, leased: LeasedUnit) -> None:
        spec = leased.spec
        kv = _unit_fields(state, spec)

        def on_epoch(_record: EpochRecord) -> None:
            if self.stop.is_set() or spec.unit in state.cancelled:
                raise _Stop

        started = time.monotonic()
        try:
            data = await self._data(client, spec)
            result = await asyncio.to_thread(train_unit, spec, data=data, device=self._device, on_epoch=on_epoch)
        except _Stop:
            if spec.unit in state.cancelled:
                state.remaining.pop(spec.unit, None)
                self._log(logging.INFO, "unit cancelled (completed elsewhere)", **kv)
            return  # shutdown: the unit stays in `remaining` and is released
        except Exception as exc:
            self._log(logging.ERROR, "training failed", **kv, error=repr(exc))
            await self._report_fail(client, state, spec.unit, spec.attempt, FailKind.fail, f"training failed: {exc!r}")
            return
        await self._finish(client, state, leased, result, time.monotonic() - started)

    async def _data(self, client: LeaseClient, spec: UnitSpec) -> SequenceArrays | ImageArrays | None:
        """The data to train ``spec`` on, when the trainer cannot make it alone; None: the trainer's default.

        ds4 on MNIST reads the campaign's IDX files, which only its store holds; workers hold no storage
        credentials, so they come from the lease server (:meth:`_fetch_inputs`). Raises :class:`_Stop` on
        shutdown while the server is unreachable, and :class:`LeaseApiError` when it refuses a file (the
        attempt fails, as for any unusable data).
        """
        names = input_files(spec.dataset, spec.images)
        if not names:
            return None
        folder = await self._fetch_inputs(client, spec, list(names))
        return await asyncio.to_thread(target_data, spec, mnist_dir=folder)

    async def _fetch_inputs(self, client: LeaseClient, spec: UnitSpec, names: list[str]) -> Path:
        """Fetch the input files not fetched yet into this worker's folder; returns the folder."""
        if self._inputs is None:
            self._inputs = Path(tempfile.mkdtemp(prefix="mlds-inputs-"))
        folder = self._inputs
        for name in names:
            path = folder / name
            if path.exists():
                continue
            retries = 0
            while True:
                try:
                    data = await client.input_file(name)
                    break
                except Unreachable as exc:
                    if self.stop.is_set():
                        raise _Stop from exc
                    self._log(logging.WARNING, "input file unavailable; retrying", campaign=spec.campaign, file=name)
                    await self._backoff(min(retries, 8), exc.retry_after)
                    retries += 1
            partial = path.with_name(f".{name}.partial")
            await asyncio.to_thread(partial.write_bytes, data)
            partial.replace(path)  # a file under its name is whole
            self._log(logging.INFO, "fetched an input file", campaign=spec.campaign, file=name, bytes=len(data))
        return folder

    def _abandon_lease(self, state: _LeaseState) -> bool:
        """Train nothing more of this lease: shutting down, the lease is lost, or orphaned for too long."""
        return self.stop.is_set() or state.lost or self._orphan_gave_up()

    async def _batch(self, client: LeaseClient, state: _LeaseState, units: list[LeasedUnit]) -> None:
        """Train the units of a lease together (:func:`mlds_worker.batched.train_batch`), issue 7.

        Each member's result is delivered as soon as that member is done, while the others train on; a
        member whose unit is cancelled (completed elsewhere), or every member on shutdown, is abandoned
        at its next epoch without disturbing the rest. A member's training time is its share of the
        stack's time, so the server's sum of training seconds stays the machine time used.
        """
        if self._abandon_lease(state):
            return
        loop = asyncio.get_running_loop()
        specs = [u.spec for u in units]
        handed: set[int] = set()  # members whose result went to delivery (written from the training thread)
        deliveries: list[concurrent.futures.Future[None]] = []

        def should_stop(i: int) -> bool:
            return self._abandon_lease(state) or specs[i].unit in state.cancelled

        def on_result(i: int, result: TrainResult) -> None:
            handed.add(i)
            coro = self._finish(client, state, units[i], result, result.seconds)
            deliveries.append(asyncio.run_coroutine_threadsafe(coro, loop))

        kv: dict[str, object] = {"campaign": specs[0].campaign, "lease": state.grant.lease_id, "units": len(specs)}
        self._log(logging.INFO, "training a stack", **kv)
        failure: Exception | None = None
        try:
            data = [await self._data(client, spec) for spec in specs]
            await asyncio.to_thread(
                train_batch, specs, device=self._device, should_stop=should_stop, on_result=on_result, data=data
            )
        except _Stop:
            pass  # shutting down while waiting for the input files: the units stay in `remaining`, released
        except Exception as exc:
            failure = exc
            self._log(logging.ERROR, "training failed", **kv, error=repr(exc))
        await asyncio.gather(*(asyncio.wrap_future(d) for d in deliveries))
        for i, spec in enumerate(specs):
            if i in handed:
                continue
            if spec.unit in state.cancelled:
                state.remaining.pop(spec.unit, None)
                self._log(logging.INFO, "unit cancelled (completed elsewhere)", **_unit_fields(state, spec))
            elif failure is not None:
                reason = f"training failed: {failure!r}"
                await self._report_fail(client, state, spec.unit, spec.attempt, FailKind.fail, reason)
            # else: shutting down, the unit stays in `remaining` and is released

    async def _finish(
        self, client: LeaseClient, state: _LeaseState, leased: LeasedUnit, result: TrainResult, seconds: float
    ) -> None:
        """Store a trained unit's result files and deliver them (upload, then complete)."""
        spec = leased.spec
        kv = _unit_fields(state, spec)
        files = result_files(result, pool=self.cfg.pool)
        self._log(
            logging.INFO,
            "trained",
            **kv,
            epochs=result.epochs,
            converged=result.converged,
            eval_loss=f"{result.eval_loss:.3g}",
            seconds=f"{seconds:.1f}",
        )
        request = CompleteRequest(
            worker=self.cfg.worker_id,
            pool=self.cfg.pool,
            unit=spec.unit,
            attempt=spec.attempt,
            converged=result.converged,
            files={name: FileDigest(sha256=sha256_hex(data), size=len(data)) for name, data in files.items()},
            training_seconds=seconds,
            epochs=result.epochs,
            bundled=_bundles(leased, files),
        )
        await self._deliver(client, state, leased, files, request, kv)

    async def _deliver(
        self,
        client: LeaseClient,
        state: _LeaseState,
        leased: LeasedUnit,
        files: dict[str, bytes],
        request: CompleteRequest,
        kv: dict[str, object],
    ) -> None:
        """Upload a result's files and complete it, until the server has had its say on the result.

        Two budgets, counted apart so that neither uses up or stretches the other: network failures (an
        unreachable server or store, a 5xx, an upload refused until a heartbeat re-establishes the lease)
        are retried with capped backoff until :data:`DELIVERY_PATIENCE_SECONDS`, a lost lease or a stop
        signal; a rejection of the staged copy (:attr:`RejectReason.cured_by_upload`: an upload lost or
        torn on its way) is answered by one fresh upload per reason, so at most three. Any other
        rejection, or a second one of the same reason, fails the attempt.
        """
        deadline = time.monotonic() + DELIVERY_PATIENCE_SECONDS
        retries = 0  # network failures so far: the backoff's exponent
        uploaded_afresh: set[RejectReason] = set()
        uploaded: set[str] = set()
        while True:
            try:
                # One PUT for every file: half the requests (and server work) per result.
                if request.bundled and leased.bundle_upload is not None and not uploaded:
                    await upload(client.session, leased.bundle_upload, b"".join(files[n] for n in leased.uploads))
                    uploaded.update(leased.uploads)
                for name in leased.uploads:
                    if name not in uploaded:
                        await upload(client.session, leased.uploads[name], files[name])
                        uploaded.add(name)
                reply = await client.complete(request)
            except Unauthorized as exc:
                self._log(logging.ERROR, "completion refused: token no longer valid", **kv, error=exc)
                state.remaining.pop(request.unit, None)
                return
            except Rejected as exc:
                reason = exc.reason
                if reason is None or not reason.cured_by_upload or reason in uploaded_afresh:
                    self._log(logging.ERROR, "result rejected", **kv, error=exc)
                    await self._report_fail(client, state, request.unit, request.attempt, FailKind.fail, str(exc))
                    return
                self._log(logging.WARNING, "result rejected; uploading it afresh", **kv, reason=reason.value)
                uploaded_afresh.add(reason)
                uploaded.clear()
                continue
            except LeaseApiError as exc:  # Unreachable, or NotHeld from an upload
                if not self._still_delivering(state, request, deadline, kv, exc):
                    return
                self._log(logging.WARNING, "delivery failed; retrying", **kv, error=exc)
                # Woken early by a shutdown signal, for one last try.
                await self._backoff(min(retries, 8))
                retries += 1
                continue
            state.remaining.pop(request.unit, None)
            self._cancel(reply.cancel)
            self._log(logging.INFO, f"completed ({reply.status.value})", **kv, state=reply.state.value)
            return

    def _still_delivering(
        self,
        state: _LeaseState,
        request: CompleteRequest,
        deadline: float,
        kv: dict[str, object],
        exc: LeaseApiError,
    ) -> bool:
        """After a network failure: is the result worth another try?

        If not, says why and gives the unit up, unless shutting down (then it stays held, to be released).
        """
        if time.monotonic() > deadline or self._orphan_gave_up():
            self._log(logging.ERROR, "giving up delivering a result", **kv, error=exc)
            state.remaining.pop(request.unit, None)
            return False
        if isinstance(exc, NotHeld) and state.lost:
            # The upload right died with the lease (a heartbeat said so): no later try can land.
            self._log(logging.ERROR, "giving up delivering a result: the lease is lost", **kv, error=exc)
            state.remaining.pop(request.unit, None)
            return False
        if self.stop.is_set():
            # Shutting down: the unit stays in `remaining`, so it is released if the server answers.
            self._log(logging.WARNING, "shutting down with a result undelivered", **kv, error=exc)
            return False
        return True

    async def _report_fail(
        self, client: LeaseClient, state: _LeaseState, unit: int, attempt: int, kind: FailKind, reason: str
    ) -> None:
        body = FailRequest(
            worker=self.cfg.worker_id, pool=self.cfg.pool, unit=unit, attempt=attempt, kind=kind, reason=reason[:4000]
        )
        for n in range(6):
            try:
                await client.fail(body)
                break
            except Unreachable:
                await asyncio.sleep(min(BACKOFF_CAP, BACKOFF_FIRST * 2**n))
            except LeaseApiError:
                break
        state.remaining.pop(unit, None)


class _StackRun:
    """A worker's continuous stack (issue 14): ``max_units`` slots, refilled from top-up leases.

    Between training rounds (one epoch of every member, in a thread) the worker delivers the members
    that stopped and asks for a top-up lease of as many units as slots are free, so a new unit starts
    while the others train on. It holds several leases at once, each heartbeated (with the stack's
    occupancy) until its last unit is delivered; SIGTERM, a lost lease, a cancellation or an orphaned
    worker's patience drop members at the next round, and what is still held is released at the end.
    """

    def __init__(self, worker: Worker, client: LeaseClient) -> None:
        self.w, self.client = worker, client
        self.slots = fit_width(worker._device, worker.cfg.max_units)  # a GPU's memory caps S
        self.stack: ContinuousStack[int] = ContinuousStack(worker._device)
        self.owner: dict[int, tuple[_LeaseState, LeasedUnit]] = {}  # unit -> its lease and grant entry
        self.leases: dict[str, tuple[_LeaseState, asyncio.Task[None]]] = {}
        self.deliveries: set[asyncio.Task[None]] = set()
        self.member_seconds = self.slot_seconds = 0.0
        self.status: ExitCode = ExitCode.ok
        self.finished, self.failures, self.idle_until = False, 0, 0.0

    def report(self) -> StackReport:
        live = self.stack.live  # never above slots (top-ups ask for the free slots only); max() keeps a report valid
        return StackReport(
            slots=max(self.slots, live), live=live, member_seconds=self.member_seconds, slot_seconds=self.slot_seconds
        )

    def should_stop(self, unit: int) -> bool:
        state = self.owner[unit][0]
        return self.w.stop.is_set() or state.lost or unit in state.cancelled or self.w._orphan_gave_up()

    async def run(self) -> ExitCode:
        try:
            while self.status is ExitCode.ok:
                again = await self.top_up()
                if again:
                    continue
                if not len(self.stack):
                    if self.w._orphaned() and not (self.finished or self.w.stop.is_set()):
                        # The stack in hand is delivered; the restarted `mlds run` has workers of its own.
                        self.w._log(logging.WARNING, "the process that started this worker is gone; exiting")
                    if self.finished or self.w.stop.is_set() or self.w._orphaned() or self.w.cfg.exit_when_idle:
                        break
                    continue
                await self.train_round()
                await self.end_leases()
        finally:
            await asyncio.gather(*self.deliveries, return_exceptions=True)
            await self.end_leases(closing=True)
        return self.status

    async def top_up(self) -> bool:
        """Ask for units for the free slots; True to go round again (granted, or waited for an idle server)."""
        w = self.w
        free = self.slots - len(self.stack)
        if free <= 0 or w.stop.is_set() or self.finished or w._orphaned() or time.monotonic() < self.idle_until:
            return False
        reply = await self.ask(free)
        if reply is None:
            return not len(self.stack) and self.status is ExitCode.ok  # unreachable: waited already when idle
        if isinstance(reply, LeaseGrant):
            await self.admit(reply)
            return True  # the grant may have had fewer units than slots are free
        self.finished = reply.reason is NoLeaseReason.finished
        self.idle_until = time.monotonic() + reply.retry_after_seconds
        if self.finished:
            w._log(logging.INFO, "campaign finished; finishing the stack")
        if len(self.stack) or self.finished or w.cfg.exit_when_idle:
            return False
        if await self.await_deliveries(reply.retry_after_seconds):
            return True
        await w._backoff(0, reply.retry_after_seconds)
        return True

    async def await_deliveries(self, timeout: float) -> bool:
        """An empty stack whose own results are still on their way: ask again as soon as one lands.

        The server's ``busy`` may be about those very units (the campaign finishes, or a rejected result
        comes back pending), so waiting out Retry-After would only leave the worker idle at the end of a
        campaign. False when nothing is in flight (the caller backs off as usual).
        """
        pending = {task for task in self.deliveries if not task.done()}
        if not pending:
            return False
        stop = asyncio.ensure_future(self.w.stop.wait())
        try:
            await asyncio.wait({*pending, stop}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        self.idle_until = 0.0
        return True

    async def ask(self, free: int) -> LeaseGrant | NoLease | None:
        """One top-up request; None when it failed (``status`` set for a fatal answer, else retried later)."""
        w = self.w
        request = LeaseRequest(
            worker=w.cfg.worker_id,
            pool=w.cfg.pool,
            accelerator=w.cfg.accelerator,
            device_name=w._device_name[:200],
            max_units=free,
            allow_speculative=w.cfg.speculative,
            stack=self.report(),
            bundle_uploads=True,
        )
        try:
            reply = await self.client.lease(request)
        except Unauthorized as exc:
            w._log(logging.ERROR, "lease refused; check the token and campaign", error=exc)
            self.status = ExitCode.unauthorized
            return None
        except Rejected as exc:
            w._log(logging.ERROR, "lease request rejected", error=exc)
            self.status = ExitCode.config
            return None
        except Unreachable as exc:
            w._log(logging.WARNING, "lease server unreachable; retrying", error=exc)
            self.idle_until = time.monotonic() + min(BACKOFF_CAP, BACKOFF_FIRST * 2**self.failures)
            self.failures += 1
            if not len(self.stack):
                await w._backoff(self.failures - 1, exc.retry_after)
            return None
        self.failures = 0
        w._noted(reply)
        return reply

    async def admit(self, grant: LeaseGrant) -> None:
        """A top-up lease: its units join the stack at the next round; its heartbeats start."""
        w = self.w
        state = _LeaseState(grant, {u.spec.unit: u.spec.attempt for u in grant.units})
        beats = asyncio.create_task(w._heartbeats(self.client, state, self.report))
        self.leases[grant.lease_id] = (state, beats)
        w._held[grant.lease_id] = state
        w._log(
            logging.INFO,
            "leased",
            campaign=grant.units[0].spec.campaign,
            lease=grant.lease_id,
            units=len(grant.units),
            speculative=grant.speculative,
        )
        for leased in grant.units:
            spec = leased.spec
            try:
                data = await w._data(self.client, spec)
                await asyncio.to_thread(self.stack.add, spec.unit, spec, data)  # may generate the target's data
            except _Stop:
                continue  # shutting down while waiting for the input files: the unit is released
            except Exception as exc:
                w._log(logging.ERROR, "training failed", **_unit_fields(state, spec), error=repr(exc))
                await w._report_fail(self.client, state, spec.unit, spec.attempt, FailKind.fail, f"{exc!r}")
                continue
            self.owner[spec.unit] = (state, leased)

    async def train_round(self) -> None:
        """One epoch of every member; members that stopped are delivered (in the background) or given back."""
        w = self.w
        try:
            done = await asyncio.to_thread(self.stack.round, self.should_stop)
        except Exception as exc:
            w._log(logging.ERROR, "training failed", units=len(self.stack), error=repr(exc))
            for unit in self.stack.members():
                state, leased = self.owner.pop(unit)
                reason = f"training failed: {exc!r}"
                await w._report_fail(self.client, state, unit, leased.spec.attempt, FailKind.fail, reason)
            self.stack = ContinuousStack(w._device)
            return
        seconds, members = self.stack.last
        self.member_seconds += seconds * members
        self.slot_seconds += seconds * self.slots
        for f in done:
            state, leased = self.owner.pop(f.key)
            kv = _unit_fields(state, leased.spec)
            if f.error is not None:
                w._log(logging.ERROR, "training failed", **kv, error=repr(f.error))
                reason = f"training failed: {f.error!r}"
                await w._report_fail(self.client, state, f.key, leased.spec.attempt, FailKind.fail, reason)
            elif f.result is None:
                if f.key in state.cancelled:
                    state.remaining.pop(f.key, None)
                    w._log(logging.INFO, "unit cancelled (completed elsewhere)", **kv)
                # else shutting down: the unit stays in `remaining` and is released
            else:
                task = asyncio.create_task(w._finish(self.client, state, leased, f.result, f.result.seconds))
                self.deliveries.add(task)
                task.add_done_callback(self.deliveries.discard)

    async def end_leases(self, *, closing: bool = False) -> None:
        """Stop heartbeating leases with nothing left; when ``closing``, release what is still held."""
        training = {id(state) for state, _ in self.owner.values()}
        for lease_id, (state, beats) in list(self.leases.items()):
            if not closing and (state.remaining or id(state) in training):
                continue
            beats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beats
            del self.leases[lease_id]
            self.w._held.pop(lease_id, None)
            if state.remaining and not state.lost:
                # Shutting down (or cancelled): give the rest back so nobody waits for the lease to expire.
                try:
                    released = await self.client.release(
                        lease_id, ReleaseRequest(worker=self.w.cfg.worker_id, reason="worker stopping")
                    )
                    self.w._log(logging.INFO, "released", lease=lease_id, units=len(released.released))
                except LeaseApiError as exc:
                    self.w._log(logging.WARNING, "release failed; the lease will expire", lease=lease_id, error=exc)


def _bundles(leased: LeasedUnit, files: dict[str, bytes]) -> bool:
    """Upload ``files`` as one body? When the grant offers a bundle URL for exactly these files, within bounds."""
    return (
        leased.bundle_upload is not None
        and set(leased.uploads) == set(files)
        and sum(len(data) for data in files.values()) <= MAX_RESULT_FILE_BYTES
    )


def _unit_fields(state: _LeaseState, spec: UnitSpec) -> dict[str, object]:
    """The identifiers every log line about one unit carries."""
    return {
        "campaign": spec.campaign,
        "lease": state.grant.lease_id,
        "unit": spec.unit,
        "target": spec.target,
        "attempt": spec.attempt,
    }


async def run_worker(cfg: WorkerConfig) -> ExitCode:
    """Run the loop until the campaign is drained or a signal stops it; returns the exit status."""
    worker = Worker(cfg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, worker.stop.set)
    return await worker.run()


def _default_worker_id() -> str:
    # In a pod, POD_NAME (downward API) or HOSTNAME is the pod name; locally host + pid keeps ids unique.
    name = os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"
    return "".join(c if c.isalnum() or c in "-._" else "-" for c in name)[:253].lstrip("-._") or "worker"


@click.command("worker")
@click.option(
    "--url",
    envvar="MLDS_LEASE_URL",
    required=True,
    help="The campaign's lease API base URL, e.g. http://mlds:8080/v1/campaigns/NS/NAME.",
)
@click.option(
    "--token-file",
    envvar="MLDS_TOKEN_FILE",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="File holding the campaign's bearer token (mounted from its Secret).",
)
@click.option("--pool", envvar="MLDS_POOL", default="cpu", show_default=True, help="This worker's pool name.")
@click.option(
    "--accelerator",
    envvar="MLDS_ACCELERATOR",
    type=click.Choice([a.value for a in Accelerator]),
    default="cpu",
    show_default=True,
)
@click.option(
    "--device", envvar="MLDS_DEVICE", default="auto", show_default=True, help="torch device: auto, cpu, cuda, cuda:N."
)
@click.option(
    "--units-per-lease",
    envvar="MLDS_UNITS_PER_LEASE",
    type=click.IntRange(1, 4096),
    default=1,
    show_default=True,
    help="Stack width S: networks trained at once as one stacked model (1: one network at a time).",
)
@click.option(
    "--fixed-stacks",
    envvar="MLDS_FIXED_STACKS",
    is_flag=True,
    help=(
        "Train each lease's units as one stack that drains before the next lease (the behaviour before "
        "continuous stacks; for comparison). Default: a continuous stack of --units-per-lease slots."
    ),
)
@click.option("--worker-id", envvar="MLDS_WORKER_ID", default=None, help="Default: the pod name, or host-pid.")
@click.option("--no-speculative", is_flag=True, help="Never take speculative copies of other workers' units.")
@click.option(
    "--parent-pid",
    type=click.IntRange(1),
    default=None,
    help="Take no new lease once process PID (the one that started this worker) is gone; `mlds run` sets it.",
)
@click.option("--log-level", envvar="MLDS_LOG_LEVEL", default="INFO", show_default=True)
def worker_command(
    url: str,
    token_file: Path,
    pool: str,
    accelerator: str,
    device: str,
    units_per_lease: int,
    fixed_stacks: bool,
    worker_id: str | None,
    no_speculative: bool,
    parent_pid: int | None,
    log_level: str,
) -> None:
    """Lease, train and upload units until the campaign is drained."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported (docs/workloads.md §4)
    logging.basicConfig(
        level=log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    try:
        token = token_file.read_text().strip()
    except OSError as exc:
        raise UserError(f"cannot read the token file {token_file}: {exc.strerror}") from exc
    if not token:
        raise UserError(f"the token file {token_file} is empty")
    cfg = WorkerConfig(
        url=url,
        token=token,
        pool=pool,
        worker_id=worker_id or _default_worker_id(),
        accelerator=Accelerator(accelerator),
        device=device,
        max_units=units_per_lease,
        speculative=not no_speculative,
        parent_pid=parent_pid,
        fixed_stacks=fixed_stacks,
    )
    sys.exit(asyncio.run(run_worker(cfg)))
