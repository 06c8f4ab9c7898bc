"""`mlds bench cycle`: verified results per second and per server CPU-second, the whole completion cycle.

Registered under `mlds bench` by :mod:`mlds_operator.bench.command` (issue 15). Where `mlds bench leases`
measures grants only, this benchmark runs what a fleet of workers makes the server do for every result:
lease -> upload the result files to the presigned (S3) or signed (local) URLs -> complete -> the server
verifies every staged object (size and SHA-256), publishes it to the unit's final folder, counts the unit
and adds its manifest row (flushed as manifest parts and a checkpoint, as in production).

Processes, so that nothing shares the server's event loop and its CPU time is its own:

- **the lease server** (spawned): exactly what `mlds run` serves (``open_campaign`` with the metrics
  observer, :func:`~mlds_operator.leases.http.create_app` with ``GET /metrics``, the campaign loop's
  ``tick`` every second) over a :class:`~mlds_operator.storage.store.LocalStore` in a temporary folder
  (durable writes, as `mlds run` uses) or an :class:`~mlds_operator.storage.store.S3Store`. It counts
  its object-store calls (every :class:`Store` method call, and on S3 every HTTP request the MinIO SDK
  sends) and reports its own CPU time (``time.process_time``: every thread of the process), RSS and
  results verified, around each measured window;
- **the S3 server** (``--store s3``, spawned): moto's ``ThreadedMotoServer`` on loopback, the server the
  tests use. Its CPU time is reported beside ours: it is the object store's cost, not the operator's;
- **simulated workers** (``--clients`` processes x ``--connections`` concurrent workers each): no
  training. Each worker leases K units, builds each unit's files with the worker's own
  :func:`mlds_worker.results.result_files` code from a template result (the real ds1 network shape,
  4,364 float32 parameters, a history of 350 epochs, the real meta.json of that unit), uploads them with
  the worker's own :func:`mlds_worker.client.upload`, then completes them: a **burst of 1** sends one
  ``complete`` request per unit (K at once), a **burst of K** sends the K completions in one
  ``complete-batch`` request.

Each measured window prints verified results per second (wall), per server CPU-second, the completion
latency percentiles (request sent -> reply), object-store requests per verified result, the server's
RSS, and the load average of the machine. ``--profile`` runs cProfile in the server process during the
windows and prints its top functions. No figure here is asserted by a test: the benchmark prints.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import cProfile
import dataclasses
import io
import json
import multiprocessing
import os
import pstats
import secrets
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import click

from mlds_operator.bench.clients import Start, run_clients
from mlds_operator.bench.leases import peak_rss_bytes, rss_bytes

__all__ = ["CycleResult", "bench_cycle_command", "run_cycle"]

NAMESPACE = "bench"
NAME = "cycle"
POOL = "bench"
BUCKET = "mlds-bench"
ACCESS_KEY = "mlds-bench-access"
SECRET_KEY = "mlds-bench-secret"  # noqa: S105 - a loopback test server's fake credential
REGION = "us-east-1"
#: Epochs in the template result's history.csv: docs/workloads.md §4's mean epochs-to-converge over ds1 (348).
HISTORY_EPOCHS = 348


def loadavg() -> str:
    """The machine's 1/5/15-minute load averages (recorded with every figure: the machine is shared)."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


# --------------------------------------------------------------------------------------- S3 server


def _moto_main(conn: Connection) -> None:
    """Entry point of the S3 server process: moto on a free loopback port until told to stop."""
    import logging  # noqa: PLC0415

    from moto.server import ThreadedMotoServer  # noqa: PLC0415 - only with --store s3

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    conn.send((f"{host}:{port}", os.getpid()))
    while True:
        command = conn.recv()
        if command == "cpu":
            conn.send(time.process_time())
        else:
            break
    server.stop()


# ------------------------------------------------------------------------------------- lease server


