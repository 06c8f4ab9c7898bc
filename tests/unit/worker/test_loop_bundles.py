"""The worker's uploads: one PUT per unit where the server offers bundles, file by file where it predates them.

The lease API ``mlds run`` serves (:func:`tests.run_fixtures.serve_campaign`) and the worker loop
(:class:`mlds_worker.loop.Worker`) talk HTTP over loopback; a middleware in front of the app counts the
uploads and, for the second story, answers like a server that predates bundles: its lease request model
refuses the unknown ``bundleUploads`` key with a 422. Training is real (one ds1 network, one epoch).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web
from mlds_contract.lease import UnitState
from mlds_worker.loop import Worker, WorkerConfig

from tests.run_fixtures import free_port, serve_campaign, write_campaign

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: A loss every network reaches after its first epoch: the stories are about uploads, not training.
FIRST_EPOCH_LOSS = 1.0


def worker(url: str, token_file: Path) -> Worker:
    token = token_file.read_text().strip()
    return Worker(WorkerConfig(url=url, token=token, pool="cpu", worker_id="w-1", device="cpu"))


async def test_a_worker_uploads_each_unit_in_one_put_where_the_server_offers_bundles(tmp_path: Path) -> None:
    puts: list[str] = []

    @web.middleware
    async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "PUT":
            puts.append(request.path)
        return await handler(request)

    campaign = write_campaign(
        tmp_path / "c.yaml", machines=["SingleInvertMachine"], networks_per_target=2, target_loss=FIRST_EPOCH_LOSS
    )
    async with serve_campaign(campaign, tmp_path / "store", port=free_port(), middlewares=[count]) as served:
        assert await worker(served.url, served.token_file).run() == 0

        assert [served.service.book.unit(u).state for u in (0, 1)] == [UnitState.succeeded] * 2
    assert len(puts) == 2
    assert all(path.endswith("~bundle") for path in puts), puts


async def test_a_worker_uploads_file_by_file_to_a_server_that_predates_bundles(tmp_path: Path) -> None:
    puts: list[str] = []
    refused = 0
    asked_without = 0

    @web.middleware
    async def old_server(request: web.Request, handler: Handler) -> web.StreamResponse:
        nonlocal refused, asked_without
        if request.method == "PUT":
            puts.append(request.path)
        elif request.path.endswith("/leases"):
            if "bundleUploads" in json.loads(await request.read()):
                refused += 1
                return web.json_response(
                    {"type": "urn:mlds:lease:malformed", "title": "Malformed request body", "status": 422},
                    status=422,
                    content_type="application/problem+json",
                )
            asked_without += 1
        return await handler(request)

    campaign = write_campaign(
        tmp_path / "c.yaml", machines=["SingleInvertMachine"], networks_per_target=2, target_loss=FIRST_EPOCH_LOSS
    )
    async with serve_campaign(campaign, tmp_path / "store", port=free_port(), middlewares=[old_server]) as served:
        assert await worker(served.url, served.token_file).run() == 0

        assert [served.service.book.unit(u).state for u in (0, 1)] == [UnitState.succeeded] * 2
    assert refused == 1  # asked once, then never again
    assert asked_without >= 2
    assert len(puts) == 6  # three files each
    assert not any(path.endswith("~bundle") for path in puts), puts
