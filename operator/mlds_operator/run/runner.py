"""`mlds run CAMPAIGN.yaml`: a whole campaign on one machine, with the cluster's own parts.

Reads the same TrainingCampaign manifest as the operator, serves the same lease API in-process
(:mod:`mlds_operator.leases.http`) and starts N real ``mlds worker`` processes against it; results go to a local
folder (default) or to S3 when the manifest has ``spec.storage``. It supervises the workers (a crashed
worker is restarted), shows live progress, and at the end writes the manifest, README and per-target
data and prints a summary.

Resuming: run the same command again. The lease book's checkpoint and the verified results in the
store say what is done; nothing finished is trained again. The campaign's token and last port are kept
in the state folder (the local store's ``_mlds/`` or ``.mlds/<name>/`` beside the manifest for S3), so
workers of a killed run that are still training re-attach to the restarted server and deliver.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import click
from aiohttp import web
from mlds_contract.campaign import TrainingCampaign
from mlds_contract.errors import UserError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mlds_operator.leases.http import create_app
from mlds_operator.leases.metrics import ServerMetrics, bound_port
from mlds_operator.leases.registry import Campaigns, open_campaign
from mlds_operator.leases.service import CampaignService, ServiceSettings, Snapshot
from mlds_operator.storage.store import LocalStore, Store

__all__ = ["RunOptions", "RunSummary", "run_campaign"]

log = logging.getLogger("mlds.run")

LOCAL_NAMESPACE = "local"
LOCAL_POOL = "local"


@dataclass
class RunOptions:
    workers: int
    store_dir: Path | None
    host: str = "127.0.0.1"
    port: int | None = None
    token_file: Path | None = None
    #: Port of /metrics (its own, never the lease API's); None: none served, 0: a free one (written to run.json).
    metrics_port: int | None = None
    progress: bool = True
    restarts: int | None = None  # worker restarts allowed in total; default 3 per worker
    settings: ServiceSettings | None = None
    #: Workers train each lease as one stack that drains (before issue 14), not a continuous stack; for benchmarks.
    fixed_stacks: bool = False
    #: When set, (monotonic seconds, networks succeeded) is appended twice a second (`mlds bench campaign`'s tail).
    progress_log: list[tuple[float, int]] | None = None
    devices: tuple[str, ...] = ("cpu",)  # torch devices, handed to workers in turn (mlds_operator.run.command)
    accelerator: str = "cpu"  # what the workers report: cpu, nvidia or rocm
    #: Printed (stderr) once the campaign is open, before any worker starts: which device trains
    #: (`mlds run`); a campaign that cannot be opened is refused without it.
    announce: str | None = None
    #: False for a store thrown away afterwards (a benchmark's temporary folder): an interrupted run then
    #: says there is nothing to resume instead of pointing at a folder that no longer exists.
    resumable: bool = True


@dataclass
class RunSummary:
    name: str
    snapshot: Snapshot
    wall_seconds: float
    workers: int
    dataset: str
    manifest: str | None
    interrupted: bool = False  # stopped by Ctrl-C or SIGTERM before the end; progress is saved

    @property
    def overhead(self) -> float | None:
        """Share of worker-seconds not spent training verified networks (all system overheads together)."""
        capacity = self.wall_seconds * self.workers
        if capacity <= 0 or self.snapshot.training_seconds <= 0:
            return None
        return max(0.0, 1.0 - self.snapshot.training_seconds / capacity)


def occupancy_lines(snap: Snapshot) -> list[str]:
    """The summary's line on continuous stacks (issue 14): mean occupancy per pool; none without stacks."""
    return [
        f"  stacks ({pool}): mean occupancy {o.mean:.1%}"
        + (f", {o.mean_while_pending:.1%} while units were pending" if o.mean_while_pending is not None else "")
        for pool, o in snap.occupancy.items()
        if o.mean is not None
    ]


def _free_port(host: str, preferred: int | None) -> int:
    for candidate in ([preferred] if preferred else []) + [0]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, candidate))
            except OSError:
                continue
            port: int = s.getsockname()[1]
            return port
    raise UserError(f"no free port on {host}")