class _Counts:
    """Object-store calls made by the server process: Store methods, and HTTP requests on S3."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.http = 0
        self._lock = threading.Lock()

    def wrap_store(self, store: Any) -> None:
        names = (
            "put_bytes",
            "put_upload",
            "get_bytes",
            "stat",
            "delete",
            "delete_many",
            "verify",
            "check_parts",
            "check",
            "publish",
            "scan",
        )
        for name in names:
            method = getattr(store, name, None)
            if method is None:
                continue

            def counted(*args: Any, _m: Callable[..., Any] = method, _n: str = name, **kwargs: Any) -> Any:
                with self._lock:
                    self.calls[_n] += 1
                return _m(*args, **kwargs)

            setattr(store, name, counted)
        client = getattr(store, "client", None)
        http = getattr(client, "_http", None)
        if http is not None:
            urlopen = http.urlopen

            def counted_urlopen(*args: Any, **kwargs: Any) -> Any:
                with self._lock:
                    self.http += 1
                return urlopen(*args, **kwargs)

            http.urlopen = counted_urlopen

    def snapshot(self) -> tuple[dict[str, int], int]:
        with self._lock:
            return dict(self.calls), self.http


class _ProfiledExecutor(concurrent.futures.ThreadPoolExecutor):
    """The event loop's default executor under ``--profile``: each call runs under its thread's cProfile.

    cProfile sees one thread only; the service verifies and publishes in ``asyncio.to_thread`` calls, whose
    cost would otherwise be missing from the profile.
    """

    def __init__(self) -> None:
        super().__init__(max_workers=min(32, (os.cpu_count() or 1) + 4), thread_name_prefix="profiled")
        self.enabled = False
        self.profiles: list[cProfile.Profile] = []
        self._local = threading.local()
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        def run() -> Any:
            if not self.enabled:
                return fn(*args, **kwargs)
            profile = getattr(self._local, "profile", None)
            if profile is None:
                profile = self._local.profile = cProfile.Profile(time.thread_time)
                with self._lock:
                    self.profiles.append(profile)
            profile.enable()
            try:
                return fn(*args, **kwargs)
            finally:
                profile.disable()

        return super().submit(run)


def _spec(units: int, storage: Any) -> Any:
    from mlds_contract.campaign import DS1_MACHINES, CampaignSpec, Pool, Workload  # noqa: PLC0415

    per_target, rest = divmod(units, len(DS1_MACHINES))
    if rest:
        raise click.BadParameter(f"--units must be a multiple of {len(DS1_MACHINES)} (the ds1 machines)")
    return CampaignSpec(
        workload=Workload(dataset="ds1", machines=list(DS1_MACHINES)),
        networks_per_target=per_target,
        pools=[Pool(name=POOL, units_per_lease=16)],
        storage=storage,
    )


def _server_main(conn: Connection, units: int, s3_endpoint: str | None, root: str) -> None:
    """Entry point of the lease server process (spawned): serve until told to stop."""
    asyncio.run(_serve(conn, units, s3_endpoint, Path(root)))


async def _serve(conn: Connection, units: int, s3_endpoint: str | None, root: Path) -> None:  # noqa: PLR0915 - one script
    import gc  # noqa: PLC0415

    from aiohttp import web  # noqa: PLC0415
    from mlds_contract.campaign import Storage  # noqa: PLC0415

    from mlds_operator.leases.http import create_app  # noqa: PLC0415
    from mlds_operator.leases.metrics import ServerMetrics  # noqa: PLC0415
    from mlds_operator.leases.registry import Campaigns, open_campaign  # noqa: PLC0415
    from mlds_operator.storage.store import LocalStore  # noqa: PLC0415

    storage = None
    if s3_endpoint is not None:
        os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = ACCESS_KEY, SECRET_KEY
        storage = Storage(endpoint=s3_endpoint, bucket=BUCKET, prefix=NAME, secure=False, region=REGION)
    spec = _spec(units, storage)
    token = secrets.token_urlsafe(32)
    # Bind first: a local store's upload URLs name the server's port.
    probe = web.AppRunner(web.Application())
    await probe.setup()
    site = web.TCPSite(probe, "127.0.0.1", 0)
    await site.start()
    port = int(probe.addresses[0][1])
    await probe.cleanup()
    base = f"http://127.0.0.1:{port}"
    campaigns = Campaigns()
    service = await open_campaign(
        campaigns, NAMESPACE, NAME, spec, token=token, local_root=root, upload_base_url=base, pools=[POOL]
    )
    store = service.store
    counts = _Counts()
    counts.wrap_store(store)
    metrics = ServerMetrics(campaigns, component="run")
    app = create_app(
        campaigns, local_store=store if isinstance(store, LocalStore) else None, observer=metrics.observe_request
    )
    metrics.add_route(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024, reuse_address=True).start()

    async def loop() -> None:  # the campaign loop of `mlds run`: expiry, parts + checkpoints, finalize
        while True:
            await asyncio.sleep(1.0)
            await service.tick()

    ticker = asyncio.create_task(loop())
    executor = _ProfiledExecutor()
    asyncio.get_running_loop().set_default_executor(executor)
    gc.collect()
    conn.send({"url": f"{base}/v1/campaigns/{NAMESPACE}/{NAME}", "token": token, "pid": os.getpid()})
    profiler: cProfile.Profile | None = None
    try:
        while True:
            command = await asyncio.to_thread(conn.recv)
            if command == "profile-start":
                profiler = cProfile.Profile(time.thread_time)  # CPU, not wall: fsync waits are not cost
                executor.profiles.clear()
                executor.enabled = True
                profiler.enable()
            elif command == "profile-stop" and profiler is not None:
                profiler.disable()
                executor.enabled = False
                out = io.StringIO()
                stats = pstats.Stats(profiler, stream=out)
                for p in executor.profiles:
                    stats.add(p)
                stats.sort_stats("tottime").print_stats(45)
                stats.sort_stats("cumulative").print_stats(30)  # where the time goes, by caller
                conn.send(out.getvalue())
                profiler = None
            elif command == "mark":
                calls, http = counts.snapshot()
                conn.send(
                    {
                        "wall": time.monotonic(),
                        "cpu": time.process_time(),
                        "verified": service.book.stats().succeeded,
                        "calls": calls,
                        "http": http,
                        "rss": rss_bytes(),
                        "peak": peak_rss_bytes(),
                    }
                )
            else:
                break
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
        await runner.cleanup()
        store.close()


# ------------------------------------------------------------------------------------------ workers


@dataclass
class ClientResult:
    """One client process's count over the measured window."""

    verified: int = 0  # completions answered "accepted" inside the window
    latencies: list[float] = field(default_factory=list)  # seconds, complete request -> reply, per result
    errors: dict[str, int] = field(default_factory=dict)
    cpu_seconds: float = 0.0


