"""`mlds bench leases`: how fast one lease server grants leases over HTTP, and what a big campaign costs it.

Registered under `mlds bench` by :mod:`mlds_operator.bench.command`. Targets (issue 7): at least 2,000 leases per
second on loopback, and a 1,000,000-unit campaign in less than 200 MB.

Three processes' worth of roles, so that no client shares the server's event loop:

- **the server process** opens a campaign of ``--units`` units (ds1, its five machines) with the real
  :class:`~mlds_operator.leases.service.CampaignService` over a :class:`~mlds_operator.storage.store.LocalStore` in a
  temporary folder, serves the real lease API (:func:`mlds_operator.leases.http.create_app`) with a
  ``web.AppRunner`` on 127.0.0.1, and reports its resident memory (RSS) before and after opening the
  campaign. In the same process, before any client connects, it measures two baselines for each K: the
  pure lease book (``LeaseBook.grant`` on a second book of the same size, fake clock) and the service
  without HTTP (``CampaignService.grant`` plus the reply's JSON, as the handler does it);
- **client processes** (``--clients``, each with ``--connections`` concurrent keep-alive connections
  through one aiohttp session) post lease requests of K units as fast as answers come back. After a
  warm-up, only answers completed inside the measured window count;
- **this process** starts them, gathers the figures and prints the table, with each rate's ratio to
  the pure book's.

Every grant leaves a live lease behind (nobody completes), as when many workers are training at once;
the memory figure after the load includes those leases. On a shared machine the clients and the server
compete for cores, so the table also gives the server's CPU use while the clients ran and the leases it
granted per CPU second it used: the server's own cost, which a busy machine does not hide.
``--profile`` runs cProfile in the server's event-loop thread while the clients run, and prints the top
functions per K.
"""

from __future__ import annotations

import asyncio
import cProfile
import gc
import io
import json
import multiprocessing
import os
import pstats
import secrets
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import click

from mlds_operator.bench.clients import Start, run_clients

__all__ = ["ClientResult", "ServerReport", "bench_leases_command", "run_bench"]

NAME = "bench"
POOL = "bench"
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """This process's resident set size now (Linux: /proc; elsewhere the peak, which is all there is)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """The most resident memory this process has used."""
    import resource  # noqa: PLC0415 - POSIX only; imported where needed

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak * 1024 if os.uname().sysname == "Linux" else peak  # kB on Linux, bytes on macOS


@dataclass
class ServerReport:
    """What the server process measured before the clients started."""

    port: int
    token: str
    pid: int
    units: int
    targets: int
    rss_start: int  # after imports, before the campaign
    rss_open: int  # campaign open and the API listening: book + service
    book_rates: dict[int, float]  # K -> leases/s, the pure book
    service_rates: dict[int, float]  # K -> leases/s, CampaignService.grant + JSON, no HTTP


@dataclass
class ClientResult:
    """One client process's count over the measured window."""

    granted: int = 0
    other: dict[str, int] = field(default_factory=dict)  # NoLease replies or HTTP statuses other than 200
    latencies: list[float] = field(default_factory=list)  # seconds per granted request
    sent: int = 0  # requests answered, warm-up included
    cpu_seconds: float = 0.0  # this client process's CPU time while sending (all of it)


# ------------------------------------------------------------------------------------------- server


def _campaign(units: int) -> Any:
    from mlds_contract.campaign import DS1_MACHINES, CampaignSpec, Pool, Workload  # noqa: PLC0415

    per_target, rest = divmod(units, len(DS1_MACHINES))
    machines = list(DS1_MACHINES) if rest == 0 else ["ParityMachine"]
    return CampaignSpec(
        workload=Workload(dataset="ds1", machines=machines),
        networks_per_target=per_target if rest == 0 else units,
        pools=[Pool(name=POOL, units_per_lease=16)],
    )


def _book_rate(units: int, k: int, seconds: float) -> float:
    """Leases per second of the pure book: grants of K on a fresh book, for ``seconds`` or until it is drained."""
    from mlds_operator.leases.book import LeaseBook  # noqa: PLC0415

    book = LeaseBook(units, lease_seconds=600, clock=lambda: 0.0, pools=[POOL])
    n = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while True:
        for _ in range(200):
            if book.grant(f"w{n % 1000}", POOL, k) is None:
                return n / (time.perf_counter() - t0)
            n += 1
        if time.perf_counter() >= deadline:
            return n / (time.perf_counter() - t0)


