"""`mlds validate` and the one campaign-file loader, through the real CLI.

Every file under ``tests/data/invalid-campaigns/`` says in its header what is wrong with it and what
`mlds validate` must answer: ``# expect: LINE|FIELD|TEXT`` lines, one per problem (LINE ``-`` when the
problem has no line). The test runs one ``mlds validate`` over all of them and checks that each file
gets exactly its expected problems, at its line and field, with the text. Every example in
``examples/`` must pass.

Start-up: an error path must not load the heavy modules (torch, pyarrow, aiohttp, kopf, ...) before
it answers. That is what made errors take 4-6 s; it is checked here through ``python -X importtime``
(what was imported), not with a timer.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.run_fixtures import reap, worker_env
from tests.waiting import HANG_GUARD_SECONDS

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
INVALID = ROOT / "tests" / "data" / "invalid-campaigns"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
#: Modules an answer about a campaign file must not wait for.
HEAVY = (
    "torch",
    "pyarrow",
    "aiohttp",
    "kopf",
    "kubernetes",
    "minio",
    "numpy",
    "sklearn",
    "rich",
    "mlds_operator.leases",
)


def mlds(*args: object, cwd: Path = ROOT, python: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *python, "-m", "mlds_cli", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_SECONDS,  # a safety net against a hang, not a verdict
        env=worker_env(),
        check=False,
    )


def expectations(path: Path) -> list[tuple[str, str, str]]:
    out = []
    for line in path.read_text().splitlines():
        if line.startswith("# expect: "):
            where, field, text = line.removeprefix("# expect: ").split("|", 2)
            out.append((where, field, text))
    return out


def test_every_example_is_valid() -> None:
    proc = mlds("validate", *EXAMPLES)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert [line.split(": ok: ")[0] for line in proc.stdout.splitlines()] == [str(p) for p in EXAMPLES]


def test_at_least_fifteen_broken_files_each_get_their_file_line_field_and_message() -> None:
    files = sorted(INVALID.glob("*.yaml"))
    assert len(files) >= 15

    proc = mlds("validate", *(p.relative_to(ROOT) for p in files))

    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[-1] == f"{len(files)} of {len(files)} files invalid"
    for path in files:
        rel = str(path.relative_to(ROOT))
        got = [line.removeprefix(rel) for line in lines if line.startswith(rel + ":")]
        wanted = expectations(path)
        assert wanted, f"{path.name} has no expectations"
        assert len(got) == len(wanted), f"{path.name}: {got}"
        for where, field, text in wanted:
            prefix = ": " if where == "-" else f":{where}: "
            prefix += f"{field}: " if field else ""
            matching = [line for line in got if line.startswith(prefix) and text in line]
            assert len(matching) == 1, f"{path.name}: wanted {prefix}...{text}; got {got}"


def test_a_missing_file_is_reported_and_the_others_still_checked(tmp_path: Path) -> None:
    proc = mlds("validate", tmp_path / "nope.yaml", EXAMPLES[0])
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"{tmp_path / 'nope.yaml'}: cannot read: No such file or directory",
        "1 of 2 files invalid",
    ]
    assert proc.stdout.startswith(f"{EXAMPLES[0]}: ok: ")


@pytest.mark.parametrize("command", ["validate", "run", "train --campaign"])
def test_every_command_reads_a_file_the_same_way(tmp_path: Path, command: str) -> None:
    """run and train used to parse campaign files each its own way; now one loader answers for all."""
    bad = INVALID / "wrong-api-version.yaml"
    proc = mlds(*command.split(), bad, cwd=tmp_path)
    assert proc.returncode == (1 if command == "validate" else 2)
    assert f"{bad}:3: apiVersion: 'mlds.dev/v1' is not served" in proc.stderr
    leftovers = reap(str(tmp_path))  # had it started a campaign (as it once did), its workers end here
    assert "Traceback" not in proc.stderr
    assert leftovers == []
    assert not any(tmp_path.iterdir())  # nothing trained, nothing stored


@pytest.mark.parametrize(
    "args",
    [
        ["validate", INVALID / "unknown-machines.yaml"],
        ["validate", EXAMPLES[0]],
        ["run", INVALID / "unknown-machines.yaml"],
        ["run", "missing.yaml"],
        ["train", "--campaign", INVALID / "misspelt-field.yaml"],
    ],
    ids=["validate-bad", "validate-good", "run-bad", "run-missing", "train-bad"],
)
def test_answers_about_a_file_load_no_heavy_module(tmp_path: Path, args: list[object]) -> None:
    proc = mlds(*args, cwd=tmp_path, python=("-X", "importtime"))
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert imported, proc.stderr
    assert "mlds_contract.files" in imported
    heavy = sorted(m for m in imported if m.split(".")[0] in HEAVY or m in HEAVY)
    assert heavy == [], f"`mlds {' '.join(map(str, args))}` imported {heavy[:10]}"
