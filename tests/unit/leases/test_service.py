"""CampaignService: staged results are verified, published once and counted once, and survive a crash.

The service is driven the way the lease API drives it (grant, complete, heartbeat, tick), on a local
folder store and a fake clock; the "worker" here fabricates its result files by hand, so each test
controls exactly which bytes were uploaded and what was declared about them. Nothing sleeps and no
process or server is started.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import threading
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from mlds_contract.campaign import CampaignSpec, Phase
from mlds_contract.errors import StorageUnavailable
from mlds_contract.lease import (
    CompleteReply,
    CompleteRequest,
    FileDigest,
    HeartbeatRequest,
    LeaseGrant,
    LeaseRequest,
    NoLease,
    NoLeaseReason,
    Outcome,
    RejectReason,
    UnitAttempt,
    UnitState,
)
from mlds_contract.results import model_tensors
from mlds_operator.leases.book import LeaseBook, NotHolder
from mlds_operator.leases.service import CampaignService, ResultRejected, ServiceSettings
from mlds_operator.storage import manifest as mf
from mlds_operator.storage.store import Checked, LocalStore

from tests.api_fixtures import safetensors_bytes
from tests.clock import FakeClock

POOL = "local"
OTHER = "other"  # a second pool, where per-pool figures matter
TOKEN = "campaign-token"
CHECKPOINT_SECONDS = 30.0
GRANT_CHECKPOINT_SECONDS = ServiceSettings().grant_checkpoint_seconds
#: Two targets x three replicas: units 0-2 mimic SingleDirectMachine, 3-5 SingleInvertMachine.
NETWORKS_PER_TARGET = 3
TOTAL = 2 * NETWORKS_PER_TARGET


class RecordingStore(LocalStore):
    """A local folder store that remembers the order of its writes (to check what is written last)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, upload_base_url="http://127.0.0.1:9", secret=b"s" * 32, durable=False)
        self.writes: list[str] = []

    def put_bytes(self, rel: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        super().put_bytes(rel, data, content_type)
        self.writes.append(rel)

    def publish(self, moves: Sequence[tuple[str, str, str]], writes: Sequence[tuple[str, bytes]] = ()) -> str | None:
        changed = super().publish(moves, writes)
        if changed is None:
            self.writes.extend([dst for _, dst, _ in moves] + [dst for dst, _ in writes])
        return changed

    def tree(self, prefix: str) -> list[str]:
        return sorted(self.list(prefix))


class CheckpointOutage(RecordingStore):
    """A store whose checkpoint writes fail (while ``down``): a crash between the manifest part and the checkpoint."""

    down = True

    def put_bytes(self, rel: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        if rel == mf.CHECKPOINT_KEY and self.down:
            raise StorageUnavailable("bucket went away")
        super().put_bytes(rel, data, content_type)


def campaign(max_attempts: int = 3) -> CampaignSpec:
    return CampaignSpec.model_validate(
        {
            "workload": {"dataset": "ds1", "machines": ["SingleDirectMachine", "SingleInvertMachine"]},
            "networksPerTarget": NETWORKS_PER_TARGET,
            "leases": {"durationSeconds": 60, "maxAttempts": max_attempts},
        }
    )


async def open_service(
    store: LocalStore,
    clock: FakeClock,
    *,
    max_attempts: int = 3,
    part_rows: int = 5000,
    pools: Sequence[str] = (POOL,),
) -> CampaignService:
    settings = ServiceSettings(checkpoint_seconds=CHECKPOINT_SECONDS, part_rows=part_rows)
    return await CampaignService.open(
        "demo", campaign(max_attempts), store, token=TOKEN, pools=list(pools), clock=clock, settings=settings
    )


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Result:
    """The files one worker produced for one unit attempt, and what it declares about them."""

    worker: str
    unit: int
    attempt: int
    converged: bool
    files: dict[str, bytes]
    declared: dict[str, FileDigest] = field(default_factory=dict)
    pool: str = POOL

    def __post_init__(self) -> None:
        if not self.declared:
            self.declared = {name: FileDigest(sha256=sha(data), size=len(data)) for name, data in self.files.items()}

    @property
    def meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = json.loads(self.files["meta.json"])
        return meta

    def request(self) -> CompleteRequest:
        """The completion as the worker sends it."""
        return CompleteRequest(
            worker=self.worker,
            pool=self.pool,
            unit=self.unit,
            attempt=self.attempt,
            converged=self.converged,
            files=self.declared,
            training_seconds=2.5,
            epochs=7,
        )


def trained(
    service: CampaignService,
    unit: int,
    *,
    attempt: int = 0,
    worker: str = "worker-a",
    converged: bool = True,
    pool: str = POOL,
) -> Result:
    """What a worker uploads for ``unit``: distinct weights per (worker, unit, attempt), a matching meta.json."""
    spec = service.unit_spec(unit, attempt)
    # A real safetensors file of the unit's architecture; its bytes differ per (worker, unit, attempt).
    fill = hashlib.sha256(f"{worker}/{unit}/{attempt}".encode()).digest()[0]
    model = safetensors_bytes(model_tensors(spec), fill=fill)
    meta = {
        "campaign": "demo",
        "dataset": "ds1",
        "target": spec.target,
        "unit": unit,
        "replica": spec.replica,
        "attempt": attempt,
        "init_seed": spec.init_seed,
        "epochs": 7,
        "converged": converged,
        "eval_loss": 5e-5 if converged else 0.02,
        "seconds": 0.3,
        "sha256": sha(model),
        "pool": pool,
    }
    files = {
        "model.safetensors": model,
        "history.csv": b"epoch,train_loss,eval_loss,seconds\n1,0.1,0.1,0.3\n",
        "meta.json": json.dumps(meta).encode(),
    }
    return Result(worker=worker, unit=unit, attempt=attempt, converged=converged, files=files, pool=pool)


def published_as(store: LocalStore, folder: str, result: Result) -> None:
    """``folder`` holds ``result``'s model and history, and the server's meta.json row for them."""
    for name in ("model.safetensors", "history.csv"):
        assert store.get_bytes(f"{folder}/{name}") == result.files[name], name
    row = json.loads(store.get_bytes(f"{folder}/meta.json") or b"")
    assert (row["unit"], row["attempt"], row["sha256"]) == (
        result.unit,
        result.attempt,
        sha(result.files["model.safetensors"]),
    )
    assert row["eval_loss"] == result.meta["eval_loss"]


def upload(store: LocalStore, service: CampaignService, result: Result, *, skip: tuple[str, ...] = ()) -> None:
    """PUT the files where the lease told the worker to: the staging keys of its presigned URLs."""
    prefix = service.staging_prefix(result.unit, result.attempt, result.worker)
    for name, data in result.files.items():
        if name not in skip:
            store.put_bytes(f"{prefix}/{name}", data)


async def deliver(store: LocalStore, service: CampaignService, result: Result) -> CompleteReply:
    upload(store, service, result)
    return await service.complete(result.request())


async def lease(service: CampaignService, worker: str = "worker-a", units: int = 1, pool: str = POOL) -> LeaseGrant:
    reply = await service.grant(
        LeaseRequest(worker=worker, pool=pool, accelerator="cpu", device_name="cpu", max_units=units)
    )
    assert isinstance(reply, LeaseGrant), reply
    return reply


def part_units(store: LocalStore) -> list[int]:
    table = mf.read_parts(store)
    return [] if table is None else sorted(table.column("unit").to_pylist())


@pytest.fixture
def store(tmp_path: Path) -> RecordingStore:
    return RecordingStore(tmp_path / "bucket")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# ------------------------------------------------------------------------------------------ publishing


async def test_a_verified_completion_is_published_meta_json_last_and_its_staging_removed(
    store: RecordingStore, clock: FakeClock
) -> None:
    service = await open_service(store, clock)
    grant = await lease(service)
    (leased,) = grant.units
    assert leased.spec.unit == 0
    # The worker may write only to this attempt's staging folder, never to the final one.
    staged = {urllib.parse.unquote(url.split("/v1/objects/")[1].split("?")[0]) for url in leased.uploads.values()}
    assert staged == {
        f"_mlds/staging/0-0-worker-a/{name}" for name in ("model.safetensors", "history.csv", "meta.json")
    }

    result = trained(service, 0)
    reply = await deliver(store, service, result)

    assert (reply.status, reply.state) == (Outcome.accepted, UnitState.succeeded)
    published_as(store, "SingleDirectMachine/00000", result)
    final_writes = [key for key in store.writes if key.startswith("SingleDirectMachine/00000/")]
    assert len(final_writes) == 3
    assert final_writes[-1] == "SingleDirectMachine/00000/meta.json"  # its presence marks a whole result
    await service.flush()  # staged copies are deleted in batches, with the manifest rows
    assert store.tree("_mlds/staging/") == []
    stats = service.snapshot().stats
    assert (stats.succeeded, stats.leased, stats.pending) == (1, 0, TOTAL - 1)
    assert [p.succeeded for p in stats.pools] == [1]


@dataclass(frozen=True)
class Tamper:
    """One way a completion can disagree with what is in storage, and the reason the server must give."""

    reason: str
    skip_upload: tuple[str, ...] = ()
    # None: leave the file undeclared; "other": the honest size with another file's sha256
    declare: dict[str, FileDigest | str | None] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)  # meta.json fields to overwrite
    raw_meta: bytes | None = None


def _other(size: int) -> FileDigest:
    return FileDigest(sha256=sha(b"something else entirely"), size=size)


TAMPERED = {
    "model bytes differ from the declared sha256": Tamper("sha_mismatch", declare={"model.safetensors": "other"}),
    "history.csv is longer than declared": Tamper(
        "size_mismatch", declare={"history.csv": FileDigest(sha256="0" * 64, size=3)}
    ),
    "model.safetensors was never uploaded": Tamper("missing", skip_upload=("model.safetensors",)),
    "meta.json was never uploaded": Tamper("missing", skip_upload=("meta.json",)),
    "history.csv is not declared": Tamper("bad_files", declare={"history.csv": None}),
    "an extra file is declared": Tamper("bad_files", declare={"snapshots.safetensors": _other(10)}),
    "meta.json names another model": Tamper("bad_meta", meta={"sha256": "f" * 64}),
    "meta.json is another unit's": Tamper("bad_meta", meta={"unit": 1}),
    "meta.json is another attempt's": Tamper("bad_meta", meta={"attempt": 1}),
    "meta.json is another target's": Tamper("bad_meta", meta={"target": "SingleInvertMachine"}),
    "meta.json says it did not converge": Tamper("bad_meta", meta={"converged": False}),
    "meta.json is not JSON": Tamper("bad_meta", raw_meta=b"{not json"),
    "meta.json is a list": Tamper("bad_meta", raw_meta=b"[]"),
}


@pytest.mark.parametrize("tamper", TAMPERED.values(), ids=TAMPERED.keys())
async def test_a_completion_that_disagrees_with_storage_is_rejected_and_counts_nothing(
    store: RecordingStore, clock: FakeClock, tamper: Tamper
) -> None:
    service = await open_service(store, clock)
    await lease(service)
    honest = trained(service, 0)
    files = dict(honest.files)
    if tamper.meta:
        files["meta.json"] = json.dumps({**honest.meta, **tamper.meta}).encode()
    if tamper.raw_meta is not None:
        files["meta.json"] = tamper.raw_meta
    bad = Result("worker-a", 0, 0, True, files)
    for name, digest in tamper.declare.items():
        if digest is None:
            del bad.declared[name]
        elif isinstance(digest, str):
            bad.declared[name] = _other(len(files[name]))
        else:
            bad.declared[name] = digest
    upload(store, service, bad, skip=tamper.skip_upload)
    request = bad.request()

    with pytest.raises(ResultRejected) as caught:
        await service.complete(request)

    assert caught.value.reason == tamper.reason
    assert str(caught.value).startswith("unit 0:")
    if tamper.reason in ("bad_meta", "bad_files"):
        # Never a manifest row: the unit goes back to pending, uncounted, for any worker to train.
        assert (service.book.unit(0).state, service.book.unit(0).attempts) == (UnitState.pending, 0)
    else:
        assert service.book.unit(0).state is UnitState.leased  # still the worker's: it may retry a torn upload
    assert service.snapshot().stats.succeeded == 0
    assert service.snapshot().rejected == {tamper.reason: 1}
    assert store.tree("SingleDirectMachine/") == []
    assert store.tree("unconverged/") == []
    # Nothing the checks claimed is left behind (no listing shows a private link, so nothing else would delete it).
    assert [p.name for p in store.root.rglob("*") if ".mlds-tmp-" in p.name] == []
    await service.flush()
    assert part_units(store) == []

    # The rejection does not poison the unit: an honest upload of the same attempt is accepted.
    reply = await deliver(store, service, honest)
    assert reply.status is Outcome.accepted
    assert store.get_bytes("SingleDirectMachine/00000/model.safetensors") == honest.files["model.safetensors"]


# ------------------------------------------------------------------------------------------ duplicates


async def test_duplicate_completions_are_neither_counted_nor_published_again(
    store: RecordingStore, clock: FakeClock
) -> None:
    service = await open_service(store, clock)
    await lease(service)
    first = trained(service, 0, worker="worker-a")
    assert (await deliver(store, service, first)).status is Outcome.accepted
    writes_after_first = list(store.writes)

    # The same worker again (its reply was lost), then a second copy trained by another worker.
    again = await service.complete(first.request())
    late = trained(service, 0, worker="worker-b")
    copy = await deliver(store, service, late)

    assert (again.status, again.state) == (Outcome.duplicate, UnitState.succeeded)
    assert (copy.status, copy.state) == (Outcome.duplicate, UnitState.succeeded)
    assert [k for k in store.writes[len(writes_after_first) :] if not k.startswith("_mlds/staging/")] == []
    assert store.get_bytes("SingleDirectMachine/00000/model.safetensors") == first.files["model.safetensors"]
    assert store.tree("_mlds/staging/") == []  # the losing copy's upload is cleaned up too
    stats = service.snapshot().stats
    assert stats.succeeded == 1
    assert [p.succeeded for p in stats.pools] == [1]
    await service.flush()
    assert part_units(store) == [0]


async def test_racing_completions_of_one_unit_publish_one_whole_copy(store: RecordingStore, clock: FakeClock) -> None:
    service = await open_service(store, clock)
    copies = [trained(service, 4, worker=f"worker-{c}") for c in "abcd"]
    for result in copies:
        upload(store, service, result)

    replies = await asyncio.gather(*(service.complete(r.request()) for r in copies))

    assert sorted(r.status for r in replies) == [Outcome.accepted] + [Outcome.duplicate] * 3
    winner = copies[[r.status for r in replies].index(Outcome.accepted)]
    # Model, history and meta.json all come from the winning copy: never a mixture of two workers' files.
    published_as(store, "SingleInvertMachine/00001", winner)
    assert service.snapshot().stats.succeeded == 1
    await service.flush()
    assert part_units(store) == [4]


# ----------------------------------------------------------------------------------- non-convergence


async def test_a_non_converged_network_is_kept_aside_and_its_unit_retried_with_fresh_seeds(
    store: RecordingStore, clock: FakeClock
) -> None:
    service = await open_service(store, clock, max_attempts=2)
    first = (await lease(service)).units[0].spec
    assert (first.unit, first.attempt) == (0, 0)

    stalled = trained(service, 0, attempt=0, converged=False)
    reply = await deliver(store, service, stalled)

    assert (reply.status, reply.state) == (Outcome.accepted, UnitState.pending)
    assert store.tree("unconverged/") == [
        f"unconverged/SingleDirectMachine/00000/attempt-0/{name}"
        for name in ("history.csv", "meta.json", "model.safetensors")
    ]
    assert store.tree("SingleDirectMachine/") == []
    await service.flush()  # staged copies are deleted in batches, with the manifest rows
    assert store.tree("_mlds/staging/") == []
    assert service.snapshot().stats.succeeded == 0
    await service.flush()
    assert part_units(store) == []  # the manifest lists converged networks only

    retry = (await lease(service, worker="worker-b")).units[0].spec
    assert (retry.unit, retry.attempt) == (0, 1)
    assert (retry.init_seed, retry.sgd_seed) != (first.init_seed, first.sgd_seed)
    done = trained(service, 0, attempt=1, worker="worker-b")
    assert (await deliver(store, service, done)).state is UnitState.succeeded
    assert json.loads(store.get_bytes("SingleDirectMachine/00000/meta.json") or b"")["attempt"] == 1


async def test_a_unit_that_never_converges_fails_after_max_attempts(store: RecordingStore, clock: FakeClock) -> None:
    service = await open_service(store, clock, max_attempts=2)
    for attempt in range(2):
        spec = (await lease(service)).units[0].spec
        assert (spec.unit, spec.attempt) == (0, attempt)
        await deliver(store, service, trained(service, 0, attempt=attempt, converged=False))

    stats = service.snapshot().stats
    assert (stats.failed, stats.failed_units, stats.succeeded) == (1, "0", 0)
    assert service.book.unit(0).state is UnitState.failed
    assert len(store.tree("unconverged/SingleDirectMachine/00000/")) == 6  # both attempts kept for research
    assert (await lease(service)).units[0].spec.unit != 0  # the failed unit is not handed out again


# ------------------------------------------------------------------------------------- checkpoints


async def test_tick_flushes_a_manifest_part_then_the_checkpoint_when_due(
    store: RecordingStore, clock: FakeClock
) -> None:
    service = await open_service(store, clock)
    await lease(service, units=2)
    for unit in (0, 1):
        await deliver(store, service, trained(service, unit))

    clock.advance(CHECKPOINT_SECONDS - 1)
    await service.tick()
    assert store.tree("_mlds/parts/") == []
    # Only the grant's own checkpoint (the book alone) so far: it does not count the units whose rows wait.
    grant_checkpoint = mf.get_checkpoint(store)
    assert grant_checkpoint is not None
    assert LeaseBook.from_bytes(grant_checkpoint).stats().succeeded == 0

    clock.advance(1)
    await service.tick()
    assert part_units(store) == [0, 1]
    flushed = [k for k in store.writes if k.startswith("_mlds/parts/") or k == mf.CHECKPOINT_KEY]
    # The grant's checkpoint, then the flush: rows first, then the book.
    assert flushed == [mf.CHECKPOINT_KEY, "_mlds/parts/part-000001.parquet", mf.CHECKPOINT_KEY]

    clock.advance(CHECKPOINT_SECONDS)
    await service.tick()  # nothing new: a fresh checkpoint, no empty part
    assert store.tree("_mlds/parts/") == ["_mlds/parts/part-000001.parquet"]
    assert store.writes[-1] == mf.CHECKPOINT_KEY


async def test_a_full_buffer_of_rows_is_flushed_before_the_interval(store: RecordingStore, clock: FakeClock) -> None:
    service = await open_service(store, clock, part_rows=2)
    await lease(service, units=3)
    await deliver(store, service, trained(service, 0))
    await service.tick()
    assert store.tree("_mlds/parts/") == []
    await deliver(store, service, trained(service, 1))
    await service.tick()
    assert part_units(store) == [0, 1]


async def test_a_restarted_service_resumes_counts_and_honours_the_leases_of_live_workers(
    store: RecordingStore, clock: FakeClock
) -> None:
    service = await open_service(store, clock)
    grant = await lease(service, worker="worker-a", units=2)  # units 0 and 1
    await deliver(store, service, trained(service, 0))
    await lease(service, worker="worker-b")  # unit 2: one attempt that does not converge
    await deliver(store, service, trained(service, 2, worker="worker-b", converged=False))
    clock.advance(CHECKPOINT_SECONDS)
    await service.tick()
    before = service.snapshot().stats

    restarted = await open_service(store, FakeClock(start=5.0))  # a new process: a new monotonic origin

    after = restarted.snapshot().stats
    assert (after.succeeded, after.leased, after.pending, after.failed) == (1, 1, 4, 0)
    assert (after.succeeded, after.leased, after.pending) == (before.succeeded, before.leased, before.pending)
    assert restarted.book.unit(2).attempts == 1  # the counted attempt survives: unit 2 goes on with attempt 1
    # worker-a never noticed the restart: its heartbeat re-establishes the lease on unit 1.
    beat = restarted.heartbeat(
        grant.lease_id, HeartbeatRequest(worker="worker-a", pool=POOL, units=[UnitAttempt(unit=1, attempt=0)])
    )
    assert (beat.readopted, beat.cancel) == (True, [])
    assert (await lease(restarted, worker="worker-c")).units[0].spec.unit == 2  # not the re-adopted unit 1
    assert (await deliver(store, restarted, trained(restarted, 1))).status is Outcome.accepted


async def test_recovery_counts_results_published_after_the_last_checkpoint(
    store: RecordingStore, clock: FakeClock
) -> None:
    service = await open_service(store, clock)
    await lease(service, units=4)
    for unit in (0, 1):
        await deliver(store, service, trained(service, unit))
    clock.advance(CHECKPOINT_SECONDS)
    await service.tick()  # the checkpoint knows units 0 and 1
    late = {unit: trained(service, unit) for unit in (2, 3)}
    for result in late.values():
        await deliver(store, service, result)  # published and counted in memory only...
    assert mf.read_parts(store) is not None
    assert part_units(store) == [0, 1]
    # ...and a crash here loses the process: no flush.

    restarted = await open_service(store, FakeClock(start=5.0))

    assert restarted.snapshot().stats.succeeded == 4
    assert restarted.book.unit(2).state is UnitState.succeeded
    assert part_units(store) == [0, 1, 2, 3]  # recovery wrote the late units' rows at once
    assert store.get_bytes(mf.CHECKPOINT_KEY) is not None
    # The late worker's retried completion (its reply was lost in the crash) is a duplicate.
    reply = await restarted.complete(late[3].request())
    assert reply.status is Outcome.duplicate
    assert restarted.snapshot().stats.succeeded == 4


async def test_a_half_published_folder_is_not_recovered(store: RecordingStore, clock: FakeClock) -> None:
    service = await open_service(store, clock)
    await lease(service)
    result = trained(service, 0)
    # The crash came after the model was written and before meta.json: not a whole result.
    store.put_bytes("SingleDirectMachine/00000/model.safetensors", result.files["model.safetensors"])

    restarted = await open_service(store, FakeClock())

    assert restarted.book.unit(0).state is UnitState.pending
    assert restarted.snapshot().stats.succeeded == 0


async def test_a_crash_between_the_part_and_the_checkpoint_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    broken = CheckpointOutage(tmp_path / "bucket")
    clock = FakeClock()
    service = await open_service(broken, clock)
    await lease(service, units=2)
    for unit in (0, 1):
        await deliver(broken, service, trained(service, unit))
    clock.advance(CHECKPOINT_SECONDS)
    with pytest.raises(StorageUnavailable):
        await service.tick()
    assert part_units(broken) == [0, 1]
    assert mf.get_checkpoint(broken) is None

    store = RecordingStore(tmp_path / "bucket")  # the same bucket, healthy again, after a restart
    restarted = await open_service(store, FakeClock())
    assert restarted.snapshot().stats.succeeded == 2
    assert sorted(mf.read_parts(store).column("unit").to_pylist()) == [0, 0, 1, 1]  # type: ignore[union-attr]

    await lease(restarted, units=TOTAL)
    for unit in range(2, TOTAL):
        await deliver(store, restarted, trained(restarted, unit))
    await restarted.tick()
    assert restarted.finalized
    assert pq.read_table(store.path(mf.MANIFEST_KEY)).column("unit").to_pylist() == list(range(TOTAL))


# ------------------------------------------------------------------------------- grant checkpoints


def beat(service: CampaignService, grant: LeaseGrant, worker: str, units: Sequence[int] | None = None) -> list[int]:
    """A heartbeat of ``grant`` naming ``units`` (default: all of the lease's) at attempt 0; returns its cancel list."""
    named = [u.spec.unit for u in grant.units] if units is None else units
    request = HeartbeatRequest(worker=worker, pool=POOL, units=[UnitAttempt(unit=u, attempt=0) for u in named])
    reply = service.heartbeat(grant.lease_id, request)
    assert reply.readopted
    return reply.cancel


async def test_a_lease_granted_after_the_last_checkpoint_is_honoured_once_its_grant_is_checkpointed(
    store: RecordingStore, clock: FakeClock
) -> None:
    service = await open_service(store, clock)
    clock.advance(CHECKPOINT_SECONDS)
    await service.tick()  # the regular checkpoint, before any lease
    regular = mf.get_checkpoint(store)
    early = await lease(service, worker="worker-a", units=2)
    clock.advance(GRANT_CHECKPOINT_SECONDS - 0.5)
    await service.tick()
    assert mf.get_checkpoint(store) == regular  # not yet
    clock.advance(0.5)
    await service.tick()
    assert mf.get_checkpoint(store) != regular  # the book alone: no manifest part
    assert store.tree("_mlds/parts/") == []
    late = await lease(service, worker="worker-b")  # granted too shortly before the crash to be checkpointed
    clock.advance(GRANT_CHECKPOINT_SECONDS - 0.5)
    await service.tick()
    # ...and the process dies here.

    restarted = await open_service(store, FakeClock(start=5.0))

    assert beat(restarted, early, "worker-a") == []  # re-established, every unit
    late_request = HeartbeatRequest(
        worker="worker-b", pool=POOL, units=[UnitAttempt(unit=late.units[0].spec.unit, attempt=0)]
    )
    with pytest.raises(NotHolder):
        restarted.heartbeat(late.lease_id, late_request)
    assert (await lease(restarted, worker="worker-c")).units[0].spec.unit == late.units[0].spec.unit


async def test_results_verified_before_a_grant_checkpoint_are_counted_and_listed_once_after_a_restart(
    store: RecordingStore, clock: FakeClock
) -> None:
    service = await open_service(store, clock, pools=(POOL, OTHER))
    a = await lease(service, worker="worker-a", units=3)
    b = await lease(service, worker="worker-b", units=2, pool=OTHER)
    a_units, b_units = [u.spec.unit for u in a.units], [u.spec.unit for u in b.units]
    await deliver(store, service, trained(service, a_units[0]))
    await deliver(store, service, trained(service, b_units[0], worker="worker-b", pool=OTHER))
    await deliver(store, service, trained(service, b_units[1], worker="worker-b", pool=OTHER, converged=False))
    clock.advance(GRANT_CHECKPOINT_SECONDS)
    await service.tick()  # the grant checkpoint, while the two verified rows are still buffered
    assert store.tree("_mlds/parts/") == []
    await deliver(store, service, trained(service, a_units[1]))  # verified after it
    before = service.snapshot().stats
    # ...and the process dies here: no flush.

    restarted = await open_service(store, FakeClock(start=5.0), pools=(POOL, OTHER))

    after = restarted.snapshot().stats
    figures = {p.name: (p.succeeded, p.failed) for p in after.pools}
    assert figures == {p.name: (p.succeeded, p.failed) for p in before.pools} == {POOL: (2, 0), OTHER: (1, 1)}
    assert (after.succeeded, after.failed, after.pending, after.leased) == (3, 0, 2, 1)
    assert restarted.book.unit(b_units[1]).attempts == 1  # the failed attempt stays counted
    assert part_units(store) == sorted([*a_units[:2], b_units[0]])  # recovery wrote each row once
    assert beat(restarted, a, "worker-a") == a_units[:2]  # its third unit is re-established, not the done ones
    assert (await restarted.complete(trained(restarted, a_units[0]).request())).status is Outcome.duplicate

    c = await lease(restarted, worker="worker-c", units=TOTAL)
    assert sorted(u.spec.unit for u in c.units) == sorted([b_units[1], *set(range(TOTAL)) - {*a_units, *b_units}])
    for leased in c.units:
        spec = leased.spec
        await deliver(store, restarted, trained(restarted, spec.unit, attempt=spec.attempt, worker="worker-c"))
    await deliver(store, restarted, trained(restarted, a_units[2]))
    await restarted.tick()
    assert restarted.finalized
    assert pq.read_table(store.path(mf.MANIFEST_KEY)).column("unit").to_pylist() == list(range(TOTAL))
    assert sorted(mf.read_parts(store).column("unit").to_pylist()) == list(range(TOTAL))  # type: ignore[union-attr]
    final = restarted.snapshot().stats
    assert {p.name: (p.succeeded, p.failed) for p in final.pools} == {POOL: (TOTAL - 1, 0), OTHER: (1, 1)}


async def test_grant_checkpoints_write_the_book_only_so_parts_stay_few(store: RecordingStore, clock: FakeClock) -> None:
    service = await open_service(store, clock)
    for i in range(TOTAL - 1):  # a lease and a result every 5 s, for 25 s
        grant = await lease(service, worker=f"worker-{i}")
        await deliver(store, service, trained(service, grant.units[0].spec.unit, worker=f"worker-{i}"))
        clock.advance(5)
        await service.tick()
    assert store.writes.count(mf.CHECKPOINT_KEY) == TOTAL - 1  # one per grant...
    assert store.tree("_mlds/parts/") == []  # ...and not one part
    clock.advance(2)
    await service.tick()
    assert store.writes.count(mf.CHECKPOINT_KEY) == TOTAL - 1  # no grant since: nothing to write
    clock.advance(CHECKPOINT_SECONDS - 27)
    await service.tick()  # the regular flush: every row in one part
    assert store.tree("_mlds/parts/") == ["_mlds/parts/part-000001.parquet"]
    assert len(part_units(store)) == TOTAL - 1

    restarted = await open_service(store, FakeClock())
    assert restarted.snapshot().stats.succeeded == TOTAL - 1
    assert len(part_units(store)) == TOTAL - 1  # nothing to recover: no second part


async def test_rows_whose_part_was_written_are_not_written_again_when_the_checkpoint_after_it_failed(
    tmp_path: Path,
) -> None:
    flaky = CheckpointOutage(tmp_path / "bucket")
    clock = FakeClock()
    service = await open_service(flaky, clock)
    await lease(service, units=2)
    for unit in (0, 1):
        await deliver(flaky, service, trained(service, unit))
    clock.advance(CHECKPOINT_SECONDS)
    with pytest.raises(StorageUnavailable):
        await service.tick()  # the part is written, its checkpoint is not
    flaky.down = False
    await lease(service, worker="worker-b")
    clock.advance(GRANT_CHECKPOINT_SECONDS)
    await service.tick()  # the retried flush: no part (its rows are in one already), then the book

    restarted = await open_service(RecordingStore(tmp_path / "bucket"), FakeClock())
    assert restarted.snapshot().stats.succeeded == 2
    assert part_units(flaky) == [0, 1]  # once: the checkpoint counts them, nothing was recovered again


async def test_a_grant_checkpoint_that_meets_an_outage_is_retried_at_the_next_tick(tmp_path: Path) -> None:
    flaky = CheckpointOutage(tmp_path / "bucket")
    clock = FakeClock()
    service = await open_service(flaky, clock)
    grant = await lease(service, units=2)
    clock.advance(GRANT_CHECKPOINT_SECONDS)
    await service.tick()  # logged, not raised: nothing is lost while the bucket is away
    assert mf.get_checkpoint(flaky) is None
    flaky.down = False
    await service.tick()
    assert flaky.tree("_mlds/parts/") == []

    restarted = await open_service(RecordingStore(tmp_path / "bucket"), FakeClock(start=5.0))
    assert beat(restarted, grant, "worker-a") == []


async def test_a_heartbeat_on_an_invented_lease_id_readopts_nothing_after_a_grant_checkpoint(
    store: RecordingStore, clock: FakeClock
) -> None:
    service = await open_service(store, clock)
    real = await lease(service, worker="worker-a", units=2)
    await deliver(store, service, trained(service, real.units[0].spec.unit))  # unpublished in the checkpoint
    clock.advance(GRANT_CHECKPOINT_SECONDS)
    await service.tick()

    restarted = await open_service(store, FakeClock(start=5.0))

    everything = HeartbeatRequest(
        worker="worker-a", pool=POOL, units=[UnitAttempt(unit=u, attempt=0) for u in range(TOTAL)]
    )
    with pytest.raises(NotHolder):
        restarted.heartbeat("invented-lease-id-0000", everything)
    stats = restarted.snapshot().stats
    assert (stats.leases, stats.leased, stats.succeeded) == (0, 1, 1)
    assert beat(restarted, real, "worker-a") == [real.units[0].spec.unit]


# ------------------------------------------------------------------------------------------- the end


async def test_finalize_writes_the_manifest_once_per_unit_the_readme_and_the_target_data(
    store: RecordingStore, clock: FakeClock
) -> None:
    service = await open_service(store, clock)
    await lease(service, units=3)
    for unit in (0, 1, 2):
        await deliver(store, service, trained(service, unit))
    clock.advance(CHECKPOINT_SECONDS)
    await service.tick()
    await deliver(store, service, trained(service, 2, worker="worker-z"))  # a late duplicate
    restarted = await open_service(store, FakeClock())  # the remaining units are finished after a restart
    await lease(restarted, units=3)
    for unit in (3, 4, 5):
        await deliver(store, restarted, trained(restarted, unit))
    assert not restarted.finalized

    await restarted.tick()

    assert restarted.finalized
    assert restarted.snapshot().phase is Phase.Succeeded
    assert restarted.manifest_url == f"{store.url}/manifest.parquet"
    manifest = pq.read_table(store.path(mf.MANIFEST_KEY)).to_pylist()
    assert [row["unit"] for row in manifest] == list(range(TOTAL))
    assert [row["key"] for row in manifest] == [
        f"{m}/{r:05d}" for m in ("SingleDirectMachine", "SingleInvertMachine") for r in range(3)
    ]
    for row in manifest:
        assert row["sha256"] == store.sha256(f"{row['key']}/model.safetensors")
    readme = (store.root / "README.md").read_text()
    assert readme.startswith("# demo: an MLDS ds1 dataset")
    assert "6 of 6 networks completed" in readme
    for target in ("SingleDirectMachine", "SingleInvertMachine"):
        data = store.get_bytes(f"data/{target}.npz")
        assert data is not None
        with np.load(io.BytesIO(data)) as arrays:
            assert arrays.files  # the training and evaluation data networks were trained on
    assert await restarted.grant(
        LeaseRequest(worker="worker-a", pool=POOL, accelerator="cpu", device_name="cpu", max_units=1)
    ) == NoLease(reason=NoLeaseReason.finished, retry_after_seconds=0)


class GatedStore(RecordingStore):
    """Reading a gated worker's staged files waits until the test opens its gate (runs in a thread)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gates: dict[str, threading.Event] = {}
        self.reached: dict[str, threading.Event] = {}

    def gate(self, worker: str) -> None:
        self.gates[worker], self.reached[worker] = threading.Event(), threading.Event()

    def check(self, rel: str, size: int, sha256: str) -> Checked | RejectReason:
        for worker, gate in self.gates.items():
            if rel.startswith("_mlds/staging/") and f"-{worker}/" in rel:
                self.reached[worker].set()
                assert gate.wait(timeout=10), "the test never opened the gate"
        return super().check(rel, size, sha256)


async def _reached(store: GatedStore, worker: str) -> None:
    for _ in range(1000):  # a thread reaching a gate: poll the event without blocking the loop
        if store.reached[worker].is_set():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{worker} never reached its gate")


async def test_late_completions_of_a_failed_unit_still_publish_one_whole_copy(tmp_path: Path) -> None:
    # Unit 0 fails (one attempt allowed); then three late reports arrive: a non-converged one, then two
    # converged copies. The second converged copy must not be verified and published while the first is.
    store = GatedStore(tmp_path / "bucket")
    service = await open_service(store, FakeClock(), max_attempts=1)
    await lease(service)
    await deliver(store, service, trained(service, 0, converged=False))
    assert service.book.unit(0).state is UnitState.failed
    stalled = trained(service, 0, worker="worker-a", converged=False)
    first = trained(service, 0, worker="worker-b")
    second = trained(service, 0, worker="worker-c")
    for result in (stalled, first, second):
        upload(store, service, result)
    store.gate("worker-a")
    store.gate("worker-b")

    a = asyncio.create_task(service.complete(stalled.request()))
    await _reached(store, "worker-a")  # a holds the unit's lock...
    b = asyncio.create_task(service.complete(first.request()))
    await asyncio.sleep(0)  # ...and b queues behind it
    store.gates["worker-a"].set()
    assert (await a).state is UnitState.failed
    await _reached(store, "worker-b")  # b is verifying now
    c = asyncio.create_task(service.complete(second.request()))
    await asyncio.sleep(0.05)  # c gets its chance to (wrongly) run beside b
    store.gates["worker-b"].set()
    replies = [await b, await c]

    assert sorted(r.status for r in replies) == [Outcome.accepted, Outcome.duplicate]
    winner = first if replies[0].status is Outcome.accepted else second
    published_as(store, "SingleDirectMachine/00000", winner)
    await service.flush()
    (row,) = mf.read_parts(store).to_pylist()  # type: ignore[union-attr]
    assert row["sha256"] == store.sha256("SingleDirectMachine/00000/model.safetensors")


async def test_a_restart_cleans_the_staging_of_finished_units_and_keeps_what_live_units_may_still_complete(
    store: RecordingStore, clock: FakeClock
) -> None:
    service = await open_service(store, clock)
    await lease(service, units=2)
    await deliver(store, service, trained(service, 0))
    upload(store, service, trained(service, 0, worker="worker-late"))  # a losing copy of a finished unit
    waiting = trained(service, 1)
    upload(store, service, waiting)  # uploaded while the server was down; the completion comes after
    store.put_bytes("_mlds/staging/999999-0-x/junk", b"not a unit of this campaign")
    store.put_bytes("_mlds/staging/0/0-worker-old/meta.json", b"{}")  # the layout before one folder per attempt
    await service.flush()

    restarted = await open_service(store, FakeClock(start=5.0))

    assert store.tree("_mlds/staging/") == sorted(f"_mlds/staging/1-0-worker-a/{name}" for name in waiting.files)
    assert (await restarted.complete(waiting.request())).status is Outcome.accepted
    await restarted.flush()  # published results' staged copies are deleted in batches, with the rows
    assert store.tree("_mlds/staging/") == []
