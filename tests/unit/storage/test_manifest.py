"""The campaign's dataset files: manifest rows, parts and compaction, checkpoint, README, recovery scan."""

from __future__ import annotations

import io
import json
import logging
import os
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlds_contract.campaign import CampaignSpec, Dataset, Workload
from mlds_contract.errors import UserError
from mlds_operator.storage import manifest as manifest_module
from mlds_operator.storage.manifest import (
    CHECKPOINT_KEY,
    MANIFEST_KEY,
    campaign_readme,
    compact_manifest,
    find_results,
    flatten,
    get_checkpoint,
    get_target_data,
    manifest_row,
    manifest_table,
    next_part_seq,
    part_key,
    put_checkpoint,
    put_readme,
    put_target_data,
    read_manifest,
    read_parts,
    target_data_key,
    write_manifest,
    write_part,
)
from mlds_operator.storage.store import LocalStore
from safetensors.numpy import save as save_safetensors


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    s = LocalStore(tmp_path / "dataset", durable=False)
    s.ensure_root()
    return s


def meta(unit: int, *, target: str = "ParityMachine", npt: int = 100, **extra: Any) -> dict[str, Any]:
    """A meta.json as the worker writes it (flat), for unit ``unit`` of a campaign with ``npt`` per target."""
    return {
        "dataset": "ds1",
        "target": target,
        "unit": unit,
        "replica": unit % npt,
        "attempt": 0,
        "init_seed": 2**62 + unit,
        "hidden": 12,
        "epochs": 170,
        "eval_loss": 5e-5,
        "converged": True,
        **extra,
    }


def row(unit: int, **extra: Any) -> dict[str, Any]:
    m = meta(unit, **extra)
    return manifest_row(m, f"{m['target']}/{m['replica']:05d}")


# -------------------------------------------------------------------------------------------- rows


def test_flatten_dots_nested_objects_and_keeps_lists() -> None:
    assert flatten({"unit": 3, "seeds": {"init": 1, "sgd": 2}, "shape": {"gru": {"layers": 4}}, "h": [1, 2]}) == {
        "unit": 3,
        "seeds.init": 1,
        "seeds.sgd": 2,
        "shape.gru.layers": 4,
        "h": [1, 2],
    }


def test_flatten_refuses_two_fields_with_one_name() -> None:
    with pytest.raises(ValueError, match=r"seeds\.init"):
        flatten({"seeds.init": 1, "seeds": {"init": 2}})


def test_manifest_table_has_one_row_per_network_with_key_and_unit_first() -> None:
    table = manifest_table([row(0), row(1)])

    assert table.column_names[:2] == ["key", "unit"]
    assert table.num_rows == 2
    assert table.column("key").to_pylist() == ["ParityMachine/00000", "ParityMachine/00001"]
    assert table.schema.field("unit").type == pa.int64()
    assert table.column("init_seed").to_pylist() == [2**62, 2**62 + 1]  # 63-bit seeds survive
    assert table.column("converged").type == pa.bool_()


def test_rows_with_different_fields_share_one_table() -> None:
    gru = row(0)
    cnn = manifest_row({"unit": 1, "target": "clean", "replica": 0, "accuracy": 0.97, "epochs": 12.5}, "clean/00000")

    table = manifest_table([gru, cnn])

    assert table.column("hidden").to_pylist() == [12, None]
    assert table.column("accuracy").to_pylist() == [None, 0.97]
    assert table.column("epochs").type == pa.float64()  # int meets float


def test_a_field_with_mixed_types_is_kept_as_text() -> None:
    table = manifest_table([row(0, device_name="cpu"), row(1, device_name=3)])

    assert table.column("device_name").to_pylist() == ["cpu", "3"]


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param({"key": "T/00000"}, id="no-unit"),
        pytest.param({"unit": 0}, id="no-key"),
        pytest.param({"unit": "0", "key": "T/00000"}, id="unit-as-text"),
        pytest.param({"unit": True, "key": "T/00000"}, id="unit-as-bool"),
    ],
)
def test_a_row_needs_an_integer_unit_and_a_key(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="unit"):
        manifest_table([bad])


def test_manifest_round_trip(store: LocalStore) -> None:
    assert write_manifest(store, [row(1), row(0)]) == MANIFEST_KEY

    table = read_manifest(store)

    assert table.column("unit").to_pylist() == [1, 0]  # written as given; compaction sorts
    assert pq.read_table(store.path(MANIFEST_KEY)).equals(table)  # a plain Parquet file


