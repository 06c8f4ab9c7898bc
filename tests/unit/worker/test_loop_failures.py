"""What the worker loop reports when a unit cannot be trained, against a real lease server on loopback.

Replaces the contract test of ``UnitError.retry`` (removed: nothing raised ``retry=True``, and a unit
given back through no fault of its own is released with its lease, not raised): a UnitError fails the
attempt, counted towards maxAttempts.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from mlds_contract.errors import ExitCode, UnitError
from mlds_contract.lease import UnitState
from mlds_worker import loop
from mlds_worker.loop import Worker, WorkerConfig

from tests.api_fixtures import POOL, TOKEN, open_api


async def test_a_unit_error_fails_the_attempt_and_counts_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    event_loop = asyncio.get_running_loop()

    def cannot_train(*args: Any, **kwargs: Any) -> Any:  # runs in the worker's training thread
        calls.append(1)
        if len(calls) > 1:  # the unit came back (released, not failed): stop the worker, the asserts say why
            event_loop.call_soon_threadsafe(worker.stop.set)
        raise UnitError("data of shape (3, 9) does not fit a network of 4 inputs")

    monkeypatch.setattr(loop, "train_unit", cannot_train)
    async with open_api(tmp_path, networks=1, max_attempts=1) as api:
        url = str(api.client.make_url(api.base))
        worker = Worker(WorkerConfig(url=url, token=TOKEN, pool=POOL, worker_id="w-1", device="cpu"))

        code = await worker.run()  # the only unit fails for good: the campaign is finished, the worker exits

        assert code is ExitCode.ok
        assert len(calls) == 1
        assert api.service.book.unit(0).state is UnitState.failed
        stats = api.service.snapshot().stats
        assert (stats.failed, stats.succeeded, stats.failed_units) == (1, 0, "0")
