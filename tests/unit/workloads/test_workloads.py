"""target_data (dispatch, caching, errors) and the per-target data file (save_data / load_data).

Units come from real campaign specs through mlds_contract.plan, as the worker gets them.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from mlds_contract.campaign import DS1_MACHINES, DS2_MACHINES, CampaignSpec, Dataset, Shape, Variant, Workload
from mlds_contract.errors import UserError
from mlds_contract.plan import UnitSpec, campaign_targets, unit_spec
from mlds_workloads import ImageData, SequenceData, clear_cache, load_data, save_data, target_data
from mlds_workloads.machines import machine_data


def units(seed: int = 1, **workload: Any) -> list[UnitSpec]:
    """One unit per target (replica 0) of a campaign with this workload."""
    spec = CampaignSpec(workload=Workload(**workload), networks_per_target=2, seed=seed)
    targets = campaign_targets(spec)
    return [unit_spec(spec, 2 * i, targets=targets) for i in range(len(targets))]


@pytest.fixture(autouse=True)
def fresh_cache() -> Iterator[None]:
    clear_cache()
    yield
    clear_cache()


@pytest.mark.parametrize(
    ("workload", "kind", "n_train"),
    [
        ({"dataset": Dataset.ds1}, SequenceData, 256),
        ({"dataset": Dataset.ds2}, SequenceData, 1024),
        ({"dataset": Dataset.ds3, "automata": 3}, SequenceData, 256),
        ({"dataset": Dataset.ds4}, ImageData, 1437),
        ({"dataset": Dataset.ds5, "shapes": [Shape(hidden=8)]}, SequenceData, 256),
    ],
    ids=["ds1", "ds2", "ds3", "ds4", "ds5"],
)
def test_every_target_of_every_dataset_has_data(workload: dict[str, Any], kind: type, n_train: int) -> None:
    for unit in units(**workload):
        data = target_data(unit)
        assert isinstance(data, kind)
        assert len(data.train_x) == n_train
        assert data.data_seed == unit.data_seed


def test_ds1_target_data_is_the_machine_data_from_the_units_seed() -> None:
    for unit in units(dataset=Dataset.ds1):
        data = target_data(unit)
        assert isinstance(data, SequenceData)
        assert data.meta["machine"] == unit.machine
        expected = machine_data(str(unit.machine), unit.data_seed)
        assert np.array_equal(data.train_x, expected.train_x)
        assert np.array_equal(data.eval_y, expected.eval_y)


def test_units_of_a_target_share_one_cached_copy() -> None:
    spec = CampaignSpec(workload=Workload(dataset=Dataset.ds1, machines=["ParityMachine"]), networks_per_target=5)
    first, last = unit_spec(spec, 0), unit_spec(spec, 4, attempt=2)
    assert target_data(first) is target_data(last)


def test_data_is_deterministic_across_processes_caches() -> None:
    unit = units(dataset=Dataset.ds3, automata=2)[1]
    before = target_data(unit)
    clear_cache()
    after = target_data(unit)
    assert after is not before
    assert save_data(after) == save_data(before)  # byte-identical data files


def test_ds1_machine_data_does_not_depend_on_the_campaign_seed() -> None:
    a = target_data(units(seed=1, dataset=Dataset.ds1, machines=["EightBitMachine"])[0])
    b = target_data(units(seed=2, dataset=Dataset.ds1, machines=["EightBitMachine"])[0])
    assert np.array_equal(a.train_x, b.train_x)


def test_ds3_automata_differ_between_targets_and_campaigns() -> None:
    one = [target_data(u).meta["sha256"] for u in units(seed=1, dataset=Dataset.ds3, automata=3)]
    two = [target_data(u).meta["sha256"] for u in units(seed=2, dataset=Dataset.ds3, automata=3)]
    assert len(set(one + two)) == 6


def test_ds5_uses_the_ds1_and_ds2_data_of_its_machine_whatever_the_shape() -> None:
    shapes = [Shape(hidden=8, gru_layers=2), Shape(hidden=24)]
    ds5 = units(dataset=Dataset.ds5, machines=["SimpleXORMachine", "SimpleXORModified"], shapes=shapes)
    ds1 = units(dataset=Dataset.ds1, machines=["SimpleXORMachine"])[0]
    ds2 = units(dataset=Dataset.ds2, machines=["SimpleXORModified"])[0]
    assert [u.machine for u in ds5] == ["SimpleXORMachine"] * 2 + ["SimpleXORModified"] * 2
    assert target_data(ds5[0]) is target_data(ds5[1]) is target_data(ds1)
    assert target_data(ds5[2]) is target_data(ds5[3]) is target_data(ds2)


def test_ds2_accepts_the_ds1_spelling_of_a_machine() -> None:
    unit = units(dataset=Dataset.ds2, machines=["ParityModified"])[0]
    assert target_data(unit.model_copy(update={"machine": "ParityMachine"})) is target_data(unit)


def test_ds4_variants_share_the_split() -> None:
    clean, pixel, checker = (target_data(u) for u in units(dataset=Dataset.ds4))
    assert isinstance(clean, ImageData)
    assert isinstance(pixel, ImageData)
    assert isinstance(checker, ImageData)
    assert clean.meta["variant"] == "clean"
    assert np.array_equal(clean.test_x, pixel.test_x)
    assert np.array_equal(clean.test_x, checker.test_x)
    assert pixel.asr_x is not None
    assert clean.asr_x is None


def test_cached_arrays_are_read_only() -> None:
    data = target_data(units(dataset=Dataset.ds1)[0])
    with pytest.raises(ValueError, match="read-only"):
        data.train_x[0, 0, 0] = 5.0


BAD_UNITS = {
    "unknown ds1 machine": (
        {"dataset": Dataset.ds1},
        {"machine": "ToasterMachine"},
        r"^unknown machine 'ToasterMachine' for ds1; expected one of SingleDirectMachine, .*ParityMachine$",
    ),
    "ds2 machine in ds1": ({"dataset": Dataset.ds1}, {"machine": "ParityModified"}, "unknown machine 'ParityModified'"),
    "unknown ds5 machine": ({"dataset": Dataset.ds5}, {"machine": None}, r"expected one of .*EightBitModified"),
    "ds3 without automaton": ({"dataset": Dataset.ds3, "automata": 1}, {"automaton": None}, "no automaton index"),
    "ds4 without variant": ({"dataset": Dataset.ds4}, {"variant": None}, "no variant; expected one of clean, pixel"),
}


@pytest.mark.parametrize(("workload", "change", "message"), BAD_UNITS.values(), ids=BAD_UNITS.keys())
def test_a_unit_naming_no_target_is_a_one_line_user_error(
    workload: dict[str, Any], change: dict[str, Any], message: str
) -> None:
    unit = units(**workload)[0].model_copy(update=change)
    with pytest.raises(UserError, match=message) as caught:
        target_data(unit)
    assert "\n" not in str(caught.value)


def test_all_machine_names_are_known() -> None:
    for machine in DS1_MACHINES + DS2_MACHINES:
        assert (
            target_data(units(dataset=Dataset.ds5, machines=[machine], shapes=[Shape()])[0]).meta["machine"] == machine
        )


# --- the data file ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "workload",
    [
        {"dataset": Dataset.ds2, "machines": ["ParityModified"]},
        {"dataset": Dataset.ds3, "automata": 1},
        {"dataset": Dataset.ds4, "variants": [Variant.clean]},
        {"dataset": Dataset.ds4, "variants": [Variant.checker]},
    ],
    ids=["ds2", "ds3", "ds4-clean", "ds4-checker"],
)
def test_data_file_round_trips(workload: dict[str, Any]) -> None:
    data = target_data(units(**workload)[0])
    blob = save_data(data)
    again = load_data(blob)
    assert type(again) is type(data)
    assert again.data_seed == data.data_seed
    assert again.meta == data.meta
    for name, value in vars(data).items():
        if isinstance(value, np.ndarray) or value is None:
            other = getattr(again, name)
            assert (other is None) if value is None else (other.dtype == value.dtype and np.array_equal(other, value))


def test_data_file_is_a_plain_npz_without_pickles() -> None:
    data = target_data(units(dataset=Dataset.ds1, machines=["SingleDirectMachine"])[0])
    with np.load(io.BytesIO(save_data(data)), allow_pickle=False) as npz:
        assert {"train_x", "train_y", "eval_x", "eval_y", "meta", "data_seed", "format", "kind"} <= set(npz.files)
        assert np.array_equal(npz["train_y"], data.train_y)
        assert int(npz["data_seed"]) == data.data_seed


def test_loading_something_else_is_a_user_error() -> None:
    with pytest.raises(UserError, match="not an mlds workload data file"):
        load_data(b"PK\x03\x04 definitely not a zip")
    buffer = io.BytesIO()
    np.savez_compressed(buffer, x=np.zeros(3))
    with pytest.raises(UserError, match="not an mlds workload data file"):
        load_data(buffer.getvalue())