def test_reading_a_manifest_that_is_not_there_says_so(store: LocalStore) -> None:
    with pytest.raises(UserError, match=r"no manifest\.parquet"):
        read_manifest(store)


# -------------------------------------------------------------------------------------- parts, compaction


def test_parts_are_numbered_files_under_mlds(store: LocalStore) -> None:
    assert next_part_seq(store) == 1
    assert write_part(store, 1, [row(0)]) == "_mlds/parts/part-000001.parquet"
    assert write_part(store, 2, []) is None  # nothing to write
    assert write_part(store, 7, [row(1)]) == part_key(7)

    assert next_part_seq(store) == 8
    parts = read_parts(store)
    assert parts is not None
    assert parts.column("unit").to_pylist() == [0, 1]


def test_compaction_keeps_the_first_row_of_each_unit_and_sorts_by_unit(store: LocalStore) -> None:
    write_part(store, 1, [row(5, attempt=0), row(2, attempt=0)])
    write_part(store, 2, [row(2, attempt=9), row(0, attempt=1)])  # unit 2 again, e.g. re-flushed after a restart
    write_part(store, 3, [row(5, attempt=9), row(9, attempt=2)])

    table = compact_manifest(store)

    assert table.column("unit").to_pylist() == [0, 2, 5, 9]
    assert table.column("attempt").to_pylist() == [1, 0, 0, 2]
    assert read_manifest(store).equals(table)


def test_parts_sort_by_number_not_by_name(store: LocalStore) -> None:
    write_part(store, 1_000_000, [row(0, attempt=2)])  # seven digits: sorts before part-999999 by name
    write_part(store, 999_999, [row(0, attempt=1)])

    assert compact_manifest(store).column("attempt").to_pylist() == [1]


def test_compaction_merges_parts_with_different_columns(store: LocalStore) -> None:
    write_part(store, 1, [row(0)])
    write_part(store, 2, [row(1, accuracy=0.5, epochs=3.5)])

    table = compact_manifest(store)

    assert table.column("accuracy").to_pylist() == [None, 0.5]
    assert table.column("epochs").to_pylist() == [170.0, 3.5]


def test_compaction_is_idempotent_and_includes_the_earlier_manifest(store: LocalStore) -> None:
    write_part(store, 1, [row(0), row(1)])
    first = compact_manifest(store, delete_parts=True)
    assert list(store.list("_mlds/parts/")) == []

    # The campaign goes on (more networks per target) and compacts again.
    write_part(store, 2, [row(1, attempt=5), row(2)])
    second = compact_manifest(store)
    third = compact_manifest(store)

    assert first.column("unit").to_pylist() == [0, 1]
    assert second.column("unit").to_pylist() == [0, 1, 2]
    assert second.column("attempt").to_pylist() == [0, 0, 0]  # the manifest's row of unit 1 came first
    assert third.equals(second)


def test_compacting_nothing_writes_an_empty_manifest(store: LocalStore) -> None:
    table = compact_manifest(store)

    assert table.num_rows == 0
    assert read_manifest(store).column_names == ["key", "unit"]


def test_a_large_campaign_compacts_from_parts(store: LocalStore) -> None:
    # 40,000 units in 20 parts (plus a re-flushed duplicate batch): no meta.json is read.
    batch = 2_000
    for seq in range(20):
        write_part(store, seq + 1, [row(u, npt=10_000) for u in range(seq * batch, (seq + 1) * batch)])
    write_part(store, 21, [row(u, npt=10_000, attempt=7) for u in range(0, batch)])

    table = compact_manifest(store)

    assert table.num_rows == 40_000
    assert np.array_equal(table.column("unit").to_numpy(), np.arange(40_000))
    assert set(table.column("attempt").to_pylist()) == {0}


