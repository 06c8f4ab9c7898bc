"""`mlds bench train`: training throughput, one network at a time against the batched trainer (issue 7).

Registered under `mlds bench` by :mod:`mlds_operator.bench.command` (a standalone click command, so it can be
run and tested alone). Runs in one process, side by side, on ds1 data (the five machines, round robin,
so a stack mixes targets as a lease may):

- (a) the baseline, the original project's way: one network at a time with ``nn.GRU``
  (:func:`mlds_worker.train.train_unit`), one intra-op thread;
- (b) the batched trainer (:func:`mlds_worker.batched.train_batch`) with K = 1, 4, 16, 64, 256 networks
  stacked into one model (K = 1 runs the stacked engine too, to show its overhead).

Every run trains a fixed number of epochs (``--epochs``; no network converges, so timings compare).
Figures: network-epochs per second of wall time, and per core; each one's ratio to (a); networks per
hour projected for a ds1 campaign from the spec's reference epochs-to-converge (docs/workloads.md §4), and the
hours 50,000 ds1 networks would take. On the CPU "per core" divides by the process's CPU time (one
intra-op thread: CPU seconds are core-seconds), which other processes on a shared machine disturb far
less than wall time; on a GPU it is per device and wall time. Every configuration runs ``--rounds``
times, interleaved, and the best round counts in the table. With two rounds or more, a line per stack
gives the median and range of its per-round ratios, each against the baseline of the same round: a
shared machine's speed drifts by a quarter within minutes, and a ratio of two measurements taken seconds
apart drifts less than one of two best rounds. ``--profile`` adds a torch.profiler table of one epoch
of the largest K: what limits the stack.

Data generation and a warm-up epoch of each configuration are not timed.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import click
from mlds_contract.campaign import CampaignSpec, Dataset, Training, Workload
from mlds_contract.plan import UnitSpec, campaign_targets, unit_spec

if TYPE_CHECKING:
    import torch

__all__ = ["DS1_REFERENCE_EPOCHS", "bench_train_command", "ds1_units"]

#: Epochs to converge per ds1 machine: the middle of docs/workloads.md §4's reference points (a check, not a promise).
DS1_REFERENCE_EPOCHS: dict[str, int] = {
    "SingleDirectMachine": 70,
    "SingleInvertMachine": 76,
    "SimpleXORMachine": 119,
    "ParityMachine": 175,
    "EightBitMachine": 1300,
}
#: A ds1 campaign in the original's proportions (10,000 networks per machine; docs/workloads.md §1).
_DS1_NETWORKS = 50_000


@dataclass
class _Timing:
    label: str
    networks: int
    epochs: int
    rounds: list[tuple[float, float]] = field(default_factory=list)  # (wall s, process CPU s) of every round

    def add(self, wall: float, cpu: float) -> None:
        self.rounds.append((wall, cpu))

    @property
    def wall(self) -> float:
        """Seconds of the best round."""
        return min((w for w, _ in self.rounds), default=float("inf"))

    @property
    def cpu(self) -> float:
        """Process CPU seconds of the best round (by CPU time)."""
        return min((c for _, c in self.rounds), default=float("inf"))

    @property
    def network_epochs(self) -> int:
        return self.networks * self.epochs


@click.command("train")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N (ROCm GPUs answer to cuda).")
@click.option("--epochs", type=click.IntRange(1), default=5, show_default=True, help="Epochs per network, timed.")
@click.option("--k", "ks", default="1,4,16,64,256", show_default=True, help="Comma-separated stack sizes to run.")
@click.option(
    "--baseline-networks",
    type=click.IntRange(1),
    default=2,
    show_default=True,
    help="Networks the baseline trains one after the other.",
)
@click.option(
    "--rounds",
    type=click.IntRange(1),
    default=2,
    show_default=True,
    help="Repeats, interleaved; the best counts in the table, and each stack's per-round ratios are summarised.",
)
@click.option("--profile", is_flag=True, help="Profile one epoch of the largest K and print the top operators.")
def bench_train_command(device: str, epochs: int, ks: str, baseline_networks: int, rounds: int, profile: bool) -> None:
    """Network-epochs per second: one nn.GRU at a time (a) against K networks batched (b), ds1 data."""
    # Before torch starts its thread pool: one thread, as the workers run (docs/workloads.md §4).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch  # noqa: PLC0415 - after OMP_NUM_THREADS; `mlds` must start without torch
    from mlds_worker.device import cpu_name, describe_device, resolve_device  # noqa: PLC0415 - imports torch

    sizes = _stack_sizes(ks)
    torch_device = resolve_device(device)  # no such GPU: UserError, one line ("this torch build sees no GPU")
    torch.set_num_threads(1)
    info = describe_device(torch_device)
    gpu = torch_device.type != "cpu"
    click.echo(
        f"torch {torch.__version__}; intra-op threads {torch.get_num_threads()}; device {info.type}: {info.name}"
    )
    click.echo(f"host CPU: {cpu_name()}; ds1 data, {epochs} epoch(s) per network, best of {rounds} round(s)")

    units = ds1_units(max(*sizes, baseline_networks), epochs)
    timings = _measure(units, sizes, baseline_networks, rounds, torch_device)
    _report(timings, gpu)
    if profile:
        _profile(units[: max(sizes)], torch_device)


def _stack_sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(k) for k in text.split(",") if k.strip()})
    except ValueError as exc:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}", param_hint="--k") from exc
    if not sizes or sizes[0] < 1:
        raise click.BadParameter("stack sizes must be at least 1", param_hint="--k")
    return sizes


def ds1_units(count: int, epochs: int) -> list[UnitSpec]:
    """``count`` ds1 units, the five machines round robin, that train exactly ``epochs`` epochs (data cached)."""
    from mlds_workloads import target_data  # noqa: PLC0415 - builds data; only when benchmarking

    machines = list(DS1_REFERENCE_EPOCHS)
    spec = CampaignSpec(
        workload=Workload(dataset=Dataset.ds1, machines=machines),
        networks_per_target=count,
        seed=7,
        # A threshold no network reaches: every run trains exactly `epochs` epochs.
        training=Training(max_epochs=epochs, target_loss=1e-30),
    )
    targets = campaign_targets(spec)
    # Replica r of machine m is unit m * count + r of the campaign.
    units = [unit_spec(spec, (i % len(machines)) * count + i // len(machines), targets=targets) for i in range(count)]
    for unit in units:
        target_data(unit)  # generate (and cache) the data before anything is timed
    return units


def _with_epochs(unit: UnitSpec, epochs: int) -> UnitSpec:
    return unit.model_copy(update={"training": unit.training.model_copy(update={"max_epochs": epochs})})


def _measure(
    units: list[UnitSpec], sizes: list[int], baseline_networks: int, rounds: int, device: torch.device
) -> list[_Timing]:
    from mlds_worker.batched import train_batch  # noqa: PLC0415 - imports torch
    from mlds_worker.train import train_unit  # noqa: PLC0415

    epochs = units[0].training.max_epochs
    base = _Timing("(a) one at a time, nn.GRU", baseline_networks, epochs)
    stacks = [_Timing(f"(b) batched K={k}", k, epochs) for k in sizes]

    def timed(run: Callable[[], object]) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        return time.perf_counter() - wall, time.process_time() - cpu

    # Warm-up: allocator, kernels and lazy initialisation, one epoch of each configuration.
    warm = [_with_epochs(u, 1) for u in units]
    train_unit(warm[0], device=device)
    for k in sizes:
        train_batch(warm[:k], device=device, min_stack=1)

    def one_at_a_time() -> None:
        for unit in units[:baseline_networks]:
            train_unit(unit, device=device)

    for _ in range(rounds):
        base.add(*timed(one_at_a_time))
        for k, timing in zip(sizes, stacks, strict=True):
            timing.add(*timed(functools.partial(train_batch, units[:k], device=device, min_stack=1)))
    return [base, *stacks]


def _report(timings: list[_Timing], gpu: bool) -> None:
    per_network = sum(DS1_REFERENCE_EPOCHS.values()) / len(DS1_REFERENCE_EPOCHS)
    unit = "device" if gpu else "core"
    click.echo(
        f"projection: a ds1 network takes {per_network:.0f} epochs on average (docs/workloads.md §4 reference points, "
        f"the five machines in equal numbers); a ds1 campaign is {_DS1_NETWORKS:,} networks"
    )
    columns = ("configuration", "net-ep/s wall", f"net-ep/s/{unit}", "x (a)", f"networks/h/{unit}", "h for 50k")
    widths = (28, 15, 15, 8, 17, 11)
    line = "".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(columns, widths, strict=True)))
    click.echo(line)
    click.echo("-" * len(line))

    def per_unit(t: _Timing) -> float:
        # One intra-op thread: CPU seconds are core-seconds. A GPU's work is not in the process's CPU time.
        return t.network_epochs / (t.wall if gpu else t.cpu)

    base = per_unit(timings[0])
    for t in timings:
        rate = per_unit(t)
        per_hour = rate * 3600 / per_network
        cells = (
            t.label,
            f"{t.network_epochs / t.wall:.2f}",
            f"{rate:.2f}",
            f"{rate / base:.2f}",
            f"{per_hour:.0f}",
            f"{_DS1_NETWORKS / per_hour:.1f}",
        )
        click.echo(
            "".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        )
    if len(timings[0].rounds) > 1:
        for t in timings[1:]:
            ratios = round_ratios(timings[0], t, gpu=gpu)
            click.echo(
                f"per-round x (a), {t.label}: median {statistics.median(ratios):.2f}x, "
                f"range {min(ratios):.2f}-{max(ratios):.2f}x over {len(ratios)} rounds"
            )


def round_ratios(base: _Timing, stack: _Timing, *, gpu: bool) -> list[float]:
    """Per core (per device and wall time on a GPU), ``stack``'s rate over ``base``'s in each round."""
    pick = 0 if gpu else 1
    return [
        (stack.network_epochs / s[pick]) / (base.network_epochs / b[pick])
        for b, s in zip(base.rounds, stack.rounds, strict=True)
    ]


def _profile(units: list[UnitSpec], device: torch.device) -> None:
    import torch  # noqa: PLC0415
    from mlds_worker.batched import train_batch  # noqa: PLC0415

    one = [_with_epochs(u, 1) for u in units]
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        train_batch(one, device=device, min_stack=1)
    click.echo(f"\nprofile: one epoch of K={len(one)}, operators by self CPU time")
    click.echo(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
