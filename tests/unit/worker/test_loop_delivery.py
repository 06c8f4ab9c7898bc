"""How the worker delivers a result through network failures and rejections, against a real lease server.

Delivery has two budgets that must not be confused: network failures (the server or the store
unreachable, a 5xx, an upload refused until a heartbeat re-establishes the lease) are retried with
capped backoff for as long as the lease is worth it, and a rejection of the staged copy (a file the
server found missing, of the wrong size or with the wrong sha256: an upload lost or torn on its way)
is answered by one fresh upload per reason. These stories mix the two and check that neither uses up
or stretches the other, and that a result torn every time still ends in a reported failure, not a loop.

As in tests/unit/worker/test_loop.py, the lease API (:func:`tests.run_fixtures.serve_campaign`) and the
worker loop run in the test's event loop over loopback; a middleware in front of the app plays the
outage or tears the stored object after the real upload route wrote it; ``@pytest.mark.looptime`` makes
the backoff take no real time and lets the test read the worker's delays off the clock.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from mlds_contract.lease import PROBLEM_JSON, ErrorReply, UnitState
from mlds_contract.results import MODEL_FILE
from mlds_operator.leases.service import BUNDLE_SUFFIX
from mlds_worker.loop import BACKOFF_FIRST, DELIVERY_PATIENCE_SECONDS, Worker, WorkerConfig

from tests.run_fixtures import Served, free_port, serve_campaign, write_campaign

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: The worker's jitter: each backoff delay is the nominal one times a factor in [0.8, 1.2].
JITTER = (0.8, 1.2)
#: A loss every network reaches after its first epoch: the stories are about delivery, not training.
FIRST_EPOCH_LOSS = 1.0


class Wire:
    """A middleware that plays a scripted story on the worker's uploads and completions.

    ``completions`` lists, for each completion request in turn, whether the network drops it (a 503
    before the server sees it); ``tear`` lists, for each upload of the model file in turn, whether the
    object the store keeps is torn (the upload route wrote it whole; half of it survives). Past the end
    of a list, requests go through untouched. The loop time of every request is recorded.
    """

    def __init__(
        self,
        *,
        completions: list[bool] | None = None,
        tear: list[bool] | None = None,
        refuse_uploads: int = 0,
    ) -> None:
        self.drop_completions = list(completions or [])
        self.tear = list(tear or [])
        self.refuse_uploads = refuse_uploads  # first uploads refused 409 (the lease unknown after a restart)
        self.completed: list[float] = []  # loop time of each completion request
        self.model_uploads = 0
        self.uploads = 0
        self.served: Served | None = None

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        now = asyncio.get_running_loop().time()
        if request.path.endswith("/complete"):
            n = len(self.completed)
            self.completed.append(now)
            if n < len(self.drop_completions) and self.drop_completions[n]:
                return web.Response(status=503, text="connection reset by a proxy")
            return await handler(request)
        if request.method != "PUT":
            return await handler(request)
        self.uploads += 1
        if self.uploads <= self.refuse_uploads:
            body = ErrorReply(type="urn:mlds:lease:not-holder", title="Not the lease holder", status=409)
            return web.Response(status=409, body=body.model_dump_json(by_alias=True), content_type=PROBLEM_JSON)
        response = await handler(request)
        key = request.match_info["key"]
        if key.endswith((f"/{MODEL_FILE}", BUNDLE_SUFFIX)):  # the model alone, or in the unit's one bundle
            n = self.model_uploads
            self.model_uploads += 1
            if n < len(self.tear) and self.tear[n]:
                assert self.served is not None
                path = self.served.store.path(key)
                path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return response


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The worker's log messages without their key=value fields."""
    return [r.getMessage().split(" pool=")[0] for r in caplog.records if r.name == "mlds.worker"]


async def deliver_one(tmp_path: Path, wire: Wire, *, max_attempts: int = 3) -> Served:
    """Serve a one-network campaign behind ``wire`` and run one worker until it exits; returns the server."""
    campaign = write_campaign(
        tmp_path / "c.yaml",
        machines=["SingleInvertMachine"],
        networks_per_target=1,
        target_loss=FIRST_EPOCH_LOSS,
        max_attempts=max_attempts,
    )
    loop = asyncio.get_running_loop()
    async with serve_campaign(
        campaign, tmp_path / "store", port=free_port(), clock=loop.time, middlewares=[wire.middleware]
    ) as served:
        wire.served = served
        token = served.token_file.read_text().strip()
        worker = Worker(WorkerConfig(url=served.url, token=token, pool="cpu", worker_id="w-1", device="cpu"))
        assert await worker.run() == 0
        return served


