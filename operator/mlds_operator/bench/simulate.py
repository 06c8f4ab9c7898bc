"""`mlds bench simulate`: fixed against continuous stacks, simulated from a step-time curve (issue 14).

Registered under `mlds bench` by :mod:`mlds_operator.bench.command`. No training: a campaign's networks
get epochs-to-converge drawn from the reference study's per-machine figures (docs/reference-study:
mean, min and max per machine; a log-normal with that mean, clipped to the range), and an epoch of a
stack of K live members costs t(K) seconds:

- ``--curve cpu``: the CPU curve measured by `mlds bench train` (network-epochs per core-second at
  K = 1, 4, 16, 32, 64, 256; bench/README.md), interpolated: t(K) = K / rate(K);
- ``--curve gpu``: flat until the knee, then linear: t(K) = t0 x max(1, K / knee), the shape a GPU
  shows for networks this small (``--gpu-epoch-seconds`` t0, ``--gpu-knee``; placeholders until
  `bench/gpu-check.sh` measures them).

Three ways per worker: one network at a time (t(1) per epoch), fixed stacks (S units leased together,
trained until the last is done) and continuous stacks (S slots, a finished member's slot refilled at
the next epoch). Units are handed out as the lease book does: the most expensive machine first. It
prints the makespan, networks per hour, mean occupancy and the 90%->100% tail for each, so a GPU
campaign's figures can be expected before one is measured; `mlds bench campaign` measures the same
on the CPU for checking.
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass

import click
from mlds_contract.campaign import DS2_MACHINES, Dataset

from mlds_operator.leases.costs import EPOCH_COST

__all__ = ["REFERENCE_EPOCHS", "StepCurve", "bench_simulate_command", "simulate"]

#: docs/reference-study/report.md: epochs to converge per machine, (mean, min, max): ds1 over 20 networks,
#: ds2 over 11-16 (ParityModified and EightBitModified were not established there).
REFERENCE_EPOCHS: dict[str, tuple[float, float, float]] = {
    "SingleDirectMachine": (88, 68, 118),
    "SingleInvertMachine": (87, 56, 165),
    "SimpleXORMachine": (181, 95, 657),
    "ParityMachine": (345, 176, 1493),
    "EightBitMachine": (1864, 1114, 3750),
    "SingleDirectModified": (100, 69, 205),
    "SingleInvertModified": (337, 56, 707),
    "SimpleXORModified": (193, 102, 658),
}
#: `mlds bench train` on the 2-core machine (bench/README.md, 2026-12-01 and issue 7): network-epochs per core-second.
CPU_RATE: dict[int, float] = {1: 3.67, 4: 9.0, 16: 16.9, 32: 20.17, 64: 21.43, 256: 21.0}


@dataclass(frozen=True)
class StepCurve:
    """Seconds for one epoch of a stack of K live members."""

    kind: str
    gpu_epoch_seconds: float = 0.5
    gpu_knee: int = 4096

    def __call__(self, k: int) -> float:
        if k <= 0:
            return 0.0
        if self.kind == "gpu":
            return self.gpu_epoch_seconds * max(1.0, k / self.gpu_knee)
        points = sorted(CPU_RATE)
        if k >= points[-1]:
            return k / CPU_RATE[points[-1]]
        lo = max(p for p in points if p <= k)
        hi = min(p for p in points if p >= k)
        if lo == hi:
            return k / CPU_RATE[lo]
        # Interpolate the rate in log K.
        w = (math.log(k) - math.log(lo)) / (math.log(hi) - math.log(lo))
        return k / (CPU_RATE[lo] * (1 - w) + CPU_RATE[hi] * w)


def _epoch_cost(machine: str) -> int:
    """ds1 epochs of work in one epoch of ``machine`` (the lease book's figure: a ds2 epoch is four)."""
    return round(EPOCH_COST[Dataset.ds2]) if machine in DS2_MACHINES else 1


def draw_epochs(machines: list[str], networks: int, seed: int = 0, spread: float = 0.35) -> list[tuple[str, int]]:
    """``networks`` (machine, epochs) pairs, machines in equal shares, in the lease book's order (costliest first).

    Epochs are log-normal with the machine's reference mean and shape ``spread`` (sigma), clipped to its
    reference range, and counted in ds1 epochs of work (a ds2 epoch is four of them, as the lease book counts).
    """
    rng = random.Random(seed)
    out: list[tuple[str, int]] = []
    for i in range(networks):
        machine = machines[i % len(machines)]
        mean, lo, hi = REFERENCE_EPOCHS[machine]
        mu = math.log(mean) - spread * spread / 2
        epochs = int(min(hi, max(lo, round(rng.lognormvariate(mu, spread)))))
        out.append((machine, epochs * _epoch_cost(machine)))
    # cost-aware grants: the costliest machine first
    out.sort(key=lambda me: -REFERENCE_EPOCHS[me[0]][0] * _epoch_cost(me[0]))
    return out


@dataclass
class Outcome:
    way: str
    makespan: float
    done_times: list[float]
    busy: float  # member-seconds
    capacity: float  # slot-seconds while the worker trained

    @property
    def tail(self) -> float:
        times = sorted(self.done_times)
        return times[-1] - times[math.ceil(0.9 * len(times)) - 1] if times else 0.0


def simulate(epochs: list[int], workers: int, width: int, curve: StepCurve, way: str) -> Outcome:
    """Makespan and completion times of ``epochs`` (units in grant order) on ``workers`` workers."""
    queue = list(epochs)
    done: list[float] = []
    busy = capacity = 0.0
    clocks = [(0.0, w) for w in range(workers)]
    heapq.heapify(clocks)
    if way in ("one", "fixed"):
        size = 1 if way == "one" else width
        while queue:
            now, w = heapq.heappop(clocks)
            batch, queue = queue[:size], queue[size:]
            t, left = now, sorted(batch)
            epoch = 0
            while left:
                k = len(left)
                step = curve(k)
                nxt = left[0]
                for _ in range(nxt - epoch):
                    t += step
                    busy += step * k
                    capacity += step * size
                epoch = nxt
                while left and left[0] == epoch:
                    left.pop(0)
                    done.append(t)
            heapq.heappush(clocks, (t, w))
        return Outcome(way, max(done, default=0.0), done, busy, capacity)
    # continuous: all workers advance round by round; a worker refills its free slots from the shared queue.
    stacks: list[list[int]] = [[] for _ in range(workers)]
    times = [0.0] * workers
    while queue or any(stacks):
        w = min((i for i in range(workers) if stacks[i] or queue), key=lambda i: times[i])
        while queue and len(stacks[w]) < width:
            stacks[w].append(queue.pop(0))
        k = len(stacks[w])
        step = curve(k)
        times[w] += step
        busy += step * k
        capacity += step * width
        stacks[w] = [e - 1 for e in stacks[w]]
        for _ in range(sum(1 for e in stacks[w] if e <= 0)):
            done.append(times[w])
        stacks[w] = [e for e in stacks[w] if e > 0]
    return Outcome(way, max(done, default=0.0), done, busy, capacity)


@click.command("simulate")
@click.option("--curve", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True)
@click.option("--networks", type=click.IntRange(1), default=1000, show_default=True)
@click.option(
    "--machines",
    default=",".join(m for m in REFERENCE_EPOCHS if m.endswith("Machine")),
    show_default=True,
    help="ds1 (or ds2 Modified) machines, comma-separated.",
)
@click.option("--workers", type=click.IntRange(1), default=1, show_default=True)
@click.option("--stack", "width", type=click.IntRange(1), default=64, show_default=True, help="Stack width S.")
@click.option("--gpu-epoch-seconds", type=float, default=0.5, show_default=True, help="t(K) below the knee (gpu).")
@click.option(
    "--gpu-knee", type=click.IntRange(1), default=4096, show_default=True, help="K where t(K) starts to grow."
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--spread",
    type=click.FloatRange(0),
    default=0.35,
    show_default=True,
    help="Shape (sigma) of the log-normal epochs: 0.6 resembles what campaigns at the spec's 1e-4 met.",
)
def bench_simulate_command(
    curve: str,
    networks: int,
    machines: str,
    workers: int,
    width: int,
    gpu_epoch_seconds: float,
    gpu_knee: int,
    seed: int,
    spread: float,
) -> None:
    """Fixed against continuous stacks on a step-time curve, with the reference study's epochs."""
    names = [m.strip() for m in machines.split(",") if m.strip()]
    unknown = [m for m in names if m not in REFERENCE_EPOCHS]
    if unknown or not names:
        raise click.BadParameter(f"unknown machines {unknown}; expected some of {list(REFERENCE_EPOCHS)}")
    step = StepCurve(curve, gpu_epoch_seconds, gpu_knee)
    drawn = draw_epochs(names, networks, seed, spread)
    epochs = [e for _, e in drawn]
    click.echo(
        f"simulated: {networks} networks ({', '.join(names)}; {sum(epochs) / len(epochs):.0f} ds1 epochs of work on "
        f"average, spread {spread:g}), "
        f"{workers} worker(s), S={width}, {curve} curve: t(1)={step(1):.3f} s, t(S)={step(width):.3f} s per epoch"
    )
    header = f"{'way':<14}{'hours':>10}{'networks/h':>12}{'x one':>8}{'occupancy':>11}{'tail 90-100% h':>16}"
    click.echo(header)
    click.echo("-" * len(header))
    base = None
    for way in ("one", "fixed", "continuous"):
        out = simulate(epochs, workers, width, step, way)
        rate = networks / out.makespan * 3600
        base = base or rate
        occupancy = out.busy / out.capacity if out.capacity else 0.0
        click.echo(
            f"{way:<14}{out.makespan / 3600:>10,.2f}{rate:>12,.1f}{rate / base:>8.2f}{occupancy:>11.1%}"
            f"{out.tail / 3600:>16,.3f}"
        )
