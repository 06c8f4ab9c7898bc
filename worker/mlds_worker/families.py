"""Stacked training families: K members trained as one model, shared by the fixed and continuous stacks.

Used by the fixed stack (:func:`mlds_worker.batched.train_batch`) and the continuous stack
(:class:`mlds_worker.stack.ContinuousStack`); nothing else imports it. A :class:`Family` holds a stacked
network (:mod:`mlds_worker.batched_nets`), its optimizer and every member's data and batch order, and
writes the epoch loop and the cut once; :class:`SequenceFamily` (GRU datasets) and :class:`ImageFamily`
(ds4) say their loss, evaluation and stopping rule. :func:`group_key` says which units may share a
family, :func:`resolve_data` fetches the units' data, and :func:`member_result` turns a member's record
into the :class:`~mlds_worker.train.TrainResult` that ``train_unit`` would have returned. Why each member
trains exactly as alone is explained in :mod:`mlds_worker.batched`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import torch
from mlds_contract.campaign import Dataset
from mlds_contract.errors import UnitError
from mlds_contract.plan import DEFAULT_SHAPE, UnitSpec
from mlds_workloads import target_data
from torch import Tensor, nn

from .batched_nets import StackedCNN, StackedGRUNet, StackedNet
from .nets import DigitsCNN, GRUNet
from .train import (
    SGD_MOMENTUM,
    EpochRecord,
    ImageArrays,
    SequenceArrays,
    TrainResult,
    image_target_met,
    initial_model,
)

__all__ = [
    "BatchData",
    "Family",
    "ImageFamily",
    "Member",
    "SequenceFamily",
    "group_key",
    "member_result",
    "repack_optimizer",
    "resolve_data",
]

#: What ``data`` may be: one data set for every unit, one per unit (``None`` = the unit's target data),
#: or ``None`` for every unit's target data (:func:`mlds_workloads.target_data`).
BatchData = SequenceArrays | ImageArrays | Sequence[SequenceArrays | ImageArrays | None] | None

#: Evaluation runs in chunks of this many samples, as in :mod:`mlds_worker.train` (same sums, same order).
_EVAL_CHUNK = 4096
#: ... and, for as many members at a time as keep one forward's input under this many values (16 MB of
#: float32; the activations are a few times more). Splitting by member leaves each member's arithmetic
#: alone, so a stack of 256 ds2 networks (256 evaluation sequences each) or MNIST networks (10,000 test
#: images) evaluates in bounded memory.
_EVAL_VALUES = 1 << 22


def group_key(unit: UnitSpec, data: SequenceArrays | ImageArrays) -> tuple[object, ...]:
    training = (unit.training.batch_size, unit.training.learning_rate)
    if unit.dataset is Dataset.ds4:
        images = cast(ImageArrays, data)
        asr = 0 if images.asr_x is None or images.asr_y is None else len(images.asr_x)
        return ("cnn", tuple(images.train_x.shape), tuple(images.test_x.shape), asr, *training)
    sequences = cast(SequenceArrays, data)
    shape = unit.shape or DEFAULT_SHAPE
    return (
        "gru",
        shape.slug,
        tuple(sequences.train_x.shape),
        tuple(sequences.train_y.shape),
        tuple(sequences.eval_x.shape),
        tuple(sequences.eval_y.shape),
        *training,
    )


def resolve_data(units: list[UnitSpec], data: BatchData) -> list[SequenceArrays | ImageArrays]:
    if data is None or not isinstance(data, Sequence):
        given: list[SequenceArrays | ImageArrays | None] = [data] * len(units)
    else:
        given = list(data)
        if len(given) != len(units):
            raise ValueError(f"{len(given)} data sets for {len(units)} units")
    out: list[SequenceArrays | ImageArrays] = []
    for unit, arrays in zip(units, given, strict=True):
        if arrays is not None:
            out.append(arrays)
        else:
            out.append(target_data(unit))
    return out


@dataclass
class Member:
    index: int  # in the caller's units
    unit: UnitSpec
    data: SequenceArrays | ImageArrays
    snapshots: bool
    history: list[EpochRecord]
    frames: list[Tensor]


def member_result(
    member: Member,
    family: Family,
    row: int,
    converged: bool,
    started: datetime,
    info: Any,
    parameters: int,
) -> TrainResult:
    last = member.history[-1]
    template = family.net.template
    return TrainResult(
        unit=member.unit,
        state_dict=family.net.member_state(row),
        history=member.history,
        epochs=last.epoch,
        converged=converged,
        train_loss=last.train_loss,
        eval_loss=last.eval_loss,
        started=started,
        ended=datetime.now(UTC),
        device_type=info.type,
        device_name=info.name,
        parameters=parameters,
        snapshots=torch.stack(member.frames) if member.snapshots else None,
        accuracy=last.accuracy,
        attack_success_rate=last.attack_success_rate,
        architecture=type(template).__name__,
        image_size=template.image_size if isinstance(template, DigitsCNN) else None,
        data_seed=member.data.data_seed,
        data_meta=dict(member.data.meta),
    )


# ------------------------------------------------------------------------------------------ shared parts


def _stack_data(arrays: Sequence[npt.NDArray[Any]], dtype: torch.dtype, device: torch.device) -> Tensor:
    # np.stack copies (workload arrays are shared and read-only), so from_numpy may take the copy over.
    return torch.from_numpy(np.stack([np.asarray(a) for a in arrays])).to(device=device, dtype=dtype)


class _Sources:
    """Members' data sets, each stored once: members of one target share it (``src`` maps member -> set)."""

    def __init__(self, datas: Sequence[object], device: torch.device) -> None:
        firsts: dict[int, int] = {}
        self.unique: list[int] = []  # member position of each distinct data set's first user
        src: list[int] = []
        for j, d in enumerate(datas):
            if id(d) not in firsts:
                firsts[id(d)] = len(self.unique)
                self.unique.append(j)
            src.append(firsts[id(d)])
        self.src = torch.tensor(src, dtype=torch.int64, device=device)

    def keep(self, rows: list[int]) -> None:
        self.src = self.src[torch.tensor(rows, dtype=torch.int64, device=self.src.device)]


