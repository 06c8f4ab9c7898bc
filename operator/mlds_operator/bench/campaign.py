"""`mlds bench campaign`: one realistic campaign three ways, side by side (issue 14).

Registered under `mlds bench` by :mod:`mlds_operator.bench.command`. Runs the same ds1 (or ds2) campaign
(convergence-based stopping, cost-aware grants and all) through :func:`mlds_operator.run.runner.run_campaign`
three times in this process, each in a fresh temporary store:

- **one at a time**: ``unitsPerLease: 1`` (a worker trains one network with ``nn.GRU``);
- **fixed stacks**: ``unitsPerLease: S`` with ``--fixed-stacks`` (a lease's S units trained as one
  stack that drains before the next lease: the behaviour before issue 14);
- **continuous stacks**: ``unitsPerLease: S`` (S slots kept full from top-up leases).

Figures per way: wall time, networks per hour per core (workers are one-thread processes: their CPU
seconds are core-seconds, read from this process's finished children, which other jobs on a shared
machine disturb far less than wall time), CPU-seconds per converged network (start-up, data and
idle waiting included), the ratio to one at a time, mean stack occupancy (over
the run, and until nothing was pending) and the tail: the time from 90% to 100% of the networks
verified. The machine's load average is printed with every run: ratios are measured in one process,
one way after the other, so a load that changes between runs moves them.

Training is deterministic, so every way trains the same networks for the same epochs; the report ends
with their spread per target, the attempts that hit the epoch cap (work every way does, retried with
fresh seeds only after the cap) and the longest unit (all its attempts, one after the other), which no
schedule on the campaign's workers can finish before: what bounds the tail of a campaign with few units
per slot.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import resource
import tempfile
from dataclasses import dataclass
from pathlib import Path

import click
from mlds_contract.campaign import Dataset, TrainingCampaign
from mlds_contract.results import META_FILE, UNCONVERGED_PREFIX

from mlds_operator.bench.campaign_run import bench_campaign
from mlds_operator.run.runner import RunOptions, RunSummary, run_campaign
from mlds_operator.storage.manifest import read_manifest
from mlds_operator.storage.store import LocalStore

__all__ = ["bench_campaign_command", "tail_seconds"]


def tail_seconds(progress: list[tuple[float, int]], total: int) -> float | None:
    """Seconds from 90% of ``total`` networks verified to 100% (None when the run never got there)."""
    t90 = next((t for t, n in progress if n >= 0.9 * total), None)
    t100 = next((t for t, n in progress if n >= total), None)
    return None if t90 is None or t100 is None else t100 - t90


@dataclass
class _Way:
    label: str
    units_per_lease: int
    fixed: bool
    summary: RunSummary | None = None
    tail: float | None = None
    load: str = ""
    cpu: float = float("nan")  # CPU seconds of the worker processes (children of this process)
    rows: list[dict[str, object]] | None = None  # the manifest's unit, target, epochs and seconds per network
    capped: list[dict[str, object]] | None = None  # the same of each attempt that hit the epoch cap


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def _run(way: _Way, campaign: TrainingCampaign, networks: int, workers: int) -> None:
    progress: list[tuple[float, int]] = []
    before = _loadavg()
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    with tempfile.TemporaryDirectory(prefix="mlds-bench-campaign-") as tmp:
        opts = RunOptions(
            workers=workers,
            store_dir=Path(tmp) / "store",
            progress=False,
            fixed_stacks=way.fixed,
            progress_log=progress,
            resumable=False,  # the store is a temporary folder, removed on the way out
        )
        way.summary = asyncio.run(run_campaign(campaign, Path(tmp) / "bench-campaign.yaml", opts))
        if way.summary.manifest is not None:
            store = LocalStore(Path(tmp) / "store")
            way.rows = read_manifest(store).select(["unit", "target", "epochs", "seconds"]).to_pylist()
            way.capped = capped_attempts(store)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    way.cpu = (after.ru_utime + after.ru_stime) - (used.ru_utime + used.ru_stime)
    way.tail = tail_seconds(progress, networks)
    way.load = f"{before} -> {_loadavg()}"


@click.command("campaign")
@click.option("--networks", type=click.IntRange(1), default=24, show_default=True, help="Networks in total.")
@click.option(
    "--dataset",
    type=click.Choice([Dataset.ds1.value, Dataset.ds2.value]),
    default=Dataset.ds1.value,
    show_default=True,
    help="ds2: the Modified machines (an epoch is four of ds1's; epochs spread far wider).",
)
@click.option(
    "--machines",
    default="SingleDirectMachine,SingleInvertMachine,SimpleXORMachine,ParityMachine",
    show_default=True,
    help="Machines, comma-separated; the networks are split evenly (ds2 takes both spellings).",
)
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True, help="Worker processes.")
@click.option("--stack", "width", type=click.IntRange(2, 4096), default=4, show_default=True, help="Stack width S.")
@click.option(
    "--ways",
    default="one,fixed,continuous",
    show_default=True,
    help="Which ways to run, comma-separated (one, fixed, continuous).",
)
@click.option(
    "--target-loss",
    type=click.FloatRange(0, min_open=True),
    default=None,
    help="Evaluation MSE that ends training [default: the spec's 1e-4]; larger for a shorter run.",
)
@click.option(
    "--seed",
    type=click.IntRange(0),
    default=1,
    show_default=True,
    help="The campaign's seed: another draws other initial weights and data orders (every way gets the same).",
)
def bench_campaign_command(
    networks: int,
    dataset: str,
    machines: str,
    workers: int,
    width: int,
    ways: str,
    target_loss: float | None,
    seed: int,
) -> None:
    """The same ds1 (or ds2) campaign one network at a time, in fixed stacks and in continuous stacks."""
    ds = Dataset(dataset)
    names = [m.strip() for m in machines.split(",") if m.strip()]
    chosen = [w.strip() for w in ways.split(",") if w.strip()]
    known = {
        "one": _Way("one at a time", 1, False),
        "fixed": _Way(f"fixed stacks S={width}", width, True),
        "continuous": _Way(f"continuous S={width}", width, False),
    }
    unknown = [w for w in chosen if w not in known]
    if unknown or not chosen:
        raise click.BadParameter(f"unknown ways {unknown}; expected one, fixed, continuous", param_hint="--ways")
    # The campaign of each way differs in its stack width only.
    build = functools.partial(bench_campaign, networks, names, target_loss=target_loss, dataset=ds, seed=seed)
    build(units_per_lease=width)  # a bad machine list is one clear line, before any run
    click.echo(
        f"campaign: {networks} {ds.value} networks ({', '.join(names)}), {workers} worker(s), stack width {width} "
        f"({networks / (width * workers):.1f} units per slot), target loss {target_loss or 1e-4:g}, seed {seed}; "
        f"{os.cpu_count()} CPUs"
    )
    runs = [known[w] for w in chosen]
    for way in runs:
        _run(way, build(units_per_lease=way.units_per_lease), networks, workers)
        click.echo(f"  ran {way.label}: load average {way.load}")
    _report(runs, networks, workers)
    for line in spread_lines(runs, slots=width * workers):
        click.echo(line)


def _report(runs: list[_Way], networks: int, workers: int) -> None:
    header = (
        f"{'way':<22}{'wall s':>9}{'nets/h/core':>13}{'x one':>8}{'cpu-s/net':>11}{'train-s/net':>13}"
        f"{'occupancy':>11}{'(pending)':>11}{'tail 90-100% s':>16}"
    )
    click.echo(header)
    click.echo("-" * len(header))
    base: float | None = None
    for way in runs:
        s = way.summary
        assert s is not None
        done = s.snapshot.stats.succeeded
        rate = done / way.cpu * 3600 if way.cpu > 0 else float("nan")
        if way.units_per_lease == 1:
            base = rate
        occ = next(iter(s.snapshot.occupancy.values()), None)
        mean = f"{occ.mean:.1%}" if occ is not None and occ.mean is not None else "-"
        fed = f"{occ.mean_while_pending:.1%}" if occ is not None and occ.mean_while_pending is not None else "-"
        click.echo(
            f"{way.label:<22}{s.wall_seconds:>9,.1f}{rate:>13,.1f}"
            f"{(f'{rate / base:.2f}' if base else '-'):>8}"
            f"{way.cpu / max(done, 1):>11,.1f}{s.snapshot.training_seconds / max(done, 1):>13,.1f}"
            f"{mean:>11}{fed:>11}{(f'{way.tail:,.1f}' if way.tail is not None else '-'):>16}"
        )
    click.echo(f"({networks} networks; every figure from runs in this process, one way after the other)")


def capped_attempts(store: LocalStore) -> list[dict[str, object]]:
    """Unit, target, epochs and seconds of every attempt that hit the epoch cap (kept under ``unconverged/``)."""
    out: list[dict[str, object]] = []
    for key in sorted(store.list(UNCONVERGED_PREFIX)):
        if key.endswith("/" + META_FILE):
            meta = json.loads(store.get_bytes(key) or b"{}")
            out.append({k: meta.get(k) for k in ("unit", "target", "epochs", "seconds")})
    return out


def spread_lines(runs: list[_Way], *, slots: int) -> list[str]:
    """Epochs per target (min / median / max), capped attempts, the longest unit, and the occupancy left possible.

    A unit's attempts run one after the other (a capped attempt is retried, with fresh seeds, once it hit
    the cap), so the campaign lasts at least as long as its longest unit, all attempts together; and
    however units are ordered, ``slots`` slots cannot all be busy for longer than the total epochs allow:
    the mean occupancy of any schedule is at most total / (slots x max(longest, total / slots)) (epochs
    as time; members of a stack step together).
    """
    way = next((w for w in runs if w.rows), None)
    if way is None or not way.rows:
        return []
    rows, capped = way.rows, way.capped or []
    by_target: dict[str, list[int]] = {}
    for row in rows:
        by_target.setdefault(str(row["target"]), []).append(int(str(row["epochs"])))
    parts = [f"{t} {min(e)}/{sorted(e)[len(e) // 2]}/{max(e)}" for t, e in sorted(by_target.items())]
    lines = ["epochs to converge (min/median/max): " + ", ".join(parts)]
    if capped:
        named = ", ".join(f"unit {c['unit']} ({c['target']}) {int(str(c['epochs'])):,}" for c in capped)
        lines.append(
            f"attempts that hit the epoch cap: {len(capped)} ({named} epochs); each unit was trained again, "
            "with fresh seeds, after its cap"
        )
    chains: dict[object, list[int]] = {}
    targets: dict[object, object] = {}
    for row in [*capped, *rows]:
        chains.setdefault(row["unit"], []).append(int(str(row["epochs"])))
        targets[row["unit"]] = row["target"]
    unit, attempts = max(chains.items(), key=lambda kv: sum(kv[1]))
    most = sum(attempts)
    alone = next((w for w in runs if w.units_per_lease == 1 and w.rows), None)
    took = ""
    if alone is not None:
        seconds = [float(str(r["seconds"])) for r in [*(alone.capped or []), *(alone.rows or [])] if r["unit"] == unit]
        took = f", {sum(seconds):,.1f} s alone" if len(seconds) == len(attempts) else ""
    over = f" over {len(attempts)} attempts, one after the other" if len(attempts) > 1 else ""
    lines.append(
        f"longest {'unit' if over else 'network'}: unit {unit} ({targets[unit]}), {most:,} epochs{over}{took}; "
        "no schedule ends the campaign before it does"
    )
    total = sum(sum(e) for e in chains.values())
    ceiling = total / (slots * max(most, total / slots))
    lines.append(
        f"best mean occupancy of any schedule with {slots} slots: {ceiling:.1%} "
        f"({total:,} epochs in all, {most / total:.0%} of them in the longest {'unit' if over else 'network'})"
    )
    return lines
