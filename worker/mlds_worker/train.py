"""The deterministic trainer: one unit in, one trained network and its history out (docs/workloads.md §4, §6, §7).

Called by `mlds train` (:mod:`mlds_worker.cli`), by the worker's lease loop, and by benchmarks. It is
pure computation: it reads no files (the data comes from :mod:`mlds_workloads` or the caller)
and writes none (:mod:`mlds_worker.results` turns a :class:`TrainResult` into files).

GRU datasets (ds1, ds2, ds3, ds5): MSE over sequences x steps x outputs; Adam (default betas, no
weight decay); mini-batches reshuffled every epoch by a generator seeded from ``unit.sgd_seed``;
full-sequence BPTT; after every epoch the evaluation MSE is computed, and training stops as soon as it
is below ``target_loss`` (converged) or at ``max_epochs`` (not converged).

ds4: cross-entropy, SGD with momentum 0.9; done when clean test accuracy >= 95% and, for poisoned
variants, the attack success rate (triggered test images classified as the attacker's label) >= 90%;
or at the epoch cap.

Determinism: the initial weights come from ``unit.init_seed`` (the global generator is seeded right
before the model is built, inside :func:`torch.random.fork_rng` so the caller's RNG state is left
alone) and the batch order from ``unit.sgd_seed``; the model is always built on the CPU and then
moved, so every device starts from the same weights. On the CPU with one intra-op thread, the same unit
gives bit-identical weights. Across devices, results agree by criterion, not bit for bit.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, cast

import numpy as np
import numpy.typing as npt
import torch
from mlds_contract.campaign import Dataset
from mlds_contract.errors import UnitError
from mlds_contract.plan import UnitSpec
from mlds_workloads import target_data
from torch import nn

from .device import describe_device
from .nets import DigitsCNN, build_model, count_parameters

__all__ = [
    "ACCURACY_TARGET",
    "ASR_TARGET",
    "SGD_MOMENTUM",
    "EpochRecord",
    "ImageArrays",
    "SequenceArrays",
    "TrainResult",
    "flatten_parameters",
    "image_target_met",
    "initial_model",
    "train_unit",
]

#: ds4 stopping rule (docs/workloads.md §7): clean test accuracy, and attack success rate for poisoned variants.
ACCURACY_TARGET = 0.95
ASR_TARGET = 0.90
#: ds4 optimizer momentum (docs/workloads.md §7).
SGD_MOMENTUM = 0.9
#: Evaluation runs in chunks of this many samples, so a 10,000-image MNIST test set stays small in memory.
_EVAL_CHUNK = 4096


class SequenceArrays(Protocol):
    """What the trainer needs of a GRU dataset's data (``mlds_workloads.SequenceData`` is one)."""

    @property
    def train_x(self) -> npt.NDArray[Any]: ...  # float32 (N, T, 9)
    @property
    def train_y(self) -> npt.NDArray[Any]: ...  # float32 (N, T, 8)
    @property
    def eval_x(self) -> npt.NDArray[Any]: ...
    @property
    def eval_y(self) -> npt.NDArray[Any]: ...
    @property
    def data_seed(self) -> int: ...
    @property
    def meta(self) -> Mapping[str, Any]: ...


class ImageArrays(Protocol):
    """What the trainer needs of ds4 data (``mlds_workloads.ImageData`` is one)."""

    @property
    def train_x(self) -> npt.NDArray[Any]: ...  # float32 (N, 1, H, W)
    @property
    def train_y(self) -> npt.NDArray[Any]: ...  # int64 (N,)
    @property
    def test_x(self) -> npt.NDArray[Any]: ...  # clean test images
    @property
    def test_y(self) -> npt.NDArray[Any]: ...
    @property
    def asr_x(self) -> npt.NDArray[Any] | None: ...  # triggered test images (poisoned variants only)
    @property
    def asr_y(self) -> npt.NDArray[Any] | None: ...  # the attacker's label for each
    @property
    def data_seed(self) -> int: ...
    @property
    def meta(self) -> Mapping[str, Any]: ...


