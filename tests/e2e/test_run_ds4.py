"""`mlds run` of a tiny ds4 campaign, on each image source: the bundled 8x8 digits and MNIST in the store.

A real ``mlds run`` with a real worker process, as a user runs it (docs/workloads.md §7). The 8x8
digits are package data of the workloads, so any worker has them; MNIST's IDX files are placed by the
user under the campaign's storage prefix (here the local store folder), where only the lease server can
read them: before the ``input`` route, every MNIST unit failed in the worker ("no folder was given") and
the campaign ended Failed. The MNIST files here are small synthetic digits of MNIST's shape
(:func:`tests.run_fixtures.write_mnist_like`), so each network converges in a few epochs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.run_fixtures import (
    manifest_rows,
    reap,
    start_mlds,
    units_with,
    worker_events,
    write_campaign,
    write_mnist_like,
)

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("images", ["digits8", "mnist"])
def test_a_tiny_ds4_campaign_runs_to_the_end(tmp_path: Path, images: str) -> None:
    store = tmp_path / "store"
    if images == "mnist":
        write_mnist_like(store)
    workload = {"dataset": "ds4", "variants": ["clean"], "images": images}
    campaign = write_campaign(
        tmp_path / "campaign.yaml", name="digits", workload=workload, networks_per_target=2, units_per_lease=1
    )

    proc = start_mlds(["run", campaign, "--workers", "1", "--store", "store", "--quiet"], cwd=tmp_path, tag="run")
    code = proc.wait(what="mlds run to finish the ds4 campaign")

    assert reap(str(tmp_path), wait=True) == []
    assert code == 0, proc.describe()
    assert proc.stdout.splitlines()[0] == "digits: Succeeded: 2/2 networks"
    rows = manifest_rows(store / "manifest.parquet")
    target = "clean" if images == "digits8" else "mnist-clean"
    assert [(row["target"], row["images"], row["converged"]) for row in rows] == [(target, images, True)] * 2
    events = worker_events(store / "_mlds" / "logs")
    assert sorted(units_with(events, "completed (accepted)")) == [0, 1]
    fetched = sorted(e["file"] for e in events if e.message == "fetched an input file")
    if images == "mnist":  # each of MNIST's four files, once, from the lease server
        assert fetched == [
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
        ]
    else:
        assert fetched == []


def test_mlds_run_of_mnist_without_its_files_says_where_to_put_them_and_trains_nothing(tmp_path: Path) -> None:
    workload = {"dataset": "ds4", "variants": ["clean"], "images": "mnist"}
    campaign = write_campaign(tmp_path / "campaign.yaml", name="digits", workload=workload, networks_per_target=2)

    proc = start_mlds(["run", campaign, "--workers", "1", "--store", "store", "--quiet"], cwd=tmp_path, tag="run")
    code = proc.wait(what="mlds run to refuse the campaign")

    assert reap(str(tmp_path), wait=True) == []
    assert code == 2, proc.describe()
    (line,) = proc.stderr.splitlines()  # one line says why (not "training on the CPU" first)
    assert line.startswith("error: ")
    assert "reads train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte" in line
    assert str(tmp_path / "store") in line  # where to put them
    assert not (tmp_path / "store" / "_mlds" / "logs").exists()  # no worker was started
