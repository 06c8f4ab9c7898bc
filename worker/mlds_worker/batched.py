"""The batched trainer: the K units of a lease trained together as one model (issue 7).

Called by the worker's lease loop (:mod:`mlds_worker.loop`) for leases of more than one unit, and by
`mlds bench train`. One tiny network per process is mostly per-operation overhead; K networks whose
weights are stacked along a leading dimension (:mod:`mlds_worker.batched_nets`) cost barely more per
operation than one, so K of them train in a fraction of K times one's time.

Every member is trained exactly as :func:`mlds_worker.train.train_unit` would train it alone: initial
weights from its ``init_seed`` (the plain module is built under that seed and copied into the stack),
its own data (members may have different targets), its own batch order (a generator seeded from its
``sgd_seed``, one permutation per epoch), its own loss (the stack's loss is the sum of the members'
mean losses, so each member's gradient is its own loss's gradient), its own optimizer state (Adam and
SGD are elementwise, so one optimizer over the stacked tensors is K optimizers whose step counts
agree), its own evaluation after every epoch and its own stopping rule, epoch cap and history. A
member that stops (converged, capped, diverged, or abandoned through ``should_stop``) is removed by
re-packing every stacked tensor and the optimizer state; the others carry on untouched (masking would
keep the stopped member's weights moving with Adam's momentum, and keep paying for it).

Equivalence (tests/unit/test_batched.py): on the CPU, a GRU-family member's weights, losses and
convergence epoch are **bit-identical** to ``train_unit``'s for the same unit, whatever the other
members; ds4 members agree to float rounding (grouped convolutions sum in another order). Across
devices, as for ``train_unit``, results agree by criterion.

Grouping: one model holds members of the same architecture and shape, the same data sizes, batch size
and learning rate (the optimizer has one learning rate). :func:`train_batch` splits its units into such
groups (:func:`batch_groups`) and trains one group after the other; results come back in the order of
the units.

Timing: an epoch's ``seconds`` in a member's history is its share of the stack's epoch (the stack's
wall time divided by the members it trained that epoch), so that the sum over all networks is the
machine time they took; ``TrainResult.seconds`` sums those shares.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import cast

import torch
from mlds_contract.campaign import Dataset
from mlds_contract.plan import UnitSpec

from .device import describe_device
from .families import (
    BatchData,
    Family,
    ImageFamily,
    Member,
    SequenceFamily,
    group_key,
    member_result,
    resolve_data,
)
from .train import (
    EpochRecord,
    ImageArrays,
    SequenceArrays,
    TrainResult,
    train_unit,
)

__all__ = ["BatchData", "batch_groups", "train_batch"]


def train_batch(
    units: Sequence[UnitSpec],
    *,
    device: str | torch.device = "cpu",
    on_epoch: Callable[[int, EpochRecord], None] | None = None,
    should_stop: Callable[[int], bool] | None = None,
    on_result: Callable[[int, TrainResult], None] | None = None,
    data: BatchData = None,
    snapshots: bool | None = None,
    min_stack: int = 2,
) -> list[TrainResult | None]:
    """Train ``units`` together; result ``i`` is what ``train_unit(units[i])`` returns, or ``None``.

    ``on_epoch(i, record)`` is called after every epoch of every member, ``i`` being the member's index
    in ``units``; an exception it raises aborts the whole call and propagates. ``should_stop(i)`` is
    asked before every epoch of every member still training: ``True`` abandons member ``i`` (its result
    is ``None``; e.g. the unit was cancelled) without disturbing the others. ``on_result(i, result)`` is
    called as soon as member ``i`` is done (converged, capped or diverged), while the others may still
    be training: a caller can deliver it at once. ``data`` and ``snapshots``
    are as for :func:`~mlds_worker.train.train_unit` (``data`` may also be one data set per unit).
    Units of different architectures, shapes, data sizes, batch sizes or learning rates are trained as
    separate stacks, one after the other (:func:`batch_groups`); a group of fewer than ``min_stack``
    units is trained one unit at a time with ``train_unit`` (same result; ``nn.GRU``'s C++ loop is
    faster than a stack of one). Data of the wrong shape raises
    :class:`~mlds_contract.errors.UnitError`, as ``train_unit`` does.
    """
    units = list(units)
    arrays = resolve_data(units, data)
    torch_device = torch.device(device)
    if torch_device.type == "cpu":
        # One intra-op thread per process (docs/workloads.md §4): faster for these tiny networks, and deterministic.
        torch.set_num_threads(1)
    results: list[TrainResult | None] = [None] * len(units)
    for group in batch_groups(units, arrays):
        if len(group) < min_stack:
            for i in group:
                results[i] = _train_alone(i, units[i], arrays[i], torch_device, on_epoch, should_stop, snapshots)
                if on_result is not None and results[i] is not None:
                    on_result(i, cast(TrainResult, results[i]))
            continue
        _train_group(
            [units[i] for i in group],
            [arrays[i] for i in group],
            group,
            torch_device,
            results,
            on_epoch=on_epoch,
            should_stop=should_stop,
            on_result=on_result,
            snapshots=snapshots,
        )
    return results


def batch_groups(
    units: Sequence[UnitSpec], arrays: Sequence[SequenceArrays | ImageArrays] | None = None
) -> list[list[int]]:
    """Indices of ``units`` that can share one stacked model, in order of first appearance.

    Members of a group have the same architecture and shape (GRU shape, or ds4 image size), the same
    data sizes (training, evaluation, sequence length, attack-success set), batch size and learning
    rate. ``arrays`` (one per unit) defaults to every unit's target data.
    """
    if arrays is None:
        arrays = resolve_data(list(units), None)
    groups: dict[tuple[object, ...], list[int]] = {}
    for i, (unit, data) in enumerate(zip(units, arrays, strict=True)):
        groups.setdefault(group_key(unit, data), []).append(i)
    return list(groups.values())


# ------------------------------------------------------------------------------------------ one group


class _Abandoned(Exception):
    """Raised through ``train_unit``'s ``on_epoch`` when ``should_stop`` abandons a lone unit."""