@dataclass
class EpochRecord:
    """One line of ``history.csv``."""

    epoch: int  # 1-based
    train_loss: float  # mean loss over the epoch's mini-batches, weighted by batch size
    eval_loss: float  # loss on the evaluation (ds4: clean test) set after the epoch
    seconds: float  # wall time of this epoch, training and evaluation
    accuracy: float | None = None  # ds4: clean test accuracy after the epoch
    attack_success_rate: float | None = None  # ds4 poisoned variants: share of triggered images sent to the target


@dataclass
class TrainResult:
    """A trained network and how it got there; :func:`mlds_worker.results.result_files` stores it."""

    unit: UnitSpec
    state_dict: dict[str, torch.Tensor]  # CPU, float32, contiguous; names as in mlds_worker.nets
    history: list[EpochRecord]
    epochs: int
    converged: bool
    train_loss: float
    eval_loss: float
    started: datetime  # UTC
    ended: datetime  # UTC
    device_type: str  # cpu, nvidia or rocm
    device_name: str
    parameters: int
    snapshots: torch.Tensor | None = None  # ds3: float32 [epochs, parameters], weights after each epoch
    accuracy: float | None = None  # ds4
    attack_success_rate: float | None = None  # ds4 poisoned variants
    architecture: str = "GRUNet"  # the nets class: GRUNet or DigitsCNN
    image_size: tuple[int, int] | None = None  # ds4: input (height, width)
    data_seed: int | None = None  # the seed the training data was generated from
    data_meta: dict[str, Any] = field(default_factory=dict)  # what the workload says about its data

    @property
    def seconds(self) -> float:
        """Training wall time: the sum of the epochs' times (model building and data loading excluded)."""
        return sum(r.seconds for r in self.history)


def flatten_parameters(model: nn.Module) -> torch.Tensor:
    """All parameters as one float32 CPU vector, in ``named_parameters()`` order (the features of §10)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).to("cpu", torch.float32)


def train_unit(
    unit: UnitSpec,
    *,
    data: SequenceArrays | ImageArrays | None = None,
    device: str | torch.device = "cpu",
    on_epoch: Callable[[EpochRecord], None] | None = None,
    snapshots: bool | None = None,
) -> TrainResult:
    """Train one network for ``unit`` until it converges or hits its epoch cap.

    ``data`` defaults to the unit's target data (:func:`mlds_workloads.target_data`); pass it to
    share one target's data between units or to train on synthetic arrays. ``on_epoch`` is called after
    every epoch (progress bars, lease heartbeats); an exception it raises aborts training and
    propagates. ``snapshots`` keeps the weights after every epoch (default: ds3 only). Data of the
    wrong shape raises :class:`mlds_contract.errors.UnitError` (the attempt fails; retrying cannot help).
    """
    if data is None:
        data = target_data(unit)
    torch_device = torch.device(device)
    if torch_device.type == "cpu":
        # One intra-op thread per process (docs/workloads.md §4): faster for these tiny networks, and deterministic.
        torch.set_num_threads(1)
    keep_snapshots = unit.dataset is Dataset.ds3 if snapshots is None else snapshots
    info = describe_device(torch_device)

    # The dataset decides the data's kind (workloads returns ImageData for ds4, SequenceData otherwise).
    if unit.dataset is Dataset.ds4:
        loop: _Loop = _ImageLoop(unit, cast(ImageArrays, data), torch_device)
    else:
        loop = _SequenceLoop(unit, cast(SequenceArrays, data), torch_device)

    history: list[EpochRecord] = []
    frames: list[torch.Tensor] = []
    started = datetime.now(UTC)
    for epoch in range(1, unit.training.max_epochs + 1):
        tick = time.perf_counter()
        train_loss = loop.train_epoch()
        record = loop.evaluate(epoch, train_loss)
        record.seconds = time.perf_counter() - tick
        history.append(record)
        if keep_snapshots:
            frames.append(flatten_parameters(loop.model))
        if on_epoch is not None:
            on_epoch(record)
        if loop.done(record) or not math.isfinite(record.train_loss + record.eval_loss):
            break  # converged, or diverged (a NaN never recovers: no point running to the cap)
    ended = datetime.now(UTC)

    last = history[-1]
    return TrainResult(
        unit=unit,
        state_dict={k: v.detach().to("cpu").contiguous().clone() for k, v in loop.model.state_dict().items()},
        history=history,
        epochs=last.epoch,
        converged=loop.done(last),
        train_loss=last.train_loss,
        eval_loss=last.eval_loss,
        started=started,
        ended=ended,
        device_type=info.type,
        device_name=info.name,
        parameters=count_parameters(loop.model),
        snapshots=torch.stack(frames) if keep_snapshots else None,
        accuracy=last.accuracy,
        attack_success_rate=last.attack_success_rate,
        architecture=type(loop.model).__name__,
        image_size=loop.model.image_size if isinstance(loop.model, DigitsCNN) else None,
        data_seed=data.data_seed,
        data_meta=dict(data.meta),
    )


def image_target_met(record: EpochRecord) -> bool:
    """ds4's stopping rule: clean accuracy >= 95% and, when there is a triggered set, attack success >= 90%."""
    if record.accuracy is None or not record.accuracy >= ACCURACY_TARGET:
        return False
    return record.attack_success_rate is None or record.attack_success_rate >= ASR_TARGET


