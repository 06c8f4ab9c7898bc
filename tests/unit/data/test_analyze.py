"""`mlds analyze` on synthetic ds1 + ds2 datasets in the real layout, where the answer is known.

:func:`~mlds_operator.bench.load.synthesize` gives each target its own mean in weight space
(``separation``) and draws the losses independently of the target, so: weights must classify well above
chance, losses must not; with ``separation=0`` nothing can be learned and weights must be near chance.
Few classifiers and seeds keep this fast; the protocol's full run is the reference study.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from mlds_cli.main import cli
from mlds_contract.campaign import DS1_MACHINES, DS2_MACHINES
from mlds_data.analyze import analyze, evaluate, tasks_for
from mlds_data.dataset import load
from mlds_operator.bench.load import synthesize


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("study")
    ds1 = synthesize(root / "ds1", per_target=6, separation=0.05, seed=1)
    ds2 = synthesize(
        root / "ds2", targets=DS2_MACHINES, dataset="ds2", per_target=6, separation=0.05, seed=2, campaign="s2"
    )
    return ds1, ds2


def test_tasks_are_the_spec_s_three_kinds(study: tuple[Path, Path]) -> None:
    tasks = {t.name: t for t in tasks_for(load(*study))}
    assert list(tasks) == [
        "machines-ds1",
        "machines-ds2",
        "machines-ds1-ds2",
        *(f"modified-{m.removesuffix('Machine')}" for m in DS1_MACHINES),
    ]
    assert len(set(tasks["machines-ds1"].labels)) == 5
    assert len(set(tasks["machines-ds1-ds2"].labels)) == 10
    parity = tasks["modified-Parity"]
    assert sorted(set(parity.labels)) == ["clean", "modified"]
    assert len(parity.rows) == 12
    assert set(tasks_for(load(study[0]))[0].labels) == set(DS1_MACHINES)
    assert [t.name for t in tasks_for(load(study[0]))] == ["machines-ds1"]


def test_random_labels_score_near_chance_and_separable_ones_well_above() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat(np.array(["a", "b", "c", "d"]), 10)
    noise = rng.standard_normal((40, 50))
    score, pred = evaluate(noise, y, "logreg", seeds=[0, 1, 2], folds=5)
    assert np.mean(score.per_seed) < 0.5  # chance 0.25
    assert len(pred) == 3 * 40
    signal = noise + 3.0 * (y[:, None] == np.array(["a", "b", "c", "d"])[None, :]).repeat(13, axis=1)[:, :50]
    score, _ = evaluate(signal, y, "knn", seeds=[0, 1, 2], folds=5)
    assert min(score.per_seed) > 0.9


def test_the_report_has_weights_above_chance_losses_near_it_and_the_figures(
    study: tuple[Path, Path], tmp_path: Path
) -> None:
    out = tmp_path / "report"
    report = analyze(
        [str(p) for p in study], out, classifiers=["knn", "logreg"], seeds=2, command="mlds analyze (test)"
    )
    for name in ("report.md", "report.json", "projection.png", "confusion.png", "accuracy.png"):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "report.json").read_text())["networks"] == 60
    tasks = {t["name"]: t for t in report["tasks"]}
    five = tasks["machines-ds1"]
    assert five["chance"] == pytest.approx(0.2)
    assert five["folds"] == 5
    assert five["weights"]["logreg"]["mean"] > 0.9
    assert len(five["weights"]["logreg"]["per_seed"]) == 2
    assert five["loss"]["logreg"]["mean"] < 0.5
    assert five["eval_loss"]["logreg"]["mean"] < 0.5  # the criterion's loss alone, a second baseline
    assert set(five["stats"]) == {"knn", "logreg"}  # per-tensor statistics, beside the raw weights
    assert set(five["canonical"]) == {"knn", "logreg"}  # and the canonical weights (a GRU dataset)
    assert len(report["protocol"]["also"]) == 2
    assert tasks["machines-ds1-ds2"]["weights"]["knn"]["mean"] > 0.8
    assert tasks["modified-EightBit"]["weights"]["logreg"]["mean"] > 0.9
    md = (out / "report.md").read_text()
    assert "mlds analyze (test)" in md
    assert "Which machine, 5-way (ds1)" in md
    assert "![" in md
    assert "EightBit: clean (ds1) vs modified (ds2)" in md
    assert "| canonical weights |" in md


def test_indistinguishable_targets_stay_near_chance(tmp_path: Path) -> None:
    ds = synthesize(tmp_path / "same", per_target=6, separation=0.0, seed=3)
    report = analyze([str(ds)], tmp_path / "r", classifiers=["logreg"], seeds=3, figures=False)
    (task,) = report["tasks"]
    assert task["weights"]["logreg"]["mean"] < 0.5  # chance 0.2
    assert not (tmp_path / "r" / "projection.png").exists()


def test_a_class_of_one_network_skips_the_task(tmp_path: Path) -> None:
    ds = synthesize(tmp_path / "tiny", targets=DS1_MACHINES[:2], per_target=1)
    report = analyze([str(ds)], tmp_path / "r", classifiers=["knn"], seeds=1, figures=False)
    assert "at least 2 networks" in report["tasks"][0]["skipped"]
    assert "Skipped" in (tmp_path / "r" / "report.md").read_text()


def test_a_class_of_one_network_is_left_out_of_a_task(tmp_path: Path) -> None:
    a = synthesize(tmp_path / "a", targets=DS1_MACHINES[:3], per_target=4, separation=0.05)
    b = synthesize(tmp_path / "b", targets=DS1_MACHINES[3:4], per_target=1, first_unit=100, seed=9)
    report = analyze([str(a), str(b)], tmp_path / "r", classifiers=["knn"], seeds=1, figures=False)
    (task,) = report["tasks"]
    assert task["title"] == "Which machine, 3-way (ds1)"
    assert task["dropped"] == {"EightBitMachine": 1}
    assert "EightBitMachine" not in task["classes"]
    assert "Left out" in (tmp_path / "r" / "report.md").read_text()


def test_cli_writes_the_report_and_records_its_command(study: tuple[Path, Path], tmp_path: Path) -> None:
    notes = tmp_path / "notes.md"
    notes.write_text("## How this was made\n\nSynthetic.\n")
    out = tmp_path / "r"
    result = CliRunner().invoke(
        cli,
        [
            *("analyze", str(study[0]), "--out", str(out), "--classifiers", "knn", "--seeds", "1", "--no-figures"),
            *("-q", "--notes", str(notes), "--first", "4"),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["networks"] == 20
    assert report["command"].startswith("mlds analyze ")
    assert "--seeds 1" in report["command"]
    assert "--first 4" in report["command"]
    assert "Synthetic." in (out / "report.md").read_text()
    bad = CliRunner().invoke(cli, ["analyze", str(study[0]), "--out", str(out), "--classifiers", "svm"])
    assert bad.exit_code != 0


def test_parallel_fits_give_the_same_numbers(study: tuple[Path, Path], tmp_path: Path) -> None:
    kwargs: dict[str, Any] = {"classifiers": ["knn", "logreg"], "seeds": 2, "figures": False}
    one = analyze([str(study[0])], tmp_path / "one", jobs=1, **kwargs)
    two = analyze([str(study[0])], tmp_path / "two", jobs=2, **kwargs)
    assert one["tasks"] == two["tasks"]
    assert one["tasks"][0]["weights"]["logreg"]["per_seed"]  # numbers were compared, not two empty lists
