"""A continuous stack stops a losing speculative copy at its next request, not its next heartbeat (issue 14).

Against a real lease server on loopback: another worker holds unit 0; the stack worker trains unit 1 and,
with a slot free and nothing pending, a speculative copy of unit 0. The other worker completes unit 0.
Heartbeats are pushed out of reach (a 600 s lease heartbeats every 200 s, and the tail period is raised to
an hour), so the only way the stack can hear of it is the reply to its next top-up request. Training is
real, at the spec's loss target (no network converges in a few epochs), and waits once, at the start, for
the other worker's completion; the worker is then stopped as SIGTERM would (unit 1 goes back uncounted).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mlds_contract.errors import ExitCode
from mlds_contract.lease import UnitState
from mlds_operator.leases.service import ServiceSettings
from mlds_worker import loop
from mlds_worker.loop import Worker, WorkerConfig
from mlds_worker.stack import ContinuousStack

from tests.api_fixtures import POOL, TOKEN, open_api

#: Guards against a hang only; the test waits on progress, never on this.
HANG_GUARD_SECONDS = 300.0


async def progress(check: Callable[[], bool], worker: asyncio.Task[ExitCode]) -> None:
    async def poll() -> None:
        while not check():
            assert not worker.done(), worker.result()
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), HANG_GUARD_SECONDS)


async def test_a_losing_copy_in_a_continuous_stack_stops_at_the_next_reply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    gate = threading.Event()

    class GatedStack(ContinuousStack[Any]):
        """The real stack; its training waits for the test once, until unit 0 was completed elsewhere."""

        def round(self, should_stop: Any = None) -> Any:
            gate.wait(HANG_GUARD_SECONDS)
            return super().round(should_stop)

    monkeypatch.setattr(loop, "ContinuousStack", GatedStack)
    monkeypatch.setattr(loop, "TAIL_HEARTBEAT_SECONDS", 3600.0)
    caplog.set_level(logging.INFO, logger="mlds.worker")
    # No wait between top-ups: the stack asks again every round while a slot is free.
    async with open_api(tmp_path, networks=2, settings=ServiceSettings(idle_retry_seconds=0.0)) as api:
        other = await api.grant("w-other")
        assert other.units[0].spec.unit == 0
        url = str(api.client.make_url(api.base))
        cfg = WorkerConfig(url=url, token=TOKEN, pool=POOL, worker_id="w-stack", device="cpu", max_units=3)
        worker = Worker(cfg)
        running = asyncio.create_task(worker.run())

        # The stack holds unit 1 and a speculative copy of unit 0.
        await progress(lambda: len(api.service.book.unit(0).leases) == 2, running)
        status, reply = await api.deliver(other.units[0], worker="w-other")
        assert (status, reply["status"]) == (200, "accepted")
        gate.set()
        # At the spec's 1e-4 no network converges in a few epochs: the copy can only stop by being told.
        await progress(lambda: any(said(r, "unit cancelled (completed elsewhere)") for r in caplog.records), running)
        worker.stop.set()  # SIGTERM: unit 1 goes back uncounted
        code = await asyncio.wait_for(running, HANG_GUARD_SECONDS)

        assert code is ExitCode.ok
        assert api.service.book.unit(1).state is UnitState.pending
    lines = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("completed elsewhere; stopping") and "units=[0]" in m for m in lines), lines
    cancelled = [m for m in lines if said_of(m, "unit cancelled (completed elsewhere)")]
    assert len(cancelled) == 1, lines
    assert " unit=0 " in cancelled[0], lines
    assert not [m for m in lines if m.startswith(("trained ", "completed ("))], lines  # the copy never finished


def said_of(line: str, message: str) -> bool:
    return line.startswith(message + " ")


def said(record: logging.LogRecord, message: str) -> bool:
    return said_of(record.getMessage(), message)
