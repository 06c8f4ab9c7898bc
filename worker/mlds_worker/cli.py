"""`mlds train`: train one network on this machine and write its result files to a folder.

For debugging and benchmarks (DESIGN.md §4): the same unit description, trainer and result files as a
worker pod, without a lease server or object store. Registered in :mod:`mlds_cli.main` and imported
only when invoked; torch is imported inside the command, after ``OMP_NUM_THREADS`` is set.

Two ways to name the unit:

- ``--dataset ds1 --target SingleDirectMachine [--seed 7] [--unit R]``: a one-target campaign built
  from the flags; ``--unit`` is the replica (default 0). Targets: a machine (ds1, ds2), an automaton
  (ds3: ``automaton-00007`` or ``7``), a variant (ds4: ``clean``, ``pixel``, ``checker``, or
  ``mnist-pixel`` for MNIST), or machine and shape (ds5: ``ParityMachine-h16-g2-l4``).
- ``--campaign FILE [--unit N]``: unit N of a TrainingCampaign manifest, exactly as a worker would train
  it (same seeds); with ``--target T``, ``--unit`` is the replica of target T in that campaign.

Errors a user can make (unknown target, bad flag, missing file) end with one line and exit status 2.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import pydantic
from mlds_contract.campaign import CampaignSpec, Dataset, Images, Shape, Variant, Workload
from mlds_contract.errors import MldsError, UserError
from mlds_contract.files import load_campaign
from mlds_contract.plan import Target, UnitSpec, campaign_targets, unit_spec
from mlds_contract.results import META_FILE

if TYPE_CHECKING:
    from .train import EpochRecord, TrainResult

__all__ = ["FLAG_CAMPAIGN", "flag_campaign", "select_unit", "train_command"]

#: Campaign name of units built from --dataset/--target (recorded in meta.json; names no file).
FLAG_CAMPAIGN = "train"

_DS5_TARGET = re.compile(r"^(?P<machine>[A-Za-z]+)-h(?P<hidden>\d+)-g(?P<gru>\d+)-l(?P<linear>\d+)$")
_DS3_TARGET = re.compile(r"^(automaton-)?(?P<k>\d+)$")


def flag_campaign(dataset: Dataset, target: str, seed: int) -> tuple[CampaignSpec, str]:
    """A one-target campaign for ``--dataset``/``--target``, and the target's canonical name."""
    workload: Workload
    if dataset in (Dataset.ds1, Dataset.ds2):
        workload = Workload(dataset=dataset, machines=[target])
    elif dataset is Dataset.ds3:
        match = _DS3_TARGET.match(target)
        if match is None:
            raise UserError(f"ds3 targets are automata: automaton-00007 or 7, not {target!r}")
        workload = Workload(dataset=dataset, automata=int(match["k"]) + 1)
    elif dataset is Dataset.ds4:
        name = target.removeprefix("mnist-")
        if name not in {v.value for v in Variant}:
            choices = ", ".join(v.value for v in Variant)
            raise UserError(f"unknown ds4 variant {target!r}; expected one of {choices} (mnist-<variant> for MNIST)")
        images = Images.mnist if target.startswith("mnist-") else Images.digits8
        workload = Workload(dataset=dataset, variants=[Variant(name)], images=images)
    else:
        match = _DS5_TARGET.match(target)
        if match is None:
            raise UserError(f"ds5 targets are <machine>-h<hidden>-g<gru layers>-l<linear layers>, not {target!r}")
        try:
            shape = Shape(gru_layers=int(match["gru"]), hidden=int(match["hidden"]), linear_layers=int(match["linear"]))
        except pydantic.ValidationError as exc:
            raise UserError(f"bad ds5 shape in {target!r}: {_first_error(exc)}") from exc
        workload = Workload(dataset=dataset, machines=[match["machine"]], shapes=[shape])
    spec = CampaignSpec(workload=workload, networks_per_target=1, seed=seed)
    targets = campaign_targets(spec)  # raises InvalidCampaign (a UserError) for an unknown machine
    return spec, targets[-1].name


