"""The continuous stack (issue 14): members join and leave between epochs, each trains as it would alone.

Every test trains units in a :class:`ContinuousStack`, refilling slots as members stop, and compares
each result with :func:`train_unit` of the same unit (the definition of correct): on the CPU the GRU
family is bit-identical, down to the sha256 of ``model.safetensors``, whatever the other members'
ages, targets and stopping epochs.
"""

from __future__ import annotations

import hashlib

import pytest
import torch
from mlds_contract.campaign import Dataset, Variant
from mlds_contract.plan import UnitSpec
from mlds_worker.results import result_files
from mlds_worker.stack import ContinuousStack, Finished, MemberAdam
from mlds_worker.train import TrainResult, train_unit

from tests.train_fixtures import gru_unit, image_unit, images, sequences
from tests.unit.worker.test_batched import assert_same_training, with_training


def drain(stack: ContinuousStack[int], queue: list[tuple[int, UnitSpec, object]], slots: int) -> dict[int, TrainResult]:
    """Keep ``slots`` members training, refilling from ``queue`` after every round, until all are done."""
    done: dict[int, TrainResult] = {}
    rounds = 0
    while queue or len(stack):
        while queue and len(stack) < slots:
            key, unit, data = queue.pop(0)
            stack.add(key, unit, data)  # type: ignore[arg-type]
        for finished in stack.round():
            assert finished.result is not None
            assert finished.error is None
            done[finished.key] = finished.result
        rounds += 1
        assert rounds < 1000
    return done


def model_sha(result: TrainResult) -> str:
    return hashlib.sha256(result_files(result, pool="cpu")["model.safetensors"]).hexdigest()


def test_a_unit_entering_mid_way_beside_members_of_other_ages_and_targets_has_the_sha256_of_the_unit_alone() -> None:
    datas = [sequences(seed=s) for s in range(3)]
    # Different caps, so members leave at different rounds and the queue refills their slots mid-way.
    caps = [2, 5, 3, 4, 6, 2, 3, 5, 4]
    queue = [(i, gru_unit(unit=i, max_epochs=caps[i]), datas[i % 3]) for i in range(len(caps))]
    expected = {key: train_unit(unit, data=data) for key, unit, data in queue}
    stack: ContinuousStack[int] = ContinuousStack()
    done = drain(stack, list(queue), slots=3)
    assert sorted(done) == list(range(len(caps)))
    for key, _unit, _data in queue:
        assert_same_training(done[key], expected[key], exact=True)
        assert model_sha(done[key]) == model_sha(expected[key])
    assert [r.epoch for r in done[8].history] == [1, 2, 3, 4]  # its own epochs, not the stack's rounds


def test_members_converge_at_their_own_epoch_and_are_refilled_while_the_others_train_on() -> None:
    data = sequences(seed=4)
    base = [gru_unit(unit=i, max_epochs=6) for i in range(5)]
    history = train_unit(base[1], data=data).history
    base[1] = with_training(base[1], target_loss=(history[1].eval_loss + history[2].eval_loss) / 2)
    expected = [train_unit(u, data=data) for u in base]
    assert expected[1].converged
    assert expected[1].epochs == 3
    stack: ContinuousStack[int] = ContinuousStack()
    live: list[int] = []
    queue = [(i, u, data) for i, u in enumerate(base)]
    done = {}
    while queue or len(stack):
        while queue and len(stack) < 2:
            key, unit, d = queue.pop(0)
            stack.add(key, unit, d)
        for f in stack.round():
            assert f.result is not None
            done[f.key] = f.result
        live.append(stack.live)
    for i, result in done.items():
        assert_same_training(result, expected[i], exact=True)
    assert max(live) <= 2


def test_should_stop_drops_a_member_and_a_waiting_unit_without_disturbing_the_others() -> None:
    data = sequences(seed=2)
    units = [gru_unit(unit=i, max_epochs=4) for i in range(3)]
    stack: ContinuousStack[int] = ContinuousStack()
    stack.add(0, units[0], data)
    stack.add(1, units[1], data)
    assert stack.round() == []
    stack.add(2, units[2], data)
    dropped = stack.round(lambda key: key in (1, 2))
    assert sorted(f.key for f in dropped if f.result is None) == [1, 2]
    rest: list[Finished[int]] = []
    while len(stack):
        rest += stack.round()
    assert [f.key for f in rest] == [0]
    assert rest[0].result is not None
    assert_same_training(rest[0].result, train_unit(units[0], data=data), exact=True)


def test_units_of_another_shape_wait_for_a_stack_of_their_own() -> None:
    short, long = sequences(steps=12, seed=1), sequences(steps=16, seed=1)
    units = [gru_unit(unit=i, max_epochs=2) for i in range(3)]
    stack: ContinuousStack[int] = ContinuousStack()
    stack.add(0, units[0], short)
    stack.add(1, units[1], long)
    stack.add(2, units[2], short)
    stack.round()
    assert (stack.live, stack.waiting) == (2, 1)  # the 16-step unit waits
    done: dict[int, TrainResult] = {}
    while len(stack):
        for f in stack.round():
            assert f.result is not None
            done[f.key] = f.result
    for key, data in ((0, short), (1, long), (2, short)):
        assert_same_training(done[key], train_unit(units[key], data=data), exact=True)


@pytest.mark.parametrize("dataset", [Dataset.ds2, Dataset.ds3])
def test_other_gru_datasets_join_mid_way_exactly_as_alone(dataset: Dataset) -> None:
    data = sequences(seed=3)
    queue = [(i, gru_unit(dataset, unit=i, max_epochs=2 + i % 3), data) for i in range(4)]
    stack: ContinuousStack[int] = ContinuousStack()
    done = drain(stack, list(queue), slots=2)
    for key, unit, d in queue:
        assert_same_training(done[key], train_unit(unit, data=d), exact=True)
        alone_snapshots = train_unit(unit, data=d).snapshots
        if alone_snapshots is not None:
            snapshots = done[key].snapshots
            assert snapshots is not None
            assert torch.equal(snapshots, alone_snapshots)


def test_ds4_members_join_mid_way_and_match_alone_to_rounding() -> None:
    data = images()
    units = [image_unit(Variant.pixel, max_epochs=1 + i, seed=i + 1) for i in range(3)]
    queue = [(i, u, data) for i, u in enumerate(units)]
    stack: ContinuousStack[int] = ContinuousStack()
    done = drain(stack, list(queue), slots=2)
    for key, unit, d in queue:
        assert_same_training(done[key], train_unit(unit, data=d), exact=False)


def test_member_adam_with_equal_steps_is_torch_adam_bit_for_bit() -> None:
    torch.manual_seed(0)
    start = torch.randn(4, 6, 5)
    ours = start.clone().requires_grad_(True)
    theirs = start.clone().requires_grad_(True)
    a, b = MemberAdam([ours], lr=0.01), torch.optim.Adam([theirs], lr=0.01)
    for _ in range(7):
        for p, opt in ((ours, a), (theirs, b)):
            opt.zero_grad()
            (p.sin() * torch.arange(1.0, 6.0)).sum().backward()  # type: ignore[no-untyped-call]
            opt.step()
    assert torch.equal(ours, theirs)
