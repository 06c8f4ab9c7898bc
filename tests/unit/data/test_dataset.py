"""`mlds dataset` and the loading API on tiny synthetic datasets in the real on-disk layout.

The datasets come from :func:`mlds_operator.bench.load.synthesize` (valid safetensors with the ds1
network's names and shapes, meta.json, manifest.parquet). Pulls here read a LocalStore; the S3 path is
tests/e2e/test_dataset_pull.py.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from mlds_cli.main import cli
from mlds_contract.errors import StorageUnavailable, UserError
from mlds_data.dataset import (
    JOURNAL_FILE,
    SUMS_FILE,
    load,
    open_source,
    pull,
    read_source_manifest,
    subset_key,
    summarize,
    write_subsets,
)
from mlds_operator.bench.load import synthesize
from mlds_operator.storage.manifest import MANIFEST_KEY, write_part
from mlds_operator.storage.store import LocalStore
from safetensors.numpy import load_file, save

TARGETS = ("SingleDirectMachine", "ParityMachine", "EightBitMachine")


@pytest.fixture(scope="module")
def ds1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 targets x 4 networks. Read-only: tests that change a dataset copy it first (see ``fresh``)."""
    return synthesize(tmp_path_factory.mktemp("ds") / "ds1", targets=TARGETS, per_target=4, seed=1)


@pytest.fixture
def fresh(tmp_path: Path) -> Path:
    return synthesize(tmp_path / "src", targets=TARGETS, per_target=4, seed=1)


def flat(path: Path) -> np.ndarray:
    """A network's weights the slow, obvious way: safetensors' own loader, tensors in name order."""
    tensors = load_file(str(path))
    return np.concatenate([tensors[name].ravel() for name in sorted(tensors)])