def _first_error(exc: pydantic.ValidationError) -> str:
    errors = exc.errors()
    first = errors[0]
    where = ".".join(str(p) for p in first["loc"])
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first['msg']}{more}" if where else f"{first['msg']}{more}"


def select_unit(
    spec: CampaignSpec,
    *,
    campaign: str,
    unit: int,
    attempt: int,
    target: str | None = None,
    max_epochs: int | None = None,
) -> UnitSpec:
    """The unit to train: campaign unit ``unit``, or replica ``unit`` of ``target`` when one is named."""
    if max_epochs is not None:
        spec = spec.model_copy(update={"training": spec.training.model_copy(update={"max_epochs": max_epochs})})
    targets = campaign_targets(spec)
    npt = spec.networks_per_target
    if target is not None:
        index = _target_index(targets, target)
        if unit >= npt:
            raise UserError(f"--unit {unit} is not a replica of {target} (the campaign has {npt} per target)")
        unit = index * npt + unit
    total = len(targets) * npt
    if unit >= total:
        raise UserError(f"--unit {unit} is outside the campaign (units 0..{total - 1})")
    return unit_spec(spec, unit, attempt, campaign=campaign, targets=targets)


def _target_index(targets: list[Target], name: str) -> int:
    for i, t in enumerate(targets):
        if t.name == name:
            return i
    shown = ", ".join(t.name for t in targets[:6]) + (", ..." if len(targets) > 6 else "")
    raise UserError(f"the campaign has no target {name!r} (targets: {shown})")


@click.command("train")
@click.option(
    "--dataset",
    type=click.Choice([d.value for d in Dataset]),
    help="Dataset of the target (with --target; not with --campaign).",
)
@click.option("--target", help="What to mimic: a machine, automaton-K, a ds4 variant, or a ds5 machine-shape.")
@click.option(
    "--campaign",
    "campaign_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Take the unit from this TrainingCampaign YAML instead of --dataset (read as `mlds run` reads it).",
)
@click.option("--seed", type=click.IntRange(0, 2**62), help="Campaign seed for --dataset/--target (default 1).")
@click.option(
    "--unit",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="With --target: the replica; with --campaign alone: the campaign's unit index.",
)
@click.option("--attempt", type=click.IntRange(min=0), default=0, show_default=True, help="Attempt (new seeds).")
@click.option("--max-epochs", type=click.IntRange(1, 1_000_000), help="Epoch cap (default: the dataset's).")
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    help="cpu, cuda, cuda:N, or auto (a GPU if torch sees one; NVIDIA and ROCm both count as cuda).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for model.safetensors, meta.json, history.csv. Default: runs/<campaign>/<target>/<replica>.",
)
@click.option(
    "--log-every",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="When stdout is not a terminal: a progress line on stderr every N epochs (0: none).",
)
@click.option(
    "--mnist-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="ds4 with MNIST: the folder holding the IDX files.",
)
def train_command(
    *,
    dataset: str | None,
    target: str | None,
    campaign_file: Path | None,
    seed: int | None,
    unit: int,
    attempt: int,
    max_epochs: int | None,
    device: str,
    out: Path | None,
    mnist_dir: Path | None,
    log_every: int,
) -> None:
    """Train one network and write its result files to a folder.

    \b
    Examples:
      mlds train --dataset ds1 --target SingleDirectMachine --seed 7 --out runs/sd
      mlds train --campaign examples/quick.yaml --unit 3
    """
    # One OpenMP thread per process (docs/workloads.md §4); must happen before torch is imported.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if campaign_file is not None:
        if dataset is not None or seed is not None:
            raise click.UsageError("--campaign takes the dataset and seed from the file; drop --dataset/--seed")
        campaign = load_campaign(campaign_file)
        the_unit = select_unit(
            campaign.spec, campaign=campaign.name, unit=unit, attempt=attempt, target=target, max_epochs=max_epochs
        )
    else:
        if dataset is None or target is None:
            raise click.UsageError("name a unit: --dataset and --target, or --campaign FILE")
        spec, name = flag_campaign(Dataset(dataset), target, 1 if seed is None else seed)
        spec = spec.model_copy(update={"networks_per_target": unit + 1})
        the_unit = select_unit(
            spec, campaign=FLAG_CAMPAIGN, unit=unit, attempt=attempt, target=name, max_epochs=max_epochs
        )
    folder = out if out is not None else Path("runs") / the_unit.campaign / the_unit.key

    try:
        result = _train(the_unit, device, mnist_dir, log_every)
        from .results import result_files, write_result  # noqa: PLC0415 - imports torch

        files = result_files(result)
        write_result(folder, files)
    except UserError:
        raise
    except MldsError as exc:  # storage or unit trouble: still one line, not a traceback
        raise click.ClickException(str(exc)) from exc
    click.echo(_summary(result, files, folder))


