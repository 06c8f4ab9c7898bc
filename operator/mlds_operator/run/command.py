"""The `mlds run` command line: read the file, pick the device, run, print the summary.

Registered in :data:`mlds_cli.main.COMMANDS` as ``run``. This module imports only click and the
contract, and :mod:`mlds_operator.run.runner` (aiohttp, the lease server, the store, pyarrow) only once
the campaign file has been judged valid: a mistake in the file is reported in well under a second.

Devices: a pool whose accelerator is ``nvidia`` or ``rocm`` trains on the GPUs torch sees here (one
worker per GPU by default; workers are spread over the GPUs in turn). With no GPU of that vendor
visible, `mlds run` refuses (exit 2) rather than silently train on the CPU; ``--device cpu`` trains such
a campaign on the CPU on purpose. Which device trains is printed once the campaign is open, before the
first lease.

Exit status: 0 when every network converged, 1 when some units failed, 2 for a mistake in the file or
the flags, 130 when interrupted (Ctrl-C or SIGTERM; progress is saved, run the same command to resume).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import click
from mlds_contract.campaign import Accelerator, TrainingCampaign
from mlds_contract.errors import TemporaryError, UserError
from mlds_contract.files import load_campaign

__all__ = ["DevicePlan", "plan_devices", "probe_devices", "run_command"]

#: Exit status of an interrupted run: 128 + SIGINT, as shells report a Ctrl-C.
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class DevicePlan:
    """Which device each worker trains on, and how to say it."""

    accelerator: Accelerator  # what the workers report as their pool's accelerator
    devices: tuple[str, ...]  # torch devices, handed out to workers in turn: ("cpu",) or ("cuda:0", "cuda:1")
    description: str  # "2 GPUs: cuda:0 NVIDIA H200, cuda:1 NVIDIA H200"


def probe_devices() -> dict[str, object]:
    """What torch sees on this machine, asked of a worker-side process so that `mlds run` imports no torch.

    Returns ``{"torch": version, "vendor": "nvidia" | "rocm", "gpus": [names], "cpu": name}``.
    """
    try:
        out = subprocess.run(
            [sys.executable, "-m", "mlds_worker.device"],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        ).stdout
        probe: dict[str, object] = json.loads(out)
    except (subprocess.SubprocessError, OSError, ValueError) as exc:
        raise UserError(f"cannot tell which devices torch sees here: {exc}") from exc
    return probe


def plan_devices(campaign: TrainingCampaign, device: str, probe: dict[str, object] | None) -> DevicePlan:
    """The device plan for ``--device`` (auto or cpu) and the campaign's first pool. Raises UserError."""
    pool = campaign.spec.pools[0]
    if device == "cpu" or (device == "auto" and pool.accelerator is Accelerator.cpu):
        cpu = str(probe.get("cpu", "")) if probe else ""
        return DevicePlan(Accelerator.cpu, ("cpu",), f"the CPU{f' ({cpu})' if cpu else ''}, one thread per worker")
    assert probe is not None
    listed = probe.get("gpus")
    gpus = [str(g) for g in listed] if isinstance(listed, list) else []
    vendor = str(probe.get("vendor"))
    wanted = pool.accelerator if pool.accelerator is not Accelerator.cpu else Accelerator(vendor)
    if not gpus:
        raise UserError(
            f"pool {pool.name!r} asks for {wanted.value} GPUs, but torch {probe.get('torch')} sees none here; "
            "run with --device cpu to train on the CPU instead"
        )
    if vendor != wanted.value:
        raise UserError(
            f"pool {pool.name!r} asks for {wanted.value} GPUs, but this torch build ({probe.get('torch')}) drives "
            f"{vendor} GPUs; run with --device cpu to train on the CPU instead"
        )
    devices = tuple(f"cuda:{i}" for i in range(len(gpus)))
    named = ", ".join(f"{d} {g}" for d, g in zip(devices, gpus, strict=True))
    return DevicePlan(wanted, devices, f"{len(gpus)} {wanted.value} GPU{'s' if len(gpus) > 1 else ''}: {named}")


