"""The worker loop's timers in fake time: backoff against an unreachable server, heartbeats through an outage.

The lease API (the service and app ``mlds run`` serves, :func:`tests.run_fixtures.serve_campaign`) and the
worker loop (:class:`mlds_worker.loop.Worker`) run in the test's event loop and talk HTTP over loopback;
a middleware in front of the app plays the outage. ``@pytest.mark.looptime`` makes that loop's clock
fake: whenever nothing is left to run but timers, it jumps to the next one, so the minutes of backoff
and heartbeats these stories need take no real time, and the delays the worker chose can be read off
the clock exactly. The lease book reads the same clock, so a lease really expires if the worker stops
heartbeating. Training is real (a ds1 network in a thread); while a thread works, looptime lets the
clock follow real time.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from mlds_contract.lease import UnitState
from mlds_worker.loop import BACKOFF_CAP, BACKOFF_FIRST, Worker, WorkerConfig

from tests.run_fixtures import SHORT_LEASE_SECONDS, free_port, serve_campaign, write_campaign

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: The worker's jitter: each backoff delay is the nominal one times a factor in [0.8, 1.2].
JITTER = (0.8, 1.2)
#: A loss every network reaches after its first epoch: the stories are about timers, not training.
FIRST_EPOCH_LOSS = 1.0


def worker(url: str, token_file: Path) -> Worker:
    token = token_file.read_text().strip()
    return Worker(WorkerConfig(url=url, token=token, pool="cpu", worker_id="w-1", device="cpu"))


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The worker's log messages without their key=value fields."""
    return [r.getMessage().split(" pool=")[0] for r in caplog.records if r.name == "mlds.worker"]


@pytest.mark.looptime
async def test_an_unreachable_server_is_retried_with_capped_exponential_backoff_and_its_retry_after(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mlds.worker")
    loop = asyncio.get_running_loop()
    asked: list[float] = []  # loop time of each lease request
    outage = 8  # the first requests are answered 503, the last of them with a Retry-After

    @web.middleware
    async def unavailable(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.endswith("/leases"):
            asked.append(loop.time())
            if len(asked) < outage:
                return web.Response(status=503, text="restarting")
            if len(asked) == outage:
                return web.Response(status=503, text="restarting", headers={"Retry-After": "42"})
        return await handler(request)

    campaign = write_campaign(
        tmp_path / "c.yaml", machines=["SingleInvertMachine"], networks_per_target=1, target_loss=FIRST_EPOCH_LOSS
    )
    async with serve_campaign(
        campaign, tmp_path / "store", port=free_port(), clock=loop.time, middlewares=[unavailable]
    ) as served:
        code = await worker(served.url, served.token_file).run()

        assert code == 0
        assert served.service.book.unit(0).state is UnitState.succeeded
    gaps = [b - a for a, b in itertools.pairwise(asked)][:outage]
    nominal = [min(BACKOFF_CAP, BACKOFF_FIRST * 2**n) for n in range(outage - 1)] + [42.0]
    assert nominal == [0.5, 1, 2, 4, 8, 15, 15, 42]  # doubling from half a second, capped, then the server's word
    for gap, want in zip(gaps, nominal, strict=True):
        assert JITTER[0] * want <= gap <= JITTER[1] * want, (gaps, nominal)
    assert messages(caplog).count("lease server unreachable; retrying") == outage
    assert "completed (accepted)" in messages(caplog)


@pytest.mark.looptime
async def test_heartbeats_keep_a_lease_through_a_store_outage_many_leases_long(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mlds.worker")
    loop = asyncio.get_running_loop()
    outage_seconds = 6 * SHORT_LEASE_SECONDS  # the lease would have expired six times over without heartbeats
    beats: list[float] = []
    uploads_refused = 0
    outage_began: float | None = None

    @web.middleware
    async def store_down(request: web.Request, handler: Handler) -> web.StreamResponse:
        nonlocal outage_began, uploads_refused
        if request.path.endswith("/heartbeat"):
            beats.append(loop.time())
        if request.method == "PUT":  # a result upload to the local store's presigned URL
            outage_began = loop.time() if outage_began is None else outage_began
            if loop.time() - outage_began < outage_seconds:
                uploads_refused += 1
                return web.Response(status=503, text="store unavailable")
        return await handler(request)

    campaign = write_campaign(
        tmp_path / "c.yaml", machines=["SingleInvertMachine"], networks_per_target=1, target_loss=FIRST_EPOCH_LOSS
    )
    async with serve_campaign(
        campaign, tmp_path / "store", port=free_port(), clock=loop.time, middlewares=[store_down]
    ) as served:
        code = await worker(served.url, served.token_file).run()

        assert code == 0
        unit = served.service.book.unit(0)
        assert (unit.state, unit.attempts) == (UnitState.succeeded, 0)  # no expiry was charged to it
    assert outage_began is not None
    assert uploads_refused >= 5  # the worker kept retrying the upload, backing off
    assert messages(caplog).count("delivery failed; retrying") == uploads_refused
    during = [t for t in beats if outage_began <= t <= outage_began + outage_seconds]
    gaps = [b - a for a, b in itertools.pairwise(during)]
    assert len(during) >= outage_seconds / SHORT_LEASE_SECONDS * 3 - 2  # every third of a lease
    assert max(gaps) <= SHORT_LEASE_SECONDS / 3, gaps  # never close to letting the lease lapse
    assert "completed (accepted)" in messages(caplog)
