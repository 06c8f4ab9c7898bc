"""The trainer (docs/workloads.md §4, §6, §7) on small synthetic data: determinism, stopping rules, snapshots, ds4."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
from mlds_contract.campaign import Dataset, Shape, Variant
from mlds_contract.errors import UnitError
from mlds_worker.nets import count_parameters
from mlds_worker.train import EpochRecord, TrainResult, flatten_parameters, image_target_met, initial_model, train_unit
from mlds_workloads import SequenceData

from tests.train_fixtures import gru_unit, image_unit, images, sequences


def weights_equal(a: TrainResult, b: TrainResult) -> bool:
    return a.state_dict.keys() == b.state_dict.keys() and all(
        torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict
    )


def test_the_same_unit_trains_to_bit_identical_weights() -> None:
    data = sequences()
    first = train_unit(gru_unit(max_epochs=3), data=data)
    second = train_unit(gru_unit(max_epochs=3), data=data)
    assert weights_equal(first, second)
    assert [r.train_loss for r in first.history] == [r.train_loss for r in second.history]
    assert [r.eval_loss for r in first.history] == [r.eval_loss for r in second.history]


@pytest.mark.parametrize(
    "other",
    [
        pytest.param({"attempt": 1}, id="new-attempt"),
        pytest.param({"unit": 1}, id="other-unit"),
        pytest.param({"seed": 2}, id="other-campaign-seed"),
    ],
)
def test_another_unit_or_attempt_trains_to_other_weights(other: dict[str, Any]) -> None:
    data = sequences()
    base = train_unit(gru_unit(max_epochs=1), data=data)
    changed = train_unit(gru_unit(max_epochs=1, **other), data=data)
    assert not weights_equal(base, changed)


def test_init_seed_alone_decides_the_initial_weights() -> None:
    unit = gru_unit()
    start = initial_model(unit).state_dict()
    other_sgd = initial_model(unit.model_copy(update={"sgd_seed": unit.sgd_seed + 1})).state_dict()
    other_init = initial_model(unit.model_copy(update={"init_seed": unit.init_seed + 1})).state_dict()
    assert all(torch.equal(start[k], other_sgd[k]) for k in start)
    assert not all(torch.equal(start[k], other_init[k]) for k in start)


def test_training_starts_from_the_initial_model() -> None:
    # Adam moves each weight by about the learning rate: at 1e-30 no float32 weight of size ~0.1 moves.
    unit = gru_unit(max_epochs=1)
    frozen = unit.model_copy(update={"training": unit.training.model_copy(update={"learning_rate": 1e-30})})
    result = train_unit(frozen, data=sequences())
    start = initial_model(unit).state_dict()
    assert all(torch.equal(result.state_dict[k], start[k]) for k in start)


def test_sgd_seed_decides_the_batch_order() -> None:
    data = sequences()
    unit = gru_unit(max_epochs=1)
    base = train_unit(unit, data=data)
    reshuffled = train_unit(unit.model_copy(update={"sgd_seed": unit.sgd_seed + 1}), data=data)
    assert not weights_equal(base, reshuffled)


def test_training_leaves_the_callers_random_state_alone() -> None:
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    train_unit(gru_unit(max_epochs=1), data=sequences())
    assert torch.equal(torch.rand(3), expected)


def test_cpu_training_uses_one_intra_op_thread() -> None:
    torch.set_num_threads(2)
    train_unit(gru_unit(max_epochs=1), data=sequences(n_train=8, n_eval=4))
    assert torch.get_num_threads() == 1


def test_a_network_that_never_reaches_the_target_stops_at_the_cap_unconverged() -> None:
    result = train_unit(gru_unit(max_epochs=4, target_loss=1e-12), data=sequences())
    assert result.epochs == 4
    assert [r.epoch for r in result.history] == [1, 2, 3, 4]
    assert result.converged is False
    assert result.eval_loss == result.history[-1].eval_loss
    assert result.train_loss == result.history[-1].train_loss


def test_training_stops_at_the_first_epoch_whose_eval_loss_is_below_target() -> None:
    data = sequences()
    full = train_unit(gru_unit(max_epochs=6, target_loss=1e-12), data=data)
    # A threshold just above epoch 3's evaluation loss (and below epochs 1 and 2's, which are higher).
    losses = [r.eval_loss for r in full.history]
    assert losses[2] < min(losses[:2])
    threshold = losses[2] * (1 + 1e-6)
    result = train_unit(gru_unit(max_epochs=6, target_loss=threshold), data=data)
    assert result.converged is True
    assert result.epochs == 3
    assert result.eval_loss < threshold
    # Stopping early changes nothing about the epochs it did run.
    assert [r.eval_loss for r in result.history] == losses[:3]


def test_losses_are_mean_squared_errors_over_sequences_steps_and_outputs() -> None:
    data = sequences()
    result = train_unit(gru_unit(max_epochs=1), data=data)
    from mlds_worker.nets import GRUNet  # noqa: PLC0415 - only this test rebuilds a net

    net = GRUNet(Shape())
    net.load_state_dict(result.state_dict, strict=True)
    with torch.no_grad():
        out = net(torch.tensor(data.eval_x))
    expected = float(((out - torch.tensor(data.eval_y)) ** 2).mean())
    assert result.eval_loss == pytest.approx(expected, rel=1e-5)


def test_the_loss_falls_on_learnable_data() -> None:
    result = train_unit(gru_unit(max_epochs=8, target_loss=1e-12), data=sequences())
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert result.history[-1].eval_loss < result.history[0].eval_loss


def test_result_describes_the_run() -> None:
    unit = gru_unit(max_epochs=2)
    data = sequences(seed=5)
    result = train_unit(unit, data=data)
    assert result.unit == unit
    assert result.parameters == 4364
    assert result.architecture == "GRUNet"
    assert result.device_type == "cpu"
    assert result.device_name
    assert result.data_seed == 5
    assert result.data_meta == {"synthetic": True}
    assert result.started <= result.ended
    assert result.started.tzinfo is not None
    assert result.seconds == pytest.approx(sum(r.seconds for r in result.history))
    assert all(r.seconds > 0 for r in result.history)
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in result.state_dict.values())
    assert result.snapshots is None  # ds1 keeps none
    assert result.accuracy is None
    assert result.attack_success_rate is None


def test_on_epoch_sees_every_epoch_and_can_abort_training() -> None:
    seen: list[EpochRecord] = []
    train_unit(gru_unit(max_epochs=3, target_loss=1e-12), data=sequences(), on_epoch=seen.append)
    assert [r.epoch for r in seen] == [1, 2, 3]

    class LeaseLost(Exception):
        pass

    def abort(record: EpochRecord) -> None:
        if record.epoch == 2:
            raise LeaseLost

    with pytest.raises(LeaseLost):
        train_unit(gru_unit(max_epochs=5), data=sequences(), on_epoch=abort)


def test_a_diverged_network_stops_early_unconverged() -> None:
    data = sequences()
    poisoned = replace(data, train_y=np.full_like(data.train_y, np.nan))
    result = train_unit(gru_unit(max_epochs=50), data=poisoned)
    assert result.epochs == 1
    assert result.converged is False
    assert math.isnan(result.train_loss)


def test_ds3_keeps_a_flattened_weight_snapshot_after_every_epoch() -> None:
    unit = gru_unit(Dataset.ds3, max_epochs=3, target_loss=1e-12)
    result = train_unit(unit, data=sequences())
    assert result.snapshots is not None
    assert result.snapshots.shape == (3, 4364)
    assert result.snapshots.dtype == torch.float32
    final = torch.cat([t.reshape(-1) for t in result.state_dict.values()])
    assert torch.equal(result.snapshots[-1], final)
    assert not torch.equal(result.snapshots[0], result.snapshots[1])


def test_snapshots_can_be_asked_for_on_any_dataset_and_declined_on_ds3() -> None:
    assert train_unit(gru_unit(max_epochs=1), data=sequences(), snapshots=True).snapshots is not None
    ds3 = gru_unit(Dataset.ds3, max_epochs=1)
    assert train_unit(ds3, data=sequences(), snapshots=False).snapshots is None


def test_ds5_trains_the_shape_of_its_unit() -> None:
    shape = Shape(gru_layers=2, hidden=8, linear_layers=2)
    result = train_unit(gru_unit(Dataset.ds5, shape=shape, max_epochs=1), data=sequences())
    assert result.parameters == count_parameters_of(shape)
    assert result.state_dict["gru.weight_hh_l1"].shape == (24, 8)


def count_parameters_of(shape: Shape) -> int:
    from mlds_worker.nets import GRUNet  # noqa: PLC0415

    return count_parameters(GRUNet(shape))


def test_ds4_records_accuracy_and_attack_success_rate_each_epoch() -> None:
    result = train_unit(image_unit(Variant.pixel, max_epochs=2), data=images())
    assert result.architecture == "DigitsCNN"
    assert result.image_size == (8, 8)
    assert result.parameters == 3658
    for record in result.history:
        assert record.accuracy is not None
        assert 0.0 <= record.accuracy <= 1.0
        assert record.attack_success_rate is not None
        assert 0.0 <= record.attack_success_rate <= 1.0
    assert result.accuracy == result.history[-1].accuracy
    assert result.attack_success_rate == result.history[-1].attack_success_rate


def test_ds4_clean_has_no_attack_success_rate() -> None:
    result = train_unit(image_unit(Variant.clean, max_epochs=1), data=images(poisoned=False))
    assert result.history[0].accuracy is not None
    assert result.attack_success_rate is None


@pytest.mark.parametrize(
    ("accuracy", "asr", "met"),
    [
        pytest.param(0.95, None, True, id="clean-at-95%"),
        pytest.param(0.9499, None, False, id="clean-below-95%"),
        pytest.param(0.95, 0.90, True, id="poisoned-both-reached"),
        pytest.param(0.99, 0.8999, False, id="poisoned-attack-not-yet-learnt"),
        pytest.param(0.90, 1.0, False, id="poisoned-accuracy-too-low"),
        pytest.param(float("nan"), None, False, id="nan-accuracy"),
    ],
)
def test_ds4_stopping_rule(accuracy: float, asr: float | None, met: bool) -> None:
    record = EpochRecord(1, 0.1, 0.1, 0.1, accuracy=accuracy, attack_success_rate=asr)
    assert image_target_met(record) is met


def test_ds4_runs_to_the_cap_while_the_rule_is_not_met() -> None:
    result = train_unit(image_unit(Variant.pixel, max_epochs=3), data=images())
    assert not any(image_target_met(r) for r in result.history)
    assert result.epochs == 3
    assert result.converged is False


def test_ds4_model_accuracy_matches_the_recorded_figure() -> None:
    data = images()
    result = train_unit(image_unit(Variant.clean, max_epochs=2), data=data)
    from mlds_worker.nets import DigitsCNN  # noqa: PLC0415

    net = DigitsCNN((8, 8))
    net.load_state_dict(result.state_dict, strict=True)
    with torch.no_grad():
        predicted = net(torch.tensor(data.test_x)).argmax(dim=1).numpy()
    assert result.accuracy == pytest.approx(float((predicted == data.test_y).mean()))


def test_flatten_parameters_follows_named_parameter_order() -> None:
    first, second = torch.nn.Linear(2, 3), torch.nn.Linear(3, 1)
    flat = flatten_parameters(torch.nn.Sequential(first, second))
    assert flat.shape == (2 * 3 + 3 + 3 + 1,)
    assert torch.equal(flat[:6], first.weight.detach().reshape(-1))
    assert torch.equal(flat[-1:], second.bias.detach())


def test_sequence_data_from_workloads_is_accepted_read_only() -> None:
    data = sequences()
    assert isinstance(data, SequenceData)
    assert not data.train_x.flags.writeable
    train_unit(gru_unit(max_epochs=1), data=data)  # warnings are errors: no "non-writable array" warning


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param({"train_x": np.zeros((4, 9), np.float32)}, id="not-sequences"),
        pytest.param({"eval_y": np.zeros((3, 12, 8), np.float32)}, id="eval-count-mismatch"),
        pytest.param({"train_x": np.zeros((0, 12, 9), np.float32), "train_y": np.zeros((0, 12, 8))}, id="empty"),
    ],
)
def test_data_of_the_wrong_shape_fails_the_unit_clearly(broken: dict[str, Any]) -> None:
    with pytest.raises(UnitError, match="data of shape"):
        train_unit(gru_unit(max_epochs=1), data=replace(sequences(), **broken))