def _train_alone(
    index: int,
    unit: UnitSpec,
    data: SequenceArrays | ImageArrays,
    device: torch.device,
    on_epoch: Callable[[int, EpochRecord], None] | None,
    should_stop: Callable[[int], bool] | None,
    snapshots: bool | None,
) -> TrainResult | None:
    if should_stop is not None and should_stop(index):
        return None

    def each_epoch(record: EpochRecord) -> None:
        if on_epoch is not None:
            on_epoch(index, record)
        if should_stop is not None and should_stop(index):
            raise _Abandoned

    try:
        return train_unit(unit, data=data, device=device, on_epoch=each_epoch, snapshots=snapshots)
    except _Abandoned:
        return None


def _train_group(
    units: list[UnitSpec],
    arrays: list[SequenceArrays | ImageArrays],
    indices: list[int],
    device: torch.device,
    results: list[TrainResult | None],
    *,
    on_epoch: Callable[[int, EpochRecord], None] | None,
    should_stop: Callable[[int], bool] | None,
    on_result: Callable[[int, TrainResult], None] | None,
    snapshots: bool | None,
) -> None:
    info = describe_device(device)
    family: Family
    if units[0].dataset is Dataset.ds4:
        family = ImageFamily(units, [cast(ImageArrays, a) for a in arrays], device)
    else:
        family = SequenceFamily(units, [cast(SequenceArrays, a) for a in arrays], device)
    members = [
        Member(i, u, a, (u.dataset is Dataset.ds3) if snapshots is None else snapshots, [], [])
        for i, u, a in zip(indices, units, arrays, strict=True)
    ]
    parameters = family.net.member_parameters()
    started = datetime.now(UTC)
    epoch = 0
    while members:
        if should_stop is not None:
            stay = [j for j, m in enumerate(members) if not should_stop(m.index)]
            if len(stay) < len(members):
                members = _keep(family, members, stay)
                if not members:
                    return
        epoch += 1
        tick = time.perf_counter()
        losses = family.train_epoch()
        records = family.evaluate(epoch, losses)
        share = (time.perf_counter() - tick) / len(members)
        frames = family.net.flat().to("cpu") if any(m.snapshots for m in members) else None
        stay = []
        for j, (member, record) in enumerate(zip(members, records, strict=True)):
            record.seconds = share
            member.history.append(record)
            if member.snapshots and frames is not None:
                member.frames.append(frames[j].clone())
            if on_epoch is not None:
                on_epoch(member.index, record)
            converged = family.done(j, record)
            diverged = not math.isfinite(record.train_loss + record.eval_loss)
            if converged or diverged or epoch >= member.unit.training.max_epochs:
                result = member_result(member, family, j, converged, started, info, parameters)
                results[member.index] = result
                if on_result is not None:
                    on_result(member.index, result)
            else:
                stay.append(j)
        members = _keep(family, members, stay)


def _keep(family: Family, members: list[Member], stay: list[int]) -> list[Member]:
    """Members at positions ``stay`` carry on; the stack drops the others (when any are left)."""
    if len(stay) < len(members) and stay:
        family.keep(stay)
    return [members[j] for j in stay]