class _Supervisor:
    """Starts worker processes, restarts crashed ones, stops them all on the way out."""

    def __init__(
        self,
        argv: list[str],
        n: int,
        log_dir: Path,
        restarts: int,
        env: dict[str, str],
        devices: tuple[str, ...] = ("cpu",),
    ) -> None:
        self.argv, self.n, self.log_dir, self.restarts_left, self.env = argv, n, log_dir, restarts, env
        self.devices = devices  # worker i trains on devices[i % len(devices)]: workers spread over the GPUs
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self._logs: dict[int, IO[bytes]] = {}
        self.run_id = secrets.token_hex(3)
        self.generation: dict[int, int] = {}

    def start(self, i: int) -> None:
        gen = self.generation.get(i, -1) + 1
        self.generation[i] = gen
        worker_id = f"{socket.gethostname()}-{self.run_id}-{i}-{gen}"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        logf = self._logs.get(i) or (self.log_dir / f"worker-{i}.log").open("ab")
        self._logs[i] = logf
        self.procs[i] = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
            [*self.argv, "--device", self.devices[i % len(self.devices)], "--worker-id", worker_id],
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,  # a Ctrl-C reaches mlds run only; it stops the workers in order
        )

    def start_all(self) -> None:
        for i in range(self.n):
            self.start(i)

    def check(self, finished: bool) -> list[str]:
        """Restart workers that died while work remains; returns log lines about it."""
        notes = []
        for i, proc in list(self.procs.items()):
            code = proc.poll()
            if code is None or (code == 0 and finished):
                continue
            if code == 0:
                continue  # drained its share; no more work for it right now
            if finished or self.restarts_left <= 0:
                continue
            self.restarts_left -= 1
            notes.append(f"worker {i} exited with status {code}; restarting it (see {self.log_dir}/worker-{i}.log)")
            self.start(i)
        return notes

    def alive(self) -> int:
        return sum(1 for p in self.procs.values() if p.poll() is None)

    async def stop(self, timeout: float = 15.0, kill: asyncio.Event | None = None) -> None:
        """SIGTERM every worker (each hands back its units at the next epoch); SIGKILL what is left after
        ``timeout`` seconds or as soon as ``kill`` is set (a second Ctrl-C)."""
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline and not (kill is not None and kill.is_set()):
            await asyncio.sleep(0.1)
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5.0)  # reap: a killed worker is gone before the summary counts
        for f in self._logs.values():
            f.close()
        self._logs.clear()

    async def wait_drained(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)


def _state_dir(campaign: TrainingCampaign, store_dir: Path | None, manifest_path: Path) -> Path:
    if campaign.spec.storage is None and store_dir is not None:
        return store_dir / "_mlds"
    return manifest_path.parent / ".mlds" / campaign.name


def _load_or_create_secret(path: Path) -> bytes:
    """The upload-signing secret kept in the state folder (random, 0600), so URLs outlive a restart.

    Random, never derived from the token: every worker holds the token, and a secret it could compute
    would let it sign an upload of any key (issue 13).
    """
    with contextlib.suppress(OSError):
        secret = path.read_bytes()
        if len(secret) == 32:
            return secret
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_bytes(32)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secret)
    os.replace(tmp, path)
    return secret


def _load_or_create_token(path: Path) -> str:
    if path.exists():
        token = path.read_text().strip()
        if token:
            return token
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


@dataclass
class _Server:
    service: CampaignService
    store: Store
    runner: web.AppRunner
    url: str  # the campaign's lease API base URL
    token_file: Path
    state: Path
    metrics: web.AppRunner | None = None

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.service.flush()
        await self.runner.cleanup()
        if self.metrics is not None:
            await self.metrics.cleanup()
        self.store.close()


