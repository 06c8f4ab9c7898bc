"""Kill -9 at random moments with hostile completions in flight: the chaos driver of issue 13.

Who uses it: bench/chaos.py (the command behind bench/README.md's "Chaos (issue 13)" figures: ten kills
of ``mlds run``, ten of the operator) and tests/e2e/test_chaos.py (a few kills of each, marker ``chaos``).

Two targets, one story (:func:`drive`):

- ``mlds run`` (:class:`RunTarget`): a small ds1 campaign in a local folder. At each kill the run is
  SIGKILLed, either alone (its workers live on in their own sessions and deliver to the restarted run)
  or with every process of the campaign (the machine died); then the same command again.
- the operator (:class:`OperatorTarget`): a real ``mlds operator`` process against the kmock emulator,
  results in a moto S3 bucket, workers real ``mlds worker`` processes run by the test kubelet
  (tests/operator_processes.py). At each kill the operator is SIGKILLed and started again; its pods
  live on, as they would in a cluster.

Beside either a :class:`~tests.attacks.Harasser` holding the campaign's token sends forged results and
forbidden requests without pause, holding each forged result a random moment before completing it, so
kills find hostile completions in flight. Kill moments are random and reproducible (``seed``): a kill
waits for the campaign to reach a random number of verified results (progress, never a time budget:
a busy machine only makes the run longer), then a random delay; about one kill in five instead strikes
a random delay after the restart began, while the server may still be recovering.

The end is judged by :meth:`Report.failures`, issue 13's must-show: the campaign Succeeded; the
manifest has exactly one row per unit, distinct keys, and every row's model matches its sha256 and its
meta.json; no object written once was rewritten or removed; no hostile request was taken (a 2xx or a
500); no restart failed (exited on its own, or printed a traceback).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from mlds_contract.errors import UserError
from mlds_operator.controller import pods
from mlds_operator.storage import manifest as mf
from mlds_operator.storage.store import LocalStore, Store

from tests.attacks import Harasser, changed_objects, published_objects
from tests.operator_fixtures import (
    CAMPAIGNS,
    SECRETS,
    Cluster,
    campaign_manifest,
    credentials_secret,
    emulated_cluster,
    free_port,
)
from tests.operator_processes import NAMESPACE, Kubelet, OperatorProcess, operator_process
from tests.run_fixtures import Proc, activity, processes_mentioning, reap, start_mlds, write_campaign
from tests.s3_fixtures import S3Server, moto_server
from tests.waiting import wait_until_async

__all__ = ["Kill", "Moment", "OperatorTarget", "Report", "RunTarget", "chaos_operator", "chaos_run", "plan"]

NAME = "chaos"
#: Share of kills that strike during a restart rather than after some results.
STARTUP_KILLS = 0.2


# --------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Moment:
    """When a kill strikes: ``delay`` seconds after ``results`` verified results, or after the restart began."""

    results: int | None  # None: ``delay`` after the (re)start, whatever the results
    delay: float

    def __str__(self) -> str:
        if self.results is None:
            return f"{self.delay:.1f} s into a restart"
        return f"{self.delay:.1f} s after {self.results} results"


def plan(rng: random.Random, kills: int, units: int) -> list[Moment]:
    """``kills`` moments, their result counts ascending and at most 80% of ``units`` (so work is left)."""
    ceiling = max(1, int(units * 0.8))
    out = []
    for results in sorted(rng.randrange(ceiling) for _ in range(kills)):
        if rng.random() < STARTUP_KILLS:
            out.append(Moment(None, rng.uniform(0.5, 4.0)))
        else:
            out.append(Moment(results, rng.uniform(0.0, 3.0)))
    return out


# ------------------------------------------------------------------------------------- the report


@dataclass
class Kill:
    """One SIGKILL and the restart after it."""

    number: int
    moment: Moment
    what: str  # what was killed
    at: float  # seconds since the chaos began
    done: int  # verified results in the store at the kill
    hostile_in_flight: bool  # the harasser held an uploaded forged result not yet answered
    restart_seconds: float | None = None  # from the restart's start until its lease API answered


@dataclass
class Report:
    """What a chaos run did and found; :meth:`failures` is the verdict."""

    target: str
    units: int
    seed: int
    kills: list[Kill] = field(default_factory=list)
    restart_failures: list[str] = field(default_factory=list)
    outcome: str = ""  # the campaign's last word: mlds run's summary line, or the CR's phase and progress
    succeeded: bool = False
    rows: int = 0
    distinct_units: int = 0
    distinct_keys: int = 0
    sha_mismatches: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)  # objects written once, then rewritten or removed
    max_attempt: int = 0
    hostile: dict[str, int] = field(default_factory=dict)
    breaches: list[str] = field(default_factory=list)
    hostile_rounds: int = 0
    leftovers: list[int] = field(default_factory=list)  # processes that had to be killed at the end
    wall_seconds: float = 0.0

    def failures(self) -> list[str]:
        """Every check of issue 13's must-show that failed (empty: all held)."""
        out = []
        if not self.succeeded:
            out.append(f"the campaign did not succeed: {self.outcome}")
        if (self.rows, self.distinct_units, self.distinct_keys) != (self.units,) * 3:
            out.append(
                f"manifest: {self.rows} rows, {self.distinct_units} distinct units, {self.distinct_keys} distinct keys "
                f"for {self.units} units"
            )
        out += [f"sha256 mismatch: {m}" for m in self.sha_mismatches]
        out += [f"published object changed: {c}" for c in self.changed]
        out += [f"restart failed: {f}" for f in self.restart_failures]
        out += [f"hostile request taken: {b}" for b in self.breaches]
        if len(self.kills) < 1:
            out.append("no kill happened")
        return out

    def render(self) -> str:
        lines = [
            f"chaos: {self.target}, {self.units} units, {len(self.kills)} kills, seed {self.seed}",
            "",
            f"{'kill':>4}  {'moment':<26} {'killed':<15} {'at s':>6} {'done':>7} {'hostile':>8} {'restart s':>9}",
        ]
        for k in self.kills:
            restart = f"{k.restart_seconds:.1f}" if k.restart_seconds is not None else "killed"
            lines.append(
                f"{k.number:>4}  {k.moment!s:<26} {k.what:<15} {k.at:>6.1f} {f'{k.done}/{self.units}':>7} "
                f"{'in flight' if k.hostile_in_flight else '-':>8} {restart:>9}"
            )
        refused = sum(n for answer, n in self.hostile.items() if answer != "server down")
        by_answer: dict[str, int] = {}
        for answer, n in self.hostile.items():
            if answer != "server down":
                status = answer.rpartition(": ")[2]
                by_answer[status] = by_answer.get(status, 0) + n
        lines += [
            "",
            f"outcome: {self.outcome}",
            f"manifest: {self.rows} rows, {self.distinct_units} distinct units, {self.distinct_keys} distinct keys; "
            f"sha256 mismatches {len(self.sha_mismatches)}; highest attempt {self.max_attempt}",
            f"published objects rewritten or removed: {len(self.changed)}",
            f"restarts: {len(self.kills)}, failed: {len(self.restart_failures)}",
            f"hostile: {self.hostile_rounds} rounds, {refused} requests answered, {len(self.breaches)} taken, "
            f"{self.hostile.get('server down', 0)} met a dead server; answers {dict(sorted(by_answer.items()))}",
            f"processes left at the end: {len(self.leftovers)}",
            f"wall: {self.wall_seconds:.0f} s",
            "verdict: " + ("all checks held" if not self.failures() else "FAILED: " + "; ".join(self.failures())),
        ]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------ the targets