def _template() -> tuple[Any, dict[str, bytes]]:
    """A ds1 result of the real shape and sizes (random weights, 348 epochs of history) and its files."""
    import torch  # noqa: PLC0415 - the simulated workers build files with the worker's own code
    from mlds_contract.campaign import CampaignSpec, Pool, Workload  # noqa: PLC0415
    from mlds_contract.plan import unit_spec  # noqa: PLC0415
    from mlds_worker.nets import GRUNet  # noqa: PLC0415
    from mlds_worker.results import result_files  # noqa: PLC0415
    from mlds_worker.train import EpochRecord, TrainResult  # noqa: PLC0415

    torch.manual_seed(0)
    net = GRUNet()
    state = {k: v.detach().clone().contiguous() for k, v in net.named_parameters()}
    spec = CampaignSpec(
        workload=Workload(dataset="ds1", machines=["ParityMachine"]), networks_per_target=1, pools=[Pool(name=POOL)]
    )
    unit = unit_spec(spec, 0, 0, campaign=NAME)
    history = [
        EpochRecord(epoch=e, train_loss=0.25 / e**1.3, eval_loss=0.24 / e**1.3, seconds=0.08 + 1e-3 * (e % 7))
        for e in range(1, HISTORY_EPOCHS + 1)
    ]
    now = datetime.now(UTC)
    result = TrainResult(
        unit=unit,
        state_dict=state,
        history=history,
        epochs=HISTORY_EPOCHS,
        converged=True,
        train_loss=history[-1].train_loss,
        eval_loss=history[-1].eval_loss,
        started=now,
        ended=now,
        device_type="cpu",
        device_name="bench",
        parameters=sum(t.numel() for t in state.values()),
    )
    return result, result_files(result, pool=POOL)


