"""The worker loop: lease -> train -> upload -> complete, heartbeating meanwhile (`mlds worker`).

Runs in every worker pod (and as the worker processes of ``mlds run``). One loop per process; training
runs in a thread so the event loop keeps heartbeating. A lease of one unit is trained with
:func:`~mlds_worker.train.train_unit`; a lease of K > 1 units is trained as one stacked model
(:func:`~mlds_worker.batched.train_batch`, the same weights as alone, several times faster per network),
each member's result delivered as soon as that member is done. What happens when:

- **Nothing to lease**: ``busy``/``paused`` -> ask again after the server's Retry-After; ``finished``
  -> exit 0 (a Job whose pods all exit 0 completes).
- **Lease server unreachable** (restart, network): retry with capped exponential backoff and jitter. A
  lease survives a server restart: the next heartbeat re-establishes it, so training goes on meanwhile.
- **Heartbeat says cancel** (another worker finished the unit first) or **409** (the lease is lost):
  stop training those units at the next epoch; a result already trained is still reported (it is
  verified and accepted if the unit is not done yet).
- **Upload or storage outage**: retry the upload and the completion with backoff; results live in
  memory until acknowledged.
- **Training error** (a bug, NaN, out of memory): the unit is reported ``fail`` (the attempt counts).
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
import json
import logging
import os
import random
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from mlds_contract.campaign import Accelerator
from mlds_contract.errors import UserError
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
    ReleaseRequest,
    UnitAttempt,
)
from mlds_contract.plan import UnitSpec

from .batched import train_batch
from .client import LeaseApiError, LeaseClient, NotHeld, Rejected, Unauthorized, Unreachable, upload
from .device import describe_device, resolve_device
from .results import result_files, sha256_hex
from .train import EpochRecord, TrainResult, train_unit

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

    def _log(self, level: int, msg: str, **kv: object) -> None:
        fields = " ".join(f"{k}={v}" for k, v in {"pool": self.cfg.pool, "device": self._device_type, **kv}.items())
        log.log(level, "%s %s", msg, fields)

    async def _backoff(self, attempt: int, hint: float | None = None) -> None:
        delay = hint if hint is not None else min(BACKOFF_CAP, BACKOFF_FIRST * 2**attempt)
        delay *= random.uniform(0.8, 1.2)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), timeout=delay)

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

    async def run(self) -> int:
        """The loop. Returns the process exit status."""
        await asyncio.to_thread(self._setup_device)
        async with LeaseClient(self.cfg.url, self.cfg.token) as client:
            failures = 0
            while not self.stop.is_set():
                if self._orphaned():
                    self._log(logging.WARNING, "the process that started this worker is gone; exiting")
                    return 0
                request = LeaseRequest(
                    worker=self.cfg.worker_id,
                    pool=self.cfg.pool,
                    accelerator=self.cfg.accelerator,
                    device_name=self._device_name[:200],
                    max_units=self.cfg.max_units,
                    allow_speculative=self.cfg.speculative,
                )
                try:
                    reply = await client.lease(request)
                except Unauthorized as exc:
                    self._log(logging.ERROR, "lease refused; check the token and campaign", error=exc)
                    return 3
                except Unreachable as exc:
                    self._log(logging.WARNING, "lease server unreachable; retrying", error=exc)
                    await self._backoff(failures, exc.retry_after)
                    failures += 1
                    continue
                except Rejected as exc:
                    self._log(logging.ERROR, "lease request rejected", error=exc)
                    return 2
                failures = 0
                if isinstance(reply, NoLease):
                    if reply.reason is NoLeaseReason.finished:
                        self._log(logging.INFO, "campaign finished; exiting")
                        return 0
                    if self.cfg.exit_when_idle:
                        return 0
                    await self._backoff(0, reply.retry_after_seconds)
                    continue
                await self._work(client, reply)
            return 0

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
        try:
            if len(grant.units) > 1:
                await self._batch(client, state, list(grant.units))
            elif not self._abandon_lease(state):
                await self._one(client, state, grant.units[0])
        finally:
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

    async def _heartbeats(self, client: LeaseClient, state: _LeaseState) -> None:
        interval = state.grant.heartbeat_seconds
        while True:
            await asyncio.sleep(interval * random.uniform(0.9, 1.0))
            if not state.remaining:
                continue
            body = HeartbeatRequest(
                worker=self.cfg.worker_id,
                pool=self.cfg.pool,
                units=[UnitAttempt(unit=u, attempt=a) for u, a in sorted(state.remaining.items())],
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
            result = await asyncio.to_thread(train_unit, spec, device=self._device, on_epoch=on_epoch)
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
            await asyncio.to_thread(
                train_batch, specs, device=self._device, should_stop=should_stop, on_result=on_result
            )
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
            meta={},
            training_seconds=seconds,
            epochs=result.epochs,
        )
        request.meta = json.loads(files["meta.json"])
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
        deadline = time.monotonic() + DELIVERY_PATIENCE_SECONDS
        attempt = 0
        uploaded: set[str] = set()
        while True:
            try:
                for name in leased.uploads:
                    if name not in uploaded:
                        await upload(client.session, leased.uploads[name], files[name])
                        uploaded.add(name)
                reply = await client.complete(request)
                state.remaining.pop(request.unit, None)
                self._log(logging.INFO, f"completed ({reply.status.value})", **kv, state=reply.state.value)
                return
            except Unauthorized as exc:
                self._log(logging.ERROR, "completion refused: token no longer valid", **kv, error=exc)
                state.remaining.pop(request.unit, None)
                return
            except Rejected as exc:
                # The server read back something other than what we sent (or the URL expired): one
                # fresh upload may fix a torn object; after that the attempt is reported failed.
                if attempt == 0 and uploaded:
                    uploaded.clear()
                    attempt += 1
                    continue
                self._log(logging.ERROR, "result rejected", **kv, error=exc)
                await self._report_fail(client, state, request.unit, request.attempt, FailKind.fail, str(exc))
                return
            except (Unreachable, LeaseApiError) as exc:
                if time.monotonic() > deadline or self._orphan_gave_up():
                    self._log(logging.ERROR, "giving up delivering a result", **kv, error=exc)
                    state.remaining.pop(request.unit, None)
                    return
                if self.stop.is_set():
                    # Shutting down: the unit stays in `remaining`, so it is released if the server answers.
                    self._log(logging.WARNING, "shutting down with a result undelivered", **kv, error=exc)
                    return
                self._log(logging.WARNING, "delivery failed; retrying", **kv, error=exc)
                # Woken early by a shutdown signal, for one last try.
                await self._backoff(min(attempt, 8))
                attempt += 1

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


def _unit_fields(state: _LeaseState, spec: UnitSpec) -> dict[str, object]:
    """The identifiers every log line about one unit carries."""
    return {
        "campaign": spec.campaign,
        "lease": state.grant.lease_id,
        "unit": spec.unit,
        "target": spec.target,
        "attempt": spec.attempt,
    }


async def run_worker(cfg: WorkerConfig) -> int:
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
    help="Units to ask for per lease.",
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
    )
    sys.exit(asyncio.run(run_worker(cfg)))
