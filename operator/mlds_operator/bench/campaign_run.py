"""`mlds bench run`: the whole pipeline end to end against the training it contains (issue 7 (d)).

Registered under `mlds bench` by :mod:`mlds_operator.bench.command`. Runs a fixed ds1 campaign through
:func:`mlds_operator.run.runner.run_campaign`, exactly what `mlds run` does (the lease API in this process,
N real worker processes, a local store, verification, checkpoints, the final manifest), in a fresh
temporary store, and compares what it achieved with what the training alone would allow:

- *training seconds*: the sum over verified networks of the time each spent in its training loop, as
  the workers report it (:attr:`Snapshot.training_seconds`);
- *ideal networks per hour*: the networks per hour N workers would reach if they did nothing but that
  training, back to back;
- *overhead*: the share of worker-seconds (wall x workers) not spent training a network that counted:
  process start-up and imports, data generation, leasing, uploads, verification, the manifest, the
  idle tail while the last networks finish, and attempts that did not converge.

The baseline (the training time) is measured inside the same run, so a busy machine slows both sides.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

import click
from mlds_contract.campaign import CampaignSpec, Dataset, Pool, Training, TrainingCampaign, Workload
from mlds_contract.errors import UserError
from mlds_contract.plan import check_campaign

from mlds_operator.run.runner import RunOptions, RunSummary, run_campaign

__all__ = ["bench_campaign", "bench_run_command"]


def bench_campaign(
    networks: int,
    machines: list[str],
    units_per_lease: int,
    target_loss: float | None = None,
    dataset: Dataset = Dataset.ds1,
    *,
    seed: int = 1,
) -> TrainingCampaign:
    """The fixed campaign: ``networks`` ds1 (or ds2) networks spread evenly over ``machines``, default training.

    ``seed`` is the campaign's: another seed draws other initial weights and data orders for every unit.
    """
    if not machines or networks % len(machines):
        raise UserError(f"{networks} networks do not split evenly over the machines {machines}")
    spec = CampaignSpec(
        workload=Workload(dataset=dataset, machines=machines),
        networks_per_target=networks // len(machines),
        seed=seed,
        training=Training() if target_loss is None else Training(target_loss=target_loss),
        pools=[Pool(name="cpu", units_per_lease=units_per_lease)],
    )
    check_campaign(spec)  # an unknown machine is one clear line, as in `mlds run`
    return TrainingCampaign(metadata={"name": "bench-run"}, spec=spec)


def report(summary: RunSummary) -> list[str]:
    """The figures of one run, a line each."""
    snap, workers = summary.snapshot, summary.workers
    done = snap.stats.succeeded
    ideal = done / (snap.training_seconds / workers) * 3600 if snap.training_seconds > 0 else float("nan")
    achieved = done / summary.wall_seconds * 3600
    overhead = summary.overhead
    return [
        f"networks verified      {done}/{snap.stats.total} ({snap.stats.failed} failed)",
        f"wall                   {summary.wall_seconds:,.1f} s with {workers} workers",
        f"training (sum)         {snap.training_seconds:,.1f} s",
        f"networks/h achieved    {achieved:,.0f}",
        f"networks/h ideal       {ideal:,.0f}   (training alone, {workers} workers back to back)",
        f"achieved / ideal       {achieved / ideal:.3f}",
        f"overhead               {overhead:.1%}" if overhead is not None else "overhead               n/a",
    ]


@click.command("run")
@click.option("--networks", type=click.IntRange(1), default=100, show_default=True, help="ds1 networks in total.")
@click.option(
    "--machines",
    default="SingleDirectMachine,SingleInvertMachine",
    show_default=True,
    help="ds1 machines, comma-separated; the networks are split evenly.",
)
@click.option("--workers", type=click.IntRange(1, 64), default=None, help="Worker processes [default: CPUs].")
@click.option("--units-per-lease", type=click.IntRange(1, 4096), default=1, show_default=True)
@click.option(
    "--target-loss",
    type=click.FloatRange(0, min_open=True),
    default=None,
    help="Evaluation MSE that ends training [default: the spec's 1e-4]; larger for a quick smoke run.",
)
@click.option(
    "--store",
    "store_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep the dataset here (default: a temporary folder, removed afterwards).",
)
def bench_run_command(
    networks: int,
    machines: str,
    workers: int | None,
    units_per_lease: int,
    target_loss: float | None,
    store_dir: Path | None,
) -> None:
    """`mlds run` of a fixed ds1 campaign: networks per hour against the sum of its training times."""
    names = [m.strip() for m in machines.split(",") if m.strip()]
    campaign = bench_campaign(networks, names, units_per_lease, target_loss)
    n = workers or os.cpu_count() or 1
    click.echo(
        f"campaign: {networks} ds1 networks ({', '.join(names)}), "
        f"{units_per_lease} unit(s) per lease, {n} workers, target loss {campaign.spec.training.target_loss:g}"
    )
    with tempfile.TemporaryDirectory(prefix="mlds-bench-run-") as tmp:
        where = store_dir or Path(tmp) / "store"
        # Resumable only with --store-dir: a temporary store is removed on the way out.
        opts = RunOptions(workers=n, store_dir=where, progress=False, resumable=store_dir is not None)
        summary = asyncio.run(run_campaign(campaign, Path(tmp) / "bench-run.yaml", opts))
        click.echo("\n".join(report(summary)))
