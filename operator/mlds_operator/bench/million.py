"""`mlds bench million`: a campaign of 1,000,000 ds1 units driven to Succeeded, and what that costs the server.

Registered under `mlds bench` by :mod:`mlds_operator.bench.command` (issue 15). One process plays the lease
server of `mlds run` (a :class:`~mlds_operator.leases.service.CampaignService` over a durable
:class:`~mlds_operator.storage.store.LocalStore` in ``--dir``) and the simulated workers, which call the
service directly instead of over HTTP: `mlds bench cycle` measures the HTTP and verification path; here the
question is what a million units do to the book, the checkpoint, the manifest, the status and the dataset
tools. Every unit is leased through :meth:`CampaignService.grant` (K units per lease, presigned URLs and
all) and counted once:

- every ``--verify-every``-th unit goes the whole way: its three result files (the real ds1 sizes, built by
  the worker's own code) are uploaded to its staging keys and :meth:`CampaignService.complete_many`
  verifies and publishes them;
- the others are *placeholders*: no files (a million results of ~35 kB would be ~35 GB and hours of
  uploads on a laptop-sized machine); the book counts them (``LeaseBook.complete``) and the service gets
  their real meta.json row, exactly what a verified completion adds to the book and the manifest.

The campaign loop runs as in production (``tick``: manifest parts and a checkpoint when ``--part-rows``
rows are buffered; ``finalize`` at the end: compaction, README, per-target data). Then it measures: the
checkpoint's size and the time to serialise and write it; the time to reopen the campaign from the store
(a fresh :meth:`CampaignService.open`: checkpoint + the results scan); the CR status the controller would
write (:func:`mlds_operator.controller.reconcile.reconcile` on the service's progress) and its JSON size;
compaction's time and the manifest's size; distinct manifest keys; `mlds dataset info` and
``mlds_data.dataset.load`` of the result, each in a fresh process; and this process's peak RSS (server
and simulated workers together: an upper bound on the server's).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mlds_operator.bench.cycle import POOL, _template, loadavg

__all__ = ["MillionResult", "bench_million_command", "run_million"]

NAME = "million"
NAMESPACE = "bench"


@dataclass
class MillionResult:
    """What `mlds bench million` measured (seconds, bytes)."""

    units: int
    verified_with_files: int
    drive_seconds: float
    drive_cpu_seconds: float
    parts: int
    checkpoint_bytes: int
    checkpoint_serialise_s: float
    checkpoint_write_s: float
    finalize_s: float
    compact_s: float
    manifest_bytes: int
    manifest_rows: int
    distinct_keys: int
    reopen_s: float
    reopen_succeeded: int
    status_bytes: int
    status_phase: str
    info_s: float
    load_s: float
    load_len: int
    peak_rss: int
    load_avg: list[str]


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


async def _drive(root: Path, units: int, k: int, verify_every: int, part_rows: int) -> MillionResult:  # noqa: PLR0915
    from mlds_contract.campaign import DS1_MACHINES, CampaignSpec, Pool, Workload  # noqa: PLC0415
    from mlds_contract.lease import CompleteRequest, FileDigest, LeaseGrant, LeaseRequest  # noqa: PLC0415
    from mlds_contract.results import META_FILE  # noqa: PLC0415

    from mlds_operator.controller import pods  # noqa: PLC0415
    from mlds_operator.controller.reconcile import (  # noqa: PLC0415
        Campaign,
        Observed,
        PoolProgress,
        Progress,
        reconcile,
    )
    from mlds_operator.leases.service import CampaignService, ServiceSettings  # noqa: PLC0415
    from mlds_operator.storage import manifest as mf  # noqa: PLC0415
    from mlds_operator.storage.store import LocalStore  # noqa: PLC0415

    loads = [loadavg()]
    per_target, rest = divmod(units, len(DS1_MACHINES))
    if rest:
        raise click.BadParameter(f"--units must be a multiple of {len(DS1_MACHINES)}")
    spec = CampaignSpec(
        workload=Workload(dataset="ds1", machines=list(DS1_MACHINES)),
        networks_per_target=per_target,
        pools=[Pool(name=POOL, units_per_lease=min(k, 4096))],
    )
    settings = ServiceSettings(checkpoint_seconds=1e9, part_rows=part_rows)  # flush by size, as under load
    store = LocalStore(root, upload_base_url="http://127.0.0.1:9")
    store.ensure_root()
    service = await CampaignService.open(NAME, spec, store, pools=[POOL], settings=settings)
    # The template's files come from a child process: torch (the worker's code) would add ~300 MB to this
    # process's memory, which stands for the server's.
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        files, base_meta = pool.submit(_template_files).result()
    model, history = files["model.safetensors"], files["history.csv"]
    digest = {n: FileDigest(size=len(b), sha256=sha256_hex(b)) for n, b in files.items()}
    lease = LeaseRequest(worker="sim-0", pool=POOL, accelerator="cpu", device_name="bench", max_units=k)
    verified = 0
    t0, c0 = time.monotonic(), time.process_time()
    while True:
        grant = await service.grant(lease)
        if not isinstance(grant, LeaseGrant):
            break
        full: list[CompleteRequest] = []
        for leased in grant.units:
            unit = leased.spec
            if unit.unit % verify_every == 0:
                meta = {**base_meta, **{f: getattr(unit, f) for f in _UNIT_FIELDS}}
                meta_bytes = (json.dumps(meta, indent=2) + "\n").encode()
                prefix = service.staging_prefix(unit.unit, unit.attempt, lease.worker)
                for name, data in (("model.safetensors", model), ("history.csv", history), (META_FILE, meta_bytes)):
                    store.put_upload(f"{prefix}/{name}", data)
                full.append(
                    CompleteRequest(
                        worker=lease.worker,
                        pool=POOL,
                        unit=unit.unit,
                        attempt=unit.attempt,
                        converged=True,
                        files={**digest, META_FILE: FileDigest(size=len(meta_bytes), sha256=sha256_hex(meta_bytes))},
                        training_seconds=28.0,
                        epochs=int(base_meta["epochs"]),
                    )
                )
            else:
                # A placeholder: what a verified completion changes, without the files (see the module docs).
                service.book.complete(unit.unit, worker=lease.worker, pool=POOL, attempt=unit.attempt, converged=True)
                service._rows.append(placeholder_row(base_meta, unit))
        if full:
            for done in await service.complete_many(full):
                if isinstance(done, Exception):
                    raise done
                verified += 1
        await service.tick()
    drive_s, drive_cpu = time.monotonic() - t0, time.process_time() - c0
    loads.append(loadavg())

    # The checkpoint as the campaign loop writes it.
    t = time.perf_counter()
    checkpoint = service.book.to_bytes()
    serialise_s = time.perf_counter() - t
    t = time.perf_counter()
    await asyncio.to_thread(mf.put_checkpoint, store, checkpoint)
    write_s = time.perf_counter() - t
    parts = len(list(store.list(mf.PARTS_PREFIX)))

    # Finalize (flush, compaction, README, data), then compaction alone again (idempotent) for its own time.
    t = time.perf_counter()
    await service.finalize()
    finalize_s = time.perf_counter() - t
    t = time.perf_counter()
    manifest_rows = await asyncio.to_thread(mf.compact, store)
    compact_s = time.perf_counter() - t
    # Distinct keys from the key column alone (the whole manifest as a table would be ~0.7 GB of this
    # process's peak, which stands for the server's).
    keys = pq.read_table(root / mf.MANIFEST_KEY, columns=["key"]).column("key")
    distinct = int(pc.count_distinct(keys).as_py())
    del keys
    info = store.stat(mf.MANIFEST_KEY)
    manifest_bytes = info.size if info is not None else 0

    # The status the controller would write for it.
    snap = service.snapshot()
    stats = snap.stats
    progress = Progress(
        counts=stats.unit_counts(),
        pools=tuple(PoolProgress(p.name, p.succeeded, p.failed, p.workers) for p in stats.pools),
        failed_units=stats.failed_units,
        networks_per_hour=snap.networks_per_hour,
        eta=snap.eta,
        finished=stats.finished,
        finalized=service.finalized,
        manifest=service.manifest_url,
        lease_url=f"http://mlds-operator.mlds.svc:8080/v1/campaigns/{NAMESPACE}/{NAME}",
    )
    outcome = reconcile(
        Campaign(name=NAME, namespace=NAMESPACE, uid="uid-1", generation=1, spec=spec),
        Observed(now=datetime.now(UTC), token="t", secret_exists=True, progress=progress),  # noqa: S106 - not a secret,
        pods.WorkerSettings(lease_base_url="http://mlds-operator.mlds.svc:8080"),
    )
    status_json = json.dumps(outcome.status.model_dump(mode="json", by_alias=True, exclude_none=True))

    # A restart: a fresh service from the store (checkpoint, then the scan for results after it).
    t = time.perf_counter()
    reopened = await CampaignService.open(NAME, spec, store, pools=[POOL], settings=settings)
    reopen_s = time.perf_counter() - t
    reopen_succeeded = reopened.book.stats().succeeded
    peak = _peak_rss()
    loads.append(loadavg())

    # The researchers' tools, each in a fresh process.
    env = {**os.environ}
    t = time.perf_counter()
    subprocess.run(  # noqa: S603 - this interpreter, fixed arguments
        [sys.executable, "-m", "mlds_cli", "dataset", "info", str(root)], check=True, env=env, stdout=subprocess.DEVNULL
    )
    info_s = time.perf_counter() - t
    t = time.perf_counter()
    out = subprocess.run(  # noqa: S603 - this interpreter, fixed arguments
        [
            sys.executable,
            "-c",
            "import sys; from mlds_data.dataset import load; print(len(load(sys.argv[1])))",
            str(root),
        ],
        check=True,
        env=env,
        capture_output=True,
        text=True,
    )
    load_s = time.perf_counter() - t
    return MillionResult(
        units=units,
        verified_with_files=verified,
        drive_seconds=drive_s,
        drive_cpu_seconds=drive_cpu,
        parts=parts,
        checkpoint_bytes=len(checkpoint),
        checkpoint_serialise_s=serialise_s,
        checkpoint_write_s=write_s,
        finalize_s=finalize_s,
        compact_s=compact_s,
        manifest_bytes=manifest_bytes,
        manifest_rows=manifest_rows,
        distinct_keys=distinct,
        reopen_s=reopen_s,
        reopen_succeeded=reopen_succeeded,
        status_bytes=len(status_json.encode()),
        status_phase=str(outcome.status.phase),
        info_s=info_s,
        load_s=load_s,
        load_len=int(out.stdout.strip() or 0),
        peak_rss=peak,
        load_avg=loads,
    )


#: The meta.json fields that differ between units of a ds1 campaign: the worker copies them from the unit.
_UNIT_FIELDS = ("campaign", "target", "machine", "unit", "replica", "attempt", "init_seed", "sgd_seed", "data_seed")


def placeholder_row(base_meta: dict[str, Any], unit: Any) -> dict[str, Any]:
    """The manifest row of a placeholder unit: the template's meta.json with the unit's own fields."""
    from mlds_operator.storage.manifest import manifest_row  # noqa: PLC0415

    return manifest_row({**base_meta, **{f: getattr(unit, f) for f in _UNIT_FIELDS}}, unit.key)


def _template_files() -> tuple[dict[str, bytes], dict[str, Any]]:
    """The template result's files and its meta.json (run in a child process: it imports torch)."""
    _, files = _template()
    return files, json.loads(files["meta.json"])


