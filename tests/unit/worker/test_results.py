"""Result files (docs/workloads.md §9): what meta.json, history.csv and the safetensors files hold, and writing them."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import stat
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch
from mlds_contract.campaign import Dataset, Variant
from mlds_contract.errors import StorageUnavailable
from mlds_contract.lease import CompleteRequest, FileDigest
from mlds_contract.results import model_tensors
from mlds_operator.leases import checks
from mlds_worker.nets import DigitsCNN, GRUNet
from mlds_worker.results import (
    META_FIELDS,
    load_snapshots,
    load_state_dict,
    meta_record,
    result_files,
    unflatten,
    write_result,
)
from mlds_worker.train import TrainResult, train_unit

from tests.train_fixtures import gru_unit, image_unit, images, sequences


@pytest.fixture(scope="module")
def ds1_result() -> TrainResult:
    return train_unit(gru_unit(max_epochs=2), data=sequences(seed=3))


@pytest.fixture(scope="module")
def ds3_result() -> TrainResult:
    data = replace(sequences(), meta={"generator": "mlds-transducers/1", "states": 5, "sha256": "ab" * 32})
    return train_unit(gru_unit(Dataset.ds3, max_epochs=3, target_loss=1e-12), data=data)


@pytest.fixture(scope="module")
def ds4_result() -> TrainResult:
    return train_unit(image_unit(Variant.pixel, max_epochs=2), data=images())


def test_a_gru_result_is_model_meta_and_history(ds1_result: TrainResult) -> None:
    assert set(result_files(ds1_result)) == {"model.safetensors", "meta.json", "history.csv"}


def test_meta_json_holds_every_field_the_spec_lists(ds1_result: TrainResult) -> None:
    files = result_files(ds1_result, pool="cpu")
    meta = json.loads(files["meta.json"])
    unit = ds1_result.unit
    assert tuple(meta) == META_FIELDS
    assert meta["dataset"] == "ds1"
    assert meta["target"] == "SingleDirectMachine"
    assert meta["machine"] == "SingleDirectMachine"
    assert (meta["unit"], meta["replica"], meta["attempt"]) == (unit.unit, unit.replica, unit.attempt)
    assert (meta["init_seed"], meta["sgd_seed"]) == (unit.init_seed, unit.sgd_seed)
    assert meta["data_seed"] == 3  # the seed the data was actually made from
    assert meta["automaton_states"] is None
    assert (meta["shape"], meta["gru_layers"], meta["hidden"], meta["linear_layers"]) == ("h12-g4-l4", 4, 12, 4)
    assert meta["parameters"] == 4364
    assert (meta["optimizer"], meta["learning_rate"], meta["batch_size"]) == ("adam", 1e-3, 32)
    assert (meta["max_epochs"], meta["target_loss"]) == (2, 1e-4)
    assert meta["epochs"] == 2
    assert meta["converged"] is False
    assert meta["train_loss"] == ds1_result.train_loss
    assert meta["eval_loss"] == ds1_result.eval_loss
    assert meta["sha256"] == hashlib.sha256(files["model.safetensors"]).hexdigest()
    assert meta["torch_version"] == torch.__version__
    assert meta["device_type"] == "cpu"
    assert meta["device_name"]
    assert meta["pool"] == "cpu"
    assert meta["campaign"] == "campaign"
    assert meta["mlds_version"]
    for key in ("started", "ended"):
        assert meta[key].endswith("Z")
        assert datetime.fromisoformat(meta[key]).tzinfo == UTC


def test_meta_values_are_flat_scalars_for_the_manifest(ds1_result: TrainResult, ds4_result: TrainResult) -> None:
    for result in (ds1_result, ds4_result):
        meta = meta_record(result, sha256="0" * 64)
        assert all(v is None or isinstance(v, str | int | float | bool) for v in meta.values())


def test_the_model_file_loads_into_a_fresh_network_by_name(ds1_result: TrainResult) -> None:
    blob = result_files(ds1_result)["model.safetensors"]
    net = GRUNet()
    net.load_state_dict(load_state_dict(blob), strict=True)
    for name, tensor in net.state_dict().items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, ds1_result.state_dict[name])


def test_identical_weights_give_identical_bytes_and_sha256(ds1_result: TrainResult) -> None:
    later = TrainResult(**{**vars(ds1_result), "started": datetime(2030, 1, 1, tzinfo=UTC)})
    a, b = result_files(ds1_result), result_files(later)
    assert a["model.safetensors"] == b["model.safetensors"]
    assert json.loads(a["meta.json"])["sha256"] == json.loads(b["meta.json"])["sha256"]
    assert a["meta.json"] != b["meta.json"]  # the start time differs, the model does not


def test_history_csv_has_one_row_per_epoch(ds1_result: TrainResult) -> None:
    rows = list(csv.DictReader(io.StringIO(result_files(ds1_result)["history.csv"].decode())))
    assert list(rows[0]) == ["epoch", "train_loss", "eval_loss", "seconds"]
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert [float(r["eval_loss"]) for r in rows] == [r.eval_loss for r in ds1_result.history]
    assert [float(r["train_loss"]) for r in rows] == [r.train_loss for r in ds1_result.history]


def test_ds3_results_keep_per_epoch_snapshots_that_unflatten_to_state_dicts(ds3_result: TrainResult) -> None:
    files = result_files(ds3_result)
    assert "snapshots.safetensors" in files
    snapshots, layout = load_snapshots(files["snapshots.safetensors"])
    assert snapshots.shape == (3, 4364)
    assert snapshots.dtype == torch.float32
    assert ds3_result.snapshots is not None
    assert torch.equal(snapshots, ds3_result.snapshots)
    assert layout[0] == ("gru.weight_ih_l0", [36, 9])
    assert [name for name, _ in layout] == list(GRUNet().state_dict())
    net = GRUNet()
    net.load_state_dict(unflatten(snapshots[-1], layout), strict=True)
    assert all(torch.equal(t, ds3_result.state_dict[k]) for k, t in net.state_dict().items())


def test_ds3_meta_names_the_automaton(ds3_result: TrainResult) -> None:
    meta = meta_record(ds3_result, sha256="0" * 64)
    assert (meta["dataset"], meta["target"], meta["automaton"]) == ("ds3", "automaton-00000", 0)
    assert (meta["automaton_states"], meta["automaton_sha256"]) == (5, "ab" * 32)
    assert meta["data_generator"] == "mlds-transducers/1"


def test_unflatten_refuses_a_row_of_the_wrong_length() -> None:
    with pytest.raises(ValueError, match="layout covers 6 values"):
        unflatten(torch.zeros(7), [("w", [2, 3])])


def test_ds4_meta_and_history_carry_accuracy_and_attack_success_rate(ds4_result: TrainResult) -> None:
    files = result_files(ds4_result)
    meta = json.loads(files["meta.json"])
    assert (meta["dataset"], meta["variant"], meta["images"]) == ("ds4", "pixel", "digits8")
    assert (meta["architecture"], meta["shape"], meta["parameters"]) == ("DigitsCNN", "8x8", 3658)
    assert (meta["optimizer"], meta["momentum"], meta["learning_rate"], meta["batch_size"]) == ("sgd", 0.9, 0.01, 64)
    assert meta["gru_layers"] is None
    assert meta["target_loss"] is None  # ds4 stops on accuracy, not loss
    assert meta["accuracy"] == ds4_result.accuracy
    assert meta["attack_success_rate"] == ds4_result.attack_success_rate
    rows = list(csv.DictReader(io.StringIO(files["history.csv"].decode())))
    assert list(rows[0]) == ["epoch", "train_loss", "eval_loss", "seconds", "accuracy", "attack_success_rate"]
    assert [float(r["accuracy"]) for r in rows] == [r.accuracy for r in ds4_result.history]
    net = DigitsCNN((8, 8))
    net.load_state_dict(load_state_dict(files["model.safetensors"]), strict=True)


def test_a_nan_loss_is_stored_as_null(ds1_result: TrainResult) -> None:
    diverged = TrainResult(**{**vars(ds1_result), "eval_loss": float("nan")})
    meta = json.loads(result_files(diverged)["meta.json"])  # json.loads would accept NaN; check the text
    assert meta["eval_loss"] is None
    assert b"NaN" not in result_files(diverged)["meta.json"]


def test_write_result_creates_the_folder_and_readable_files(tmp_path: Path, ds1_result: TrainResult) -> None:
    files = result_files(ds1_result)
    folder = tmp_path / "SingleDirectMachine" / "00000"
    write_result(folder, files)
    assert sorted(p.name for p in folder.iterdir()) == sorted(files)  # no temporary files left behind
    for name, data in files.items():
        path = folder / name
        assert path.read_bytes() == data
        assert path.stat().st_mode & stat.S_IRGRP  # not mkstemp's 0600: others read datasets


def test_write_result_replaces_an_earlier_result(tmp_path: Path, ds1_result: TrainResult) -> None:
    write_result(tmp_path, {"meta.json": b"old", "model.safetensors": b"old"})
    files = result_files(ds1_result)
    write_result(tmp_path, files)
    assert (tmp_path / "meta.json").read_bytes() == files["meta.json"]


def test_an_unwritable_folder_is_a_storage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StorageUnavailable, match="cannot write results"):
        write_result(blocker / "sub", {"meta.json": b"{}"})


# ------------------------------------------------------------------------- what the lease server checks


@pytest.mark.parametrize("which", ["ds1", "ds3", "ds4"])
def test_a_real_result_passes_every_check_of_the_lease_server(
    which: str, ds1_result: TrainResult, ds3_result: TrainResult, ds4_result: TrainResult
) -> None:
    # The server checks the model header against mlds_contract.results.model_tensors and parses meta.json
    # strictly (mlds_operator.leases.checks): what the worker writes must pass as it is.
    result = {"ds1": ds1_result, "ds3": ds3_result, "ds4": ds4_result}[which]
    files = result_files(result, pool="cpu")
    request = CompleteRequest(
        worker="w-1",
        pool="cpu",
        unit=result.unit.unit,
        attempt=result.unit.attempt,
        converged=result.converged,
        files={n: FileDigest(sha256=hashlib.sha256(d).hexdigest(), size=len(d)) for n, d in files.items()},
        training_seconds=1.0,
        epochs=result.epochs,
    )
    checks.check_file_names(request, result.unit)
    measured = checks.check_meta(files["meta.json"], request, result.unit)
    checks.check_model(files["model.safetensors"], request, result.unit)
    if "snapshots.safetensors" in files:
        checks.check_snapshots(files["snapshots.safetensors"], request, result.unit, measured.epochs)
    assert {k: tuple(v.shape) for k, v in result.state_dict.items()} == model_tensors(result.unit)
    row = checks.manifest_row(
        result.unit, measured, sha256=request.files["model.safetensors"].sha256, pool="cpu", key="k"
    )
    worker_meta = json.loads(files["meta.json"])
    # The server's row says what the worker's meta.json says, field for field, but the folder key it adds and
    # data_seed: these fixtures hand-make data with their own seed; a campaign's data comes from the plan's.
    same = [k for k in row if k not in ("key", "data_seed")]
    assert {k: row[k] for k in same} == {k: worker_meta[k] for k in same}
