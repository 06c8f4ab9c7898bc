"""ds4 on MNIST in the worker loop: the IDX files come from the lease server, which reads them from the store.

Workers hold no storage credentials, and MNIST is the one workload whose data no generator can make: its
owner places the IDX files under the campaign's storage prefix (docs/workloads.md §7). Before the
``input`` route, every MNIST unit failed in the worker with "no folder was given" and the campaign ended
with all its units failed. Here a real lease server (:func:`tests.run_fixtures.serve_campaign`, a local
folder store) serves a ds4 campaign whose store holds small synthetic MNIST files
(:func:`tests.run_fixtures.write_mnist_like`), and a real worker loop trains it, in each of its three
ways of training a lease. Training is real (28x28 CNNs on a few hundred images, a few epochs each).
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.typedefs import Middleware
from mlds_contract.lease import UnitState
from mlds_worker.loop import Worker, WorkerConfig

from tests.run_fixtures import Served, free_port, serve_campaign, write_campaign, write_mnist_like

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MNIST_CLEAN = {"dataset": "ds4", "variants": ["clean"], "images": "mnist"}


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The worker's log messages without their key=value fields."""
    return [r.getMessage().split(" pool=")[0] for r in caplog.records if r.name == "mlds.worker"]


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mlds.worker" and r.levelno >= logging.ERROR]


async def run_worker_on(
    tmp_path: Path,
    *,
    networks: int,
    max_units: int = 1,
    fixed_stacks: bool = False,
    max_attempts: int = 3,
    mnist: bool = True,
    middlewares: list[Middleware] | None = None,
) -> Served:
    """Serve a ds4 MNIST campaign and run one worker to the end.

    The files are in the store when the campaign opens (it refuses to open without them); with ``mnist``
    False they are deleted once it is open, before the worker fetches them (a mistaken delete, a sweep).
    """
    store = tmp_path / "store"
    write_mnist_like(store)
    campaign = write_campaign(
        tmp_path / "c.yaml",
        workload=MNIST_CLEAN,
        networks_per_target=networks,
        units_per_lease=max_units,
        max_attempts=max_attempts,
    )
    loop = asyncio.get_running_loop()
    async with serve_campaign(
        campaign, store, port=free_port(), clock=loop.time, middlewares=middlewares or []
    ) as served:
        if not mnist:
            for file in [*store.glob("t*-idx?-ubyte"), *store.glob("t*-idx?-ubyte.gz")]:
                file.unlink()
        token = served.token_file.read_text().strip()
        cfg = WorkerConfig(
            url=served.url,
            token=token,
            pool="cpu",
            worker_id="w-1",
            device="cpu",
            max_units=max_units,
            fixed_stacks=fixed_stacks,
        )
        assert await Worker(cfg).run() == 0
        return served


@pytest.mark.parametrize(
    ("max_units", "fixed_stacks"),
    [(1, False), (2, False), (2, True)],
    ids=["one network at a time", "continuous stack", "fixed stack"],
)
async def test_a_worker_trains_ds4_on_mnist_files_it_fetches_once_from_the_lease_server(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    max_units: int,
    fixed_stacks: bool,
) -> None:
    caplog.set_level(logging.INFO, logger="mlds.worker")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the worker keeps the fetched files

    served = await run_worker_on(tmp_path, networks=2, max_units=max_units, fixed_stacks=fixed_stacks)

    assert [served.service.book.unit(u).state for u in (0, 1)] == [UnitState.succeeded] * 2, errors(caplog)
    assert messages(caplog).count("fetched an input file") == 4  # the four IDX files, once for both units
    assert list(scratch.glob("mlds-inputs-*")) == []  # the worker's copy is gone with the worker
    assert sorted(served.store.list("mnist-clean/")) == [
        f"mnist-clean/{replica:05d}/{name}"
        for replica in (0, 1)
        for name in ("history.csv", "meta.json", "model.safetensors")
    ]


async def test_mnist_files_deleted_from_the_store_mid_campaign_fail_the_unit_saying_where_they_were_looked_for(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mlds.worker")

    served = await run_worker_on(tmp_path, networks=1, max_attempts=1, mnist=False)

    assert served.service.book.unit(0).state is UnitState.failed
    (failure,) = [m for m in errors(caplog) if m.startswith("training failed")]
    assert "train-images-idx3-ubyte is not under the campaign's storage prefix" in failure
    assert "train-images.idx3-ubyte.gz" in failure  # every name it may have was looked for


@pytest.mark.looptime
async def test_an_input_route_that_is_down_is_waited_for_without_failing_the_unit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mlds.worker")
    refused: list[str] = []

    @web.middleware
    async def store_down(request: web.Request, handler: Handler) -> web.StreamResponse:
        if "/inputs/" in request.path and len(refused) < 3:
            refused.append(request.path)
            return web.Response(status=503, text="store unavailable")
        return await handler(request)

    served = await run_worker_on(tmp_path, networks=1, middlewares=[store_down])

    unit = served.service.book.unit(0)
    assert (unit.state, unit.attempts) == (UnitState.succeeded, 0), errors(caplog)
    assert messages(caplog).count("input file unavailable; retrying") == 3