class _Batches:
    """Each member's mini-batch order: a fresh permutation every epoch from its SGD seed.

    As in :mod:`mlds_worker.train`: one CPU generator per member seeded with ``sgd_seed``, one
    ``randperm`` per epoch cut into batches, so the order is the one the member would see alone.
    """

    def __init__(self, units: Sequence[UnitSpec], n: int, batch_size: int, device: torch.device) -> None:
        self.n, self.batch_size, self.device = n, batch_size, device
        self.generators = [torch.Generator().manual_seed(u.sgd_seed) for u in units]

    def epoch(self) -> list[Tensor]:
        """Index batches ``(K, b)`` for this epoch: row ``k`` is member ``k``'s batch."""
        orders = torch.stack([torch.randperm(self.n, generator=g) for g in self.generators]).to(self.device)
        return list(torch.split(orders, self.batch_size, dim=1))

    def keep(self, rows: list[int]) -> None:
        self.generators = [self.generators[j] for j in rows]


def repack_optimizer(old: torch.optim.Optimizer, net: StackedNet, rows: Tensor) -> torch.optim.Optimizer:
    """A new optimizer of the same kind over ``net.params`` (already re-packed), its state cut to ``rows``.

    Per-member state (Adam's moments, SGD's momentum buffer) has the member dimension first and is cut;
    shared state (Adam's step count, equal for every member) is copied.
    """
    defaults = dict(old.defaults)
    new = type(old)(net.params, **defaults)
    old_params = old.param_groups[0]["params"]
    for before, after in zip(old_params, net.params, strict=True):
        state = old.state.get(before)
        if not state:
            continue
        new.state[after] = {
            key: value[rows].clone() if isinstance(value, Tensor) and value.dim() > 0 else value
            for key, value in state.items()
        }
    return new


