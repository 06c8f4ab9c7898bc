"""Chaos on `mlds run` with an S3 bucket: a worker and then the server itself are SIGKILLed mid-lease.

The promise under test (DESIGN.md §2): a unit is done only when its result is verified in the bucket,
a second completion is never double-counted, and a restart loses nothing while the leases of live
workers are honoured. The campaign (20 ds1 networks, results in a moto S3 server through presigned
URLs) is run by a real ``mlds run`` with two real worker processes, each a continuous stack of two slots
(``unitsPerLease: 2``) that takes a top-up lease whenever a member finishes:

1. SIGKILL one worker while it holds a lease. The supervisor starts a new one; the dead worker's lease
   expires (10 s) and its units are trained again as a new attempt.
2. SIGKILL ``mlds run`` while a worker holds a lease it was just granted, once the server has
   checkpointed the book after that grant (it does within ``grant_checkpoint_seconds``, ~2 s: a restart
   honours the leases its checkpoint knows, so that is what the promise covers). Its workers live on
   (they run in their own sessions), retrying against a dead server.
3. Start ``mlds run`` again with the same file, port and state. The surviving workers re-attach (their
   heartbeats re-establish their leases) and deliver; the run completes.

Then every network is in the manifest exactly once, its bytes in the bucket are what the manifest and
its meta.json say, no staging object is left except by the killed worker, and no process is left over.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
from collections import Counter
from pathlib import Path

import pytest
from mlds_operator.storage import manifest as mf

from tests.run_fixtures import (
    Event,
    Proc,
    activity,
    cmdline,
    free_port,
    live_children,
    log_sizes,
    open_lease,
    reap,
    start_mlds,
    worker_events,
    write_campaign,
)
from tests.s3_fixtures import S3Server
from tests.waiting import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
pytest_plugins = ["tests.s3_fixtures"]

NAME = "chaos"
PREFIX = "chaos"
TOTAL = 20


def worker_id(pid: int) -> str:
    argv = cmdline(pid)
    return argv[argv.index("--worker-id") + 1] if "--worker-id" in argv else ""


def slot(worker: str) -> int:
    """The supervisor's worker index in a worker id ``<host>-<run>-<index>-<generation>``."""
    return int(worker.rsplit("-", 2)[1])


def events_of(logs: Path, index: int, skip: dict[Path, int] | None = None) -> list[Event]:
    path = logs / f"worker-{index}.log"
    return worker_events([path], skip_bytes=skip) if path.exists() else []


def topped_up(events: list[Event]) -> bool:
    """Was a worker granted a lease while another of its leases still had a unit in training (a top-up)?

    A continuous stack asks for a unit as soon as a member finishes, while the others train on; a fixed
    stack (or one network at a time) asks only when its whole lease is delivered.
    """
    training: dict[str, int] = {}  # lease -> its units not yet trained or given up, in this process
    for e in events:
        if e.message == "training a continuous stack":  # a new process in this slot: nothing in training
            training.clear()
        elif e.message == "leased":
            if any(training.values()):
                return True
            training[e["lease"]] = int(e["units"])
        elif e.get("lease") in training and (
            e.message in ("trained", "training failed") or e.message.startswith("unit cancelled")
        ):
            training[e["lease"]] -= 1
    return False


def workers_of(run: Proc) -> dict[int, str]:
    """pid -> worker id of the run's live worker processes."""
    return {pid: wid for pid in live_children(run.pid) if (wid := worker_id(pid))}