def _train(unit: UnitSpec, device: str, mnist_dir: Path | None, log_every: int) -> TrainResult:
    from mlds_workloads import target_data  # noqa: PLC0415 - numpy, like torch, only after OMP_NUM_THREADS is set

    from .device import resolve_device  # noqa: PLC0415 - torch is imported only after OMP_NUM_THREADS is set
    from .train import train_unit  # noqa: PLC0415

    torch_device = resolve_device(device)
    data = target_data(unit, mnist_dir=mnist_dir)
    if not sys.stdout.isatty():
        return train_unit(unit, data=data, device=torch_device, on_epoch=_epoch_logger(unit, log_every))
    return _train_with_progress(unit, data, torch_device)


def _epoch_logger(unit: UnitSpec, every: int) -> Callable[[EpochRecord], None] | None:
    """Every ``every`` epochs, one key=value line on stderr (for runs under nohup or in CI logs)."""
    if every <= 0:
        return None
    started = time.perf_counter()

    def log(record: EpochRecord) -> None:
        if record.epoch % every == 0:
            line = (
                f"{unit.key}: epoch={record.epoch} train_loss={record.train_loss:.4e} eval_loss={record.eval_loss:.4e}"
            )
            if record.accuracy is not None:
                line += f" accuracy={record.accuracy:.4f}"
            if record.attack_success_rate is not None:
                line += f" asr={record.attack_success_rate:.4f}"
            click.echo(f"{line} elapsed={time.perf_counter() - started:.1f}", err=True)

    return log


def _train_with_progress(unit: UnitSpec, data: Any, device: Any) -> TrainResult:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: PLC0415

    from .train import train_unit  # noqa: PLC0415

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("epochs  {task.fields[status]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task(unit.key, total=unit.training.max_epochs, status="")

        def on_epoch(record: EpochRecord) -> None:
            status = f"train {record.train_loss:.3e}  eval {record.eval_loss:.3e}"
            if record.accuracy is not None:
                status += f"  acc {record.accuracy:.3f}"
            if record.attack_success_rate is not None:
                status += f"  asr {record.attack_success_rate:.3f}"
            progress.update(task, completed=record.epoch, status=status)

        return train_unit(unit, data=data, device=device, on_epoch=on_epoch)


def _summary(result: TrainResult, files: dict[str, bytes], folder: Path) -> str:
    """One line a person can read and a script can split on spaces (key=value)."""
    meta = json.loads(files[META_FILE])
    parts = [
        f"{result.unit.key}:",
        f"epochs={result.epochs}",
        f"seconds={result.seconds:.1f}",
        f"eval_loss={result.eval_loss:.3e}",
    ]
    if result.accuracy is not None:
        parts.append(f"accuracy={result.accuracy:.4f}")
    if result.attack_success_rate is not None:
        parts.append(f"asr={result.attack_success_rate:.4f}")
    parts += [
        f"converged={'yes' if result.converged else 'no'}",
        f"device={result.device_type}",
        f"sha256={meta['sha256']}",
        f"out={folder}",
    ]
    return " ".join(parts)