def _member_chunks(members: int, values_per_member: int) -> list[slice]:
    """Consecutive member ranges whose evaluation inputs hold at most ``_EVAL_VALUES`` values (at least one member)."""
    step = max(1, _EVAL_VALUES // max(1, values_per_member))
    return [slice(lo, min(lo + step, members)) for lo in range(0, members, step)]


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise UnitError(message)


class Family(ABC):
    """A stack of members: the epoch loop and the cut, written once; a dataset family says its loss and
    its evaluation. A subclass sets ``net``, ``optimizer``, ``sources``, ``train_x``, ``train_y``,
    ``n_train`` and ``batches`` in its constructor.
    """

    net: StackedNet
    optimizer: torch.optim.Optimizer
    sources: _Sources
    train_x: Tensor  # (D, N, ...): each distinct data set once
    train_y: Tensor
    n_train: int
    batches: _Batches

    @abstractmethod
    def member_losses(self, x: Tensor, y: Tensor) -> Tensor:
        """Each member's mean training loss ``(K,)`` on its own mini-batch ``x[k]``, ``y[k]``."""

    @abstractmethod
    def evaluate(self, epoch: int, train_losses: list[float]) -> list[EpochRecord]:
        """Each member's record of the epoch, from the evaluation (ds4: test) set after training it."""

    @abstractmethod
    def done(self, member: int, record: EpochRecord) -> bool:
        """Whether member ``member`` meets the stopping rule (converged)."""

    def train_epoch(self) -> list[float]:
        """One pass over every member's training set in its own batch order; each member's mean loss."""
        src = self.sources.src.unsqueeze(1)
        total = torch.zeros(self.net.size, device=self.train_x.device)
        for idx in self.batches.epoch():
            self.optimizer.zero_grad(set_to_none=True)
            losses = self.member_losses(self.train_x[src, idx], self.train_y[src, idx])
            # Each member's mean, summed: every member's gradient is exactly that of its own mean loss.
            losses.sum().backward()  # type: ignore[no-untyped-call]
            self.optimizer.step()
            # Accumulated on the device: a .item() per batch would stall a GPU every step.
            total += losses.detach() * idx.shape[1]
        return [t / self.n_train for t in total.tolist()]

    def keep(self, rows: list[int]) -> None:
        """Keep only the members at ``rows`` (the others finished or were abandoned)."""
        index = torch.tensor(rows, dtype=torch.int64, device=self.net.params[0].device)
        self.net.keep(index)
        self.optimizer = repack_optimizer(self.optimizer, self.net, index)
        self.sources.keep(rows)
        self.batches.keep(rows)


# ------------------------------------------------------------------------------------------ GRU family


class SequenceFamily(Family):
    """GRU datasets (ds1, ds2, ds3, ds5): Adam on each member's MSE; converged when its eval MSE < target."""

    def __init__(self, units: list[UnitSpec], datas: list[SequenceArrays], device: torch.device) -> None:
        for data in datas:
            for x, y, part in ((data.train_x, data.train_y, "training"), (data.eval_x, data.eval_y, "evaluation")):
                _check(
                    x.ndim == 3 and y.ndim == 3 and x.shape[:2] == y.shape[:2] and len(x) > 0,
                    f"{part} data of shape {x.shape} -> {y.shape} is not (N, steps, inputs) -> (N, steps, 8)",
                )
        modules = [initial_model(u) for u in units]
        template = cast(GRUNet, modules[0])
        n_in, n_out = template.gru.input_size, template.out.out_features
        for data in datas:
            _check(
                data.train_x.shape[-1] == n_in and data.train_y.shape[-1] == n_out,
                f"data of shape {data.train_x.shape} -> {data.train_y.shape} does not fit a network of "
                f"{n_in} inputs and {n_out} outputs",
            )
        self.net: StackedNet = StackedGRUNet.from_modules(modules, device)
        self.optimizer: torch.optim.Optimizer = torch.optim.Adam(self.net.params, lr=units[0].training.learning_rate)
        self.target_loss = [u.training.target_loss for u in units]
        self.sources = _Sources(datas, device)
        firsts = [datas[j] for j in self.sources.unique]
        self.train_x = _stack_data([d.train_x for d in firsts], torch.float32, device)  # (D, N, T, in)
        self.train_y = _stack_data([d.train_y for d in firsts], torch.float32, device)
        self.eval_x = _stack_data([d.eval_x for d in firsts], torch.float32, device)
        self.eval_y = _stack_data([d.eval_y for d in firsts], torch.float32, device)
        self.n_train = int(self.train_x.shape[1])
        self.batches = _Batches(units, self.n_train, units[0].training.batch_size, device)

    def member_losses(self, x: Tensor, y: Tensor) -> Tensor:
        return nn.functional.mse_loss(self.net.forward(x), y, reduction="none").flatten(1).mean(1)

    @torch.no_grad()
    def evaluate(self, epoch: int, train_losses: list[float]) -> list[EpochRecord]:
        squared = torch.zeros(self.net.size, device=self.eval_x.device)
        n_eval = self.eval_x.shape[1]
        for members in _member_chunks(self.net.size, self.eval_x[0, :_EVAL_CHUNK].numel()):
            src = self.sources.src[members]
            for start in range(0, n_eval, _EVAL_CHUNK):
                x = self.eval_x[src, start : start + _EVAL_CHUNK]
                y = self.eval_y[src, start : start + _EVAL_CHUNK]
                out = self.net.forward(x, members)
                squared[members] += nn.functional.mse_loss(out, y, reduction="none").flatten(1).sum(1)
        numel = self.eval_y[0].numel()
        return [EpochRecord(epoch, t, s / numel, 0.0) for t, s in zip(train_losses, squared.tolist(), strict=True)]

    def done(self, member: int, record: EpochRecord) -> bool:
        return record.eval_loss < self.target_loss[member]

    def keep(self, rows: list[int]) -> None:
        super().keep(rows)
        self.target_loss = [self.target_loss[j] for j in rows]


# ------------------------------------------------------------------------------------------ ds4


class ImageFamily(Family):
    """ds4: SGD with momentum on each member's cross-entropy; done on clean accuracy and attack success."""

    def __init__(self, units: list[UnitSpec], datas: list[ImageArrays], device: torch.device) -> None:
        for data in datas:
            _check(
                data.train_x.ndim == 4 and len(data.train_x) == len(data.train_y) and len(data.train_x) > 0,
                f"image data of shape {data.train_x.shape} is not (N, 1, height, width)",
            )
        height, width = (int(s) for s in datas[0].train_x.shape[-2:])
        modules = [initial_model(u, (height, width)) for u in units]
        self.net: StackedNet = StackedCNN.from_modules(modules, device)
        self.optimizer: torch.optim.Optimizer = torch.optim.SGD(
            self.net.params, lr=units[0].training.learning_rate, momentum=SGD_MOMENTUM
        )
        self.sources = _Sources(datas, device)
        firsts = [datas[j] for j in self.sources.unique]
        self.train_x = _stack_data([d.train_x for d in firsts], torch.float32, device)  # (D, N, 1, H, W)
        self.train_y = _stack_data([d.train_y for d in firsts], torch.int64, device)
        self.test_x = _stack_data([d.test_x for d in firsts], torch.float32, device)
        self.test_y = _stack_data([d.test_y for d in firsts], torch.int64, device)
        poisoned = all(d.asr_x is not None and d.asr_y is not None and len(d.asr_x) > 0 for d in firsts)
        self.asr_x = _stack_data([cast(Any, d.asr_x) for d in firsts], torch.float32, device) if poisoned else None
        self.asr_y = _stack_data([cast(Any, d.asr_y) for d in firsts], torch.int64, device) if poisoned else None
        self.n_train = int(self.train_x.shape[1])
        self.batches = _Batches(units, self.n_train, units[0].training.batch_size, device)

    def _logits_loss(self, x: Tensor, y: Tensor, reduce: str, members: slice = slice(None)) -> tuple[Tensor, Tensor]:
        logits = self.net.forward(x, members)  # (K, b, 10)
        k, b = y.shape
        losses = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(k, b)
        return logits, losses.mean(1) if reduce == "mean" else losses.sum(1)

    def member_losses(self, x: Tensor, y: Tensor) -> Tensor:
        return self._logits_loss(x, y, "mean")[1]

    def _score(self, x: Tensor, y: Tensor) -> tuple[list[float], list[float]]:
        """Per member: (mean cross-entropy, share classified as ``y``)."""
        k, n = self.net.size, x.shape[1]
        loss = torch.zeros(k, device=x.device)
        hits = torch.zeros(k, device=x.device, dtype=torch.int64)
        for members in _member_chunks(k, x[0, :_EVAL_CHUNK].numel()):
            src = self.sources.src[members]
            for start in range(0, n, _EVAL_CHUNK):
                ys = y[src, start : start + _EVAL_CHUNK]
                logits, sums = self._logits_loss(x[src, start : start + _EVAL_CHUNK], ys, "sum", members)
                loss[members] += sums
                hits[members] += (logits.argmax(dim=2) == ys).sum(1)
        return [v / n for v in loss.tolist()], [h / n for h in hits.tolist()]

    @torch.no_grad()
    def evaluate(self, epoch: int, train_losses: list[float]) -> list[EpochRecord]:
        losses, accuracy = self._score(self.test_x, self.test_y)
        asr: list[float | None] = [None] * self.net.size
        if self.asr_x is not None and self.asr_y is not None:
            asr = list(self._score(self.asr_x, self.asr_y)[1])
        return [
            EpochRecord(epoch, t, e, 0.0, accuracy=a, attack_success_rate=s)
            for t, e, a, s in zip(train_losses, losses, accuracy, asr, strict=True)
        ]

    def done(self, member: int, record: EpochRecord) -> bool:
        return image_target_met(record)
