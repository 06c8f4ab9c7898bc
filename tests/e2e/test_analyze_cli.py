"""`mlds analyze` on datasets far too small for the protocol, as a user makes them from the README.

Two networks per target used to end in a 40-line traceback (k-NN's ``n_neighbors <= n_samples_fit``),
and ten networks gave "90.0% ± 0.0%" with no word that such a figure means nothing, after minutes of
silence. Now: a report, k-NN's k lowered to what the classes allow, a warning before the fits, the
results marked in the report, and a progress line per evaluation. Synthetic datasets in the real
layout (:func:`~mlds_operator.bench.load.synthesize`) stand in for trained ones.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlds_operator.bench.load import synthesize

from tests.run_fixtures import worker_env
from tests.waiting import HANG_GUARD_SECONDS

pytestmark = pytest.mark.e2e


def test_two_networks_per_target_give_a_marked_report_not_a_traceback(tmp_path: Path) -> None:
    data = synthesize(tmp_path / "ds1", targets=("SingleDirectMachine", "SingleInvertMachine"), per_target=2, seed=1)
    out = tmp_path / "report"

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlds_cli",
            "analyze",
            data,
            "--out",
            out,
            "--classifiers",
            "knn,logreg",
            "--seeds",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_SECONDS,  # a safety net against a hang, not a verdict
        env=worker_env(),
        check=False,
    )

    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    warning = next(i for i, line in enumerate(lines) if line.startswith("warning: machines-ds1: only 2 networks"))
    first_fit = next(i for i, line in enumerate(lines) if line.startswith("  [1/10] "))
    assert warning < first_fit, "the warning must come before minutes of fitting, not after"
    assert sum(1 for line in lines if line.startswith("  [")) == 10  # a progress line per evaluation
    assert "k-NN (k lowered to 1: small classes)" in proc.stderr
    assert "too few networks for meaningful accuracies in: machines-ds1" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    (task,) = report["tasks"]
    assert task["too_few"] == {"smallest_class": 2, "needed": 10}
    assert task["weights"]["knn"]["knn_k_min"] == 1
    assert "Too few networks: 2 in the smallest class" in (out / "report.md").read_text()
    for figure in ("projection.png", "confusion.png", "accuracy.png"):
        assert (out / figure).stat().st_size > 0
