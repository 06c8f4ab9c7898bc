"""Simulated-client processes of the HTTP benchmarks: started together, counted over one measured window.

Used by `mlds bench leases` (:mod:`mlds_operator.bench.leases`) and `mlds bench cycle`
(:mod:`mlds_operator.bench.cycle`). Each client process runs one async function (the benchmark's own
client: what it sends and what it counts); :func:`run_clients` starts them all, lets them connect, starts
them at once, and calls ``mark`` at the start and the end of the measured window (after the warm-up), so
the server's figures (CPU time, results, leases) are taken around exactly the window the clients count in.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

__all__ = ["Start", "run_clients"]

#: Seconds a client process may take to import, connect and say it is ready, or to hand back its result.
_PATIENCE = 300.0
#: Seconds between "go" and the start, so that every process is waiting when it comes.
_LEAD = 0.2


@dataclass(frozen=True)
class Start:
    """What a client process needs to start with the others and to know its measured window."""

    ready: Any  # multiprocessing.Queue: a process's index once it is connected
    go: Any  # multiprocessing.Event: set when the start time is
    t0: Any  # multiprocessing.Value("d"): the start, in time.monotonic() seconds (system-wide on Linux)
    warmup: float  # seconds after the start before the window
    seconds: float  # the window's length

    async def wait(self, index: int) -> tuple[float, float]:
        """Say this process is ready, wait for the start; returns the measured window (monotonic begin, end)."""
        self.ready.put(index)
        await asyncio.to_thread(self.go.wait)
        start = float(self.t0.value)
        await asyncio.sleep(max(0.0, start - time.monotonic()))
        return start + self.warmup, start + self.warmup + self.seconds


Client = Callable[..., Coroutine[Any, Any, Any]]


def _main(client: Client, index: int, start: Start, args: tuple[Any, ...], results: Any) -> None:
    """Entry point of a client process (spawned): run the client, hand back what it counted."""
    results.put((index, asyncio.run(client(index, start, *args))))


def run_clients(
    ctx: Any,
    client: Client,
    args: tuple[Any, ...],
    *,
    clients: int,
    warmup: float,
    seconds: float,
    mark: Callable[[], None],
    name: str,
) -> list[Any]:
    """Run ``clients`` processes of ``client(index, start, *args)`` once; their results, by index.

    ``client`` must be a module-level async function (the processes are spawned) that calls
    :meth:`Start.wait` once it is connected and counts only what finishes inside the window it returns.
    ``mark`` is called when the window begins and when it ends.
    """
    ready, results = ctx.Queue(), ctx.Queue()
    start = Start(ready=ready, go=ctx.Event(), t0=ctx.Value("d", 0.0), warmup=warmup, seconds=seconds)
    procs = [
        ctx.Process(target=_main, args=(client, i, start, args, results), name=f"{name}-{i}") for i in range(clients)
    ]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            ready.get(timeout=_PATIENCE)
        start.t0.value = time.monotonic() + _LEAD
        start.go.set()
        time.sleep(_LEAD + warmup)
        mark()
        time.sleep(seconds)
        mark()
        out = dict(results.get(timeout=_PATIENCE) for _ in procs)
        return [out[i] for i in range(clients)]
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
