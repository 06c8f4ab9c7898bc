"""The continuous stack: S slots kept full, members joining and leaving between epochs (issue 14).

Called by the worker's lease loop (:mod:`mlds_worker.loop`) when its pool leases more than one unit at
a time, and by `mlds bench campaign`. :func:`mlds_worker.batched.train_batch` trains a fixed set of
units: as members stop at their own convergence epoch the stack shrinks towards one network while its
slowest members train on, and no new unit starts until the whole stack is done. Here a member that
stops is handed back at once (:meth:`ContinuousStack.round` returns it) and the caller refills its slot
(:meth:`ContinuousStack.add`) before the next round, while the others train on.

Every member still trains exactly as :func:`mlds_worker.train.train_unit` trains it alone: its own
initial weights, data, batch order, loss, stopping rule and epoch cap, as in
:mod:`mlds_worker.batched`, and its own optimizer state. Members join at different times, so their
Adam step counts differ: :class:`MemberAdam` keeps one step count per member and repeats, per member,
the arithmetic of ``torch.optim.Adam``'s single-tensor implementation (what the CPU runs), so on the
CPU a member's weights are bit-identical to the unit trained alone whatever joined or left beside it
(tests/unit/worker/test_stack.py). ds4's SGD with momentum needs no step count: a joining member's
momentum buffer starts at zero, which its first step turns into its gradient, as alone.

Members that cannot share one model (another architecture, shape, data size, batch size or learning
rate; :func:`mlds_worker.batched.batch_groups`) wait: the stack trains one group at a time, the group
of its live members, and turns to the oldest waiting unit's group when it empties.

Threading: an instance is used from one thread at a time (the worker runs :meth:`round` in a thread
and calls :meth:`add` between rounds).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar, cast

import torch
from mlds_contract.campaign import Dataset
from mlds_contract.errors import UnitError
from mlds_contract.plan import UnitSpec
from torch import Tensor

from .device import describe_device
from .families import Family, ImageFamily, Member, SequenceFamily, group_key, member_result, resolve_data
from .train import EpochRecord, ImageArrays, SequenceArrays, TrainResult

__all__ = ["MEMBER_BYTES", "ContinuousStack", "Finished", "MemberAdam", "fit_width"]

#: Device memory one ds1/ds2-sized member of a stack needs while it trains, with room to spare: its
#: parameters, gradients and Adam moments (4,364 floats each) are small; the GRU's saved activations
#: (4 layers x 50 steps x batch 32 x 3 gates x 12 hidden, forward and backward) and its evaluation
#: chunk dominate, a few MB.
MEMBER_BYTES = 8 << 20


def fit_width(device: torch.device, requested: int, *, fraction: float = 0.8) -> int:
    """The stack width S for ``device``: ``requested`` on the CPU; on a GPU at most what fits in its free memory."""
    if device.type != "cuda":
        return requested
    free, _total = torch.cuda.mem_get_info(device)
    return max(1, min(requested, int(free * fraction) // MEMBER_BYTES))


Key = TypeVar("Key", bound=Hashable)

#: Data tensors of each family, stacked along a leading data-set dimension and shared by members.
_DATA_ATTRS = {
    "gru": ("train_x", "train_y", "eval_x", "eval_y"),
    "cnn": ("train_x", "train_y", "test_x", "test_y", "asr_x", "asr_y"),
}


class MemberAdam(torch.optim.Optimizer):
    """Adam over stacked parameters ``(K, ...)`` with one step count per member (leading dimension).

    Per member it performs the operations of ``torch.optim.Adam``'s single-tensor path (the CPU
    default) in the same order and precision: ``exp_avg.lerp_(grad, 1 - beta1)``,
    ``exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)``, the bias corrections in Python
    floats from the member's own step, ``denom = (exp_avg_sq.sqrt() / sqrt(bc2)).add_(eps)`` and
    ``param += (-step_size * exp_avg) / denom`` (``addcdiv``'s order), the per-member scalars rounded
    to float32 as ``addcdiv`` and ``div`` round a Python scalar. State per parameter: ``step`` (one
    float32 count per member, as Adam's step tensor), ``exp_avg``, ``exp_avg_sq``; every entry has the
    member dimension first, so re-packing (:func:`mlds_worker.families.repack_optimizer`) and growing
    cut and extend it like the parameters.
    """

    def __init__(
        self, params: Iterable[Tensor], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]  # no closure
        group = self.param_groups[0]
        lr, eps = float(group["lr"]), float(group["eps"])
        beta1, beta2 = (float(b) for b in group["betas"])
        factors: tuple[Tensor, Tensor] | None = None
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros(p.shape[0], dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            steps: Tensor = state["step"]
            steps += 1
            if factors is None:  # every parameter of a member has the same step count
                sizes, roots = [], []
                for step in steps.tolist():
                    bias_correction1 = 1 - beta1**step
                    bias_correction2 = 1 - beta2**step
                    sizes.append(-(lr / bias_correction1))
                    roots.append(bias_correction2**0.5)
                factors = (
                    torch.tensor(sizes, dtype=p.dtype, device=p.device),
                    torch.tensor(roots, dtype=p.dtype, device=p.device),
                )
            shape = (-1,) + (1,) * (p.dim() - 1)
            neg_step_size, root = factors[0].view(shape), factors[1].view(shape)
            grad, exp_avg, exp_avg_sq = p.grad, state["exp_avg"], state["exp_avg_sq"]
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / root).add_(eps)
            p.add_(exp_avg.mul(neg_step_size).div_(denom))


def _grow_optimizer(old: torch.optim.Optimizer, params: list[Tensor], added: int) -> torch.optim.Optimizer:
    """A new optimizer of the same kind over ``params`` (``added`` members appended): new members' state is zero."""
    new = type(old)(params, **dict(old.defaults))
    for before, after in zip(old.param_groups[0]["params"], params, strict=True):
        state = old.state.get(before)
        if not state:
            continue
        grown: dict[str, Any] = {}
        for key, value in state.items():
            if isinstance(value, Tensor) and value.dim() > 0:
                grown[key] = torch.cat([value, value.new_zeros((added, *value.shape[1:]))])
            else:
                grown[key] = value
        new.state[after] = grown
    return new


@dataclass
class Finished(Generic[Key]):
    """A member that left the stack: its result, ``None`` when abandoned, or the error that stopped it."""

    key: Key
    result: TrainResult | None
    error: Exception | None = None


@dataclass
class _Slot(Generic[Key]):
    key: Key
    unit: UnitSpec
    data: SequenceArrays | ImageArrays
    group: tuple[object, ...]
    snapshots: bool
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    epoch: int = 0
    history: list[EpochRecord] = field(default_factory=list)
    frames: list[Tensor] = field(default_factory=list)


class ContinuousStack(Generic[Key]):
    """Members training as one stacked model; :meth:`add` a unit, :meth:`round` trains one epoch of each.

    ``key`` names a member for the caller (the worker uses the unit index). ``snapshots`` is as for
    :func:`~mlds_worker.train.train_unit` (default: ds3 only).
    """

    def __init__(self, device: str | torch.device = "cpu", *, snapshots: bool | None = None) -> None:
        self.device = torch.device(device)
        if self.device.type == "cpu":
            torch.set_num_threads(1)  # one intra-op thread per process (docs/workloads.md §4), as train_unit
        self._info = describe_device(self.device)
        self._snapshots = snapshots
        self._family: Family | None = None
        self._members: list[_Slot[Key]] = []  # row j of the model is _members[j]
        self._waiting: list[_Slot[Key]] = []  # leased but not yet in the model (joining next round, or another group)
        self._datas: list[SequenceArrays | ImageArrays] = []  # data set of each stacked data row (kept alive: ids)
        self._parameters = 0
        #: Rounds trained, their seconds in total, and the last round's (seconds, members trained).
        self.rounds = 0
        self.seconds = 0.0
        self.last: tuple[float, int] = (0.0, 0)

    # ------------------------------------------------------------------------------------------ views

    @property
    def live(self) -> int:
        """Members in the model now."""
        return len(self._members)

    @property
    def waiting(self) -> int:
        """Units added but not yet training (they join at the next round, or wait for their group's turn)."""
        return len(self._waiting)

    def __len__(self) -> int:
        return self.live + self.waiting

    def members(self) -> list[Key]:
        """Every member's and waiting unit's key."""
        return [s.key for s in self._members] + [s.key for s in self._waiting]

    # ------------------------------------------------------------------------------------------ changes

    def add(self, key: Key, unit: UnitSpec, data: SequenceArrays | ImageArrays | None = None) -> None:
        """Queue ``unit`` to join at the next round (``data`` defaults to the unit's target data)."""
        arrays = resolve_data([unit], data)[0]
        snapshots = (unit.dataset is Dataset.ds3) if self._snapshots is None else self._snapshots
        self._waiting.append(_Slot(key, unit, arrays, group_key(unit, arrays), snapshots))

    def round(self, should_stop: Callable[[Key], bool] | None = None) -> list[Finished[Key]]:
        """Admit waiting units of the stack's group, drop abandoned members, train one epoch of every member.

        ``should_stop(key)`` is asked of every member and waiting unit first: ``True`` drops it
        (``Finished(key, None)``). Returns the members that stopped in this round (converged, capped,
        diverged, abandoned) and waiting units whose data did not fit (``Finished.error``, a
        :class:`UnitError`). An exception from training itself propagates (the caller fails every
        member). With no member left, trains nothing.
        """
        out: list[Finished[Key]] = []
        if should_stop is not None:
            quit_waiting = [should_stop(s.key) for s in self._waiting]
            out += [Finished(s.key, None) for s, q in zip(self._waiting, quit_waiting, strict=True) if q]
            self._waiting = [s for s, q in zip(self._waiting, quit_waiting, strict=True) if not q]
            quit_members = [should_stop(s.key) for s in self._members]
            if any(quit_members):
                out += [Finished(s.key, None) for s, q in zip(self._members, quit_members, strict=True) if q]
                self._keep([j for j, q in enumerate(quit_members) if not q])
        out += self._admit()
        if not self._members:
            return out
        family = self._family
        assert family is not None
        tick = time.perf_counter()
        losses = family.train_epoch()
        records = family.evaluate(0, losses)
        took = time.perf_counter() - tick
        self.rounds += 1
        self.seconds += took
        self.last = (took, len(self._members))
        share = took / len(self._members)
        frames = family.net.flat().to("cpu") if any(s.snapshots for s in self._members) else None
        stay = []
        for j, (slot, record) in enumerate(zip(self._members, records, strict=True)):
            slot.epoch += 1
            record.epoch, record.seconds = slot.epoch, share
            slot.history.append(record)
            if slot.snapshots and frames is not None:
                slot.frames.append(frames[j].clone())
            converged = family.done(j, record)
            diverged = not math.isfinite(record.train_loss + record.eval_loss)
            if converged or diverged or slot.epoch >= slot.unit.training.max_epochs:
                out.append(Finished(slot.key, self._result(slot, j, converged)))
            else:
                stay.append(j)
        self._keep(stay)
        return out

    # ------------------------------------------------------------------------------------------ internals

    def _result(self, slot: _Slot[Key], row: int, converged: bool) -> TrainResult:
        assert self._family is not None
        member = Member(0, slot.unit, slot.data, slot.snapshots, slot.history, slot.frames)
        return member_result(member, self._family, row, converged, slot.started, self._info, self._parameters)

    def _keep(self, rows: list[int]) -> None:
        if len(rows) == len(self._members):
            return
        self._members = [self._members[j] for j in rows]
        if not rows:
            self._family = None  # the next group starts a model of its own
            self._datas = []
            return
        assert self._family is not None
        self._family.keep(rows)
        self._compact_data()

    def _admit(self) -> list[Finished[Key]]:
        """Move waiting units of the stack's group (or, when empty, of the oldest waiting unit's) into the model."""
        if not self._waiting:
            return []
        group = self._members[0].group if self._members else self._waiting[0].group
        joining = [s for s in self._waiting if s.group == group]
        if not joining:
            return []
        self._waiting = [s for s in self._waiting if s.group != group]
        try:
            new = self._build(joining)
        except UnitError:
            # Find the units whose data does not fit, one by one; the others join.
            bad: list[Finished[Key]] = []
            fit: list[_Slot[Key]] = []
            for s in joining:
                try:
                    self._build([s])
                    fit.append(s)
                except UnitError as exc:
                    bad.append(Finished(s.key, None, exc))
            if not fit:
                return bad + (self._admit() if not self._members and self._waiting else [])
            self._join(self._build(fit), fit)
            return bad
        self._join(new, joining)
        return []

    def _build(self, slots: Sequence[_Slot[Key]]) -> Family:
        units = [s.unit for s in slots]
        if units[0].dataset is Dataset.ds4:
            family: Family = ImageFamily(units, [cast(ImageArrays, s.data) for s in slots], self.device)
        else:
            family = SequenceFamily(units, [cast(SequenceArrays, s.data) for s in slots], self.device)
            # Per-member step counts: members join at different times (the module docstring).
            cast(Any, family).optimizer = MemberAdam(family.net.params, lr=units[0].training.learning_rate)
        return family

    def _join(self, new: Family, slots: list[_Slot[Key]]) -> None:
        new_datas = [slots[j].data for j in cast(Any, new).sources.unique]
        if self._family is None:
            self._family, self._members, self._datas = new, list(slots), new_datas
            self._parameters = new.net.member_parameters()
            return
        old = cast(Any, self._family)
        fresh = cast(Any, new)
        added = len(slots)
        params = [
            torch.cat([a.detach(), b.detach()]).requires_grad_(True)
            for a, b in zip(old.net.params, fresh.net.params, strict=True)
        ]
        old.net.params = params
        old.optimizer = _grow_optimizer(old.optimizer, params, added)
        # Data: a set already stacked is reused (members of one target share it), others are appended.
        rows = {id(d): i for i, d in enumerate(self._datas)}
        mapping: list[int] = []
        append: list[int] = []
        for j, d in enumerate(new_datas):
            if id(d) not in rows:
                rows[id(d)] = len(self._datas)
                self._datas.append(d)
                append.append(j)
            mapping.append(rows[id(d)])
        kind = "cnn" if isinstance(old, ImageFamily) else "gru"
        if append:
            pick = torch.tensor(append, dtype=torch.int64, device=self.device)
            for attr in _DATA_ATTRS[kind]:
                mine, theirs = getattr(old, attr), getattr(fresh, attr)
                if mine is not None and theirs is not None:
                    setattr(old, attr, torch.cat([mine, theirs[pick]]))
        remap = torch.tensor(mapping, dtype=torch.int64, device=self.device)
        old.sources.src = torch.cat([old.sources.src, remap[fresh.sources.src]])
        old.batches.generators += fresh.batches.generators
        if kind == "gru":
            old.target_loss += fresh.target_loss
        self._members += slots

    def _compact_data(self) -> None:
        """Drop stacked data sets no member uses any more (a long campaign sees many targets come and go)."""
        family = cast(Any, self._family)
        used = sorted(set(family.sources.src.tolist()))
        if len(used) == len(self._datas) or len(self._datas) <= 2 * len(used) + 4:
            return
        kind = "cnn" if isinstance(family, ImageFamily) else "gru"
        pick = torch.tensor(used, dtype=torch.int64, device=self.device)
        for attr in _DATA_ATTRS[kind]:
            tensor = getattr(family, attr)
            if tensor is not None:
                setattr(family, attr, tensor[pick])
        lookup = torch.full((len(self._datas),), -1, dtype=torch.int64, device=self.device)
        lookup[pick] = torch.arange(len(used), dtype=torch.int64, device=self.device)
        family.sources.src = lookup[family.sources.src]
        self._datas = [self._datas[i] for i in used]
