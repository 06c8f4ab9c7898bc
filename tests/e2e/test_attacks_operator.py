"""Issue 13's attacks against a real ``mlds operator`` process's lease port, its real workers training beside.

The operator runs as its own process against the kmock emulator, results in a moto S3 bucket, one
worker pod run by the test kubelet (tests/operator_processes.py). The attacker holds what a worker pod
holds: the token from the campaign's Secret and the lease URL. While the campaign trains it sends the
set of tests/attacks.py (forged results, forged upload URLs, attempts and leases the server never
issued, invented pools, malformed URLs, foreign campaigns); every answer must be the 4xx it now gets,
no object written once in the bucket may change, and the campaign must still end Succeeded with each
unit counted once and every manifest row's model matching its sha256.

Uploads: the operator's lease port hosts no upload route (results go to S3 through URLs S3 signs), so
a forged upload URL on it is a 404. What S3 itself does with a forged signature is S3's check, which
the moto stand-in does not make; tests/unit/leases/test_attacks.py covers the local store's own.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import aiohttp
import pytest
from mlds_operator.controller import pods
from mlds_operator.storage import manifest as mf

from tests.attacks import Attacker, attack_set, changed_objects, published_objects
from tests.operator_fixtures import CAMPAIGNS, SECRETS, Cluster, campaign_manifest, credentials_secret, free_port
from tests.operator_processes import NAMESPACE, Kubelet, operator_process
from tests.s3_fixtures import S3Server
from tests.waiting import wait_until_async

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
pytest_plugins = ["tests.s3_fixtures", "tests.operator_fixtures"]

NAME = "attacked"
TOTAL = 6

EXPECTED = {
    "epochs past uint64": 422,
    "a model of another architecture": 422,
    "meta nested 100,000 deep": 422,
    "upload to SingleDirectMachine/00000/model.safetensors": 404,
    f"upload to {mf.CHECKPOINT_KEY}": 404,
    f"upload to {mf.MANIFEST_KEY}": 404,
    "fail of attempt 1,000,000": 422,
    "heartbeat of an invented lease": 409,
    "an invented pool": 422,
    "a Unicode digit as unit": 404,
    "a non-ASCII signature": 404,
    "another campaign with this token": 401,
    "no token": 401,
    "/metrics on the lease port": 404,
    "/metrics on its own port": 200,
}


async def test_attacks_on_the_operators_lease_port_change_nothing_published_and_the_campaign_still_finishes(
    cluster: Cluster, s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    await cluster.create(
        SECRETS, credentials_secret(NAMESPACE, "s3-credentials", s3_server.access_key, s3_server.secret_key)
    )
    port, metrics_port = free_port(), free_port()
    operator = operator_process(cluster, tmp_path, port, metrics_port)
    kubelet = Kubelet(cluster, tmp_path)
    # One worker leasing one unit at a time leaves units pending for the attacker's forged deliveries.
    pool = {"name": "cpu", "accelerator": "cpu", "replicas": 1, "unitsPerLease": 1}
    manifest = campaign_manifest(
        NAME, NAMESPACE, storage=s3_server.storage(s3_bucket, NAME), pools=[pool], networks_per_target=TOTAL // 2
    )
    store = s3_server.open(s3_bucket, NAME)
    operator.start()
    kubelet.start()
    try:
        await cluster.create(CAMPAIGNS, manifest)

        def progress() -> object:
            return cluster.status(NAMESPACE, NAME).get("units"), kubelet.progress()

        await wait_until_async(
            lambda: any(mf.find_results(store)), what="the first published result", progress=progress
        )
        before = published_objects(store)
        secret = cluster.get(SECRETS, NAMESPACE, pods.secret_name(NAME))
        assert secret is not None
        token = pods.token_from_secret(secret)
        assert token

        async with aiohttp.ClientSession() as session:
            intruder = Attacker(session, pods.lease_url(f"http://127.0.0.1:{port}", NAMESPACE, NAME), token, "cpu")
            got = await attack_set(intruder, metrics_url=f"http://127.0.0.1:{metrics_port}/metrics")

        assert got == EXPECTED
        assert changed_objects(before, published_objects(store)) == []  # every object written once kept its bytes

        done = await wait_until_async(
            lambda: (
                cluster.status(NAMESPACE, NAME).get("phase") in ("Succeeded", "Failed")
                and cluster.status(NAMESPACE, NAME)
            ),
            what="the campaign to finish",
            progress=progress,
        )
        assert (done["phase"], done["progress"], done["units"]["failed"]) == ("Succeeded", f"{TOTAL}/{TOTAL}", 0)
        assert changed_objects(before, published_objects(store)) == []
        rows = mf.read_manifest(store).to_pylist()
        assert sorted(row["unit"] for row in rows) == list(range(TOTAL))  # each unit counted once
        assert len({row["key"] for row in rows}) == TOTAL
        for row in rows:
            model = store.get_bytes(f"{row['key']}/model.safetensors")
            meta = json.loads(store.get_bytes(f"{row['key']}/meta.json") or b"{}")
            assert model is not None
            assert hashlib.sha256(model).hexdigest() == row["sha256"] == meta["sha256"], row["key"]
            assert row["pool"] == "cpu"
        await wait_until_async(lambda: not kubelet.alive(), what="the worker to exit", progress=progress)
        assert [pod.proc.returncode for pod in kubelet.every_pod] == [0]
        assert "Traceback" not in operator.log(), operator.log()[-5000:]
    except BaseException:
        print("---- operator log ----\n" + operator.log()[-20000:])
        raise
    finally:
        store.close()
        await kubelet.close()
        operator.stop()