async def _client(  # noqa: PLR0915 - one worker script, read top to bottom
    index: int, start: Start, url: str, token: str, k: int, burst: int, connections: int, bundles: bool
) -> ClientResult:
    """One worker process (spawned by :func:`~mlds_operator.bench.clients.run_clients`): ``connections`` workers."""
    import aiohttp  # noqa: PLC0415
    from mlds_contract.lease import (  # noqa: PLC0415
        CompleteBatchReply,
        CompleteBatchRequest,
        CompleteReply,
        CompleteRequest,
        FileDigest,
        LeaseGrant,
        LeaseRequest,
    )
    from mlds_contract.results import META_FILE  # noqa: PLC0415
    from mlds_contract.routes import COMPLETE, COMPLETE_BATCH, LEASE  # noqa: PLC0415
    from mlds_worker.client import upload  # noqa: PLC0415
    from mlds_worker.results import meta_record, sha256_hex  # noqa: PLC0415

    template, files = _template()
    model_sha = json.loads(files[META_FILE])["sha256"]
    fixed = {name: (data, FileDigest(size=len(data), sha256=sha256_hex(data))) for name, data in files.items()}
    result = ClientResult()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=4 * connections, limit_per_host=4 * connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        begin, end = await start.wait(index)
        cpu0 = time.process_time()

        def error(key: str) -> None:
            result.errors[key] = result.errors.get(key, 0) + 1

        async def post(path: str, body: bytes) -> tuple[int, bytes]:
            async with session.post(url + path, data=body, headers=headers) as resp:
                return resp.status, await resp.read()

        async def worker(i: int) -> None:  # noqa: PLR0912 - lease, upload, complete, count
            lease_body = LeaseRequest(
                worker=f"w{index}-{i}",
                pool=POOL,
                accelerator="cpu",
                device_name="bench",
                max_units=k,
                bundle_uploads=bundles,
            ).model_dump_json(by_alias=True)
            while time.monotonic() < end:
                status, data = await post(LEASE.campaign_path(), lease_body.encode())
                if status != 200 or not data.startswith(b'{"leaseId"'):
                    error(f"lease {status}")
                    await asyncio.sleep(0.2)
                    continue
                grant = LeaseGrant.model_validate_json(data)
                requests = []
                for leased in grant.units:
                    meta = meta_record(dataclasses.replace(template, unit=leased.spec), sha256=model_sha, pool=POOL)
                    meta_bytes = (json.dumps(meta, indent=2) + "\n").encode()
                    bodies, digests = {}, {}
                    for name in leased.uploads:
                        bodies[name], digests[name] = fixed[name]
                    bodies[META_FILE] = meta_bytes
                    digests[META_FILE] = FileDigest(size=len(meta_bytes), sha256=sha256_hex(meta_bytes))
                    if leased.bundle_upload is not None:  # as the worker does: one PUT, the files in uploads' order
                        await upload(session, leased.bundle_upload, b"".join(bodies[n] for n in leased.uploads))
                    else:
                        for name, url_ in leased.uploads.items():
                            await upload(session, url_, bodies[name])
                    requests.append(
                        CompleteRequest(
                            worker=f"w{index}-{i}",
                            pool=POOL,
                            unit=leased.spec.unit,
                            attempt=leased.spec.attempt,
                            converged=True,
                            files=digests,
                            training_seconds=28.0,
                            epochs=HISTORY_EPOCHS,
                            bundled=leased.bundle_upload is not None,
                        )
                    )
                sent = time.monotonic()
                if burst == 1:

                    async def one(req: CompleteRequest) -> str:
                        status, data = await post(
                            COMPLETE.campaign_path(unit=req.unit), req.model_dump_json(by_alias=True).encode()
                        )
                        if status != 200:
                            return f"complete {status}"
                        return CompleteReply.model_validate_json(data).status.value

                    outcomes = await asyncio.gather(*(one(r) for r in requests))
                else:
                    batch = CompleteBatchRequest(completions=requests).model_dump_json(by_alias=True).encode()
                    status, data = await post(COMPLETE_BATCH.campaign_path(), batch)
                    if status != 200:
                        outcomes = [f"complete-batch {status}"] * len(requests)
                    else:
                        reply = CompleteBatchReply.model_validate_json(data)
                        outcomes = [
                            r.status.value if r.status is not None else f"rejected {r.error}" for r in reply.results
                        ]
                done = time.monotonic()
                if not begin <= done <= end:
                    continue
                for outcome in outcomes:
                    if outcome == "accepted":
                        result.verified += 1
                        result.latencies.append(done - sent)
                    else:
                        error(outcome)

        await asyncio.gather(*(worker(i) for i in range(connections)))
        result.cpu_seconds = time.process_time() - cpu0
    return result


# ------------------------------------------------------------------------------------------- driver


@dataclass
class Row:
    """One measured window's figures."""

    burst: int
    k: int
    verified: int
    seconds: float
    server_cpu: float  # CPU seconds of the server process in the window
    store_cpu: float | None  # CPU seconds of the S3 server process in the window (S3 only)
    p50_ms: float
    p99_ms: float
    calls: dict[str, int]  # Store method calls in the window
    http: int  # HTTP requests to S3 in the window
    rss: int
    errors: dict[str, int]
    load: str
    profile: str | None = None

    @property
    def per_second(self) -> float:
        return self.verified / self.seconds

    @property
    def per_cpu_second(self) -> float:
        return self.verified / max(self.server_cpu, 1e-9)