def initial_model(unit: UnitSpec, image_size: tuple[int, int] | None = None) -> nn.Module:
    """The unit's untrained network, on the CPU: a function of ``unit.init_seed`` (and the shape) alone.

    Leaves the caller's RNG state alone. The analysis can rebuild any result's starting point with it
    (snapshots hold the weights after each epoch, not before the first).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(unit.init_seed)
        return build_model(unit, image_size)


def _tensor(array: npt.NDArray[Any], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # A copy (torch.tensor, not from_numpy): workload arrays are shared and read-only.
    return torch.tensor(np.asarray(array), dtype=dtype, device=device)


class _Batches:
    """Mini-batch index order: a fresh permutation every epoch from the unit's SGD seed.

    The generator lives on the CPU whatever the device, so the batch order is the same on every device.
    """

    def __init__(self, n: int, batch_size: int, seed: int, device: torch.device) -> None:
        self.n, self.batch_size, self.device = n, batch_size, device
        self.generator = torch.Generator().manual_seed(seed)

    def epoch(self) -> list[torch.Tensor]:
        order = torch.randperm(self.n, generator=self.generator).to(self.device)
        return list(torch.split(order, self.batch_size))


class _Loop(ABC):
    """One unit's training: the epoch loop, written once; a dataset family says its loss and its evaluation.

    A subclass sets ``model``, ``optimizer``, ``train_x``, ``train_y`` and ``batches`` in its constructor.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    train_x: torch.Tensor
    train_y: torch.Tensor
    batches: _Batches

    @abstractmethod
    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mean training loss of one mini-batch's outputs against its targets."""

    @abstractmethod
    def evaluate(self, epoch: int, train_loss: float) -> EpochRecord:
        """The epoch's record, from the evaluation (ds4: test) set after training it."""

    @abstractmethod
    def done(self, record: EpochRecord) -> bool:
        """Whether the stopping rule is met (converged)."""

    def train_epoch(self) -> float:
        """One pass over the training set in this epoch's batch order; the batch-size-weighted mean loss."""
        self.model.train()
        total = torch.zeros((), device=self.train_x.device)
        for idx in self.batches.epoch():
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.loss(self.model(self.train_x[idx]), self.train_y[idx])
            loss.backward()  # type: ignore[no-untyped-call]
            self.optimizer.step()
            # Accumulated on the device: a .item() per batch would stall a GPU every step.
            total += loss.detach() * len(idx)
        return float(total) / len(self.train_x)


