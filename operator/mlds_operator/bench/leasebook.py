"""Memory and throughput of the pure lease book at campaign scale (a script that prints figures, not a test).

    .venv/bin/python -m mlds_operator.bench.leasebook [--units 1000000]

Memory: each scenario runs in a fresh Python process and reports the resident-set growth (RSS, from
/proc/self/statm) from just before the book is built to the end of the scenario, so numpy's lazily
mapped zero pages are counted only once they are really touched. Throughput: grants, completions,
expiry and checkpoints of the pure book, single-threaded, with a fake clock (no HTTP, no storage).
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import subprocess
import sys
import time

import numpy as np

from mlds_operator.leases.book import LeaseBook, LeaseView

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def memory(scenario: str, units: int) -> None:
    """Run one memory scenario in this (fresh) process and print its RSS growth in MB."""
    gc.collect()
    before = rss_bytes()
    clock = Clock()
    book = LeaseBook(units, lease_seconds=600, clock=clock)
    if scenario == "built":
        pass
    elif scenario == "live-1000x16":  # a busy cluster: 1,000 workers each holding 16 units
        for w in range(1000):
            book.grant(f"w{w}", "cpu", 16)
    elif scenario == "all-leased-k16":  # worst case: every unit leased, 16 per lease (62,500 leases)
        w = 0
        while book.grant(f"w{w}", "cpu", 16) is not None:
            w += 1
    elif scenario == "all-done-k16":  # every unit leased then completed, checkpoint written
        w = 0
        while (lease := book.grant(f"w{w % 1000}", "cpu", 16)) is not None:
            for u in lease.units:
                book.complete(u, worker=lease.worker, pool="cpu", attempt=0, converged=True)
            w += 1
        book.to_bytes()
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    gc.collect()
    print(f"{(rss_bytes() - before) / 1e6:.1f}")


Row = tuple[str, float, str]


def bench_grants(units: int, clock: Clock) -> list[Row]:
    """Grant until everything is leased, for several K; then complete and checkpoint the K=16 book."""
    rows: list[Row] = []
    for k in (1, 16, 256):
        book = LeaseBook(units, lease_seconds=600, clock=clock)
        n = 0
        t0 = time.perf_counter()
        while book.grant(f"w{n % 1000}", "cpu", k) is not None:
            n += 1
        dt = time.perf_counter() - t0
        rows.append((f"grant K={k} until {units:,} units are leased", n / dt, f"grants/s ({units / dt:,.0f} units/s)"))
        if k != 16:
            continue
        leases = book.leases()
        t0 = time.perf_counter()
        for view in leases:
            for u in view.units:
                book.complete(u, worker=view.worker, pool="cpu", attempt=0, converged=True)
        dt = time.perf_counter() - t0
        rows.append((f"complete {units:,} units (K=16 leases)", units / dt, "completions/s"))
        t0 = time.perf_counter()
        data = book.to_bytes()
        dt_save = time.perf_counter() - t0
        t0 = time.perf_counter()
        LeaseBook.from_bytes(data, clock=clock)
        dt_load = time.perf_counter() - t0
        rows.append(("checkpoint to_bytes (all done)", dt_save * 1e3, f"ms, {len(data):,} bytes"))
        rows.append(("checkpoint from_bytes (all done)", dt_load * 1e3, "ms"))
    return rows


def bench_steady_state(units: int, clock: Clock, *, costs: bool = False) -> list[Row]:
    """1,000 workers, K=16: each round every worker heartbeats, completes its lease and takes the next.

    ``costs``: the book orders five targets by expected cost (issue 14) and learns from every completion.
    """
    book = LeaseBook(units, lease_seconds=600, clock=clock)
    if costs:
        book.set_costs(-(-units // 5), [70, 76, 119, 175, 1300])
    held = {f"w{w}": book.grant(f"w{w}", "cpu", 16) for w in range(1000)}
    ops = 0
    t0 = time.perf_counter()
    while held:
        for worker, lease in list(held.items()):
            if lease is None:
                del held[worker]
                continue
            book.heartbeat(lease.lease_id, worker, pool="cpu")
            for u in lease.units:
                book.complete(u, worker=worker, pool="cpu", attempt=0, converged=True)
                if costs:
                    book.observe_cost(u, epochs=100 + u % 7, seconds=1.0)
            held[worker] = book.grant(worker, "cpu", 16)
            ops += 1
        clock.t += 1
    dt = time.perf_counter() - t0
    label = "steady state, cost-aware (5 targets)" if costs else "steady state: heartbeat + 16 completes + grant"
    return [(label, ops / dt, f"leases/s ({ops * 16 / dt:,.0f} units/s)")]


def bench_expiry_and_stats(units: int, clock: Clock) -> list[Row]:
    """Every lease expiring at once (an outage), and stats over half a million scattered failures."""
    book = LeaseBook(units, lease_seconds=600, clock=clock)
    while book.grant("w", "cpu", 16) is not None:
        pass
    clock.t += 601
    t0 = time.perf_counter()
    expired = book.expire()
    dt = time.perf_counter() - t0
    rows: list[Row] = [(f"expire {len(expired):,} leases ({units:,} units) at once", dt * 1e3, "ms")]

    book = LeaseBook(units, max_attempts=1, lease_seconds=600, clock=clock)
    lease = book.grant("w", "cpu", 4096)
    while lease is not None:
        for u in lease.units[::2]:
            book.fail(u, worker="w", pool="cpu", attempt=0, retry=False)
        lease = book.grant("w", "cpu", 4096)
    t0 = time.perf_counter()
    stats = book.stats()
    dt = time.perf_counter() - t0
    rows.append((f"stats() with {stats.failed:,} scattered failed units", dt * 1e3, "ms"))
    return rows


def bench_checkpoint_mid_campaign(units: int, clock: Clock, *, repeat: int = 5) -> list[Row]:
    """A checkpoint of a book in mid-campaign: states scattered, 2,000 live leases, a part's worth unpublished.

    What a grant checkpoint costs (``CampaignService.checkpoint_leases``, every ~2 s while grants come):
    the copy runs on the server's event loop, the compression in a thread. Best of ``repeat``.
    """
    book = LeaseBook(units, lease_seconds=600, clock=clock, pools=("cpu",))
    views: list[LeaseView] = []
    while len(views) < units // 25 and (view := book.grant(f"w{len(views) % 2000}", "cpu", 16)) is not None:
        views.append(view)
    unpublished: dict[int, str] = {}
    draws = iter(np.random.default_rng(0).random(len(views) * 16).tolist())  # scattered, as results arrive
    for view in views[:-2000]:  # the last 2,000 leases stay live
        for u, a in zip(view.units, view.attempts, strict=True):
            draw = next(draws)
            if draw < 0.8:
                book.complete(u, worker=view.worker, pool="cpu", attempt=a, converged=True)
                if draw < 0.01 and len(unpublished) < 5000:
                    unpublished[u] = "cpu"  # verified, its row not flushed yet
            elif draw < 0.9:
                book.fail(u, worker=view.worker, pool="cpu", attempt=a, retry=False)  # counted: attempt 1 next
            else:
                book.fail(u, worker=view.worker, pool="cpu", attempt=a, retry=True)
    stats = book.stats(failed_max_chars=0)
    copy_s, encode_s = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        checkpoint = book.checkpoint(unpublished=unpublished)
        t1 = time.perf_counter()
        data = checkpoint.to_bytes()
        copy_s.append(t1 - t0)
        encode_s.append(time.perf_counter() - t1)
    shape = f"{stats.succeeded:,} done, {stats.leased:,} leased, {len(unpublished):,} unpublished"
    return [
        (f"checkpoint copy, mid-campaign ({shape})", min(copy_s) * 1e3, "ms (on the event loop)"),
        ("checkpoint compression, mid-campaign", min(encode_s) * 1e3, f"ms (in a thread), {len(data):,} bytes"),
    ]


def throughput(units: int) -> None:
    clock = Clock()
    benches = (
        bench_grants,
        bench_steady_state,
        functools.partial(bench_steady_state, costs=True),
        bench_expiry_and_stats,
        bench_checkpoint_mid_campaign,
    )
    for bench in benches:
        for name, value, unit in bench(units, clock):
            print(f"  {name:<58} {value:>12,.1f} {unit}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--units", type=int, default=1_000_000, help="campaign size (default 1,000,000)")
    parser.add_argument("--memory-scenario", help=argparse.SUPPRESS)  # internal: run one scenario in a child
    args = parser.parse_args()
    if args.memory_scenario:
        memory(args.memory_scenario, args.units)
        return
    print(f"lease book, {args.units:,} units, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    print("memory (RSS growth in a fresh process):")
    for scenario in ("built", "live-1000x16", "all-leased-k16", "all-done-k16"):
        out = subprocess.run(  # noqa: S603 - this same script, fixed arguments
            [sys.executable, __file__, "--units", str(args.units), "--memory-scenario", scenario],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        print(f"  {scenario:<58} {float(out):>12,.1f} MB")
    print("throughput (pure book, one thread):")
    throughput(args.units)


if __name__ == "__main__":
    main()