def write_manifest_parts(root: Path, units: int, part_rows: int) -> int:
    """Only the manifest parts of a finished million-unit campaign in ``root`` (``--manifest-only``).

    The rows are exactly those `_drive` gives its placeholders (the template's meta.json with each unit's
    own fields), written as the campaign loop writes them (``part_rows`` rows a part); no leasing, no
    result files. Returns the number of parts. A quick way to a million-row manifest for the dataset tools
    and compaction, which is what `--manifest-only` measures.
    """
    from mlds_contract.campaign import DS1_MACHINES, CampaignSpec, Pool, Workload  # noqa: PLC0415
    from mlds_contract.plan import campaign_targets, unit_spec  # noqa: PLC0415

    from mlds_operator.storage import manifest as mf  # noqa: PLC0415
    from mlds_operator.storage.store import LocalStore  # noqa: PLC0415

    per_target, rest = divmod(units, len(DS1_MACHINES))
    if rest:
        raise click.BadParameter(f"--units must be a multiple of {len(DS1_MACHINES)}")
    spec = CampaignSpec(
        workload=Workload(dataset="ds1", machines=list(DS1_MACHINES)),
        networks_per_target=per_target,
        pools=[Pool(name=POOL)],
    )
    targets = campaign_targets(spec)
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        _files, base_meta = pool.submit(_template_files).result()
    store = LocalStore(root)
    store.ensure_root()
    seq, rows = 0, []
    for u in range(units):
        rows.append(placeholder_row(base_meta, unit_spec(spec, u, campaign=NAME, targets=targets)))
        if len(rows) == part_rows or u == units - 1:
            seq += 1
            mf.write_part(store, seq, rows)
            rows = []
    return seq