def test_a_manifest_larger_than_a_row_group_compacts_in_row_groups_to_the_same_rows(
    store: LocalStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The streaming path (the one a million-row campaign takes) at a size the suite affords, 4-row groups,
    # against the in-memory merge of the same parts: units out of order and repeated across parts, columns
    # that differ between parts and a column of mixed types (JSON text).
    parts = [
        [row(u, attempt=0) for u in (7, 3, 11, 0, 5)],
        [row(3, attempt=9), row(2, accuracy=0.5), row(9, epochs=3.5), row(1, note="x")],
        [row(4, note=True), row(8), row(6, attempt=4), row(10), row(12)],
    ]
    small = LocalStore(tmp_path / "in-memory", durable=False)
    small.ensure_root()
    for seq, rows in enumerate(parts, 1):
        write_part(store, seq, rows)
        write_part(small, seq, rows)
    in_memory = compact_manifest(small)
    monkeypatch.setattr(manifest_module, "_GROUP_ROWS", 4)

    table = compact_manifest(store)

    assert table.column("unit").to_pylist() == list(range(13))
    assert table.column("attempt").to_pylist() == [0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0]
    assert table.column("note").to_pylist() == [None, "x", None, None, "true"] + [None] * 8
    assert table.schema == in_memory.schema
    assert table.to_pylist() == in_memory.to_pylist()
    assert pq.ParquetFile(store.root / MANIFEST_KEY).metadata.num_row_groups == 4

    # Again with the big manifest itself among the inputs (its row groups read back): same rows, plus the new one.
    write_part(store, 4, [row(13)])
    again = compact_manifest(store)
    assert again.column("unit").to_pylist() == list(range(14))
    assert again.slice(0, 13).to_pylist() == in_memory.to_pylist()


@pytest.mark.parametrize(
    "rows",
    [
        pytest.param([0, 2, 4, 6, 8], id="in-order"),
        pytest.param([9, 0, 5, 3, 3, 7], id="out-of-order-and-repeated"),
        pytest.param([4], id="one"),
        pytest.param([], id="none"),
    ],
)
def test_gathering_rows_from_chunks_is_take_on_the_chunks_laid_end_to_end(rows: list[int]) -> None:
    # What compaction takes from each column, without concatenating the column first (its memory peak).
    chunks = [pa.array(["a", None, "c"]), pa.array([], pa.string()), pa.array(["d", "e"]), pa.array(list("fghij"))]
    want = pa.chunked_array(chunks).take(pa.array(rows, pa.int64())).combine_chunks()

    got = manifest_module._gather(chunks, np.array(rows, dtype=np.int64), pa.string())

    assert got.equals(want)


# ----------------------------------------------------------------------------------------- checkpoint


def test_checkpoint_round_trip(store: LocalStore) -> None:
    assert get_checkpoint(store) is None
    put_checkpoint(store, b"")
    assert get_checkpoint(store) == b""
    put_checkpoint(store, b"\x00lease book\xff" * 1000)

    assert get_checkpoint(store) == b"\x00lease book\xff" * 1000
    assert list(store.list("_mlds/")) == [CHECKPOINT_KEY]


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda b: b[:-1], id="truncated"),
        pytest.param(lambda b: b[:-1] + bytes([b[-1] ^ 1]), id="bit-flip"),
        pytest.param(lambda b: b"", id="empty"),
        pytest.param(lambda b: b"raw checkpoint bytes from elsewhere", id="foreign"),
    ],
)
def test_a_damaged_checkpoint_is_ignored_with_a_warning(
    store: LocalStore, caplog: pytest.LogCaptureFixture, damage: Any
) -> None:
    put_checkpoint(store, b"state" * 100)
    blob = store.get_bytes(CHECKPOINT_KEY)
    assert blob is not None
    store.put_bytes(CHECKPOINT_KEY, damage(blob))

    with caplog.at_level(logging.WARNING):
        assert get_checkpoint(store) is None
    assert "damaged" in caplog.text


# ---------------------------------------------------------------------------------- data, README, scan


def test_target_data_round_trip(store: LocalStore) -> None:
    assert get_target_data(store, "ParityMachine") is None
    assert put_target_data(store, "ParityMachine", b"npz bytes") == "data/ParityMachine.npz"

    assert get_target_data(store, "ParityMachine") == b"npz bytes"
    with pytest.raises(ValueError, match="no '/'"):
        target_data_key("a/b")


def test_find_results_lists_folders_with_a_meta_json(store: LocalStore) -> None:
    for key in (
        "ParityMachine/00000/meta.json",
        "ParityMachine/00000/model.safetensors",
        "ParityMachine/00001/model.safetensors",  # upload in progress: no meta.json yet
        "ParityMachine/123456/meta.json",  # replica >= 100,000
        "automaton-00003/00042/meta.json",
        "ParityMachine/00002/snapshots/meta.json",  # too deep
        "ParityMachine/meta.json",  # too shallow
        "ParityMachine/0001/meta.json",  # not a replica number
        "_mlds/00001/meta.json",  # bookkeeping
        "data/ParityMachine.npz",
    ):
        store.put_bytes(key, b"{}")
    write_part(store, 1, [row(0)])
    put_checkpoint(store, b"c")

    assert sorted(find_results(store)) == ["ParityMachine/00000", "ParityMachine/123456", "automaton-00003/00042"]


