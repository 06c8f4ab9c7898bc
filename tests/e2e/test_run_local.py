"""`mlds run` on a local folder, as a user runs it: to the end, again, interrupted and resumed, and wrong.

Real ``mlds run`` processes with real worker processes; networks converge in a few epochs
(``RELAXED_LOSS``). What is checked is what a user sees: the exit status, the summary line, the
manifest, and (from the workers' logs) which networks were trained how many times.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.run_fixtures import (
    Proc,
    activity,
    log_sizes,
    manifest_rows,
    reap,
    start_mlds,
    units_with,
    worker_env,
    worker_events,
    write_campaign,
)
from tests.waiting import Progress, wait_exit, wait_until

pytestmark = pytest.mark.e2e


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
    proc.wait(what="mlds run to finish the campaign")
    leftovers = reap(str(folder), wait=True)
    assert leftovers == [], f"worker processes outlived mlds run: {leftovers}"
    return Finished(folder, campaign, folder / "store", proc)


@pytest.mark.slow
def test_a_campaign_runs_to_the_end_and_prints_its_summary(finished: Finished) -> None:
    assert finished.first.popen.returncode == 0, finished.first.describe()
    assert finished.first.stderr.startswith("quick: training on the CPU, one thread per worker; 2 workers\n")
    lines = finished.first.stdout.splitlines()
    assert lines[1].startswith("  wall ")
    assert " with 2 workers; " in lines[1]
    assert "(worker time not spent training: " in lines[1]
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
def test_a_pulled_copy_s_readme_does_not_name_the_original_folder(finished: Finished, tmp_path: Path) -> None:
    pull = start_mlds(["dataset", "pull", finished.store, tmp_path / "copy", "-q"], cwd=tmp_path, tag="pull")
    assert pull.wait(what="mlds dataset pull", progress=lambda: activity(tmp_path)) == 0, pull.describe()
    readme = (tmp_path / "copy" / "README.md").read_text()
    assert readme.startswith("# quick: an MLDS ds1 dataset")
    assert str(finished.store) not in readme
    assert finished.store.as_uri() not in readme


@pytest.mark.slow
def test_running_a_finished_campaign_again_trains_nothing_and_exits_at_once(finished: Finished) -> None:
    before = log_sizes(finished.logs)
    rows_before = manifest_rows(finished.store / "manifest.parquet")

    again = start_mlds(
        ["run", finished.campaign, "--workers", "2", "--store", "store", "--quiet"], cwd=finished.folder, tag="again"
    )
    code = again.wait()

    assert code == 0, again.describe()
    assert again.stdout.splitlines()[0] == "quick: Succeeded: 6/6 networks"
    assert "quick: nothing to do: all 6 units are already done" in again.stderr
    assert log_sizes(finished.logs) == before  # no worker was even started
    assert manifest_rows(finished.store / "manifest.parquet") == rows_before
    assert reap(str(finished.folder)) == []


class Terminal:
    """``mlds ARGS`` on a pseudo-terminal, as a person runs it: stdout and stderr are a tty (so the live
    progress bar is drawn), and it leads its own process group, so :meth:`ctrl_c` sends SIGINT to that
    group exactly as the terminal's line discipline does for Ctrl-C."""

    def __init__(self, args: list[object], cwd: Path) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a wide window: one bar line
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "mlds_cli", *map(str, args)],
            cwd=cwd,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=worker_env(TERM="xterm"),
            start_new_session=True,
        )
        os.close(slave)
        self._master, self._buf = master, bytearray()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self._master, 4096)
            except OSError:  # EIO: every process holding the terminal has closed it
                return
            if not chunk:
                return
            self._buf += chunk

    @property
    def screen(self) -> str:
        """What the terminal showed, without its control sequences (cursor moves, colours)."""
        return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", self._buf.decode(errors="replace"))

    def ended(self) -> str | None:
        """None while it runs; once it has ended, its exit status and the end of its screen."""
        code = self.popen.poll()
        return None if code is None else f"mlds exited {code}:\n{self.screen[-3000:]}"

    def ctrl_c(self) -> None:
        os.killpg(self.popen.pid, signal.SIGINT)

    def wait(self, *, what: str, progress: Progress) -> int:
        """Its exit status; killed (and the wait failed) when ``progress`` stops moving."""
        try:
            code = wait_exit(self.popen, what=what, progress=progress)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.screen[-3000:]}") from None
        self._reader.join()  # the terminal closes when its last process ends
        os.close(self._master)
        return code


@pytest.mark.slow
def test_ctrl_c_stops_at_once_exits_130_with_the_true_count_and_the_rerun_resumes(tmp_path: Path) -> None:
    campaign = write_campaign(tmp_path / "campaign.yaml", name="resumed", networks_per_target=5)
    args: list[object] = ["run", campaign, "--workers", "2", "--store", "store"]
    logs = tmp_path / "store" / "_mlds" / "logs"
    first = Terminal(args, tmp_path)

    def accepted() -> list[int]:
        return units_with(worker_events(logs), "completed (accepted)") if logs.is_dir() else []

    wait_until(
        lambda: len(accepted()) >= 2,
        what="two networks completed",
        progress=lambda: activity(tmp_path),
        alive=first.ended,
    )
    first.ctrl_c()
    wait_until(
        lambda: "stopping…" in first.screen,
        what="the stopping message",
        progress=lambda: (len(first.screen), activity(tmp_path)),
        alive=first.ended,
    )
    code = first.wait(what="mlds run to stop after Ctrl-C", progress=lambda: (len(first.screen), activity(tmp_path)))

    screen = first.screen
    assert code == 130, screen[-3000:]
    assert "stopping…" in screen
    assert "Traceback" not in screen
    assert "Error" not in screen
    assert reap(str(tmp_path)) == [], "mlds run left workers behind after Ctrl-C"
    done_first = accepted()
    saved = len(done_first)
    assert saved < 10, "the run finished before it could be interrupted; the test proved nothing"
    last = screen.strip().splitlines()[-2:]
    assert last[0].strip() == f"resumed: interrupted: {saved}/10 networks saved; run the same command again to resume"
    # The bar's last frame agrees with what was saved (it used to freeze several networks behind).
    bar = screen[: screen.index("resumed: interrupted")]
    assert re.findall(r"(\d+)/10", bar)[-1] == str(saved)
    first_events = worker_events(logs)
    # Units in training when Ctrl-C came were handed back (not failed) by workers that exited cleanly.
    assert any(e.message == "released" for e in first_events)
    assert not any(e.level == "ERROR" for e in first_events)
    offsets = log_sizes(logs)

    info = start_mlds(["dataset", "info", "store"], cwd=tmp_path, tag="info")
    assert info.wait(what="mlds dataset info") == 0, info.describe()
    assert "[interrupted at " in info.stdout
    assert "still running" not in info.stdout

    second = start_mlds([*args, "--quiet"], cwd=tmp_path, tag="second")
    code = second.wait(what="the resumed run to finish", progress=lambda: activity(tmp_path))

    assert code == 0, second.describe()
    assert f"resumed: resuming: {saved}/10 done" in second.stderr
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
    assert reap(str(tmp_path), wait=True) == []


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
    "no TrainingCampaign in it": ("kind: ConfigMap\n", "holds no TrainingCampaign document"),
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
    code = proc.wait()

    assert code == 2, proc.describe()
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    assert says in lines[0]
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert not (tmp_path / "store").exists()  # nothing was created for a campaign that never started