@dataclass
class CycleResult:
    """Everything `mlds bench cycle` measured."""

    store: str
    units: int
    clients: int
    connections: int
    rows: list[Row]
    peak_rss: int
    uploads: str = "bundle"  # "bundle" (one PUT per unit, as the worker does) or "files" (one per file)


def run_cycle(  # noqa: PLR0915 - start, measure, stop, in order
    *,
    store: str = "local",
    units: int = 200_000,
    k: int = 16,
    bursts: tuple[int, ...] = (1, 16),
    clients: int = 1,
    connections: int = 8,
    seconds: float = 10.0,
    warmup: float = 2.0,
    profile: bool = False,
    uploads: str = "bundle",
) -> CycleResult:
    """Start the servers, run each burst's window with simulated workers, stop everything."""
    ctx = multiprocessing.get_context("spawn")
    moto: Any = None
    moto_conn: Connection | None = None
    endpoint = None
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="mlds-bench-cycle-") as tmp:
        try:
            if store == "s3":
                moto_conn, child = ctx.Pipe()
                moto = ctx.Process(target=_moto_main, args=(child,), name="bench-s3")
                moto.start()
                if not moto_conn.poll(120):
                    raise click.ClickException("the S3 test server did not start within 120 s")
                endpoint, _ = moto_conn.recv()
            parent, child = ctx.Pipe()
            server = ctx.Process(target=_server_main, args=(child, units, endpoint, tmp), name="bench-cycle-server")
            server.start()
            try:
                if not parent.poll(300):
                    raise click.ClickException("the lease server did not start within 300 s")
                info = parent.recv()

                def mark() -> dict[str, Any]:
                    parent.send("mark")
                    m: dict[str, Any] = parent.recv()
                    if moto_conn is not None:
                        moto_conn.send("cpu")
                        m["store_cpu"] = moto_conn.recv()
                    return m

                for burst in bursts:
                    if profile:
                        parent.send("profile-start")
                    marks: list[dict[str, Any]] = []

                    def take(into: list[dict[str, Any]] = marks) -> None:
                        into.append(mark())

                    results: list[ClientResult] = run_clients(
                        ctx,
                        _client,
                        (info["url"], info["token"], k, burst, connections, uploads == "bundle"),
                        clients=clients,
                        warmup=warmup,
                        seconds=seconds,
                        mark=take,
                        name="bench-worker",
                    )
                    text = None
                    if profile:
                        parent.send("profile-stop")
                        text = parent.recv()
                    a, b = marks
                    latencies = sorted(x for r in results for x in r.latencies)
                    errors: Counter[str] = Counter()
                    for r in results:
                        errors.update(r.errors)
                    calls = {n: b["calls"].get(n, 0) - a["calls"].get(n, 0) for n in b["calls"]}
                    rows.append(
                        Row(
                            burst=burst,
                            k=k,
                            verified=b["verified"] - a["verified"],
                            seconds=b["wall"] - a["wall"],
                            server_cpu=b["cpu"] - a["cpu"],
                            store_cpu=(b["store_cpu"] - a["store_cpu"]) if "store_cpu" in a else None,
                            p50_ms=statistics.median(latencies) * 1e3 if latencies else float("nan"),
                            p99_ms=latencies[int(0.99 * (len(latencies) - 1))] * 1e3 if latencies else float("nan"),
                            calls={n: c for n, c in calls.items() if c},
                            http=b["http"] - a["http"],
                            rss=b["rss"],
                            errors=dict(errors),
                            load=loadavg(),
                            profile=text,
                        )
                    )
                parent.send("mark")
                peak = parent.recv()["peak"]
                parent.send("stop")
            finally:
                server.join(timeout=60)
                if server.is_alive():
                    server.kill()
        finally:
            if moto is not None and moto_conn is not None:
                with contextlib.suppress(OSError):
                    moto_conn.send("stop")
                moto.join(timeout=30)
                if moto.is_alive():
                    moto.kill()
    return CycleResult(
        store=store, units=units, clients=clients, connections=connections, rows=rows, peak_rss=peak, uploads=uploads
    )


