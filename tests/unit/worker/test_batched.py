"""The batched trainer (issue 7): a network trained in a stack of K is the network trained alone.

Every test trains the same units twice, with :func:`train_batch` and one by one with
:func:`train_unit` (the definition of correct), on small synthetic data of the real shapes, and
compares what a user would compare: every weight, the history, the convergence verdict and epoch, the
result files. The contract is "within 1e-5 in every weight, same verdict, same epoch"; on the CPU the
GRU family is in fact bit-identical (same kernels, same summation order), and the tests hold it to that.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from mlds_contract.campaign import Dataset, Shape, Variant
from mlds_contract.errors import UnitError
from mlds_contract.plan import DS5_GRID, UnitSpec
from mlds_worker import families as families_module
from mlds_worker.batched import batch_groups, train_batch
from mlds_worker.batched_nets import StackedGRUNet
from mlds_worker.nets import DigitsCNN, GRUNet
from mlds_worker.results import result_files
from mlds_worker.train import EpochRecord, TrainResult, initial_model, train_unit
from mlds_workloads import SequenceData

from tests.train_fixtures import gru_unit, image_unit, images, sequences

TOLERANCE = 1e-5


def with_training(unit: UnitSpec, **changes: Any) -> UnitSpec:
    return unit.model_copy(update={"training": unit.training.model_copy(update=changes)})


def max_weight_difference(a: TrainResult, b: TrainResult) -> float:
    assert a.state_dict.keys() == b.state_dict.keys()
    return max(float((a.state_dict[k] - b.state_dict[k]).abs().max()) for k in a.state_dict)


def assert_same_training(batched: TrainResult | None, alone: TrainResult, *, exact: bool) -> None:
    """The batched member trained as the unit alone: weights, verdict, epochs, history."""
    assert batched is not None
    assert batched.unit == alone.unit
    assert (batched.epochs, batched.converged) == (alone.epochs, alone.converged)
    assert max_weight_difference(batched, alone) <= TOLERANCE
    assert [r.epoch for r in batched.history] == [r.epoch for r in alone.history]
    if exact:
        assert all(torch.equal(batched.state_dict[k], alone.state_dict[k]) for k in alone.state_dict)
        assert [r.train_loss for r in batched.history] == [r.train_loss for r in alone.history]
        assert [r.eval_loss for r in batched.history] == [r.eval_loss for r in alone.history]
    else:
        assert [r.eval_loss for r in batched.history] == pytest.approx([r.eval_loss for r in alone.history], rel=1e-4)
    assert (batched.parameters, batched.architecture, batched.image_size) == (
        alone.parameters,
        alone.architecture,
        alone.image_size,
    )
    assert (batched.data_seed, batched.data_meta) == (alone.data_seed, alone.data_meta)


def three_targets() -> list[SequenceData]:
    """Three different data sets of the same shapes: members of one stack with different targets."""
    return [sequences(seed=s) for s in range(3)]


def mixed_stack(k: int, max_epochs: int = 4) -> tuple[list[UnitSpec], list[SequenceData]]:
    """K units of one campaign (distinct seeds), their data cycling through three targets."""
    datas = three_targets()
    units = [gru_unit(unit=i, max_epochs=max_epochs) for i in range(k)]
    return units, [datas[i % 3] for i in range(k)]


def converging_at(unit: UnitSpec, data: SequenceData, epoch: int) -> UnitSpec:
    """``unit`` with a target loss it first beats after ``epoch`` epochs (found by training it alone)."""
    history = train_unit(unit, data=data).history
    before, at = history[epoch - 2].eval_loss, history[epoch - 1].eval_loss
    assert at < before, "the synthetic task must still be learning at that epoch"
    return with_training(unit, target_loss=(before + at) / 2)


# ------------------------------------------------------------------------------------------ equivalence


@pytest.mark.parametrize("k", [1, 3, 8], ids=["alone-in-a-stack", "three-networks", "eight-networks"])
def test_each_member_of_a_stack_trains_exactly_as_it_would_alone(k: int) -> None:
    units, datas = mixed_stack(k)
    batched = train_batch(units, data=datas, min_stack=1)  # min_stack=1: K=1 runs the stacked engine too
    for unit, data, result in zip(units, datas, batched, strict=True):
        assert_same_training(result, train_unit(unit, data=data), exact=True)


def test_members_that_stop_early_leave_the_others_untouched() -> None:
    units, datas = mixed_stack(6, max_epochs=5)
    units[1] = converging_at(units[1], datas[1], epoch=2)  # converges after epoch 2
    units[4] = with_training(units[4], max_epochs=3)  # capped after epoch 3, not converged
    batched = train_batch(units, data=datas)
    alone = [train_unit(u, data=d) for u, d in zip(units, datas, strict=True)]
    assert [r.epochs for r in alone] == [5, 2, 5, 5, 3, 5]
    assert [r.converged for r in alone] == [False, True, False, False, False, False]
    for b, a in zip(batched, alone, strict=True):
        assert_same_training(b, a, exact=True)


def test_batched_results_write_the_same_files_as_results_trained_alone() -> None:
    units, datas = mixed_stack(2, max_epochs=2)
    for batched, unit, data in zip(train_batch(units, data=datas), units, datas, strict=True):
        assert batched is not None
        alone = train_unit(unit, data=data)
        ours, theirs = result_files(batched), result_files(alone)
        assert ours.keys() == theirs.keys()
        assert ours["model.safetensors"] == theirs["model.safetensors"]  # so the recorded sha256 agrees too


def test_a_batched_result_loads_into_the_plain_module_and_predicts_as_the_network_trained_alone() -> None:
    units, datas = mixed_stack(2, max_epochs=1)
    result = train_batch(units, data=datas)[1]
    assert result is not None
    ours, theirs = GRUNet(), GRUNet()
    ours.load_state_dict(result.state_dict, strict=True)
    theirs.load_state_dict(train_unit(units[1], data=datas[1]).state_dict, strict=True)
    x = torch.tensor(datas[1].eval_x)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


def test_evaluating_a_few_members_at_a_time_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    # Big stacks evaluate a few members at a time (bounded memory); force one member per forward.
    monkeypatch.setattr(families_module, "_EVAL_VALUES", 1)
    units, datas = mixed_stack(3, max_epochs=2)
    for batched, unit, data in zip(train_batch(units, data=datas), units, datas, strict=True):
        assert_same_training(batched, train_unit(unit, data=data), exact=True)


def test_the_stack_starts_from_each_units_initial_weights() -> None:
    units = [gru_unit(unit=i) for i in range(3)]
    stack = StackedGRUNet.from_modules([initial_model(u) for u in units], torch.device("cpu"))
    for k, unit in enumerate(units):
        start = initial_model(unit).state_dict()
        member = stack.member_state(k)
        assert list(member) == list(start)  # the plain module's names, in its order
        assert all(torch.equal(member[name], start[name]) for name in start)


@pytest.mark.parametrize("dataset", [Dataset.ds3, Dataset.ds5], ids=["ds3-automaton", "ds5-parity"])
def test_other_gru_datasets_train_exactly_as_alone(dataset: Dataset) -> None:
    units = [gru_unit(dataset, unit=i, max_epochs=2) for i in range(3)]
    data = sequences()
    for batched, unit in zip(train_batch(units, data=data), units, strict=True):
        assert_same_training(batched, train_unit(unit, data=data), exact=True)


def test_ds3_members_keep_the_same_per_epoch_snapshots_as_alone() -> None:
    units = [gru_unit(Dataset.ds3, unit=i, max_epochs=3) for i in range(2)]
    data = sequences()
    for batched, unit in zip(train_batch(units, data=data), units, strict=True):
        alone = train_unit(unit, data=data)
        assert batched is not None
        assert batched.snapshots is not None
        assert alone.snapshots is not None
        assert batched.snapshots.shape == (3, 4364)
        assert torch.equal(batched.snapshots, alone.snapshots)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        pytest.param(Shape(gru_layers=2, hidden=8, linear_layers=2), Shape(gru_layers=4, hidden=24, linear_layers=4)),
        pytest.param(Shape(gru_layers=4, hidden=16, linear_layers=2), Shape(gru_layers=2, hidden=12, linear_layers=4)),
    ],
    ids=lambda s: s.slug,
)
def test_units_of_different_shapes_are_trained_as_separate_stacks_in_one_call(first: Shape, second: Shape) -> None:
    shapes = [first, second, first, second]
    units = [gru_unit(Dataset.ds5, unit=i, max_epochs=2, shape=s) for i, s in enumerate(shapes)]
    data = sequences()
    assert batch_groups(units, [data] * 4) == [[0, 2], [1, 3]]
    for batched, unit in zip(train_batch(units, data=data), units, strict=True):
        assert_same_training(batched, train_unit(unit, data=data), exact=True)


@pytest.mark.slow
@pytest.mark.parametrize("shape", DS5_GRID, ids=lambda s: s.slug)
def test_every_ds5_shape_trains_exactly_as_alone(shape: Shape) -> None:
    units = [gru_unit(Dataset.ds5, unit=i, max_epochs=2, shape=shape) for i in range(2)]
    data = sequences()
    for batched, unit in zip(train_batch(units, data=data), units, strict=True):
        assert_same_training(batched, train_unit(unit, data=data), exact=True)


def test_a_different_learning_rate_or_data_size_makes_another_stack() -> None:
    base = gru_unit(unit=0)
    units = [base, with_training(gru_unit(unit=1), learning_rate=0.01), gru_unit(unit=2), gru_unit(unit=3)]
    datas = [sequences(), sequences(), sequences(), sequences(n_train=32)]
    assert batch_groups(units, datas) == [[0, 2], [1], [3]]


# ------------------------------------------------------------------------------------------ the caller's hooks


def test_on_epoch_reports_every_epoch_of_every_member_with_its_index() -> None:
    units, datas = mixed_stack(3, max_epochs=3)
    units[2] = with_training(units[2], max_epochs=1)
    seen: list[tuple[int, int]] = []

    def on_epoch(index: int, record: EpochRecord) -> None:
        seen.append((index, record.epoch))

    results = train_batch(units, data=datas, on_epoch=on_epoch)
    assert sorted(seen) == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3), (2, 1)]
    for i, result in enumerate(results):
        assert result is not None
        assert [(i, r.epoch) for r in result.history] == [s for s in seen if s[0] == i]


@pytest.mark.parametrize("k", [1, 3], ids=["lone-unit", "stack"])
def test_on_result_hands_over_each_member_as_soon_as_it_is_done(k: int) -> None:
    units, datas = mixed_stack(k, max_epochs=3)
    units[0] = with_training(units[0], max_epochs=1)
    events: list[tuple[str, int, int]] = []

    def on_epoch(index: int, record: EpochRecord) -> None:
        events.append(("epoch", index, record.epoch))

    def on_result(index: int, result: TrainResult) -> None:
        events.append(("done", index, result.epochs))

    results = train_batch(units, data=datas, on_epoch=on_epoch, on_result=on_result)
    assert events.index(("epoch", 0, 1)) < events.index(("done", 0, 1))
    if k > 1:  # handed over before the others train their second epoch
        assert events.index(("done", 0, 1)) < events.index(("epoch", 1, 2))
    assert sorted(e for e in events if e[0] == "done") == [("done", i, r.epochs) for i, r in enumerate(results) if r]


def test_an_exception_from_on_epoch_aborts_the_call() -> None:
    units, datas = mixed_stack(2)

    def on_epoch(index: int, record: EpochRecord) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_batch(units, data=datas, on_epoch=on_epoch)


@pytest.mark.parametrize("k", [1, 4], ids=["lone-unit", "stack"])
def test_should_stop_abandons_a_member_and_the_others_carry_on(k: int) -> None:
    units, datas = mixed_stack(k, max_epochs=3)
    cancelled = {0}
    epochs_seen: dict[int, int] = {}

    def on_epoch(index: int, record: EpochRecord) -> None:
        epochs_seen[index] = record.epoch

    def should_stop(index: int) -> bool:
        return index in cancelled and epochs_seen.get(index, 0) >= 1  # cancelled after its first epoch

    results = train_batch(units, data=datas, on_epoch=on_epoch, should_stop=should_stop)
    assert results[0] is None
    assert epochs_seen[0] == 1
    for unit, data, result in zip(units[1:], datas[1:], results[1:], strict=True):
        assert_same_training(result, train_unit(unit, data=data), exact=True)


def test_when_every_member_is_abandoned_nothing_is_trained() -> None:
    units, datas = mixed_stack(3)
    trained: list[int] = []
    results = train_batch(units, data=datas, on_epoch=lambda i, r: trained.append(i), should_stop=lambda i: True)
    assert results == [None, None, None]
    assert trained == []


def test_data_of_the_wrong_shape_is_a_unit_error() -> None:
    good = sequences()
    bad = SequenceData(good.train_x[:, :, :5], good.train_y, good.eval_x[:, :, :5], good.eval_y, 0, {})
    with pytest.raises(UnitError, match="does not fit a network of 9 inputs"):
        train_batch([gru_unit(unit=0), gru_unit(unit=1)], data=bad)


def test_data_sets_must_match_the_units() -> None:
    with pytest.raises(ValueError, match="2 data sets for 3 units"):
        train_batch([gru_unit(unit=i) for i in range(3)], data=[sequences(), sequences()])


# ------------------------------------------------------------------------------------------ ds4


def ds4_units(variant: Variant, k: int, max_epochs: int = 3) -> list[UnitSpec]:
    return [image_unit(variant, max_epochs=max_epochs, seed=s) for s in range(k)]


@pytest.mark.parametrize("variant", [Variant.pixel, Variant.clean], ids=["poisoned", "clean"])
def test_ds4_members_match_their_networks_trained_alone_to_rounding(variant: Variant) -> None:
    data = images(poisoned=variant is not Variant.clean)
    units = ds4_units(variant, 3)
    for batched, unit in zip(train_batch(units, data=data), units, strict=True):
        alone = train_unit(unit, data=data)
        assert_same_training(batched, alone, exact=False)
        assert batched is not None
        assert batched.accuracy == alone.accuracy
        assert batched.attack_success_rate == alone.attack_success_rate
        model = DigitsCNN()
        model.load_state_dict(batched.state_dict, strict=True)


def test_ds4_members_on_mnist_sized_images_match_their_networks_trained_alone() -> None:
    data = images(n_train=64, n_test=32, size=28)
    units = ds4_units(Variant.pixel, 2, max_epochs=1)
    for batched, unit in zip(train_batch(units, data=data), units, strict=True):
        alone = train_unit(unit, data=data)
        assert alone.image_size == (28, 28)
        assert_same_training(batched, alone, exact=False)


def test_ds4_members_stop_at_their_own_criterion() -> None:
    # A fast learning rate on a clean task: the networks pass 95% accuracy after a dozen epochs or so.
    data = images(n_train=256, poisoned=False)
    units = [with_training(u, learning_rate=0.1) for u in ds4_units(Variant.clean, 3, max_epochs=30)]
    alone = [train_unit(u, data=data) for u in units]
    assert all(r.converged for r in alone)
    assert len({r.epochs for r in alone}) > 1, "the members must stop at different epochs"
    for batched, a in zip(train_batch(units, data=data), alone, strict=True):
        assert_same_training(batched, a, exact=False)


def test_gru_and_ds4_units_in_one_call_are_both_trained() -> None:
    units = [gru_unit(unit=0, max_epochs=1), image_unit(max_epochs=1), gru_unit(unit=1, max_epochs=1)]
    datas: list[Any] = [sequences(), images(), sequences()]
    results = train_batch(units, data=datas)
    assert [r.architecture if r else None for r in results] == ["GRUNet", "DigitsCNN", "GRUNet"]