class Target(Protocol):
    """A server under chaos: started, killed, started again; the driver asks it these."""

    def start(self, tag: str) -> None: ...
    def kill(self, rng: random.Random) -> str: ...  # returns what was killed
    def ended(self) -> str | None: ...  # None while the server process runs; why it ended otherwise
    def done(self) -> int: ...  # verified results in the store
    def progress(self) -> object: ...
    def published(self) -> dict[str, str]: ...
    async def serving(self, session: aiohttp.ClientSession) -> bool: ...


async def health(session: aiohttp.ClientSession, port: int, *, campaigns: int = 1) -> bool:
    """Does a lease server on ``port`` answer /healthz with ``campaigns`` campaigns opened (recovery done)?"""
    try:
        async with session.get(f"http://127.0.0.1:{port}/healthz", timeout=aiohttp.ClientTimeout(total=2)) as r:
            return r.status == 200 and (await r.json()).get("campaigns", 0) >= campaigns
    except (TimeoutError, aiohttp.ClientError, ConnectionError, ValueError):
        return False


@dataclass
class RunTarget:
    """``mlds run`` of a ds1 campaign in ``folder`` (local store ``folder/store``)."""

    folder: Path
    units: int
    workers: int = 2
    procs: list[Proc] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        # The default three attempts per unit: a kill must cost none (units a restart orphans go back uncounted).
        self.campaign = write_campaign(self.folder / "campaign.yaml", name=NAME, networks_per_target=self.units // 2)
        self.store_dir = self.folder / "store"
        self.store = LocalStore(self.store_dir)
        self.args = ["run", self.campaign, "--workers", self.workers, "--store", "store", "--quiet"]

    @property
    def run(self) -> Proc:
        return self.procs[-1]

    def start(self, tag: str) -> None:
        self.procs.append(start_mlds(self.args, cwd=self.folder, tag=tag))

    def kill(self, rng: random.Random) -> str:
        """SIGKILL the run; in one kill of two every process of the campaign with it (orphans of earlier kills too)."""
        everything = rng.random() < 0.5
        victims = [self.run.pid]
        if everything:
            victims += [p for p in processes_mentioning(str(self.folder)) if p != self.run.pid]
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.run.popen.wait()
        return "run + workers" if everything else "run"

    def ended(self) -> str | None:
        return self.run.ended()

    def done(self) -> int:
        return sum(1 for _ in mf.find_results(self.store))

    def progress(self) -> object:
        return activity(self.folder)

    def published(self) -> dict[str, str]:
        return published_objects(self.store)

    def port(self) -> int | None:
        with contextlib.suppress(OSError, ValueError, KeyError):
            return int(json.loads((self.store_dir / "_mlds" / "run.json").read_text())["port"])
        return None

    async def serving(self, session: aiohttp.ClientSession) -> bool:
        port = self.port()
        info = self.store_dir / "_mlds" / "run.json"
        # run.json names the process that wrote it: the port of a killed run is not the restart's.
        with contextlib.suppress(OSError, ValueError, KeyError):
            if json.loads(info.read_text())["pid"] != self.run.pid:
                return False
        return port is not None and await health(session, port)

    def where(self) -> tuple[str, str] | None:
        """The harasser's view: what a local worker reads (the token file and run.json's port)."""
        port = self.port()
        with contextlib.suppress(OSError):
            token = (self.store_dir / "_mlds" / "run-token").read_text().strip()
            if port is not None and token:
                return f"http://127.0.0.1:{port}/v1/campaigns/local/{NAME}", token
        return None

    async def finish(self, report: Report) -> None:
        """Wait for the last run to end; judge its exit, its summary and every run's output."""
        await wait_until_async(lambda: not self.run.alive(), what="the last run to finish", progress=self.progress)
        code = self.run.popen.returncode
        first = (self.run.stdout.splitlines() or [""])[0]
        report.outcome = f"exit {code}: {first}"
        report.succeeded = code == 0 and first == f"{NAME}: Succeeded: {self.units}/{self.units} networks"
        for proc in self.procs:
            if "Traceback" in proc.stderr:
                report.restart_failures.append(f"{proc.stderr_path.name} holds a traceback:\n{proc.stderr[-2000:]}")
        report.leftovers = reap(str(self.folder), wait=True)
        check_manifest(report, self.store)


@dataclass
class OperatorTarget:
    """A real operator process with a campaign in a moto bucket; the kubelet runs its pods as processes."""

    folder: Path
    units: int
    cluster: Cluster
    s3: S3Server
    bucket: str
    workers: int = 2

    def __post_init__(self) -> None:
        self.port = free_port()
        self.operator: OperatorProcess = operator_process(self.cluster, self.folder, self.port)
        self.kubelet = Kubelet(self.cluster, self.folder)
        self.store: Store = self.s3.open(self.bucket, NAME)
        self.starts = 0

    def manifest(self) -> dict[str, Any]:
        return campaign_manifest(
            NAME,
            NAMESPACE,
            storage=self.s3.storage(self.bucket, NAME),
            pools=[{"name": "cpu", "accelerator": "cpu", "replicas": self.workers, "unitsPerLease": 1}],
            networks_per_target=self.units // 2,
            lease_seconds=10,
        )

    def start(self, tag: str) -> None:
        with self.operator.log_path.open("ab") as log:
            log.write(f"---- {tag}\n".encode())
        self.operator.start()
        self.starts += 1

    def kill(self, rng: random.Random) -> str:
        self.operator.kill()
        return "operator"

    def ended(self) -> str | None:
        proc = self.operator.proc
        if proc is None or proc.poll() is None:
            return None
        return f"the operator exited {proc.returncode}; its log ends:\n{self.operator.log()[-3000:]}"

    def done(self) -> int:
        return sum(1 for _ in mf.find_results(self.store))

    def status(self) -> dict[str, Any]:
        return self.cluster.status(NAMESPACE, NAME)

    def progress(self) -> object:
        return self.status().get("units"), self.kubelet.progress()

    def published(self) -> dict[str, str]:
        return published_objects(self.store)

    async def serving(self, session: aiohttp.ClientSession) -> bool:
        # A restart after the campaign ended opens nothing (its status is final): answering is serving then.
        ended = self.status().get("phase") in ("Succeeded", "Failed")
        return await health(session, self.port, campaigns=0 if ended else 1)

    def where(self) -> tuple[str, str] | None:
        secret = self.cluster.get(SECRETS, NAMESPACE, pods.secret_name(NAME))
        token = pods.token_from_secret(secret) if secret is not None else None
        return (pods.lease_url(f"http://127.0.0.1:{self.port}", NAMESPACE, NAME), token) if token else None

    async def finish(self, report: Report) -> None:
        """Wait for the campaign's phase to settle and its pods to exit; judge the status, the log, the exits."""
        status = await wait_until_async(
            lambda: self.status().get("phase") in ("Succeeded", "Failed") and self.status(),
            what="the campaign to finish",
            progress=self.progress,
        )
        units = status.get("units") or {}
        report.outcome = f"phase {status.get('phase')}, {status.get('progress')}, units {units}"
        report.succeeded = (
            status.get("phase") == "Succeeded"
            and units.get("succeeded") == self.units
            and not units.get("failed")
            and status.get("progress") == f"{self.units}/{self.units}"
        )
        await wait_until_async(lambda: not self.kubelet.alive(), what="the workers to exit", progress=self.progress)
        exits = [pod.proc.returncode for pod in self.kubelet.every_pod]  # the Jobs may be gone, not their pods
        if any(exits):
            report.restart_failures.append(f"worker pods exited {exits}")
        log = self.operator.log()
        if "Traceback" in log:
            at = log.index("Traceback")
            report.restart_failures.append(f"the operator log holds a traceback:\n{log[at - 500 : at + 2500]}")
        check_manifest(report, self.store)


def check_manifest(report: Report, store: Store) -> None:
    """The manifest's rows: one per unit, distinct keys, each model's sha256 that of its bytes and its meta.json."""
    try:
        rows = mf.read_manifest(store).to_pylist()
    except UserError as exc:  # none written: the campaign never finished
        report.sha_mismatches.append(f"no manifest: {exc}")
        return
    report.rows = len(rows)
    report.distinct_units = len({row["unit"] for row in rows})
    report.distinct_keys = len({row["key"] for row in rows})
    report.max_attempt = max((row["attempt"] for row in rows), default=0)
    for row in rows:
        model = store.get_bytes(f"{row['key']}/model.safetensors")
        meta = json.loads(store.get_bytes(f"{row['key']}/meta.json") or b"{}")
        digest = hashlib.sha256(model).hexdigest() if model is not None else "missing"
        if not digest == row["sha256"] == meta.get("sha256"):
            report.sha_mismatches.append(
                f"{row['key']}: row {row['sha256']}, model {digest}, meta {meta.get('sha256')}"
            )


# ------------------------------------------------------------------------------------- the driver


class _Serving:
    """Times each (re)start until its lease API answers; the restart time of the kill before it."""

    def __init__(self, target: Target, session: aiohttp.ClientSession) -> None:
        self.target, self.session = target, session
        self.task: asyncio.Task[float | None] | None = None

    def watch(self) -> None:
        self.task = asyncio.create_task(self._watch(time.monotonic()))

    async def _watch(self, began: float) -> float | None:
        while self.target.ended() is None:
            if await self.target.serving(self.session):
                return time.monotonic() - began
            await asyncio.sleep(0.1)
        return None

    async def seconds(self) -> float | None:
        """The last start's time to serve, or None if it was killed (or ended) before."""
        if self.task is None:
            return None
        if not self.task.done():
            self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            return await self.task
        return None


class _Watch:
    """Objects written once must keep their bytes: the store is viewed after each kill and at the end."""

    def __init__(self, target: Target, report: Report) -> None:
        self.target, self.report = target, report
        self.seen: dict[str, str] = {}

    async def look(self) -> None:
        now = await asyncio.to_thread(self.target.published)
        for change in changed_objects(self.seen, now):
            if change not in self.report.changed:
                self.report.changed.append(change)
        self.seen.update(now)


async def _sleep_while_work_is_left(target: Target, seconds: float, units: int) -> None:
    """Sleep ``seconds``, or less: a kill after the last results were verified would find no work to disturb.

    On a quiet machine a small campaign can finish within a moment's delay; the kill then lands while units
    are still being delivered, as the plan means (at least two left).
    """
    until = time.monotonic() + seconds
    while time.monotonic() < until and target.done() < units - 2:
        await asyncio.sleep(0.1)


async def drive(
    target: Target, moments: list[Moment], rng: random.Random, report: Report, harasser: Harasser, watch: _Watch
) -> None:
    """Start the target, kill it at each moment and start it again; returns with the last start running."""
    began = time.monotonic()
    async with aiohttp.ClientSession() as session:
        serving = _Serving(target, session)
        target.start("start 0")
        serving.watch()
        started = time.monotonic()
        for number, moment in enumerate(moments, 1):
            if moment.results is not None:
                goal = moment.results
                await wait_until_async(
                    lambda goal=goal: target.done() >= goal or target.ended() is not None,
                    what=f"{goal} verified results before kill {number}",
                    progress=target.progress,
                    interval=0.5,
                )
                await _sleep_while_work_is_left(target, moment.delay, report.units)
            else:
                await asyncio.sleep(max(0.0, started + moment.delay - time.monotonic()))
            ended = target.ended()
            if ended is not None:
                report.restart_failures.append(f"before kill {number}: {ended}")
                return
            in_flight = harasser.holding
            what = target.kill(rng)
            kill = Kill(number, moment, what, time.monotonic() - began, target.done(), in_flight)
            if report.kills:
                report.kills[-1].restart_seconds = await serving.seconds()
            report.kills.append(kill)
            await asyncio.sleep(rng.uniform(0.0, 1.0))  # what a supervisor or a person takes to notice
            target.start(f"restart {number}")
            serving.watch()
            started = time.monotonic()
            await watch.look()
        # The last restart is left to finish; its time to serve is known once it serves (or ends).
        await wait_until_async(
            lambda: serving.task is None or serving.task.done(),
            what="the last restart to serve",
            progress=target.progress,
        )
        if report.kills:
            report.kills[-1].restart_seconds = await serving.seconds()


@contextlib.asynccontextmanager
async def harassing(
    report: Report, where: Callable[[], tuple[str, str] | None], pool: str, rng: random.Random
) -> AsyncIterator[Harasser]:
    """A :class:`~tests.attacks.Harasser` running beside the body; its tally goes into ``report`` at the end."""
    harasser = Harasser(where, pool, random.Random(rng.random()))
    stop = asyncio.Event()
    task = asyncio.create_task(harasser.run(stop))
    try:
        yield harasser
    finally:
        stop.set()
        await task
        report.hostile = dict(harasser.answers)
        report.breaches = list(harasser.breaches)
        report.hostile_rounds = harasser.rounds


async def chaos_run(folder: Path, *, kills: int, units: int, seed: int, workers: int = 2) -> Report:
    """``kills`` SIGKILLs of ``mlds run`` (alone or with its workers), a harasser beside it; then the checks."""
    rng = random.Random(seed)
    units = 2 * max(1, units // 2)  # two machines, half each
    report = Report("mlds run", units, seed)
    began = time.monotonic()
    target = RunTarget(folder, units, workers)
    watch = _Watch(target, report)
    try:
        async with harassing(report, target.where, "local", rng) as harasser:
            await drive(target, plan(rng, kills, units), rng, report, harasser, watch)
            if not report.restart_failures:
                await target.finish(report)
        await watch.look()
    finally:
        report.leftovers = sorted(set(report.leftovers) | set(reap(str(folder))))
    report.wall_seconds = time.monotonic() - began
    return report


async def chaos_operator(folder: Path, *, kills: int, units: int, seed: int, workers: int = 2) -> Report:
    """``kills`` SIGKILLs of a real operator process mid-campaign, a harasser beside it; then the checks."""
    rng = random.Random(seed)
    units = 2 * max(1, units // 2)  # two machines, half each
    report = Report("operator", units, seed)
    began = time.monotonic()
    folder.mkdir(parents=True, exist_ok=True)
    with moto_server() as (s3, _):
        bucket = f"chaos-{seed}"
        s3.client().make_bucket(bucket)
        async with emulated_cluster(folder) as cluster:
            secret = credentials_secret(NAMESPACE, "s3-credentials", s3.access_key, s3.secret_key)
            await cluster.create(SECRETS, secret)
            target = OperatorTarget(folder, units, cluster, s3, bucket, workers)
            watch = _Watch(target, report)
            target.kubelet.start()
            try:
                async with harassing(report, target.where, "cpu", rng) as harasser:
                    await cluster.create(CAMPAIGNS, target.manifest())
                    await drive(target, plan(rng, kills, units), rng, report, harasser, watch)
                    if not report.restart_failures:
                        await target.finish(report)
                await watch.look()
            finally:
                await target.kubelet.close()
                target.operator.stop()
                target.store.close()
    report.wall_seconds = time.monotonic() - began
    return report
