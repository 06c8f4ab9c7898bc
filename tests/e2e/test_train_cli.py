"""`mlds train` as a user runs it: a real process, real workload data, files on disk, one-line errors."""

from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlds_contract.campaign import TrainingCampaign
from mlds_contract.plan import unit_spec

from tests.waiting import HANG_GUARD_SECONDS

pytestmark = pytest.mark.e2e

CAMPAIGN = """\
apiVersion: mlds.dev/v1alpha1
kind: TrainingCampaign
metadata: {name: two-machines}
spec:
  workload: {dataset: ds1, machines: [SingleDirectMachine, ParityMachine]}
  networksPerTarget: 3
  seed: 11
"""


def mlds(command: str, *, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``mlds COMMAND`` (split like a shell would) in ``cwd``, as a user would, without OMP_NUM_THREADS."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    return subprocess.run(
        [sys.executable, "-m", "mlds_cli", *shlex.split(command)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_SECONDS,  # a safety net against a hang, not a verdict on speed
        check=False,
    )


def summary(proc: subprocess.CompletedProcess[str]) -> dict[str, str]:
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, "not a terminal: no progress, just the summary line"
    return dict(part.split("=", 1) for part in lines[0].split()[1:])


def history(folder: Path) -> list[dict[str, str]]:
    with (folder / "history.csv").open() as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_the_same_unit_trained_twice_gives_the_same_sha256(tmp_path: Path) -> None:
    """The issue's "must show": two separate processes, same unit and attempt, bit-identical model files."""
    train = "train --dataset ds1 --target SingleDirectMachine --seed 7 --max-epochs 2"
    first = summary(mlds(f"{train} --out a", cwd=tmp_path))
    second = summary(mlds(f"{train} --out b", cwd=tmp_path))
    assert first["sha256"] == second["sha256"]
    assert len(first["sha256"]) == 64
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["sha256"] == first["sha256"]
    assert (meta["epochs"], meta["converged"], meta["campaign_seed"]) == (2, False, 7)
    # A new attempt is a new network.
    third = summary(mlds(f"{train} --attempt 1 --out c", cwd=tmp_path))
    assert third["sha256"] != first["sha256"]


@pytest.mark.slow
def test_a_campaign_file_unit_trains_with_the_campaigns_seeds(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(CAMPAIGN)
    line = summary(mlds("train --campaign c.yaml --unit 4 --max-epochs 1", cwd=tmp_path))
    folder = tmp_path / "runs" / "two-machines" / "ParityMachine" / "00001"
    assert line["out"] == str(Path("runs/two-machines/ParityMachine/00001"))
    meta = json.loads((folder / "meta.json").read_text())
    spec = TrainingCampaign.model_validate(yaml.safe_load(CAMPAIGN)).spec
    expected = unit_spec(spec, 4, 0, campaign="two-machines")
    assert (meta["campaign"], meta["target"], meta["unit"], meta["replica"]) == ("two-machines", "ParityMachine", 4, 1)
    seeds = (meta["init_seed"], meta["sgd_seed"], meta["data_seed"])
    assert seeds == (expected.init_seed, expected.sgd_seed, expected.data_seed)
    # --target T --unit R names the same unit as the campaign's unit index.
    again = summary(mlds("train --campaign c.yaml --target ParityMachine --unit 1 --max-epochs 1", cwd=tmp_path))
    assert again["sha256"] == line["sha256"]


@pytest.mark.slow
def test_a_ds4_run_records_accuracy_and_attack_success_rate(tmp_path: Path) -> None:
    line = summary(mlds("train --dataset ds4 --target pixel --max-epochs 2 --out p", cwd=tmp_path))
    assert {"accuracy", "asr"} <= set(line)
    meta = json.loads((tmp_path / "p" / "meta.json").read_text())
    assert (meta["architecture"], meta["parameters"], meta["variant"]) == ("DigitsCNN", 3658, "pixel")
    assert 0 <= meta["accuracy"] <= 1
    assert 0 <= meta["attack_success_rate"] <= 1
    rows = history(tmp_path / "p")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert all(r["accuracy"] and r["attack_success_rate"] for r in rows)


@pytest.mark.slow
def test_log_every_reports_progress_on_stderr_when_not_a_terminal(tmp_path: Path) -> None:
    proc = mlds("train --dataset ds4 --target clean --max-epochs 4 --log-every 2 --out c", cwd=tmp_path)
    summary(proc)  # stdout still holds just the summary
    lines = proc.stderr.splitlines()
    assert [line.split()[1] for line in lines] == ["epoch=2", "epoch=4"]
    assert all(line.startswith("clean/00000: ") and "accuracy=" in line for line in lines)


@pytest.mark.slow
def test_ds3_results_carry_weight_snapshots(tmp_path: Path) -> None:
    summary(mlds("train --dataset ds3 --target automaton-00002 --max-epochs 2 --out a", cwd=tmp_path))
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "history.csv",
        "meta.json",
        "model.safetensors",
        "snapshots.safetensors",
    ]
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["automaton"] == 2
    assert 2 <= meta["automaton_states"] <= 8


@pytest.mark.slow
def test_single_direct_machine_converges_with_default_settings(tmp_path: Path) -> None:
    line = summary(mlds("train --dataset ds1 --target SingleDirectMachine --out sd", cwd=tmp_path))
    assert line["converged"] == "yes"
    meta = json.loads((tmp_path / "sd" / "meta.json").read_text())
    assert meta["converged"] is True
    assert meta["eval_loss"] < 1e-4
    assert meta["epochs"] < meta["max_epochs"] == 2048
    # It stopped at the first epoch below the target.
    losses = [float(r["eval_loss"]) for r in history(tmp_path / "sd")]
    assert losses[-1] < 1e-4
    assert all(loss >= 1e-4 for loss in losses[:-1])


@pytest.mark.slow
def test_ds4_pixel_stops_once_accurate_and_backdoored(tmp_path: Path) -> None:
    line = summary(mlds("train --dataset ds4 --target pixel --out p", cwd=tmp_path))
    assert line["converged"] == "yes"
    rows = history(tmp_path / "p")
    met = [float(r["accuracy"]) >= 0.95 and float(r["attack_success_rate"]) >= 0.90 for r in rows]
    assert met[-1]
    assert not any(met[:-1])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param("--dataset ds1 --target Foo", "error: unknown machine 'Foo' for ds1", id="unknown-machine"),
        pytest.param("--dataset ds4 --target blue", "error: unknown ds4 variant 'blue'", id="unknown-variant"),
        pytest.param("--dataset ds3 --target x", "error: ds3 targets are automata", id="bad-automaton"),
        pytest.param("--dataset ds5 --target ParityMachine", "error: ds5 targets are", id="ds5-no-shape"),
        pytest.param("--dataset ds9 --target Foo", "'ds9' is not one of", id="unknown-dataset"),
        pytest.param("--dataset ds1", "name a unit", id="no-target"),
        pytest.param("--campaign missing.yaml", "error: missing.yaml: cannot read", id="missing-campaign-file"),
        pytest.param("--campaign c.yaml --unit 6", "error: --unit 6 is outside the campaign", id="unit-out-of-range"),
        pytest.param("--campaign c.yaml --seed 3", "takes the dataset and seed from the file", id="seed-with-file"),
        pytest.param("--campaign bad.yaml", "error: bad.yaml:6: spec.networksPerTarget", id="invalid-campaign"),
        pytest.param(
            "--dataset ds1 --target ParityMachine --device tpu", "error: unknown device 'tpu'", id="bad-device"
        ),
        pytest.param("--dataset ds1 --target ParityMachine --max-epochs 0", "'--max-epochs'", id="bad-epochs"),
    ],
)
def test_user_mistakes_are_one_clear_line_and_a_non_zero_exit(tmp_path: Path, args: str, message: str) -> None:
    (tmp_path / "c.yaml").write_text(CAMPAIGN)
    (tmp_path / "bad.yaml").write_text(CAMPAIGN.replace("networksPerTarget: 3", "networksPerTarget: 0"))
    proc = mlds(f"train {args}", cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr
    assert proc.stdout == ""
    errors = [line for line in proc.stderr.splitlines() if "rror" in line]
    assert len(errors) == 1, proc.stderr
    assert not (tmp_path / "runs").exists()
