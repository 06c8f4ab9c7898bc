"""Helpers for end-to-end tests of ``mlds run`` and ``mlds worker``: real processes, real servers, real logs.

Who uses it: tests/e2e/test_run_local.py, tests/e2e/test_run_s3_chaos.py, tests/e2e/test_worker.py,
tests/e2e/test_attacks_run.py and the chaos driver (tests/chaos.py).
Import the helpers explicitly (``from tests.run_fixtures import ...``); nothing here is a fixture.

- :func:`write_campaign` writes a small ds1 TrainingCampaign file whose networks converge in a few
  epochs (``RELAXED_LOSS``), so a campaign of 20 networks trains in well under a minute on 2 cores
  (or any other workload); :func:`write_mnist_like` writes MNIST's IDX files with easy synthetic digits.
- :class:`Proc` is an ``mlds`` subprocess with its stdout/stderr in files; :func:`start_mlds`
  starts one. ``mlds run`` starts its workers in new sessions, so they are not in the run's process
  group: :func:`processes_mentioning` finds every process of a test by a path in its command line
  (the token file lives in the test's tmp folder), and :func:`reap` ends them.
- :func:`worker_events` parses the workers' ``key=value`` log lines, which is how tests count what
  was trained, completed and released, and prove that a kill happened while a lease was held.
- :func:`serve_campaign` serves one campaign's lease API in the test's own event loop (for worker
  tests that need to look inside the lease book, or start the server after the worker).
- Waiting is :mod:`tests.waiting`'s (on progress, never on a wall-clock budget); :meth:`Proc.wait` and
  :func:`reap` use it with what the processes write under their folder as the progress signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import yaml
from aiohttp import web
from aiohttp.typedefs import Middleware
from mlds_contract.campaign import CampaignSpec, Storage, TrainingCampaign
from mlds_operator.leases.http import create_app
from mlds_operator.leases.registry import Campaigns
from mlds_operator.leases.service import CampaignService, ServiceSettings
from mlds_operator.storage.store import LocalStore
from mlds_workloads.digits import MNIST_FILES

from tests.waiting import Progress, cpu_seconds, file_sizes, wait_exit, wait_until

__all__ = [
    "MACHINES",
    "RELAXED_LOSS",
    "SHORT_LEASE_SECONDS",
    "Event",
    "Proc",
    "Served",
    "activity",
    "cmdline",
    "free_port",
    "live_children",
    "log_sizes",
    "manifest_rows",
    "open_lease",
    "processes_mentioning",
    "read_json",
    "reap",
    "serve_campaign",
    "start_mlds",
    "units_with",
    "worker_env",
    "worker_events",
    "write_campaign",
    "write_mnist_like",
]

T = TypeVar("T")

#: Evaluation MSE counted as converged in e2e tests. Measured (``mlds train``, CPU, one thread, busy
#: 2-core machine): SingleDirectMachine needs 4-5 epochs, SingleInvertMachine 1-3, about 0.3-0.6 s an
#: epoch, so a network trains in 1-3 s instead of ~30 s at the spec's 1e-4.
RELAXED_LOSS = 0.05
#: The shortest lease the campaign schema allows: an abandoned unit is re-issued 10 s after its worker died.
SHORT_LEASE_SECONDS = 10
MACHINES = ("SingleDirectMachine", "SingleInvertMachine")


def write_campaign(
    path: Path,
    *,
    name: str = "e2e",
    networks_per_target: int = 3,
    machines: Sequence[str] = MACHINES,
    units_per_lease: int = 1,
    target_loss: float = RELAXED_LOSS,
    max_epochs: int | None = None,
    lease_seconds: int = SHORT_LEASE_SECONDS,
    max_attempts: int = 3,
    storage: Storage | None = None,
    seed: int = 1,
    workload: Mapping[str, Any] | None = None,
) -> Path:
    """Write a ds1 TrainingCampaign file (as a user would) and return its path.

    ``workload`` replaces the ds1 one (``machines`` is then ignored), e.g. ``{"dataset": "ds4", ...}``.
    """
    training: dict[str, Any] = {"targetLoss": target_loss}
    if max_epochs is not None:
        training["maxEpochs"] = max_epochs
    spec: dict[str, Any] = {
        "workload": dict(workload) if workload is not None else {"dataset": "ds1", "machines": list(machines)},
        "networksPerTarget": networks_per_target,
        "seed": seed,
        "training": training,
        "pools": [{"name": "cpu", "accelerator": "cpu", "unitsPerLease": units_per_lease}],
        "leases": {"durationSeconds": lease_seconds, "maxAttempts": max_attempts},
    }
    if storage is not None:
        spec["storage"] = storage.model_dump(by_alias=True, exclude_none=True)
    doc = {"apiVersion": "mlds.dev/v1alpha1", "kind": "TrainingCampaign", "metadata": {"name": name}, "spec": spec}
    TrainingCampaign.model_validate(doc)  # a typo here should fail the test setup, not look like a product bug
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def write_mnist_like(folder: Path, *, n_train: int = 300, n_test: int = 60, seed: int = 0) -> None:
    """MNIST's four IDX files (28x28 unsigned bytes) in ``folder``, with digits a ds4 CNN learns in a few epochs.

    Image ``i`` is a bright bar at the rows its label names, with a little noise; the training files are
    written plain and the test files gzipped, the two spellings a user may place.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, count, gz in (("train", n_train, False), ("test", n_test, True)):
        labels = (np.arange(count) % 10).astype(np.uint8)
        images = rng.integers(0, 40, (count, 28, 28), dtype=np.uint8)
        for i, label in enumerate(labels):
            images[i, 2 + 2 * label : 5 + 2 * label, 4:20] = 255
        for role, array in ((f"{split}_images", images), (f"{split}_labels", labels)):
            stem = MNIST_FILES[role]
            header = bytes([0, 0, 0x08, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
            blob = header + array.tobytes()
            (folder / (f"{stem}.gz" if gz else stem)).write_bytes(gzip.compress(blob) if gz else blob)


def worker_env(**extra: str) -> dict[str, str]:
    """The environment for an ``mlds`` subprocess: this one's, one torch thread, unbuffered output."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# ------------------------------------------------------------------------------------------ processes


@dataclass
class Proc:
    """An ``mlds`` subprocess; its stdout and stderr go to files so a test can read them at any time."""

    popen: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path
    started: float = field(default_factory=time.monotonic)

    @property
    def folder(self) -> Path:
        """Where it runs and writes (its output, and for ``mlds run`` the store and the workers' logs)."""
        return self.stdout_path.parent

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def send(self, sig: signal.Signals) -> None:
        self.popen.send_signal(sig)

    def wait(self, *, what: str = "the process to exit", progress: Progress | None = None) -> int:
        """The exit status, once it ends; fails (killing it) if nothing moves for minutes.

        The progress signal is by default :func:`activity` in :attr:`folder`.
        """
        try:
            return wait_exit(self.popen, what=what, progress=progress or (lambda: activity(self.folder, self.pid)))
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.describe()}") from None

    def ended(self) -> str | None:
        """None while it runs; its exit status and output once it has ended (``wait_until``'s ``alive``)."""
        return None if self.alive() else f"{self.popen.args!r} ended, {self.describe()}"

    def describe(self) -> str:
        return f"exit {self.popen.returncode}\n--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-3000:]}"


def start_mlds(args: Sequence[object], *, cwd: Path, tag: str, env: dict[str, str] | None = None) -> Proc:
    """Start ``python -m mlds_cli ARGS`` in ``cwd``; output goes to ``cwd/<tag>.stdout`` and ``.stderr``."""
    out, err = cwd / f"{tag}.stdout", cwd / f"{tag}.stderr"
    with out.open("wb") as o, err.open("wb") as e:
        popen = subprocess.Popen(
            [sys.executable, "-m", "mlds_cli", *map(str, args)],
            cwd=cwd,
            stdout=o,
            stderr=e,
            stdin=subprocess.DEVNULL,
            env=env if env is not None else worker_env(),
        )
    return Proc(popen, out, err)


def cmdline(pid: int) -> list[str]:
    """A process's argv, or [] if it is gone (or a zombie)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) from /proc/PID/stat; None if the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return fields[0], int(fields[1])


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def live_children(pid: int) -> list[int]:
    """Running (not zombie) child processes of ``pid``."""
    out = []
    for child in _pids():
        st = _stat(child)
        if st is not None and st[1] == pid and st[0] != "Z":
            out.append(child)
    return sorted(out)


def _cwd(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return ""


def _ancestors() -> set[int]:
    """This process and the ones that started it, up to init."""
    out, pid = set(), os.getpid()
    while pid > 1 and pid not in out:
        out.add(pid)
        st = _stat(pid)
        pid = st[1] if st is not None else 0
    return out


def processes_mentioning(text: str) -> list[int]:
    """Live processes (not zombies, not this one nor its ancestors) whose command line names ``text`` or that run in it.

    Pass a test's tmp folder: ``mlds run`` and its workers run there (workers inherit its working folder)
    and name their token file under it, however deep in sessions and re-parenting they are. The ancestors
    are left out because they may name the folder too (``python bench/chaos.py --folder F`` under a shell).
    """
    out = []
    mine = _ancestors()
    for pid in _pids():
        if pid in mine:
            continue
        st = _stat(pid)
        if st is None or st[0] == "Z":
            continue
        if any(text in arg for arg in cmdline(pid)) or _cwd(pid).startswith(text):
            out.append(pid)
    return sorted(out)


def activity(folder: Path, *pids: int) -> dict[str, object]:
    """What the processes of a test folder have done so far: bytes written under it, CPU seconds used.

    The progress signal of waits on ``mlds`` processes: those running in or naming ``folder`` (and
    ``pids``) count, so a worker that trains silently for minutes is still seen to move.
    """
    running = [*pids, *processes_mentioning(str(folder))]
    return {"bytes": sum(file_sizes(folder).values()), "cpu s": cpu_seconds(running), "processes": len(running)}


def reap(text: str, *, wait: bool = False) -> list[int]:
    """SIGKILL the processes mentioning ``text``; with ``wait``, first let them exit on their own.

    Waiting lasts as long as they keep exiting or writing (:mod:`tests.waiting`), so a slow machine only
    makes it longer. Returns the pids that had to be killed (a test asserting "no orphans" checks that
    it is empty).
    """
    folder = Path(text)
    if wait:
        with contextlib.suppress(AssertionError):  # they did not all go: killed below, and returned
            wait_until(
                lambda: not processes_mentioning(text),
                what=f"processes of {text} to exit",
                progress=lambda: activity(folder),
            )
    left = processes_mentioning(text)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left


# -------------------------------------------------------------------------------------------- worker logs

_LINE = re.compile(r"^\S+ \S+ (?P<level>[A-Z]+) mlds\.worker (?P<message>.*?) (?P<fields>pool=.*)$")
_FIELD = re.compile(r"(\w+)=(\S*)")


@dataclass(frozen=True)
class Event:
    """One worker log line: ``leased``, ``trained``, ``completed (accepted)``, ``released``... and its fields."""

    level: str
    message: str
    fields: dict[str, str]

    def __getitem__(self, name: str) -> str:
        return self.fields[name]

    def get(self, name: str) -> str | None:
        return self.fields.get(name)


def worker_events(logs: Path | Iterable[Path], *, skip_bytes: dict[Path, int] | None = None) -> list[Event]:
    """Parse worker log files (a folder of ``worker-*.log`` or the files), in file then line order.

    ``skip_bytes`` maps a file to how many leading bytes to ignore (what an earlier run wrote).
    """
    paths = sorted(logs.glob("worker-*.log")) if isinstance(logs, Path) and logs.is_dir() else logs
    if isinstance(paths, Path):
        paths = [paths]
    events = []
    for path in paths:
        data = path.read_bytes()[(skip_bytes or {}).get(path, 0) :]
        for line in data.decode(errors="replace").splitlines():
            m = _LINE.match(line)
            if m:
                events.append(Event(m["level"], m["message"], dict(_FIELD.findall(m["fields"]))))
    return events


def log_sizes(folder: Path) -> dict[Path, int]:
    """Current size of each worker log in ``folder`` (pass as ``skip_bytes`` to read only what comes next)."""
    return {p: p.stat().st_size for p in folder.glob("worker-*.log")}


def units_with(events: Iterable[Event], message: str) -> list[int]:
    """Unit numbers of the events with this message, in log order (repeats kept)."""
    return [int(e["unit"]) for e in events if e.message == message and e.get("unit") is not None]


def open_lease(events: Sequence[Event]) -> Event | None:
    """The worker's last ``leased`` event if some of its units were neither completed nor given back since."""
    last = next((e for e in reversed(events) if e.message == "leased"), None)
    if last is None:
        return None
    after = events[events.index(last) + 1 :]
    if any(e.message == "released" for e in after):
        return None
    done = {e["unit"] for e in after if e.message.startswith(("completed", "unit cancelled")) and e.get("unit")}
    return last if len(done) < int(last["units"]) else None


# ---------------------------------------------------------------------------------- in-process server


@dataclass
class Served:
    """A campaign's lease API running in the test's event loop."""

    service: CampaignService
    store: LocalStore
    url: str
    token_file: Path


@contextlib.asynccontextmanager
async def serve_campaign(
    campaign_file: Path,
    store_dir: Path,
    *,
    port: int,
    token: str = "e2e-token",
    clock: Callable[[], float] = time.monotonic,
    middlewares: Sequence[Middleware] = (),
) -> AsyncIterator[Served]:
    """Serve ``campaign_file``'s lease API on ``port`` with a local-folder store, as ``mlds run`` does.

    A background task ticks the service twice a second (lease expiry, flushes, finalization).
    ``clock`` is the lease book's (the event loop's clock under looptime); ``middlewares`` run before
    the app's own, e.g. to play an outage.
    """
    doc = yaml.safe_load(campaign_file.read_text())
    name = doc["metadata"]["name"]
    spec = CampaignSpec.model_validate(doc["spec"])
    store = LocalStore(store_dir, upload_base_url=f"http://127.0.0.1:{port}", durable=False)
    store.ensure_root()
    token_file = store_dir.parent / f"{name}.token"
    token_file.write_text(token + "\n")
    service = await CampaignService.open(
        name, spec, store, token=token, pools=["cpu"], clock=clock, settings=ServiceSettings(checkpoint_seconds=2.0)
    )
    campaigns = Campaigns()
    campaigns.add("local", name, service)
    app = create_app(campaigns, local_store=store)
    app.middlewares[:0] = middlewares
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()

    async def ticker() -> None:
        while True:
            await service.tick()
            await asyncio.sleep(0.5)

    task = asyncio.create_task(ticker())
    try:
        yield Served(service, store, f"http://127.0.0.1:{port}/v1/campaigns/local/{name}", token_file)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await runner.cleanup()


def manifest_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``manifest.parquet`` file."""
    import pyarrow.parquet as pq  # noqa: PLC0415 - only the tests that finish a campaign need it

    rows: list[dict[str, Any]] = pq.read_table(path).to_pylist()
    return rows


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())