async def _open_server(campaign: TrainingCampaign, manifest_path: Path, opts: RunOptions) -> _Server:
    """Open the store and the campaign service (resuming from a checkpoint) and start the lease API."""
    spec = campaign.spec
    store_dir = opts.store_dir
    if spec.storage is None and store_dir is None:
        store_dir = Path("mlds-data") / campaign.name
    state = _state_dir(campaign, store_dir, manifest_path)
    token_file = opts.token_file or state / "run-token"
    token = _load_or_create_token(token_file)
    run_info = state / "run.json"
    last_port = None
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        last_port = int(json.loads(run_info.read_text())["port"])
    port = _free_port(opts.host, opts.port or last_port)
    if opts.port and port != opts.port:
        raise UserError(f"port {opts.port} on {opts.host} is in use")
    base = f"http://{opts.host}:{port}"
    campaigns = Campaigns()
    service = await open_campaign(
        campaigns,
        LOCAL_NAMESPACE,
        campaign.name,
        spec,
        token=token,
        local_root=store_dir,  # used when the file has no spec.storage
        upload_base_url=base,
        upload_secret=_load_or_create_secret(state / "upload-secret"),
        pools=[LOCAL_POOL],
        accelerators={LOCAL_POOL: opts.accelerator},  # what the workers train on
        settings=opts.settings,
    )
    store = service.store
    local = store if isinstance(store, LocalStore) else None
    server_metrics = ServerMetrics(campaigns, component="run")
    app = create_app(campaigns, local_store=local, observer=server_metrics.observe_request)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, opts.host, port, reuse_address=True).start()
    info: dict[str, int] = {"port": port, "pid": os.getpid()}
    metrics = None
    if opts.metrics_port is not None:  # /metrics on a port of its own: workers reach the lease port
        metrics = await server_metrics.serve(opts.host, opts.metrics_port)
        info["metricsPort"] = bound_port(metrics)
    state.mkdir(parents=True, exist_ok=True)
    run_info.write_text(json.dumps(info) + "\n")
    url = f"{base}/v1/campaigns/{LOCAL_NAMESPACE}/{campaign.name}"
    return _Server(
        service=service, store=store, runner=runner, url=url, token_file=token_file, state=state, metrics=metrics
    )


def _worker_argv(server: _Server, units_per_lease: int, accelerator: str, *, fixed_stacks: bool = False) -> list[str]:
    """A worker's command line; the supervisor adds its --device and --worker-id."""
    return [
        *(sys.executable, "-m", "mlds_cli", "worker"),
        *("--url", server.url, "--token-file", str(server.token_file), "--pool", LOCAL_POOL),
        *("--units-per-lease", str(units_per_lease), "--accelerator", accelerator),
        # Outlive a crash of this process only to deliver the lease in hand (see the module docstring).
        *("--parent-pid", str(os.getpid())),
        *(("--fixed-stacks",) if fixed_stacks else ()),
    ]


async def _supervise(
    server: _Server,
    sup: _Supervisor,
    display: _Display,
    stop: asyncio.Event,
    kill: asyncio.Event,
    progress_log: list[tuple[float, int]] | None = None,
) -> bool:
    """Drive the service and the workers until the campaign is finalized; True when interrupted.

    On an interrupt the display says "stopping" at once, the workers are asked to stop (they hand back
    the units in training and deliver what they finished), and the service keeps serving them until
    they are gone, so the last figures shown and returned are the true count saved. A second interrupt
    kills the workers. ``progress_log`` (`mlds bench campaign`'s tail): (monotonic seconds, networks
    succeeded) appended on every tick.
    """
    service = server.service
    if not service.book.finished:
        sup.start_all()
    with display:
        while True:
            await service.tick()
            display.update(service.snapshot(), sup.alive())
            if progress_log is not None:
                progress_log.append((time.monotonic(), service.book.stats(failed_max_chars=0).succeeded))
            if service.finalized:
                await sup.wait_drained(timeout=10.0)
                return False
            for note in sup.check(service.book.finished):
                display.note(note)
            if not service.book.finished and sup.alive() == 0 and sup.restarts_left <= 0:
                raise UserError(f"every worker has died; see the logs in {sup.log_dir}")
            if stop.is_set():
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.5)
        display.note("stopping… (the workers hand back their units; Ctrl-C again to kill them)", always=True)
        stopping = asyncio.create_task(sup.stop(kill=kill))
        while not stopping.done():
            await service.tick()
            display.update(service.snapshot(), sup.alive())
            await asyncio.wait([stopping], timeout=0.2)
        await stopping
        await service.tick()
        display.update(service.snapshot(), 0, final=True)
    return True


def _say_where_it_starts(name: str, snap: Snapshot) -> None:
    """Before any work: whether this run resumes, and how far; or that there is nothing left to do."""
    s = snap.stats
    done = s.succeeded + s.failed
    if s.total and done >= s.total:
        click.echo(f"{name}: nothing to do: all {s.total} units are already done (run again only to resume)", err=True)
    elif done:
        click.echo(
            f"{name}: resuming: {s.succeeded}/{s.total} done" + (f", {s.failed} failed" if s.failed else ""), err=True
        )


