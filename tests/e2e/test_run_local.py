"""`mlds run` on a local folder, as a user runs it: to the end, again, interrupted and resumed, and wrong.

Real ``mlds run`` processes with real worker processes; networks converge in a few epochs
(``RELAXED_LOSS``). What is checked is what a user sees: the exit status, the summary line, the
manifest, and (from the workers' logs) which networks were trained how many times.
"""

from __future__ import annotations

import signal
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.run_fixtures import (
    Proc,
    log_sizes,
    manifest_rows,
    reap,
    start_mlds,
    units_with,
    wait_for,
    worker_events,
    write_campaign,
)

pytestmark = pytest.mark.e2e

#: Seconds a small campaign may take on a busy 2-core machine (it needs about 20-30 s).
RUN_TIMEOUT = 240.0


@dataclass
class Finished:
    """A campaign run once to the end in its own folder."""

    folder: Path
    campaign: Path
    store: Path
    first: Proc

    @property
    def logs(self) -> Path:
        return self.store / "_mlds" / "logs"


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Finished:
    folder = tmp_path_factory.mktemp("run-local")
    campaign = write_campaign(folder / "campaign.yaml", name="quick", networks_per_target=3)
    proc = start_mlds(["run", campaign, "--workers", "2", "--store", "store", "--quiet"], cwd=folder, tag="first")
    proc.wait(RUN_TIMEOUT)
    leftovers = reap(str(folder), grace=10.0)
    assert leftovers == [], f"worker processes outlived mlds run: {leftovers}"
    return Finished(folder, campaign, folder / "store", proc)


@pytest.mark.slow
def test_a_campaign_runs_to_the_end_and_prints_its_summary(finished: Finished) -> None:
    assert finished.first.popen.returncode == 0, finished.first.describe()
    lines = finished.first.stdout.splitlines()
    assert lines[0] == "quick: Succeeded: 6/6 networks"
    assert lines[-1] == f"  manifest: {(finished.store / 'manifest.parquet').as_uri()}"
    rows = manifest_rows(finished.store / "manifest.parquet")
    assert [row["unit"] for row in rows] == list(range(6))
    assert all(row["converged"] for row in rows)
    assert (finished.store / "README.md").is_file()
    assert sorted(p.name for p in (finished.store / "data").iterdir()) == [
        "SingleDirectMachine.npz",
        "SingleInvertMachine.npz",
    ]
    # Every network was trained exactly once and accepted exactly once.
    events = worker_events(finished.logs)
    assert sorted(units_with(events, "completed (accepted)")) == list(range(6))
    assert not list((finished.store / "_mlds").glob("staging/**/*.*"))


@pytest.mark.slow
def test_running_a_finished_campaign_again_trains_nothing_and_exits_at_once(finished: Finished) -> None:
    before = log_sizes(finished.logs)
    rows_before = manifest_rows(finished.store / "manifest.parquet")

    again = start_mlds(
        ["run", finished.campaign, "--workers", "2", "--store", "store", "--quiet"], cwd=finished.folder, tag="again"
    )
    code = again.wait(60.0)

    assert code == 0, again.describe()
    assert again.stdout.splitlines()[0] == "quick: Succeeded: 6/6 networks"
    assert log_sizes(finished.logs) == before  # no worker was even started
    assert manifest_rows(finished.store / "manifest.parquet") == rows_before
    assert reap(str(finished.folder)) == []