def test_killing_a_worker_and_the_server_mid_lease_loses_and_double_counts_nothing(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str
) -> None:
    campaign = write_campaign(
        tmp_path / "campaign.yaml",
        name=NAME,
        networks_per_target=TOTAL // 2,
        units_per_lease=2,
        # Seconds per network, not a fraction of one: a surviving worker must still be training when the
        # server comes back, so that its heartbeat (not only its completion) meets the restarted server.
        target_loss=0.01,
        storage=s3_server.storage(s3_bucket, prefix=PREFIX),
    )
    port = free_port()
    # The s3_server fixture put AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in this process's environment.
    args = ["run", campaign, "--workers", "2", "--port", str(port), "--quiet"]
    logs = tmp_path / ".mlds" / NAME / "logs"  # the state folder of an S3 campaign: beside its file
    run1 = start_mlds(args, cwd=tmp_path, tag="run1")

    def written() -> dict[str, object]:  # the progress signal: what the run and its workers wrote and computed
        return activity(tmp_path)

    try:
        # 1. SIGKILL a worker that holds a lease.
        def leaseholder() -> tuple[int, str] | None:
            for pid, wid in workers_of(run1).items():
                if open_lease(events_of(logs, slot(wid))) is not None:
                    return pid, wid
            return None

        victim_pid, victim = wait_until(
            leaseholder, what="a worker holding a lease", progress=written, alive=run1.ended
        )
        os.kill(victim_pid, signal.SIGKILL)
        wait_until(lambda: not cmdline(victim_pid), what="the killed worker to be gone")
        held = open_lease(events_of(logs, slot(victim)))
        assert held is not None, "the worker finished its lease just before the kill; nothing was proved"
        at_victim_kill = log_sizes(logs)  # the killed worker's last line ("leased") is stale from here on

        replacement = wait_until(
            lambda: next((w for w in workers_of(run1).values() if slot(w) == slot(victim) and w != victim), None),
            what="the supervisor to restart the killed worker",
            progress=written,
            alive=run1.ended,
        )

        # The dead worker's lease expires on the server and its units are leased again as attempt 1.
        def retried() -> bool:
            return any(e.message == "trained" and e.get("attempt") == "1" for e in worker_events(logs))

        wait_until(retried, what="the dead worker's units to be retrained", progress=written, alive=run1.ended)

        # 2. SIGKILL mlds run while one of its workers holds a lease it has just been granted.
        def fresh_lease() -> dict[int, str] | None:
            workers = workers_of(run1)
            # A lease granted since the first kill with units still in training. (Not "the worker's last
            # line is the grant": a continuous stack logs on at once, and a 0.2-s poll could miss every
            # such moment of a short campaign.)
            if any(open_lease(events_of(logs, slot(w), at_victim_kill)) for w in workers.values()):
                return workers
            return None

        survivors = wait_until(fresh_lease, what="a freshly granted lease", progress=written, alive=run1.ended)
        # A lease is honoured after a restart once a checkpoint knows it: the server writes one within
        # seconds of a grant. Kill after the checkpoint object changed, not at whatever moment came first.
        with contextlib.closing(s3_server.open(s3_bucket, prefix=PREFIX)) as bucket:
            seen = bucket.get_bytes(mf.CHECKPOINT_KEY)
            wait_until(
                lambda: bucket.get_bytes(mf.CHECKPOINT_KEY) != seen,
                what="the book to be checkpointed after the fresh grant",
                progress=written,
                alive=run1.ended,
            )
        run1.popen.kill()
        run1.popen.wait()
        at_kill = log_sizes(logs)
        accepted_before = sum(e.message == "completed (accepted)" for e in worker_events(logs))
        assert accepted_before < TOTAL, "the campaign finished before the server could be killed"
        assert all(cmdline(pid) for pid in survivors), "workers must outlive a killed mlds run"
        # The survivors notice the outage and keep retrying.
        wait_until(
            lambda: any(e.level == "WARNING" for e in worker_events(logs, skip_bytes=at_kill)),
            what="a surviving worker to notice the dead server",
            progress=written,
        )

        # 3. The same command again: same file, port and state folder.
        run2 = start_mlds(args, cwd=tmp_path, tag="run2")
        code = run2.wait(what="the restarted run to finish the campaign")
        assert code == 0, run2.describe()
    finally:
        leftovers = reap(str(tmp_path), wait=True)
    assert leftovers == [], f"worker processes were still running after the campaign: {leftovers}"
    assert run2.stdout.splitlines()[0] == f"{NAME}: Succeeded: {TOTAL}/{TOTAL} networks"

    after_restart = {
        slot(wid): events_of(logs, slot(wid), at_kill) for wid in survivors.values()
    }  # what the survivors did after the server was killed
    assert any(
        e.message == "lease re-established after a server restart" for ev in after_restart.values() for e in ev
    ), "no surviving worker re-attached its lease to the restarted server"
    # Having delivered, the orphaned workers exit rather than lease more (the new run has its own).
    orphan_exits = [
        e for e in worker_events(logs) if e.message == "the process that started this worker is gone; exiting"
    ]
    assert len(orphan_exits) == len(survivors)
    assert replacement != victim

    # The bucket: each network once, and its bytes are what the manifest and its meta.json say.
    store = s3_server.open(s3_bucket, prefix=PREFIX)
    try:
        rows = mf.read_manifest(store).to_pylist()
        assert sorted(row["unit"] for row in rows) == list(range(TOTAL))
        assert len({row["key"] for row in rows}) == TOTAL
        for row in rows:
            model = store.get_bytes(f"{row['key']}/model.safetensors")
            meta = json.loads(store.get_bytes(f"{row['key']}/meta.json") or b"{}")
            assert model is not None
            assert hashlib.sha256(model).hexdigest() == row["sha256"] == meta["sha256"], row["key"]
            assert (meta["unit"], meta["attempt"], meta["converged"]) == (row["unit"], row["attempt"], True)
        # The killed lease's units were re-issued as a new attempt: the kill really cost a lease.
        assert any(row["attempt"] >= 1 for row in rows)
        # Staging: only the SIGKILLed worker can have left uploads behind (it never reported them).
        staging = list(store.list("_mlds/staging/"))
        assert all(key.split("/")[3].endswith(f"-{victim}") for key in staging), staging
        assert store.get_bytes("README.md") is not None
    finally:
        store.close()

    # Continuous stacks (unitsPerLease 2): workers took top-up leases while their stacks trained on.
    assert any(e.message == "training a continuous stack" for e in worker_events(logs))
    assert any(topped_up(events_of(logs, i)) for i in (0, 1)), "no worker topped up its stack"

    # No unit was accepted twice. (A unit may have no "accepted" line at all: when the server died after
    # counting it and before answering, the restarted server recovered it from the bucket and the
    # worker's retry was answered "duplicate".)
    accepted = Counter(int(e["unit"]) for e in worker_events(logs) if e.message == "completed (accepted)")
    assert max(accepted.values()) == 1, accepted