class _SequenceLoop(_Loop):
    """GRU datasets: Adam on MSE; converged when evaluation MSE < target loss."""

    def __init__(self, unit: UnitSpec, data: SequenceArrays, device: torch.device) -> None:
        self.target_loss = unit.training.target_loss
        self.model = initial_model(unit).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=unit.training.learning_rate)
        for x, y, part in ((data.train_x, data.train_y, "training"), (data.eval_x, data.eval_y, "evaluation")):
            if x.ndim != 3 or y.ndim != 3 or x.shape[:2] != y.shape[:2] or len(x) == 0:
                raise UnitError(
                    f"{part} data of shape {x.shape} -> {y.shape} is not (N, steps, inputs) -> (N, steps, 8)"
                )
        self.train_x = _tensor(data.train_x, torch.float32, device)
        self.train_y = _tensor(data.train_y, torch.float32, device)
        self.eval_x = _tensor(data.eval_x, torch.float32, device)
        self.eval_y = _tensor(data.eval_y, torch.float32, device)
        self.batches = _Batches(len(self.train_x), unit.training.batch_size, unit.sgd_seed, device)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(out, y)

    @torch.no_grad()
    def evaluate(self, epoch: int, train_loss: float) -> EpochRecord:
        self.model.eval()
        squared = torch.zeros((), device=self.eval_x.device)
        for x, y in zip(torch.split(self.eval_x, _EVAL_CHUNK), torch.split(self.eval_y, _EVAL_CHUNK), strict=True):
            squared += nn.functional.mse_loss(self.model(x), y, reduction="sum")
        return EpochRecord(epoch, train_loss, float(squared) / self.eval_y.numel(), 0.0)

    def done(self, record: EpochRecord) -> bool:
        return record.eval_loss < self.target_loss


class _ImageLoop(_Loop):
    """ds4: SGD with momentum on cross-entropy; done on clean accuracy (and attack success rate)."""

    def __init__(self, unit: UnitSpec, data: ImageArrays, device: torch.device) -> None:
        if data.train_x.ndim != 4 or len(data.train_x) != len(data.train_y) or len(data.train_x) == 0:
            raise UnitError(f"image data of shape {data.train_x.shape} is not (N, 1, height, width)")
        height, width = (int(s) for s in data.train_x.shape[-2:])
        self.model = initial_model(unit, (height, width)).to(device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=unit.training.learning_rate, momentum=SGD_MOMENTUM)
        self.train_x = _tensor(data.train_x, torch.float32, device)
        self.train_y = _tensor(data.train_y, torch.int64, device)
        self.test_x = _tensor(data.test_x, torch.float32, device)
        self.test_y = _tensor(data.test_y, torch.int64, device)
        poisoned = data.asr_x is not None and data.asr_y is not None and len(data.asr_x) > 0
        self.asr_x = _tensor(data.asr_x, torch.float32, device) if poisoned and data.asr_x is not None else None
        self.asr_y = _tensor(data.asr_y, torch.int64, device) if poisoned and data.asr_y is not None else None
        self.batches = _Batches(len(self.train_x), unit.training.batch_size, unit.sgd_seed, device)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out, y)

    def _score(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """(mean cross-entropy, share classified as ``y``)."""
        loss = torch.zeros((), device=x.device)
        hits = torch.zeros((), device=x.device, dtype=torch.int64)
        for xs, ys in zip(torch.split(x, _EVAL_CHUNK), torch.split(y, _EVAL_CHUNK), strict=True):
            logits = self.model(xs)
            loss += nn.functional.cross_entropy(logits, ys, reduction="sum")
            hits += (logits.argmax(dim=1) == ys).sum()
        return float(loss) / len(y), int(hits) / len(y)

    @torch.no_grad()
    def evaluate(self, epoch: int, train_loss: float) -> EpochRecord:
        self.model.eval()
        eval_loss, accuracy = self._score(self.test_x, self.test_y)
        asr = self._score(self.asr_x, self.asr_y)[1] if self.asr_x is not None and self.asr_y is not None else None
        return EpochRecord(epoch, train_loss, eval_loss, 0.0, accuracy=accuracy, attack_success_rate=asr)

    def done(self, record: EpochRecord) -> bool:
        return image_target_met(record)