class TestLoad:
    def test_a_row_of_the_matrix_is_the_network_as_safetensors_reads_it(self, ds1: Path) -> None:
        nets = load(ds1)
        x = nets.weights()
        assert x.shape == (12, 4364)
        assert x.dtype == np.float32
        for i, path in enumerate(nets.paths()):
            np.testing.assert_array_equal(x[i], flat(path))

    def test_labels_and_table_follow_the_manifest(self, ds1: Path) -> None:
        nets = load(ds1)
        manifest = pq.read_table(ds1 / MANIFEST_KEY)
        assert nets.labels.tolist() == manifest.column("target").to_pylist()
        assert nets.targets == list(TARGETS)
        codes, classes = nets.encode()
        assert classes == list(TARGETS)
        assert [classes[c] for c in codes] == nets.labels.tolist()
        assert len(nets.frame()) == 12

    def test_layout_names_every_parameter_once_and_covers_the_row(self, ds1: Path) -> None:
        layout = load(ds1).layout
        assert [p.name for p in layout] == sorted(p.name for p in layout)
        assert layout[0].start == 0
        assert all(a.stop == b.start for a, b in itertools.pairwise(layout))
        assert layout[-1].stop == 4364

    def test_state_dict_round_trips(self, ds1: Path) -> None:
        nets = load(ds1)
        ref = load_file(str(nets.paths()[5]))
        got = nets.state_dict(5)
        assert set(got) == set(ref)
        for name, value in ref.items():
            np.testing.assert_array_equal(got[name], value)

    def test_torch_backend_shares_the_matrix(self, ds1: Path) -> None:
        t = load(ds1).weights(backend="torch")
        assert isinstance(t, torch.Tensor)
        assert t.dtype == torch.float32
        np.testing.assert_array_equal(t.numpy(), load(ds1).weights())

    def test_chunks_and_memory_map_give_the_same_matrix(self, ds1: Path, tmp_path: Path) -> None:
        nets = load(ds1)
        whole = nets.weights()
        chunks = list(nets.iter_weights(batch=5))
        assert [len(rows) for rows, _ in chunks] == [5, 5, 2]
        np.testing.assert_array_equal(np.concatenate([m for _, m in chunks]), whole)
        mapped = nets.weights(out=tmp_path / "w.npy")
        np.testing.assert_array_equal(np.load(tmp_path / "w.npy"), whole)
        np.testing.assert_array_equal(mapped, whole)

    def test_one_thread_and_many_agree(self, ds1: Path) -> None:
        nets = load(ds1)
        np.testing.assert_array_equal(nets.weights(jobs=1), nets.weights(jobs=8))

    def test_a_file_with_another_header_is_placed_by_name(self, fresh: Path) -> None:
        nets = load(fresh)
        path = nets.paths()[3]
        before = flat(path)
        # Same tensors, other metadata: the header bytes differ, so the reader takes its by-name path.
        path.write_bytes(save(load_file(str(path)), metadata={"format": "pt", "note": "rewritten"}))
        np.testing.assert_array_equal(load(fresh).weights()[3], before)

    def test_a_network_of_another_shape_is_refused(self, fresh: Path) -> None:
        nets = load(fresh)
        path = nets.paths()[2]
        tensors = load_file(str(path))
        tensors["out.bias"] = np.zeros(9, np.float32)
        path.write_bytes(save(tensors))
        with pytest.raises(ValueError, match=r"out\.bias has shape"):
            load(fresh).weights()

    def test_datasets_combine(self, ds1: Path, tmp_path: Path) -> None:
        ds2 = synthesize(
            tmp_path / "ds2", targets=("ParityModified",), dataset="ds2", per_target=3, seed=2, campaign="c2"
        )
        nets = load(ds1, ds2)
        assert len(nets) == 15
        assert nets.targets == [*TARGETS, "ParityModified"]
        assert set(nets.table.column("dataset").to_pylist()) == {"ds1", "ds2"}
        assert set(nets.table.column("root").to_pylist()) == {str(ds1.resolve()), str(ds2.resolve())}
        x = nets.weights()
        np.testing.assert_array_equal(x[14], flat(ds2 / "ParityModified" / "00002" / "model.safetensors"))

    def test_subset_keeps_the_first_replicas_of_each_target(self, ds1: Path) -> None:
        sub = load(ds1).subset(first=2)
        assert len(sub) == 6
        assert sorted(sub.table.column("replica").to_pylist()) == [0, 0, 0, 1, 1, 1]
        only = load(ds1).subset(targets=["ParityMachine"])
        assert only.targets == ["ParityMachine"]

    def test_a_running_campaign_is_read_from_its_parts(self, tmp_path: Path) -> None:
        src = synthesize(tmp_path / "run", targets=TARGETS[:1], per_target=3)
        rows = pq.read_table(src / MANIFEST_KEY).to_pylist()
        (src / MANIFEST_KEY).unlink()
        store = LocalStore(src)
        write_part(store, 1, rows[:2])
        write_part(store, 2, rows[1:])  # unit 1 twice: the first row counts, as compaction keeps
        table, final = read_source_manifest(store)
        assert not final
        assert table.column("unit").to_pylist() == [0, 1, 2]
        assert len(load(src)) == 3

    def test_not_a_dataset(self, tmp_path: Path) -> None:
        with pytest.raises(UserError, match="not an mlds dataset"):
            load(tmp_path)
        with pytest.raises(UserError, match="neither a dataset folder"):
            load(tmp_path / "nothing")


