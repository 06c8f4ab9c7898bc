"""Issue 13's attacks against a real ``mlds run``, with its real workers training beside the attacker.

The attacker holds what a local worker holds: the run's token file and the lease port from ``run.json``
(tests/attacks.py). While the campaign trains, it sends forged results, forged upload URLs, attempts and
leases the server never issued, invented pools and malformed URLs; every answer must be the 4xx it now
gets, every result published before the attack must keep its bytes, and the campaign must still finish
with each unit counted once, every manifest row's model matching its sha256, and a second run (a
restart: recovery reads everything back) succeeding.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import aiohttp
import pytest
from mlds_operator.storage import manifest as mf

from tests.attacks import Attacker, attack_set, published_state
from tests.run_fixtures import activity, manifest_rows, reap, start_mlds, write_campaign
from tests.waiting import wait_until

pytestmark = pytest.mark.e2e


async def attack(store: Path) -> dict[str, int]:
    """Every attack once (tests/attacks.py's set), as a local worker: the token file and run.json's ports."""
    token = (store / "_mlds" / "run-token").read_text().strip()
    info = json.loads((store / "_mlds" / "run.json").read_text())
    base = f"http://127.0.0.1:{info['port']}/v1/campaigns/local/attacked"
    async with aiohttp.ClientSession() as session:
        intruder = Attacker(session, base, token, "local")
        return await attack_set(intruder, metrics_url=f"http://127.0.0.1:{info['metricsPort']}/metrics")


@pytest.mark.slow
def test_attacks_on_a_running_campaign_change_nothing_published_and_it_still_finishes(tmp_path: Path) -> None:
    campaign = write_campaign(tmp_path / "campaign.yaml", name="attacked", networks_per_target=3)
    store = tmp_path / "store"
    args = ["run", campaign, "--workers", "1", "--store", "store", "--quiet", "--metrics-port", "0"]
    first = start_mlds(args, cwd=tmp_path, tag="first")
    try:
        wait_until(
            (store / "SingleDirectMachine" / "00000" / "meta.json").is_file,
            what="the first published result",
            progress=lambda: activity(tmp_path),
            alive=first.ended,
        )
        before = {k: v for k, v in published_state(store).items() if not k.startswith(("_mlds/", "manifest"))}

        got = asyncio.run(attack(store))

        expected = {
            "epochs past uint64": 422,
            "a model of another architecture": 422,
            "meta nested 100,000 deep": 422,
            "upload to SingleDirectMachine/00000/model.safetensors": 403,
            f"upload to {mf.CHECKPOINT_KEY}": 403,
            f"upload to {mf.MANIFEST_KEY}": 403,
            "fail of attempt 1,000,000": 422,
            "heartbeat of an invented lease": 409,
            "an invented pool": 422,
            "a Unicode digit as unit": 404,
            "a non-ASCII signature": 403,
            "another campaign with this token": 401,
            "no token": 401,
            "/metrics on the lease port": 404,
            "/metrics on its own port": 200,
        }
        # One worker leasing one unit at a time leaves units pending for the attacker: every attack ran.
        assert got == expected
        after = published_state(store)
        assert {k: after.get(k) for k in before} == before  # every result published before kept its bytes
        assert first.wait(what="the attacked run to finish", progress=lambda: activity(tmp_path)) == 0, first.describe()
    finally:
        reap(str(tmp_path), wait=True)

    rows = manifest_rows(store / "manifest.parquet")
    assert [row["unit"] for row in rows] == list(range(6))  # each unit counted once
    for row in rows:
        model = (store / row["key"] / "model.safetensors").read_bytes()
        assert row["sha256"] == hashlib.sha256(model).hexdigest()
        assert row["pool"] == "local"
    second = start_mlds(args, cwd=tmp_path, tag="second")  # a restart reads every result back
    assert second.wait(what="the second run to finish", progress=lambda: activity(tmp_path)) == 0, second.describe()
    assert second.stdout.splitlines()[0] == "attacked: Succeeded: 6/6 networks"
    assert reap(str(tmp_path), wait=True) == []