@pytest.mark.slow
def test_an_interrupted_run_resumes_without_retraining_finished_networks(tmp_path: Path) -> None:
    campaign = write_campaign(tmp_path / "campaign.yaml", name="resumed", networks_per_target=5)
    args = ["run", campaign, "--workers", "2", "--store", "store", "--quiet"]
    logs = tmp_path / "store" / "_mlds" / "logs"
    first = start_mlds(args, cwd=tmp_path, tag="first")

    def accepted() -> list[int]:
        return units_with(worker_events(logs), "completed (accepted)") if logs.is_dir() else []

    wait_for(lambda: len(accepted()) >= 2, timeout=RUN_TIMEOUT, what="two networks completed", alive=first)
    first.send(signal.SIGINT)
    code = first.wait(60.0)

    assert code == 1, first.describe()
    assert "interrupted: progress is saved; run the same command again to resume" in first.stderr
    assert reap(str(tmp_path)) == [], "mlds run left workers behind after Ctrl-C"
    done_first = accepted()
    assert len(done_first) < 10, "the run finished before it could be interrupted; the test proved nothing"
    first_events = worker_events(logs)
    # Units in training when Ctrl-C came were handed back (not failed) by workers that exited cleanly.
    assert any(e.message == "released" for e in first_events)
    assert not any(e.level == "ERROR" for e in first_events)
    offsets = log_sizes(logs)

    second = start_mlds(args, cwd=tmp_path, tag="second")
    code = second.wait(RUN_TIMEOUT)

    assert code == 0, second.describe()
    assert second.stdout.splitlines()[0] == "resumed: Succeeded: 10/10 networks"
    trained_again = set(units_with(worker_events(logs, skip_bytes=offsets), "trained"))
    assert trained_again.isdisjoint(done_first)
    assert trained_again | set(done_first) == set(range(10))
    accepted_total = Counter(accepted())
    assert sorted(accepted_total) == list(range(10))
    assert set(accepted_total.values()) == {1}, f"a network was accepted twice: {accepted_total}"
    rows = manifest_rows(tmp_path / "store" / "manifest.parquet")
    assert [row["unit"] for row in rows] == list(range(10))
    # Released units were not charged an attempt: every network is its unit's first attempt.
    assert {row["attempt"] for row in rows} == {0}
    assert reap(str(tmp_path), grace=10.0) == []


GOOD = """\
apiVersion: mlds.dev/v1alpha1
kind: TrainingCampaign
metadata: {name: bad}
spec:
  workload: {dataset: ds1, machines: [SingleDirectMachine]}
  networksPerTarget: 2
"""

BAD_FILES = {
    "an unknown machine": (GOOD.replace("SingleDirectMachine", "TuringMachine"), "unknown machine 'TuringMachine'"),
    "a number written as a string": (
        GOOD.replace("networksPerTarget: 2", 'networksPerTarget: "2"'),
        "spec.networksPerTarget",
    ),
    "a misspelt field": (GOOD.replace("networksPerTarget", "networksPerTargets"), "spec.networksPerTarget"),
    "a lease shorter than allowed": (GOOD + "  leases: {durationSeconds: 1}\n", "spec.leases.durationSeconds"),
    "not YAML": ("spec: [unclosed\n", "is not valid YAML"),
    "no TrainingCampaign in it": ("kind: ConfigMap\n", "exactly one TrainingCampaign"),
    "a missing file": (None, "cannot read"),
    # Issue 13: the name becomes a folder of `mlds run`; Kubernetes would refuse these names anyway.
    "a name that climbs out of the store": (GOOD.replace("{name: bad}", "{name: ../x}"), "DNS-1123"),
    "a name that is '..'": (GOOD.replace("{name: bad}", '{name: ".."}'), "DNS-1123"),
    "an absolute name": (GOOD.replace("{name: bad}", "{name: /tmp/x}"), "DNS-1123"),
    "a storage prefix with '..'": (
        GOOD + "  storage: {endpoint: 127.0.0.1:9, bucket: mlds, prefix: ../other}\n",
        "storage.prefix",
    ),
}


@pytest.mark.parametrize(("text", "says"), BAD_FILES.values(), ids=BAD_FILES.keys())
def test_a_bad_campaign_file_is_one_line_on_stderr_and_exit_status_2(
    tmp_path: Path, text: str | None, says: str
) -> None:
    path = tmp_path / "campaign.yaml"
    if text is not None:
        path.write_text(text)

    proc = start_mlds(["run", path, "--store", "store"], cwd=tmp_path, tag="bad")
    code = proc.wait(60.0)

    assert code == 2, proc.describe()
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    assert says in lines[0]
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert not (tmp_path / "store").exists()  # nothing was created for a campaign that never started