@pytest.mark.looptime
async def test_a_network_retry_does_not_use_up_the_fresh_upload_a_torn_result_gets(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mlds.worker")
    # The model file is torn in storage; the first completion is lost on the network, the second is
    # rejected (size_mismatch): a fresh upload must follow, and the third completion is accepted.
    wire = Wire(completions=[True], tear=[True])

    served = await deliver_one(tmp_path, wire)

    unit = served.service.book.unit(0)
    assert (unit.state, unit.attempts) == (UnitState.succeeded, 0)  # no failed attempt charged to it
    assert (wire.model_uploads, len(wire.completed)) == (2, 3)
    assert served.service.snapshot().rejected == {"size_mismatch": 1}
    said = messages(caplog)
    assert said.count("delivery failed; retrying") == 1
    assert said.count("result rejected; uploading it afresh") == 1
    assert "result rejected" not in said
    assert said.count("completed (accepted)") == 1


@pytest.mark.looptime
async def test_a_fresh_upload_does_not_stretch_the_backoff_of_the_network_retry_after_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mlds.worker")
    # Rejected as torn first (size_mismatch), uploaded afresh, then the next completion is lost on the
    # network: it is the delivery's first network failure, so the worker waits the first backoff step.
    wire = Wire(completions=[False, True], tear=[True])

    served = await deliver_one(tmp_path, wire)

    assert served.service.book.unit(0).state is UnitState.succeeded
    assert (wire.model_uploads, len(wire.completed)) == (2, 3)
    waited = wire.completed[2] - wire.completed[1]
    assert JITTER[0] * BACKOFF_FIRST <= waited <= JITTER[1] * BACKOFF_FIRST, waited
    assert messages(caplog).count("completed (accepted)") == 1


@pytest.mark.looptime
async def test_a_result_torn_on_every_upload_gets_one_fresh_upload_then_the_attempt_fails(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mlds.worker")
    # A network failure before each rejection, too: retries never buy another fresh upload.
    wire = Wire(completions=[True, False, True, False], tear=[True, True, True])

    served = await deliver_one(tmp_path, wire, max_attempts=1)

    assert served.service.book.unit(0).state is UnitState.failed  # reported, and its only attempt is spent
    assert (wire.model_uploads, len(wire.completed)) == (2, 4)
    assert served.service.snapshot().rejected == {"size_mismatch": 2}
    said = messages(caplog)
    assert said.count("result rejected; uploading it afresh") == 1
    assert said.count("result rejected") == 1
    assert said.count("delivery failed; retrying") == 2


@pytest.mark.looptime
async def test_each_staging_rejection_reason_gets_its_own_fresh_upload(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mlds.worker")
    wire = Wire(tear=[True, False])
    deleted: list[str] = []

    @web.middleware
    async def lose_staging(request: web.Request, handler: Handler) -> web.StreamResponse:
        # After the torn copy was uploaded afresh, the staged model (alone, or in the unit's bundle) vanishes
        # once (a sweep, a lost object): a second reason, `missing`, which deserves its own fresh upload.
        if request.path.endswith("/complete") and wire.model_uploads == 2 and not deleted:
            assert wire.served is not None
            staged = wire.served.store.list("_mlds/staging/")
            (key,) = [k for k in staged if k.endswith((f"/{MODEL_FILE}", BUNDLE_SUFFIX))]
            wire.served.store.delete(key)
            deleted.append(key)
        return await handler(request)

    campaign = write_campaign(
        tmp_path / "c.yaml", machines=["SingleInvertMachine"], networks_per_target=1, target_loss=FIRST_EPOCH_LOSS
    )
    loop = asyncio.get_running_loop()
    async with serve_campaign(
        campaign, tmp_path / "store", port=free_port(), clock=loop.time, middlewares=[wire.middleware, lose_staging]
    ) as served:
        wire.served = served
        token = served.token_file.read_text().strip()
        worker = Worker(WorkerConfig(url=served.url, token=token, pool="cpu", worker_id="w-1", device="cpu"))
        assert await worker.run() == 0

    unit = served.service.book.unit(0)
    assert (unit.state, unit.attempts) == (UnitState.succeeded, 0)
    assert served.service.snapshot().rejected == {"size_mismatch": 1, "missing": 1}
    assert wire.model_uploads == 3
    assert messages(caplog).count("result rejected; uploading it afresh") == 2


@pytest.mark.looptime
async def test_an_upload_refused_until_the_lease_is_re_established_is_retried_not_failed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mlds.worker")
    # The upload route answers 409 while a restarted server does not know the lease yet (its worker's
    # next heartbeat re-establishes it): a wait, like an outage, never a reason to fail the attempt.
    wire = Wire(refuse_uploads=3)

    served = await deliver_one(tmp_path, wire)

    unit = served.service.book.unit(0)
    assert (unit.state, unit.attempts) == (UnitState.succeeded, 0)
    said = messages(caplog)
    assert said.count("delivery failed; retrying") == 3
    assert "result rejected" not in said


@pytest.mark.looptime
async def test_an_upload_refused_for_a_lease_a_heartbeat_says_is_lost_is_given_up_not_retried_for_an_hour(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mlds.worker")
    first: list[str] = []  # the first lease's id: everything about it is refused, as for a lease gone for good

    @web.middleware
    async def lease_gone(request: web.Request, handler: Handler) -> web.StreamResponse:
        lease = request.query.get("scope") if request.method == "PUT" else request.match_info.get("lease")
        if lease and not first:
            first.append(lease)
        if lease and lease == first[0] and (request.method == "PUT" or request.path.endswith("/heartbeat")):
            body = ErrorReply(type="urn:mlds:lease:not-holder", title="Not the lease holder", status=409)
            return web.Response(status=409, body=body.model_dump_json(by_alias=True), content_type=PROBLEM_JSON)
        return await handler(request)

    campaign = write_campaign(
        tmp_path / "c.yaml", machines=["SingleInvertMachine"], networks_per_target=1, target_loss=FIRST_EPOCH_LOSS
    )
    loop = asyncio.get_running_loop()
    async with serve_campaign(
        campaign, tmp_path / "store", port=free_port(), clock=loop.time, middlewares=[lease_gone]
    ) as served:
        token = served.token_file.read_text().strip()
        worker = Worker(WorkerConfig(url=served.url, token=token, pool="cpu", worker_id="w-1", device="cpu"))
        started = loop.time()
        assert await worker.run() == 0
        finished = loop.time()

    # The first lease expired on the server; its unit was leased again and delivered by the same worker.
    assert served.service.book.unit(0).state is UnitState.succeeded
    said = messages(caplog)
    assert said.count("giving up delivering a result: the lease is lost") == 1
    assert "result rejected" not in said
    assert finished - started < DELIVERY_PATIENCE_SECONDS  # gave up on the heartbeat's word, not on patience


@pytest.mark.looptime
async def test_a_continuous_stack_whose_last_results_are_in_flight_exits_when_they_land_not_a_retry_later(
    tmp_path: Path,
) -> None:
    # Both units of a 2-wide stack converge in the same round; their completions take a second to land.
    # Meanwhile the stack, empty, asks for work and hears `busy` (its own units are still leased). It asks
    # again as soon as a result lands instead of waiting out Retry-After (5 s), so the campaign's end does
    # not wait on an idle worker.
    landed: list[float] = []  # loop time of each completion's reply
    asked: list[float] = []  # loop time of each lease request (the last one hears `finished`)

    @web.middleware
    async def slow_completions(request: web.Request, handler: Handler) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        if request.path.endswith("/complete"):
            await asyncio.sleep(1.0)
            response = await handler(request)
            landed.append(loop.time())
            return response
        if request.path.endswith("/leases"):
            asked.append(loop.time())
        return await handler(request)

    campaign = write_campaign(
        tmp_path / "c.yaml",
        machines=["SingleInvertMachine"],
        networks_per_target=2,
        units_per_lease=2,
        target_loss=FIRST_EPOCH_LOSS,
    )
    loop = asyncio.get_running_loop()
    async with serve_campaign(
        campaign, tmp_path / "store", port=free_port(), clock=loop.time, middlewares=[slow_completions]
    ) as served:
        token = served.token_file.read_text().strip()
        cfg = WorkerConfig(url=served.url, token=token, pool="cpu", worker_id="w-1", device="cpu", max_units=2)
        assert await Worker(cfg).run() == 0

    assert [served.service.book.unit(u).state for u in (0, 1)] == [UnitState.succeeded] * 2
    assert len(landed) == 2
    assert asked[-1] - max(landed) < 0.5  # asked again as the results landed; Retry-After is 5 s