def test_find_results_since_skips_older_results(store: LocalStore) -> None:
    store.put_bytes("T/00000/meta.json", b"{}")
    store.put_bytes("T/00001/meta.json", b"{}")
    old = datetime(2026, 1, 1, tzinfo=UTC)
    os.utime(store.path("T/00000/meta.json"), (old.timestamp(), old.timestamp()))

    assert list(find_results(store, since=old + timedelta(hours=1))) == ["T/00001"]
    assert sorted(find_results(store, since=old)) == ["T/00000", "T/00001"]


def spec(dataset: Dataset, **workload: Any) -> CampaignSpec:
    return CampaignSpec(workload=Workload(dataset=dataset, **workload), networks_per_target=3, seed=7)


def test_readme_says_what_the_dataset_is_and_how_it_was_trained() -> None:
    text = campaign_readme(
        "ds1-parity",
        spec(Dataset.ds1),
        succeeded=14,
        failed_units="12",
        created=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    )

    assert text.startswith("# ds1-parity: an MLDS ds1 dataset")
    assert "5 targets x 3 networks = 15 networks, campaign seed 7" in text
    assert "14 of 15 networks completed; failed units: 12; written 2026-01-02T03:04:05+00:00" in text
    # A README travels with every copy of the dataset (`mlds dataset pull`): it names no location.
    assert "s3://" not in text
    assert "Stored at" not in text
    # Resolved hyper-parameters: EightBit's longer cap is told apart from the others.
    assert re.search(r"`EightBitMachine`: max_epochs=4096, learning_rate=0.001, batch_size=32", text)
    assert re.search(r"`SingleDirectMachine`, .*`ParityMachine`: max_epochs=2048", text)
    for needle in ("safetensors", "pyarrow", "manifest.parquet", "data/<target>.npz", "views of the manifest"):
        assert needle in text


def test_readme_summarises_thousands_of_targets() -> None:
    text = campaign_readme("ds3", spec(Dataset.ds3, automata=1000))

    assert "1,000 targets x 3 networks = 3,000 networks" in text
    assert "`automaton-00000`" in text
    assert "and 988 more: max_epochs=4096" in text
    assert "automaton-00999" not in text
    assert len(text) < 10_000


def test_readme_for_cnns_speaks_of_accuracy_not_loss() -> None:
    text = campaign_readme("ds4", spec(Dataset.ds4))

    assert "attack success rate" in text
    assert "target_loss" not in text
    assert "`clean`, `pixel`, `checker`: max_epochs=50, learning_rate=0.01, batch_size=64" in text


def test_the_readmes_loading_code_runs_on_a_dataset(store: LocalStore, monkeypatch: pytest.MonkeyPatch) -> None:
    # Build a tiny dataset the way a campaign leaves it, then run the README's Python as a user would.
    weights = {"gru.weight_ih_l0": np.ones((36, 9), np.float32), "out.bias": np.zeros(8, np.float32)}
    for unit in range(3):
        store.put_bytes(f"ParityMachine/{unit:05d}/model.safetensors", save_safetensors(weights))
        store.put_bytes(f"ParityMachine/{unit:05d}/meta.json", json.dumps(meta(unit)).encode())
    write_part(store, 1, [row(u) for u in range(3)])
    compact_manifest(store)
    buf = io.BytesIO()
    np.savez(buf, train_x=np.zeros((2, 50, 9), np.float32))
    put_target_data(store, "ParityMachine", buf.getvalue())
    text = campaign_readme("ds1-parity", spec(Dataset.ds1, machines=["ParityMachine"]))
    put_readme(store, text)

    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert len(blocks) == 2
    monkeypatch.chdir(store.root)
    scope: dict[str, Any] = {}
    for block in blocks:
        exec(block, scope)

    assert scope["features"].shape == (36 * 9 + 8,)
    assert scope["first_100"].num_rows == 3
    assert scope["parity"].num_rows == 3
    assert store.get_bytes("README.md") == text.encode()


def test_a_column_whose_type_changed_between_parts_is_kept_as_text(store: LocalStore) -> None:
    # E.g. a newer worker records device_name as an object where an older one wrote a string.
    write_part(store, 1, [row(0, device_name="cpu")])
    write_part(store, 2, [row(1, device_name=[1, 2])])

    table = compact_manifest(store)

    assert table.column("device_name").to_pylist() == ["cpu", "[1, 2]"]