@click.command("run")
# No exists=True: click's usage error spans four lines; load_campaign says "cannot read FILE: ..." in one.
@click.argument("campaign_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--workers",
    "-w",
    type=click.IntRange(1, 1024),
    default=None,
    help="Worker processes (default: one per CPU core; for a GPU pool, one per GPU).",
)
@click.option(
    "--store",
    "store_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Local folder for results (default: ./mlds-data/NAME). Ignored when the file has spec.storage.",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu"]),
    default="auto",
    show_default=True,
    help="auto: the pool's accelerator (a GPU pool trains on the GPUs torch sees, or refuses); "
    "cpu: train on the CPU whatever the pool says.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the lease API listens on.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Lease API port (default: the last run's, else a free one).",
)
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where the campaign's token is kept (default: in the state folder).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Serve Prometheus /metrics on this port (0: a free one, written to run.json). Default: none.",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress display.")
def run_command(
    campaign_file: Path,
    workers: int | None,
    store_dir: Path | None,
    device: str,
    host: str,
    port: int | None,
    token_file: Path | None,
    metrics_port: int | None,
    quiet: bool,
) -> None:
    """Run a campaign file on this machine; run it again to resume.

    Exit status: 0 all networks converged, 1 some units failed, 2 a mistake in the file or flags,
    130 interrupted (progress is saved).
    """
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
    campaign = load_campaign(campaign_file)
    gpu_pool = campaign.spec.pools[0].accelerator is not Accelerator.cpu
    plan = plan_devices(campaign, device, probe_devices() if gpu_pool and device == "auto" else None)
    n = workers or (len(plan.devices) if plan.accelerator is not Accelerator.cpu else os.cpu_count() or 1)

    from .runner import RunOptions, occupancy_lines, run_campaign  # noqa: PLC0415 - the server stack, only for a valid file

    opts = RunOptions(
        workers=n,
        store_dir=store_dir,
        host=host,
        port=port or None,
        token_file=token_file,
        metrics_port=metrics_port,
        progress=not quiet,
        devices=plan.devices,
        accelerator=plan.accelerator.value,
        announce=f"{campaign.name}: training on {plan.description}; {n} worker{'s' if n != 1 else ''}",
    )
    try:
        summary = asyncio.run(run_campaign(campaign, campaign_file, opts))
    except TemporaryError as exc:  # storage unreachable: one line, like any setup problem (exit 2)
        raise UserError(f"{exc} (run the same command again once it is reachable)") from exc
    s = summary.snapshot.stats
    if summary.interrupted:
        click.echo(
            f"{summary.name}: interrupted: {s.succeeded}/{s.total} networks saved"
            + (f", {s.failed} failed" if s.failed else "")
            + f"; run the same command again to resume\n  dataset: {summary.dataset}"
        )
        sys.exit(EXIT_INTERRUPTED)
    lines = [
        f"{summary.name}: {summary.snapshot.phase.value}: {s.succeeded}/{s.total} networks"
        + (f", {s.failed} failed (units {s.failed_units})" if s.failed else ""),
        f"  wall {summary.wall_seconds:,.1f} s with {summary.workers} worker{'s' if summary.workers != 1 else ''}; "
        f"training {summary.snapshot.training_seconds:,.1f} s"
        + (
            f"; overhead {summary.overhead:.1%} (worker time not spent training: start-up, data, uploads, idle)"
            if summary.overhead is not None
            else ""
        ),
        *occupancy_lines(summary.snapshot),
        f"  dataset: {summary.dataset}",
    ]
    if summary.manifest:
        lines.append(f"  manifest: {summary.manifest}")
    click.echo("\n".join(lines))
    if s.failed:
        sys.exit(1)