class TestSubsetsAndInfo:
    def test_subset_files_are_views_that_load_like_the_dataset(self, fresh: Path) -> None:
        written = write_subsets(LocalStore(fresh), [2, 10])
        assert {n: v.num_rows for n, v in written.items()} == {2: 6, 10: 12}
        path = fresh / subset_key(2)
        assert path.name == "first-00002.parquet"
        nets = load(path)
        assert len(nets) == 6
        assert nets.table.column("root").to_pylist()[0] == str(fresh.resolve())
        full = load(fresh)
        keys = full.table.column("key").to_pylist()
        rows = [keys.index(k) for k in nets.table.column("key").to_pylist()]
        np.testing.assert_array_equal(nets.weights(), full.weights()[rows])

    def test_summary_counts_targets_convergence_and_sizes(self, ds1: Path) -> None:
        info = summarize(LocalStore(ds1))
        assert info["networks"] == 12
        assert info["final"] is True
        assert set(info["targets"]) == set(TARGETS)
        t = info["targets"]["ParityMachine"]
        assert t["networks"] == 4
        assert t["converged"] == 4
        model = (ds1 / "ParityMachine" / "00000" / "model.safetensors").stat().st_size
        assert t["bytes"] >= 4 * model
        assert info["parameters"] == [4364]

    def test_cli_info_subset_and_an_unknown_target(self, fresh: Path) -> None:
        runner = CliRunner()
        out = runner.invoke(cli, ["dataset", "info", str(fresh)])
        assert out.exit_code == 0, out.output
        assert "EightBitMachine" in out.output
        assert "12 networks, 3 targets" in out.output
        out = runner.invoke(cli, ["dataset", "info", str(fresh), "--json"])
        assert json.loads(out.output)["networks"] == 12
        out = runner.invoke(cli, ["dataset", "subset", str(fresh), "--first", "3", "--first", "100"])
        assert out.exit_code == 0, out.output
        assert "first-00003.parquet: 9 networks" in out.output
        assert "fewer than 100 in: SingleDirectMachine 4" in out.output
        out = runner.invoke(cli, ["dataset", "subset", str(fresh), "--target", "Nope"])
        assert isinstance(out.exception, UserError)

    def test_sources_name_folders_buckets_and_campaign_files(self, tmp_path: Path) -> None:
        with pytest.raises(UserError, match="--endpoint"):
            open_source("s3://bucket/prefix")
        with pytest.raises(UserError, match="no such folder"):
            open_source(str(tmp_path / "missing"))
        campaign = tmp_path / "c.yaml"
        campaign.write_text(
            "apiVersion: mlds.dev/v1alpha1\nkind: TrainingCampaign\nmetadata: {name: c}\n"
            "spec: {workload: {dataset: ds1}, networksPerTarget: 1}\n"
        )
        with pytest.raises(UserError, match=r"no spec\.storage"):
            open_source(str(campaign))


class FlakyStore:
    """A LocalStore whose reads can fail: an outage, damaged bytes, or an interruption after N reads."""

    def __init__(self, inner: LocalStore, *, corrupt: set[str] = frozenset(), outages: int = 0) -> None:
        self.inner = inner
        self.corrupt = set(corrupt)  # keys served damaged once
        self.outages = outages
        self.interrupt_after: int | None = None
        self.reads = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def get_bytes(self, rel: str) -> bytes | None:
        data = self.inner.get_bytes(rel)
        if rel in (MANIFEST_KEY,) or rel.startswith("_mlds/"):
            return data
        self.reads += 1
        if self.interrupt_after is not None and self.reads > self.interrupt_after:
            raise KeyboardInterrupt
        if self.outages:
            self.outages -= 1
            raise StorageUnavailable("object store unreachable (test)")
        if rel in self.corrupt and data is not None:
            self.corrupt.discard(rel)
            return data[:-1] + bytes([data[-1] ^ 0xFF])
        return data


def sums_ok(dest: Path) -> Iterator[bool]:
    for line in (dest / SUMS_FILE).read_text().splitlines():
        digest, key = line.split("  ", 1)
        yield hashlib.sha256((dest / key).read_bytes()).hexdigest() == digest