async def _service_rate(service: Any, k: int, seconds: float, max_units: int) -> float:
    """Leases per second of ``CampaignService.grant`` plus the reply's JSON (the handler's work without HTTP)."""
    from mlds_contract.lease import LeaseGrant, LeaseRequest  # noqa: PLC0415

    requests = [
        LeaseRequest(worker=f"svc-{i}", pool=POOL, accelerator="cpu", device_name="cpu", max_units=k)
        for i in range(100)
    ]
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds and n * k < max_units:
        reply = await service.grant(requests[n % 100])
        if not isinstance(reply, LeaseGrant):
            break
        reply.model_dump_json(by_alias=True)
        n += 1
    return n / (time.perf_counter() - t0)


def _server_main(conn: Connection, units: int, ks: list[int], baseline_seconds: float) -> None:
    """Entry point of the server process (spawned): serve until told to stop."""
    asyncio.run(_serve(conn, units, ks, baseline_seconds))


async def _serve(conn: Connection, units: int, ks: list[int], baseline_seconds: float) -> None:
    from aiohttp import web  # noqa: PLC0415

    from mlds_operator.leases.http import create_app  # noqa: PLC0415
    from mlds_operator.leases.registry import Campaigns  # noqa: PLC0415
    from mlds_operator.leases.service import CampaignService  # noqa: PLC0415
    from mlds_operator.storage.store import LocalStore  # noqa: PLC0415

    gc.collect()
    rss_start = rss_bytes()
    spec = _campaign(units)
    token = secrets.token_urlsafe(32)
    with tempfile.TemporaryDirectory(prefix="mlds-bench-leases-") as tmp:
        store = LocalStore(Path(tmp), durable=False)
        store.ensure_root()
        service = await CampaignService.open(NAME, spec, store, token=token, pools=[POOL])
        campaigns = Campaigns()
        campaigns.add(NAME, NAME, service)
        runner = web.AppRunner(create_app(campaigns, local_store=store), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        port = int(runner.addresses[0][1])
        store.upload_base_url = f"http://127.0.0.1:{port}"
        gc.collect()
        rss_open = rss_bytes()
        book_rates = {k: _book_rate(units, k, baseline_seconds) for k in ks}
        gc.collect()
        service_rates = {k: await _service_rate(service, k, baseline_seconds, units // 20) for k in ks}
        conn.send(
            ServerReport(
                port=port,
                token=token,
                pid=os.getpid(),
                units=service.book.total,
                targets=len(spec.workload.machines or []),
                rss_start=rss_start,
                rss_open=rss_open,
                book_rates=book_rates,
                service_rates=service_rates,
            )
        )
        profiler: cProfile.Profile | None = None
        try:
            while True:
                command = await asyncio.to_thread(conn.recv)
                if command == "profile-start":
                    profiler = cProfile.Profile(time.thread_time)  # CPU, not wall: waits are not cost
                    profiler.enable()
                elif command == "profile-stop" and profiler is not None:
                    profiler.disable()
                    out = io.StringIO()
                    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(40)
                    conn.send(out.getvalue())
                    profiler = None
                elif command == "mark":
                    # CPU seconds of the whole process (every thread) and leases granted so far: the parent takes
                    # differences around a client run, which do not depend on how busy the machine is.
                    conn.send((time.monotonic(), time.process_time(), service.book.stats().leases))
                elif command == "stats":
                    stats = service.book.stats()
                    conn.send({"rss": rss_bytes(), "peak": peak_rss_bytes(), "leases": stats.leases})
                else:  # "stop", or anything unexpected
                    break
        finally:
            await runner.cleanup()


# ------------------------------------------------------------------------------------------- client


async def _client(index: int, start: Start, url: str, token: str, k: int, connections: int) -> ClientResult:
    """One client process (spawned by :func:`~mlds_operator.bench.clients.run_clients`): lease requests, K each."""
    import aiohttp  # noqa: PLC0415

    result = ClientResult()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=connections, limit_per_host=connections)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        begin, end = await start.wait(index)
        cpu0 = time.process_time()

        async def one(i: int) -> None:
            body = json.dumps(
                {
                    "worker": f"bench-{index}-{i}",
                    "pool": POOL,
                    "accelerator": "cpu",
                    "deviceName": "cpu",
                    "maxUnits": k,
                }
            ).encode()
            while (sent := time.monotonic()) < end:
                async with session.post(url, data=body) as resp:
                    data = await resp.read()
                done = time.monotonic()
                result.sent += 1
                if not begin <= done <= end:
                    continue
                if resp.status == 200 and data.startswith(b'{"leaseId"'):
                    result.granted += 1
                    result.latencies.append(done - sent)
                else:
                    key = str(resp.status) if resp.status != 200 else "no lease"
                    result.other[key] = result.other.get(key, 0) + 1

        await asyncio.gather(*(one(i) for i in range(connections)))
        result.cpu_seconds = time.process_time() - cpu0
    return result


# ------------------------------------------------------------------------------------------- driver


@dataclass
class Row:
    """One K's figures."""

    k: int
    book: float
    service: float
    http: float
    p50_ms: float
    p99_ms: float
    client_us: float  # client CPU microseconds per request (all client processes together)
    server_cpu: float  # CPU seconds the server used per wall second while the clients ran (1.0 = one core)
    per_cpu_second: float  # leases the server granted per CPU second it used (robust to a busy machine)
    other: dict[str, int]
    profile: str | None = None


@dataclass
class BenchResult:
    """Everything `mlds bench leases` measured."""

    report: ServerReport
    rows: list[Row]
    rss_after: int
    rss_peak: int
    live_leases: int
    clients: int
    connections: int
    seconds: float


def run_bench(
    *,
    units: int = 1_000_000,
    ks: tuple[int, ...] = (1, 16),
    clients: int = 2,
    connections: int = 32,
    seconds: float = 5.0,
    warmup: float = 1.0,
    baseline_seconds: float = 1.0,
    profile: bool = False,
) -> BenchResult:
    """Start the server process, measure each K with client processes, stop everything; returns the figures."""
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
    parent, child = ctx.Pipe()
    server = ctx.Process(
        target=_server_main, args=(child, units, list(ks), baseline_seconds), name="bench-lease-server"
    )
    server.start()
    try:
        if not parent.poll(300):
            raise click.ClickException("the lease server process did not start within 300 s")
        report: ServerReport = parent.recv()
        url = f"http://127.0.0.1:{report.port}/v1/campaigns/{NAME}/{NAME}/leases"
        rows = []
        marks: list[tuple[float, float, int]] = []

        def mark() -> None:
            parent.send("mark")
            marks.append(parent.recv())

        for k in ks:
            if profile:
                parent.send("profile-start")
            marks.clear()
            results: list[ClientResult] = run_clients(
                ctx,
                _client,
                (url, report.token, k, connections),
                clients=clients,
                warmup=warmup,
                seconds=seconds,
                mark=mark,
                name="bench-client",
            )
            (wall0, cpu0, leases0), (wall1, cpu1, leases1) = marks
            text = None
            if profile:
                parent.send("profile-stop")
                text = parent.recv()
            granted = sum(r.granted for r in results)
            latencies = sorted(x for r in results for x in r.latencies)
            other: dict[str, int] = {}
            for r in results:
                for key, n in r.other.items():
                    other[key] = other.get(key, 0) + n
            p50 = statistics.median(latencies) * 1e3 if latencies else float("nan")
            p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1e3 if latencies else float("nan")
            rows.append(
                Row(
                    k=k,
                    book=report.book_rates[k],
                    service=report.service_rates[k],
                    http=granted / seconds,
                    p50_ms=p50,
                    p99_ms=p99,
                    client_us=1e6 * sum(r.cpu_seconds for r in results) / max(1, sum(r.sent for r in results)),
                    server_cpu=(cpu1 - cpu0) / (wall1 - wall0),
                    per_cpu_second=(leases1 - leases0) / max(cpu1 - cpu0, 1e-9),
                    other=other,
                    profile=text,
                )
            )
        parent.send("stats")
        stats = parent.recv()
        parent.send("stop")
    finally:
        server.join(timeout=30)
        if server.is_alive():
            server.kill()
    return BenchResult(
        report=report,
        rows=rows,
        rss_after=stats["rss"],
        rss_peak=stats["peak"],
        live_leases=stats["leases"],
        clients=clients,
        connections=connections,
        seconds=seconds,
    )


def format_result(res: BenchResult) -> str:
    """The table `mlds bench leases` prints."""
    rep = res.report
    mb = 1e6
    lines = [
        f"campaign: {rep.units:,} units (ds1, {rep.targets or 1} target(s)); LocalStore in a temporary folder",
        f"server: one process (pid {rep.pid}), aiohttp on 127.0.0.1:{rep.port}; host has {os.cpu_count()} CPU(s)",
        f"clients: {res.clients} process(es) x {res.connections} keep-alive connections; "
        f"{res.seconds:g} s measured per K after a warm-up",
        "",
        f"server RSS: {rep.rss_start / mb:,.1f} MB before the campaign, {rep.rss_open / mb:,.1f} MB with it open "
        f"(+{(rep.rss_open - rep.rss_start) / mb:,.1f} MB: book + service + API); "
        f"{res.rss_after / mb:,.1f} MB after the load with {res.live_leases:,} live leases "
        f"(peak {res.rss_peak / mb:,.1f} MB)",
        "",
    ]
    header = (
        f"{'K':>3}  {'book leases/s':>14}  {'service leases/s':>16}  {'HTTP leases/s':>14}  {'HTTP units/s':>13}  "
        f"{'HTTP/book':>9}  {'HTTP/service':>12}  {'p50 ms':>7}  {'p99 ms':>7}  {'server CPU':>10}  "
        f"{'leases/CPU-s':>12}  {'client CPU us/req':>17}"
    )
    lines += [header, "-" * len(header)]
    for row in res.rows:
        lines.append(
            f"{row.k:>3}  {row.book:>14,.0f}  {row.service:>16,.0f}  {row.http:>14,.0f}  {row.http * row.k:>13,.0f}  "
            f"{row.http / row.book:>9.3f}  {row.http / row.service:>12.2f}  {row.p50_ms:>7.1f}  {row.p99_ms:>7.1f}  "
            f"{row.server_cpu:>10.0%}  {row.per_cpu_second:>12,.0f}  {row.client_us:>17,.0f}"
            + (f"  other answers: {row.other}" if row.other else "")
        )
    for row in res.rows:
        if row.profile:
            lines += ["", f"server profile while the clients ran, K={row.k} (event-loop thread, by own time):"]
            lines.append(row.profile)
    return "\n".join(lines)


@click.command("leases")
@click.option("--units", type=click.IntRange(1), default=1_000_000, show_default=True, help="Units in the campaign.")
@click.option("--k", "ks", default="1,16", show_default=True, help="Units per lease to measure, comma-separated.")
@click.option("--clients", type=click.IntRange(1, 64), default=None, help="Client processes [default: CPUs - 1, 1-4].")
@click.option("--connections", type=click.IntRange(1, 1024), default=32, show_default=True, help="Per client.")
@click.option("--seconds", type=click.FloatRange(0.5), default=5.0, show_default=True, help="Measured per K.")
@click.option("--warmup", type=click.FloatRange(0.0), default=1.0, show_default=True, help="Unmeasured, per K.")
@click.option("--profile", is_flag=True, help="cProfile the server while the clients run; print the top functions.")
def bench_leases_command(
    units: int, ks: str, clients: int | None, connections: int, seconds: float, warmup: float, profile: bool
) -> None:
    """Leases per second over loopback HTTP (K=1 and K=16) and the server's memory for a big campaign."""
    try:
        k_values = tuple(int(x) for x in ks.split(",") if x.strip())
    except ValueError as exc:
        raise click.BadParameter(f"expected comma-separated integers, got {ks!r}", param_hint="--k") from exc
    if not k_values or any(not 1 <= k <= 4096 for k in k_values):
        raise click.BadParameter("units per lease must be between 1 and 4096", param_hint="--k")
    n_clients = clients or max(1, min(4, (os.cpu_count() or 2) - 1))
    click.echo(f"mlds bench leases: starting a lease server with {units:,} units ...", err=True)
    result = run_bench(
        units=units,
        ks=k_values,
        clients=n_clients,
        connections=connections,
        seconds=seconds,
        warmup=warmup,
        profile=profile,
    )
    click.echo(format_result(result))
