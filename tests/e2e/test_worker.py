"""`mlds worker` as a real process against a real lease server: signals, a wrong token, outages, orphaning.

The lease API runs in the test's own event loop (:func:`tests.run_fixtures.serve_campaign`, the same
service and app ``mlds run`` serves), so a test can start it after the worker, stop it under the
worker's feet, and look into the lease book to check what the worker's actions did to each unit.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlds_contract.lease import UnitState
from mlds_worker.results import result_files
from mlds_worker.train import train_unit

from tests.run_fixtures import (
    Proc,
    activity,
    free_port,
    processes_mentioning,
    reap,
    serve_campaign,
    start_mlds,
    units_with,
    worker_events,
    write_campaign,
)
from tests.waiting import wait_until_async

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

#: A loss no network reaches within a test: the worker is certainly mid-training when signalled.
UNREACHABLE_LOSS = 1e-9


def worker_args(url: str, token_file: Path, *extra: object) -> list[object]:
    return ["worker", "--url", url, "--token-file", token_file, "--pool", "cpu", "--device", "cpu", *extra]


def start_worker(tmp_path: Path, url: str, token_file: Path, *extra: object, tag: str = "worker") -> Proc:
    return start_mlds(worker_args(url, token_file, *extra), cwd=tmp_path, tag=tag)


def said(proc: Proc, message: str) -> bool:
    """Has the worker logged this message (its log goes to stderr)?"""
    return any(e.message == message for e in worker_events([proc.stderr_path]))


async def exit_status(proc: Proc) -> int:
    """Its exit status; the event loop (serving the lease API) runs on meanwhile."""
    return await asyncio.to_thread(proc.wait)


@pytest.fixture
def no_leftovers(tmp_path: Path) -> Iterator[None]:
    yield
    assert reap(str(tmp_path)) == [], "a worker process outlived its test"


@pytest.mark.usefixtures("no_leftovers")
async def test_sigterm_mid_training_releases_the_lease_uncounted_and_exits_0(tmp_path: Path) -> None:
    campaign = write_campaign(tmp_path / "c.yaml", machines=["SingleDirectMachine"], target_loss=UNREACHABLE_LOSS)
    async with serve_campaign(campaign, tmp_path / "store", port=free_port()) as served:
        worker = start_worker(tmp_path, served.url, served.token_file)
        await wait_until_async(lambda: said(worker, "leased"), what="a lease", progress=lambda: activity(tmp_path))
        assert served.service.book.unit(0).state is UnitState.leased
        await asyncio.sleep(2.0)  # a few epochs into training

        worker.send(signal.SIGTERM)
        code = await exit_status(worker)

        assert code == 0, worker.describe()
        assert said(worker, "released")
        unit = served.service.book.unit(0)
        assert (unit.state, unit.attempts, unit.leases) == (UnitState.pending, 0, ())  # back, not charged
        stats = served.service.snapshot().stats
        assert (stats.pending, stats.leased, stats.succeeded, stats.failed) == (3, 0, 0, 0)
        assert list(served.store.list("SingleDirectMachine/")) == []
        assert list(served.store.list("_mlds/staging/")) == []


@pytest.mark.usefixtures("no_leftovers")
async def test_a_worker_with_a_wrong_token_exits_non_zero_saying_so(tmp_path: Path) -> None:
    campaign = write_campaign(tmp_path / "c.yaml")
    async with serve_campaign(campaign, tmp_path / "store", port=free_port()) as served:
        wrong = tmp_path / "wrong-token"
        wrong.write_text("not-the-campaign-token\n")
        worker = start_worker(tmp_path, served.url, wrong)

        code = await exit_status(worker)

        assert code == 3, worker.describe()
        (refusal,) = [e for e in worker_events([worker.stderr_path]) if e.level == "ERROR"]
        assert refusal.message == "lease refused; check the token and campaign"
        assert "401" in worker.stderr or "unauthorized" in worker.stderr
        assert "Traceback" not in worker.stderr
        assert served.service.snapshot().stats.leased == 0


@pytest.mark.usefixtures("no_leftovers")
async def test_a_worker_started_before_its_server_keeps_retrying_then_completes(tmp_path: Path) -> None:
    campaign = write_campaign(tmp_path / "c.yaml", machines=["SingleInvertMachine"], networks_per_target=2)
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/campaigns/local/e2e"
    token_file = tmp_path / "e2e.token"  # where serve_campaign will write the same token
    token_file.write_text("e2e-token\n")
    worker = start_worker(tmp_path, url, token_file)

    def retries() -> int:
        return sum(e.message == "lease server unreachable; retrying" for e in worker_events([worker.stderr_path]))

    await wait_until_async(
        lambda: retries() >= 3, what="the worker retrying a dead server", progress=lambda: activity(tmp_path)
    )
    assert worker.alive()

    async with serve_campaign(campaign, tmp_path / "store", port=port) as served:
        code = await exit_status(worker)
        assert code == 0, worker.describe()
        assert said(worker, "campaign finished; exiting")
        assert sorted(units_with(worker_events([worker.stderr_path]), "completed (accepted)")) == [0, 1]
        await wait_until_async(lambda: served.service.finalized, what="the campaign to be finalized")
        assert served.service.snapshot().stats.succeeded == 2


@pytest.mark.usefixtures("no_leftovers")
async def test_sigterm_while_the_server_is_down_does_not_wait_for_it(tmp_path: Path) -> None:
    campaign = write_campaign(tmp_path / "c.yaml", machines=["SingleInvertMachine"])
    port = free_port()
    async with serve_campaign(campaign, tmp_path / "store", port=port) as served:
        worker = start_worker(tmp_path, served.url, served.token_file)
        await wait_until_async(lambda: said(worker, "leased"), what="a lease", progress=lambda: activity(tmp_path))
    # The server is gone while the worker trains; its result cannot be delivered.
    await wait_until_async(lambda: said(worker, "delivery failed; retrying"), what="a failed delivery")

    def failed_deliveries() -> int:
        return sum(e.message == "delivery failed; retrying" for e in worker_events([worker.stderr_path]))

    before = failed_deliveries()
    worker.send(signal.SIGTERM)
    # Before the fix it kept retrying for up to an hour: the verdict is what it does, not how long it takes.
    await wait_until_async(
        lambda: not worker.alive() or failed_deliveries() > before + 1,
        what="the worker to exit or retry again",
        progress=lambda: activity(tmp_path),
    )
    assert failed_deliveries() <= before + 1, "the worker went on retrying after SIGTERM"
    code = await exit_status(worker)

    assert code == 0, worker.describe()
    assert said(worker, "shutting down with a result undelivered")


ORPHANING_PARENT = """\
import os, subprocess, sys, time
subprocess.Popen([*sys.argv[1:], "--parent-pid", str(os.getpid())], start_new_session=True)
time.sleep(3600)
"""


@pytest.mark.usefixtures("no_leftovers")
async def test_an_orphaned_worker_delivers_the_lease_in_hand_then_exits(tmp_path: Path) -> None:
    campaign = write_campaign(tmp_path / "c.yaml", machines=["SingleDirectMachine"], networks_per_target=10)
    log = tmp_path / "worker.log"
    async with serve_campaign(campaign, tmp_path / "store", port=free_port()) as served:
        # A parent that starts the worker in a session of its own, as `mlds run` does; then it dies.
        worker_argv = [sys.executable, "-m", "mlds_cli", *map(str, worker_args(served.url, served.token_file))]
        with log.open("wb") as stderr:
            parent = subprocess.Popen(  # the worker inherits this stderr
                [sys.executable, "-c", ORPHANING_PARENT, *worker_argv], cwd=tmp_path, stderr=stderr
            )

        def completed() -> list[int]:
            return units_with(worker_events([log]), "completed (accepted)")

        await wait_until_async(
            lambda: len(completed()) >= 1, what="a first completion", progress=lambda: activity(tmp_path)
        )
        parent.kill()
        parent.wait()
        await wait_until_async(
            lambda: processes_mentioning(str(tmp_path)) == [],
            what="the orphaned worker to exit",
            progress=lambda: activity(tmp_path),
        )

        events = worker_events([log])
        assert events[-1].message == "the process that started this worker is gone; exiting"
        assert sum(e.message == "leased" for e in events) == len(completed())  # every lease in hand delivered
        stats = served.service.snapshot().stats
        assert stats.leased == 0
        assert 0 < stats.succeeded < 10  # it stopped taking work: the rest is for the restarted run


# ------------------------------------------------------------------------- leases of K units (issue 7)


@pytest.mark.usefixtures("no_leftovers")
@pytest.mark.parametrize("mode", ["continuous", "fixed"])
async def test_a_lease_of_several_units_is_trained_as_one_stack_with_the_same_weights_as_alone(
    tmp_path: Path, mode: str
) -> None:
    campaign = write_campaign(tmp_path / "c.yaml", networks_per_target=2, units_per_lease=4)
    async with serve_campaign(campaign, tmp_path / "store", port=free_port()) as served:
        flags = ["--fixed-stacks"] if mode == "fixed" else []
        worker = start_worker(tmp_path, served.url, served.token_file, "--units-per-lease", 4, *flags)

        code = await exit_status(worker)

        assert code == 0, worker.describe()
        events = worker_events([worker.stderr_path])
        started = "training a stack" if mode == "fixed" else "training a continuous stack"
        assert [e.message for e in events].count(started) == 1  # one stacked model
        assert sorted(units_with(events, "completed (accepted)")) == [0, 1, 2, 3]
        await wait_until_async(lambda: served.service.finalized, what="the campaign to be finalized")
        stats = served.service.snapshot().stats
        assert (stats.succeeded, stats.failed) == (4, 0)
        # The stack changes the speed, not the networks: unit 1 trained alone gives the very same bytes.
        folder = served.service.unit_spec(1, 0).key
        meta = json.loads(served.store.get_bytes(f"{folder}/meta.json") or b"{}")
        alone = result_files(train_unit(served.service.unit_spec(1, meta["attempt"]), device="cpu"))
        assert served.store.get_bytes(f"{folder}/model.safetensors") == alone["model.safetensors"]


@pytest.mark.usefixtures("no_leftovers")
async def test_sigterm_mid_stack_releases_every_unit_of_the_lease_uncounted(tmp_path: Path) -> None:
    campaign = write_campaign(
        tmp_path / "c.yaml", networks_per_target=2, units_per_lease=4, target_loss=UNREACHABLE_LOSS
    )
    async with serve_campaign(campaign, tmp_path / "store", port=free_port()) as served:
        worker = start_worker(tmp_path, served.url, served.token_file, "--units-per-lease", 4)
        await wait_until_async(lambda: said(worker, "leased"), what="a stack", progress=lambda: activity(tmp_path))
        await asyncio.sleep(2.0)  # a few epochs into training

        worker.send(signal.SIGTERM)
        code = await exit_status(worker)

        assert code == 0, worker.describe()
        assert said(worker, "released")
        units = [served.service.book.unit(u) for u in range(4)]
        assert [(u.state, u.attempts) for u in units] == [(UnitState.pending, 0)] * 4