class TestPull:
    def test_a_pull_copies_every_network_verified_and_writes_the_manifest_last(
        self, fresh: Path, tmp_path: Path
    ) -> None:
        dest = tmp_path / "dest"
        report = pull(LocalStore(fresh), dest)
        assert not report.failed
        assert report.fetched == report.objects == 12 * 3
        assert (dest / MANIFEST_KEY).is_file()
        assert not (dest / JOURNAL_FILE).exists()
        assert all(sums_ok(dest))
        np.testing.assert_array_equal(load(dest).weights(), load(fresh).weights())
        again = pull(LocalStore(fresh), dest)
        assert (again.fetched, again.present) == (0, 36)

    def test_first_n_pulls_only_those_networks(self, fresh: Path, tmp_path: Path) -> None:
        report = pull(LocalStore(fresh), tmp_path / "d", first=1)
        assert report.fetched == 3 * 3
        assert len(load(tmp_path / "d")) == 3

    def test_damaged_bytes_in_flight_are_fetched_again(self, fresh: Path, tmp_path: Path) -> None:
        key = "ParityMachine/00001/model.safetensors"
        store = FlakyStore(LocalStore(fresh), corrupt={key}, outages=1)
        waits: list[float] = []
        report = pull(store, tmp_path / "d", jobs=1, sleep=waits.append)
        assert not report.failed
        assert report.retried == 1
        assert len(waits) == 2  # one outage, one damaged read
        assert (tmp_path / "d" / key).read_bytes() == (fresh / key).read_bytes()

    def test_a_source_object_that_never_matches_its_sha256_fails_the_pull(self, fresh: Path, tmp_path: Path) -> None:
        key = "EightBitMachine/00002/model.safetensors"
        blob = bytearray((fresh / key).read_bytes())
        blob[-1] ^= 0xFF
        (fresh / key).write_bytes(bytes(blob))
        report = pull(LocalStore(fresh), tmp_path / "d", sleep=lambda _s: None)
        assert report.failed == {key: "sha256 differs from the manifest"}
        assert report.retried == 3
        assert not (tmp_path / "d" / MANIFEST_KEY).exists()
        assert not (tmp_path / "d" / key).exists()
        out = CliRunner().invoke(cli, ["dataset", "pull", str(fresh), str(tmp_path / "d2"), "-q"])
        assert out.exit_code == 1
        assert "1 objects failed" in out.output

    def test_an_interrupted_pull_resumes_and_a_damaged_local_file_is_fetched_again(
        self, fresh: Path, tmp_path: Path
    ) -> None:
        dest = tmp_path / "d"
        store = FlakyStore(LocalStore(fresh))
        store.interrupt_after = 10
        with pytest.raises(KeyboardInterrupt):
            pull(store, dest, jobs=1)
        assert not (dest / MANIFEST_KEY).exists()
        journalled = (dest / JOURNAL_FILE).read_text().splitlines()
        assert len(journalled) == 10
        # Damage one pulled file (a bit flip on disk) and leave a non-model file without its journal line.
        victim = journalled[0].split("  ", 1)[1]
        data = bytearray((dest / victim).read_bytes())
        data[0] ^= 0x01
        (dest / victim).write_bytes(bytes(data))
        report = pull(LocalStore(fresh), dest)
        assert not report.failed
        assert report.present == 9
        assert report.refetched == 1
        assert report.fetched == 36 - 9
        assert all(sums_ok(dest))
        assert (dest / victim).read_bytes() == (fresh / victim).read_bytes()

    def test_missing_model_is_reported(self, fresh: Path, tmp_path: Path) -> None:
        (fresh / "ParityMachine" / "00003" / "model.safetensors").unlink()
        report = pull(LocalStore(fresh), tmp_path / "d")
        assert list(report.failed) == ["ParityMachine/00003/model.safetensors"]
        assert "missing from the source" in report.failed["ParityMachine/00003/model.safetensors"]


def test_bench_load_times_a_synthetic_dataset_in_fresh_processes(tmp_path: Path) -> None:
    out = CliRunner().invoke(
        cli, ["bench", "load", "--networks", "10", "--rounds", "1", "--jobs", "2", "--dir", str(tmp_path / "d")]
    )
    assert out.exit_code == 0, out.output
    assert "synthetic dataset (random weights, real layout" in out.output
    row = out.output.strip().splitlines()[-1].split()
    assert row[:3] == ["2", "10", "10x4364"]
    assert len(load(tmp_path / "d")) == 10