_COMPACT = """
import json, resource, sys, time
from mlds_operator.storage import manifest as mf
from mlds_operator.storage.store import LocalStore
t = time.perf_counter()
rows = mf.compact(LocalStore(sys.argv[1]))
print(json.dumps({"s": time.perf_counter() - t, "rows": rows,
                  "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def measure_tools(root: Path) -> dict[str, float]:
    """Compaction (time, rows, the process's peak RSS), `mlds dataset info` and ``load``, each in a fresh process."""
    env = {**os.environ}
    out: dict[str, float] = {}
    compact = json.loads(
        subprocess.run(  # noqa: S603 - this interpreter, fixed arguments
            [sys.executable, "-c", _COMPACT, str(root)], check=True, env=env, capture_output=True, text=True
        ).stdout
    )
    out.update(compact_s=compact["s"], rows=compact["rows"], compact_peak=compact["peak"])
    t = time.perf_counter()
    subprocess.run(  # noqa: S603 - this interpreter, fixed arguments
        [sys.executable, "-m", "mlds_cli", "dataset", "info", str(root)], check=True, env=env, stdout=subprocess.DEVNULL
    )
    out["info_s"] = time.perf_counter() - t
    t = time.perf_counter()
    subprocess.run(  # noqa: S603 - this interpreter, fixed arguments
        [sys.executable, "-c", "import sys; from mlds_data.dataset import load; load(sys.argv[1])", str(root)],
        check=True,
        env=env,
    )
    out["load_s"] = time.perf_counter() - t
    return out


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def run_million(
    *,
    units: int = 1_000_000,
    k: int = 1024,
    verify_every: int = 1000,
    part_rows: int = 50_000,
    root: Path | None = None,
) -> MillionResult:
    """Drive the campaign in ``root`` (default: a temporary folder, removed afterwards); returns the figures."""
    tmp = None
    if root is None:
        tmp = tempfile.mkdtemp(prefix="mlds-bench-million-")
        root = Path(tmp)
    try:
        return asyncio.run(_drive(root, units, k, verify_every, part_rows))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def format_result(r: MillionResult) -> str:
    """The report `mlds bench million` prints."""
    mb = 1e6
    return "\n".join(
        [
            f"campaign: {r.units:,} ds1 units, LocalStore (durable); {r.verified_with_files:,} verified with files,"
            f" the rest counted as placeholders (no files); host has {os.cpu_count()} CPU(s)",
            f"driven to {r.status_phase} in {r.drive_seconds:,.1f} s ({r.drive_cpu_seconds:,.1f} CPU-s); "
            f"{r.parts} manifest part(s)",
            f"checkpoint              {r.checkpoint_bytes / mb:,.2f} MB; serialise {r.checkpoint_serialise_s:.3f} s,"
            f" write {r.checkpoint_write_s:.3f} s",
            f"reopen after a restart  {r.reopen_s:.2f} s ({r.reopen_succeeded:,} succeeded restored)",
            f"CR status               {r.status_bytes:,} bytes of JSON (phase {r.status_phase})",
            f"finalize                {r.finalize_s:.2f} s (flush, compaction, README, data)",
            f"compaction alone        {r.compact_s:.2f} s; manifest.parquet {r.manifest_bytes / mb:,.2f} MB,"
            f" {r.manifest_rows:,} rows, {r.distinct_keys:,} distinct keys",
            f"mlds dataset info       {r.info_s:.2f} s (fresh process)",
            f"mlds_data load          {r.load_s:.2f} s (fresh process; {r.load_len:,} networks)",
            f"peak RSS                {r.peak_rss / mb:,.1f} MB (server and simulated workers in one process)",
            f"loadavg                 start {r.load_avg[0]} | driven {r.load_avg[1]} | end {r.load_avg[-1]}",
        ]
    )


@click.command("million")
@click.option("--units", type=click.IntRange(5), default=1_000_000, show_default=True)
@click.option("--k", type=click.IntRange(1, 4096), default=1024, show_default=True, help="Units per lease.")
@click.option(
    "--verify-every", type=click.IntRange(1), default=1000, show_default=True, help="Every Nth unit with real files."
)
@click.option("--part-rows", type=click.IntRange(1), default=50_000, show_default=True, help="Rows per manifest part.")
@click.option(
    "--dir", "root", type=click.Path(path_type=Path, file_okay=False), default=None, help="Keep the store here."
)
@click.option(
    "--manifest-only",
    is_flag=True,
    help="No campaign: write the placeholder rows as manifest parts (reusing --dir's parts if there are some), "
    "then time compaction (and its peak memory), `mlds dataset info` and load, each in a fresh process.",
)
def bench_million_command(
    units: int, k: int, verify_every: int, part_rows: int, root: Path | None, manifest_only: bool
) -> None:
    """A 1,000,000-unit campaign to Succeeded: checkpoint, reopen, status size, manifest, dataset tools, memory."""
    if manifest_only:
        _manifest_only(units, part_rows, root)
        return
    click.echo(f"mlds bench million: {units:,} units, K={k}, real files every {verify_every} ...", err=True)
    click.echo(format_result(run_million(units=units, k=k, verify_every=verify_every, part_rows=part_rows, root=root)))


def _manifest_only(units: int, part_rows: int, root: Path | None) -> None:
    from mlds_operator.storage import manifest as mf  # noqa: PLC0415
    from mlds_operator.storage.store import LocalStore  # noqa: PLC0415

    tmp = None
    if root is None:
        tmp = tempfile.mkdtemp(prefix="mlds-bench-million-")
        root = Path(tmp)
    try:
        start = loadavg()
        store = LocalStore(root)
        if not list(store.list(mf.PARTS_PREFIX)):
            t = time.perf_counter()
            parts = write_manifest_parts(root, units, part_rows)
            click.echo(f"wrote {parts} manifest part(s) of {units:,} rows in {time.perf_counter() - t:.1f} s", err=True)
        r = measure_tools(root)
        size = (root / mf.MANIFEST_KEY).stat().st_size
        click.echo(
            "\n".join(
                [
                    f"manifest only: {int(r['rows']):,} rows in {root}; host has {os.cpu_count()} CPU(s)",
                    f"compaction              {r['compact_s']:.2f} s, peak RSS {r['compact_peak'] / 1e6:,.1f} MB"
                    f" (fresh process); manifest.parquet {size / 1e6:,.2f} MB",
                    f"mlds dataset info       {r['info_s']:.2f} s (fresh process)",
                    f"mlds_data load          {r['load_s']:.2f} s (fresh process)",
                    f"loadavg                 start {start} | end {loadavg()}",
                ]
            )
        )
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