def _mark_stopped(state: Path, reason: str) -> None:
    """Record in the state folder's run.json that this run stopped, and why (`mlds dataset info` reads it)."""
    run_info = state / "run.json"
    with contextlib.suppress(OSError, ValueError):
        info = json.loads(run_info.read_text())
        info |= {"stopped": reason, "stopped_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        run_info.write_text(json.dumps(info) + "\n")


async def run_campaign(campaign: TrainingCampaign, manifest_path: Path, opts: RunOptions) -> RunSummary:
    """Run (or resume) a campaign to its end or an interrupt; returns the summary. Raises UserError."""
    server = await _open_server(campaign, manifest_path, opts)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    restarts = opts.restarts if opts.restarts is not None else 3 * opts.workers
    argv = _worker_argv(
        server, campaign.spec.pools[0].units_per_lease, opts.accelerator, fixed_stacks=opts.fixed_stacks
    )
    sup = _Supervisor(argv, opts.workers, server.state / "logs", restarts, env, devices=opts.devices)
    stop, kill = asyncio.Event(), asyncio.Event()

    def interrupt() -> None:
        (kill if stop.is_set() else stop).set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, interrupt)
    started = time.monotonic()
    if opts.announce:
        click.echo(opts.announce, err=True)
    _say_where_it_starts(campaign.name, server.service.snapshot())
    try:
        display = _Display(campaign.name, enabled=opts.progress)
        interrupted = await _supervise(server, sup, display, stop, kill, opts.progress_log)
    finally:
        await sup.stop(kill=kill)
        await server.close()
    if interrupted and not opts.resumable:
        raise click.ClickException("interrupted: the run's temporary store is removed; there is nothing to resume")
    if interrupted:
        _mark_stopped(server.state, "interrupted")
    service = server.service
    return RunSummary(
        name=campaign.name,
        snapshot=service.snapshot(),
        wall_seconds=time.monotonic() - started,
        workers=opts.workers,
        dataset=server.store.url,
        manifest=service.manifest_url if service.finalized else None,
        interrupted=interrupted,
    )


def _duration(seconds: float) -> str:
    """A remaining time as people read it: 45s, 3m05s, 2h14m, 3d04h."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _eta(snap: Snapshot) -> str:
    """The ETA as a duration from now; never a clock time, so never one in the past."""
    if snap.eta is None:
        return "-"
    left = (snap.eta - datetime.now(UTC)).total_seconds()
    return _duration(left) if left >= 1 else "<1s"


class _Display:
    """A live progress bar on a terminal; a line every 10 s otherwise (logs, CI)."""

    def __init__(self, name: str, *, enabled: bool) -> None:
        self.name, self.enabled = name, enabled
        self._progress: Any = None
        self._task: Any = None
        self._last_line = 0.0
        self.tty = sys.stderr.isatty()

    def __enter__(self) -> _Display:
        if self.enabled and self.tty:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TextColumn("ETA {task.fields[eta]}"),
                TextColumn("[red]{task.fields[failed]}"),
                TextColumn("{task.fields[workers]}"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(self.name, total=None, rate="", eta="-", failed="", workers="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(None, None, None)

    def note(self, text: str, *, always: bool = False) -> None:
        """A line above the bar (or on stderr); ``always`` prints it even with --quiet."""
        if self._progress is not None:
            self._progress.console.print(text)
        elif self.enabled or always:
            click.echo(text, err=True)

    def update(self, snap: Snapshot, workers: int, *, final: bool = False) -> None:
        s = snap.stats
        rate = f"{snap.networks_per_hour:,.0f} nets/h" if snap.networks_per_hour else ""
        eta = "-" if final else _eta(snap)
        failed = f"{s.failed} failed" if s.failed else ""
        who = f"{workers} worker{'s' if workers != 1 else ''}"
        if self._progress is not None:
            self._progress.update(
                self._task,
                total=s.total,
                completed=s.succeeded + s.failed,
                rate=rate,
                eta=eta,
                failed=failed,
                workers=who,
            )
        elif self.enabled and (final or time.monotonic() - self._last_line >= 10.0):
            self._last_line = time.monotonic()
            click.echo(
                f"{self.name}: {s.succeeded}/{s.total} done, {s.leased} leased, {s.failed} failed"
                f"{', ' + rate if rate else ''}{', ETA ' + eta if eta != '-' else ''}, {who}",
                err=True,
            )