def format_result(res: CycleResult) -> str:
    """The table `mlds bench cycle` prints."""
    lines = [
        f"store: {res.store} ({'moto ThreadedMotoServer on loopback' if res.store == 's3' else 'LocalStore, durable'});"
        f" campaign of {res.units:,} ds1 units; {res.clients} worker process(es) x {res.connections} workers,"
        f" uploading {'one bundle per unit' if res.uploads == 'bundle' else 'file by file'};"
        f" host has {os.cpu_count()} CPU(s)",
        "",
    ]
    requests_label = "S3 req/result" if res.store == "s3" else "store calls/res"
    header = (
        f"{'burst':>5} {'K':>3} {'verified':>8} {'results/s':>9} {'server CPU':>10} {'results/CPU-s':>13}"
        f" {'p50 ms':>7} {'p99 ms':>7} {requests_label:>16} {'S3 server CPU-s/result':>22}"
        f" {'RSS MB':>7}  loadavg"
    )
    lines += [header, "-" * len(header)]
    for r in res.rows:
        n = max(r.verified, 1)
        requests = r.http if res.store == "s3" else sum(r.calls.values())
        moto = f"{1e3 * r.store_cpu / n:>19.2f} ms" if r.store_cpu is not None else f"{'-':>22}"
        lines.append(
            f"{r.burst:>5} {r.k:>3} {r.verified:>8,} {r.per_second:>9,.0f} {r.server_cpu / r.seconds:>10.0%}"
            f" {r.per_cpu_second:>13,.0f} {r.p50_ms:>7.1f} {r.p99_ms:>7.1f} {requests / n:>16.2f} {moto}"
            f" {r.rss / 1e6:>7.1f}  {r.load}"
        )
    for r in res.rows:
        n = max(r.verified, 1)
        detail = ", ".join(f"{name} {c / n:.2f}" for name, c in sorted(r.calls.items()))
        lines.append(f"burst {r.burst}: Store calls per result: {detail or 'none'}")
        if r.errors:
            lines.append(f"burst {r.burst}: other answers: {r.errors}")
    lines.append(f"server peak RSS: {res.peak_rss / 1e6:,.1f} MB")
    for r in res.rows:
        if r.profile:
            title = f"server profile, burst {r.burst} (cProfile: event loop + executor threads, by own time):"
            lines += ["", title, r.profile]
    return "\n".join(lines)


@click.command("cycle")
@click.option("--store", type=click.Choice(["local", "s3"]), default="local", show_default=True)
@click.option("--units", type=click.IntRange(5), default=200_000, show_default=True, help="Units in the campaign.")
@click.option("--k", type=click.IntRange(1, 256), default=16, show_default=True, help="Units per lease.")
@click.option("--bursts", default="1,K", show_default=True, help="Completion bursts to measure (K: all of a lease).")
@click.option("--clients", type=click.IntRange(1, 16), default=1, show_default=True, help="Worker processes.")
@click.option("--connections", type=click.IntRange(1, 256), default=8, show_default=True, help="Workers each.")
@click.option("--seconds", type=click.FloatRange(1.0), default=10.0, show_default=True, help="Measured per burst.")
@click.option("--warmup", type=click.FloatRange(0.0), default=2.0, show_default=True, help="Unmeasured, per burst.")
@click.option(
    "--uploads",
    type=click.Choice(["bundle", "files"]),
    default="bundle",
    show_default=True,
    help="One PUT per unit (what the worker does) or one per file (workers that predate bundles).",
)
@click.option("--profile", is_flag=True, help="cProfile the server during the windows; print the top functions.")
def bench_cycle_command(
    store: str,
    units: int,
    k: int,
    bursts: str,
    clients: int,
    connections: int,
    seconds: float,
    warmup: float,
    uploads: str,
    profile: bool,
) -> None:
    """Verified results per second and per server CPU-second: lease, upload, complete, verify, publish, manifest."""
    try:
        values = tuple(k if b.strip().upper() == "K" else int(b) for b in bursts.split(",") if b.strip())
    except ValueError as exc:
        raise click.BadParameter(f"expected comma-separated integers or K, got {bursts!r}") from exc
    if not values or any(b not in (1, k) for b in values):
        raise click.BadParameter("bursts are 1 (one completion per request) or K (a lease's in one)")
    click.echo(f"mlds bench cycle: {store} store, {units:,} units, K={k}, bursts {values} ...", err=True)
    result = run_cycle(
        store=store,
        units=units,
        k=k,
        bursts=values,
        clients=clients,
        connections=connections,
        seconds=seconds,
        warmup=warmup,
        profile=profile,
        uploads=uploads,
    )
    click.echo(format_result(result))
