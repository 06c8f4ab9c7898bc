"""`mlds bench load`: how long loading a pulled dataset into a weights matrix takes (issue 8).

Registered in :data:`mlds_operator.bench.command.BENCHMARKS`. It writes a *synthetic* dataset folder in the real
on-disk layout (:func:`synthesize`: one ``model.safetensors`` with the ds1 network's parameter names and
shapes and random float32 values, one ``meta.json`` with every manifest field, and ``manifest.parquet``),
then times :func:`mlds_data.dataset.load` and :meth:`~mlds_data.dataset.Networks.weights` on it,
in a fresh Python process per round so that nothing is cached in the interpreter. The files were just
written, so the operating system's page cache is warm: the figure is the loader's cost, not the disk's.

:func:`synthesize` is also what the unit tests of `mlds dataset` and `mlds analyze` build their tiny
datasets with (``separation`` > 0 gives each target its own mean, so a classifier has something to find).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import numpy as np
from mlds_contract.campaign import DS1_MACHINES

from mlds_operator.storage.manifest import write_manifest
from mlds_operator.storage.store import LocalStore

__all__ = ["bench_load_command", "ds1_layout", "synthesize"]


def ds1_layout() -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the ds1 network's parameters (docs/workloads.md §3), from the worker's own module."""
    from mlds_worker.nets import GRUNet  # noqa: PLC0415 - torch, only when a dataset is synthesised

    return [(name, tuple(p.shape)) for name, p in GRUNet().named_parameters()]


def synthesize(
    dest: Path,
    *,
    targets: Sequence[str] = DS1_MACHINES,
    per_target: int = 10,
    dataset: str = "ds1",
    campaign: str = "synthetic",
    seed: int = 0,
    separation: float = 0.0,
    first_unit: int = 0,
) -> Path:
    """Write a dataset folder of ``len(targets) * per_target`` random networks in the real layout; returns it.

    Weights: target ``t``'s networks are ``N(separation * d_t, 0.1^2)`` per value, ``d_t`` a random unit-scale
    direction per target (``separation=0``: all targets alike). Losses are uniform below the criterion,
    independent of the target, as a converged dataset's are meant to be.
    """
    from safetensors.numpy import save  # noqa: PLC0415 - only here

    layout = ds1_layout()
    width = sum(int(np.prod(s)) for _, s in layout)
    rng = np.random.default_rng(seed)
    store = LocalStore(dest)
    store.ensure_root()
    rows: list[dict[str, Any]] = []
    unit = first_unit
    for target in targets:
        direction = rng.standard_normal(width).astype(np.float32)
        for replica in range(per_target):
            flat = (separation * direction + 0.1 * rng.standard_normal(width)).astype(np.float32)
            tensors, offset = {}, 0
            for name, shape in layout:
                n = int(np.prod(shape))
                tensors[name] = flat[offset : offset + n].reshape(shape)
                offset += n
            blob = save(tensors, metadata={"format": "pt"})
            key = f"{target}/{replica:05d}"
            folder = dest.joinpath(target, f"{replica:05d}")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "model.safetensors").write_bytes(blob)
            meta = {
                "mlds_version": "synthetic",
                "campaign": campaign,
                "dataset": dataset,
                "target": target,
                "machine": target,
                "unit": unit,
                "replica": replica,
                "attempt": 0,
                "campaign_seed": seed,
                "architecture": "GRUNet",
                "shape": "h12-g4-l4",
                "gru_layers": 4,
                "hidden": 12,
                "linear_layers": 4,
                "parameters": width,
                "max_epochs": 2048,
                "target_loss": 1e-4,
                "epochs": int(rng.integers(60, 400)),
                "converged": True,
                "train_loss": float(rng.uniform(1e-5, 1e-4)),
                "eval_loss": float(rng.uniform(1e-5, 1e-4)),
                "seconds": float(rng.uniform(10, 60)),
                "sha256": hashlib.sha256(blob).hexdigest(),
                "device_type": "cpu",
                "device_name": "synthetic",
            }
            (folder / "meta.json").write_text(json.dumps(meta))
            (folder / "history.csv").write_text("epoch,train_loss,eval_loss,seconds\n")
            rows.append({**meta, "key": key})
            unit += 1
    write_manifest(store, rows)
    return dest


_ROUND = """
import json, sys, time
t0 = time.perf_counter()
from mlds_data.dataset import load
t1 = time.perf_counter()
nets = load(sys.argv[1])
t2 = time.perf_counter()
x = nets.weights(jobs=int(sys.argv[2]))
t3 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "manifest": t2 - t1, "weights": t3 - t2, "shape": list(x.shape),
                  "checksum": float(x[:, :8].sum())}))
"""


def _round(folder: Path, jobs: int) -> dict[str, Any]:
    out = subprocess.run(  # noqa: S603 - our own interpreter and script, no shell
        [sys.executable, "-c", _ROUND, str(folder), str(jobs)], check=True, capture_output=True, text=True
    ).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


@click.command("load")
@click.option(
    "--networks", type=click.IntRange(min=1), default=10_000, show_default=True, help="Networks in the dataset."
)
@click.option(
    "--dir",
    "folder",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where to write the synthetic dataset (default: a temporary folder, removed afterwards).",
)
@click.option("--jobs", default="1,8", show_default=True, help="Comma-separated reader thread counts to time.")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True, help="Repeats; the best counts.")
def bench_load_command(networks: int, folder: Path | None, jobs: str, rounds: int) -> None:
    """Seconds to load N pulled networks into a weights matrix (a synthetic dataset in the real layout)."""
    thread_counts = [int(j) for j in jobs.split(",") if j.strip()]
    with tempfile.TemporaryDirectory(prefix="mlds-bench-load-") as tmp:
        where = folder or Path(tmp) / "dataset"
        per_target, extra = divmod(networks, len(DS1_MACHINES))
        t0 = time.perf_counter()
        if (where / "manifest.parquet").is_file() and folder is not None:
            click.echo(f"reusing the dataset in {where}")
        else:
            synthesize(where, per_target=per_target + (1 if extra else 0))
        made = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in where.rglob("model.safetensors"))
        click.echo(
            f"synthetic dataset (random weights, real layout: ds1 GRUNet safetensors + meta.json + manifest.parquet): "
            f"{where}, {size / 1e6:,.1f} MB of model files, written in {made:,.1f} s"
        )
        click.echo(
            f"host: {os.cpu_count()} CPUs; page cache warm (files just written); best of {rounds} fresh processes"
        )
        click.echo(
            f"{'threads':>7} {'networks':>9} {'matrix':>12} {'import s':>9} {'manifest s':>11} {'weights s':>10} "
            f"{'networks/s':>11}"
        )
        for j in thread_counts:
            best = min((_round(where, j) for _ in range(rounds)), key=lambda r: float(r["weights"]))
            n, width = best["shape"]
            click.echo(
                f"{j:>7} {n:>9,} {f'{n}x{width}':>12} {best['import']:>9.3f} {best['manifest']:>11.3f} "
                f"{best['weights']:>10.3f} {n / best['weights']:>11,.0f}"
            )
