"""`mlds operator` (kopf) against the kmock Kubernetes emulator over HTTP, with a real S3 protocol server.

The operator runs in the test's event loop (:func:`tests.operator_fixtures.running_operator`), talks to
the emulator through kopf and the official client exactly as to an API server, and opens each campaign's
store on moto. No worker runs here: the test reads the objects the operator created, edits the campaign
as a user would, and speaks to the lease API itself where it needs a worker's view.
(tests/e2e/test_operator_campaign.py runs whole campaigns with real workers.)
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from minio import Minio
from mlds_contract.lease import LeaseGrant, LeaseRequest, NoLease, NoLeaseReason, ReleaseRequest
from mlds_operator.controller import pods

from tests.operator_fixtures import (
    CAMPAIGNS,
    JOBS,
    SECRETS,
    TEST_IMAGES,
    Cluster,
    RunningOperator,
    campaign_manifest,
    condition,
    credentials_secret,
    operator_config,
    running_operator,
)
from tests.run_fixtures import write_mnist_like
from tests.s3_fixtures import S3Server
from tests.waiting import wait_until_async

pytestmark = pytest.mark.e2e
pytest_plugins = ["tests.s3_fixtures", "tests.operator_fixtures"]

NS = "research"


async def add_credentials(cluster: Cluster, s3: S3Server, name: str = "s3-credentials") -> None:
    await cluster.create(SECRETS, credentials_secret(NS, name, s3.access_key, s3.secret_key))


def ready(cluster: Cluster, name: str) -> bool:
    return condition(cluster.status(NS, name), "Ready").get("status") == "True"


async def condition_when(cluster: Cluster, name: str, kind: str, *, what: str, **fields: str) -> dict[str, Any]:
    """Wait until campaign ``name``'s ``kind`` condition has these ``fields`` (status=..., reason=...); return it."""

    def met() -> dict[str, Any] | None:
        cond = condition(cluster.status(NS, name), kind)
        return cond if all(cond.get(k) == v for k, v in fields.items()) else None

    return await wait_until_async(met, what=what)


def token_of(cluster: Cluster, campaign: str) -> str:
    secret = cluster.get(SECRETS, NS, pods.secret_name(campaign))
    token = pods.token_from_secret(secret)
    assert token, f"no token Secret for {campaign}"
    return token


async def lease(op: RunningOperator, campaign: str, token: str, pool: str = "cpu") -> tuple[int, Any]:
    """Ask the campaign's lease API for one unit, as a worker of ``pool`` would."""
    url = pods.lease_url(op.lease_base_url, NS, campaign) + "/leases"
    request = LeaseRequest(worker="test-worker", pool=pool, accelerator="cpu", device_name="test", max_units=1)
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            url, data=request.model_dump_json(by_alias=True), headers={"Authorization": f"Bearer {token}"}
        ) as resp,
    ):
        body = await resp.json(content_type=None)
        if resp.status != 200:
            return resp.status, body
        reply: LeaseGrant | NoLease = (
            LeaseGrant.model_validate(body) if "leaseId" in body else NoLease.model_validate(body)
        )
        return resp.status, reply


async def release(op: RunningOperator, campaign: str, token: str, grant: LeaseGrant) -> None:
    url = pods.lease_url(op.lease_base_url, NS, campaign) + f"/leases/{grant.lease_id}/release"
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            url,
            data=ReleaseRequest(worker="test-worker").model_dump_json(by_alias=True),
            headers={"Authorization": f"Bearer {token}"},
        ) as resp,
    ):
        assert resp.status == 200


# -------------------------------------------------------------------------------- what is made


async def test_a_campaign_gets_a_token_secret_and_one_job_per_pool_with_the_right_resources(
    cluster: Cluster, s3_server: S3Server, s3_bucket: str
) -> None:
    await add_credentials(cluster, s3_server)
    pools = [
        {"name": "cpu", "accelerator": "cpu", "replicas": 3, "resources": {"limits": {"cpu": "2", "memory": "2Gi"}}},
        {
            "name": "a100",
            "accelerator": "nvidia",
            "replicas": 2,
            "unitsPerLease": 64,
            "nodeSelector": {"gpu": "a100"},
            "tolerations": [{"key": "spot", "operator": "Exists", "effect": "NoSchedule"}],
        },
        {"name": "mi300", "accelerator": "rocm", "replicas": 1, "resources": {"limits": {"amd.com/gpu": 2}}},
    ]
    async with running_operator(operator_config(cluster)) as op:
        await cluster.create(
            CAMPAIGNS, campaign_manifest("parity", NS, storage=s3_server.storage(s3_bucket, "parity"), pools=pools)
        )
        jobs = await wait_until_async(
            lambda: len(cluster.jobs(NS, "parity")) == 3 and cluster.jobs(NS, "parity"),
            what="three Jobs",
        )
        await wait_until_async(lambda: ready(cluster, "parity"), what="Ready=True")
        campaign = cluster.campaign(NS, "parity")
        assert campaign is not None

        def containers(pool: str) -> dict[str, Any]:
            (c,) = jobs[pool]["spec"]["template"]["spec"]["containers"]
            return dict(c)

        cpu, nvidia, rocm = containers("cpu"), containers("a100"), containers("mi300")
        assert (cpu["image"], nvidia["image"], rocm["image"]) == (
            TEST_IMAGES["cpu"],
            TEST_IMAGES["nvidia"],
            TEST_IMAGES["rocm"],
        )
        assert cpu["resources"]["limits"] == {"cpu": "2", "memory": "2Gi"}
        assert {e["name"]: e.get("value") for e in cpu["env"]}["OMP_NUM_THREADS"] == "2"
        assert nvidia["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert rocm["resources"]["limits"] == {"amd.com/gpu": 2}
        assert {e["name"]: e.get("value") for e in nvidia["env"]}["MLDS_UNITS_PER_LEASE"] == "64"
        a100_pod = jobs["a100"]["spec"]["template"]["spec"]
        assert a100_pod["nodeSelector"] == {"gpu": "a100"}
        assert {"key": "spot", "operator": "Exists", "effect": "NoSchedule"} in a100_pod["tolerations"]
        assert [j["spec"]["parallelism"] for j in (jobs["cpu"], jobs["a100"], jobs["mi300"])] == [3, 2, 1]
        for job in jobs.values():
            owner = job["metadata"]["ownerReferences"][0]
            assert (owner["kind"], owner["name"], owner["uid"]) == (
                "TrainingCampaign",
                "parity",
                campaign["metadata"]["uid"],
            )
            assert job["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True

        env = {e["name"]: e.get("value") for e in cpu["env"]}
        assert env["MLDS_LEASE_URL"] == f"{op.lease_base_url}/v1/campaigns/{NS}/parity"
        token = token_of(cluster, "parity")
        code, grant = await lease(op, "parity", token)
        assert code == 200
        assert isinstance(grant, LeaseGrant), "the token in the Secret is the one the lease API takes"
        await release(op, "parity", token, grant)
        code, _ = await lease(op, "parity", "not-the-token")
        assert code == 401

        status = cluster.status(NS, "parity")
        assert status["phase"] in ("Pending", "Running")
        assert status["units"]["total"] == 20
        assert status["progress"] == "0/20"
        assert status["observedGeneration"] == 1
        assert [p["name"] for p in status["pools"]] == ["cpu", "a100", "mi300"]
        assert "kopf" not in status, "handlers return None: no kopf bookkeeping in our status"
        reasons = {e["reason"] for e in cluster.events(NS, "parity")}
        assert {"Serving", "WaitingForWorkers"} <= reasons


# ------------------------------------------------------------------------------------- edits


async def test_replicas_and_suspend_edits_reach_the_jobs_and_the_lease_book(
    cluster: Cluster, s3_server: S3Server, s3_bucket: str
) -> None:
    await add_credentials(cluster, s3_server)
    async with running_operator(operator_config(cluster)) as op:
        await cluster.create(CAMPAIGNS, campaign_manifest("edits", NS, storage=s3_server.storage(s3_bucket, "edits")))
        await wait_until_async(lambda: ready(cluster, "edits"), what="Ready=True")
        token = token_of(cluster, "edits")

        pools = [{"name": "cpu", "accelerator": "cpu", "replicas": 5, "unitsPerLease": 1}]
        await cluster.patch(CAMPAIGNS, NS, "edits", {"spec": {"pools": pools}})
        await wait_until_async(
            lambda: cluster.jobs(NS, "edits")["cpu"]["spec"]["parallelism"] == 5, what="parallelism 5"
        )
        await wait_until_async(lambda: cluster.status(NS, "edits").get("observedGeneration") == 2, what="generation 2")

        await cluster.patch(CAMPAIGNS, NS, "edits", {"spec": {"suspend": True}})
        await wait_until_async(
            lambda: cluster.jobs(NS, "edits")["cpu"]["spec"]["suspend"] is True, what="suspended Job"
        )
        await wait_until_async(lambda: cluster.status(NS, "edits").get("phase") == "Suspended", what="Suspended")
        code, reply = await lease(op, "edits", token)
        assert (code, getattr(reply, "reason", None)) == (200, NoLeaseReason.paused)
        assert condition(cluster.status(NS, "edits"), "Suspended")["status"] == "True"
        assert "SuspendedBySpec" in {e["reason"] for e in cluster.events(NS, "edits")}

        await cluster.patch(CAMPAIGNS, NS, "edits", {"spec": {"suspend": False}})
        await wait_until_async(lambda: cluster.jobs(NS, "edits")["cpu"]["spec"]["suspend"] is False, what="resumed Job")
        code, reply = await wait_until_async(lambda: _granted(op, "edits", token), what="a lease after resuming")
        assert isinstance(reply, LeaseGrant)
        await release(op, "edits", token, reply)
        await wait_until_async(
            lambda: condition(cluster.status(NS, "edits"), "Suspended").get("status") == "False",
            what="Suspended=False",
        )


async def _granted(op: RunningOperator, campaign: str, token: str) -> tuple[int, Any] | None:
    code, reply = await lease(op, campaign, token)
    return (code, reply) if isinstance(reply, LeaseGrant) else None


async def test_a_changed_worker_image_replaces_the_job(cluster: Cluster, s3_server: S3Server, s3_bucket: str) -> None:
    await add_credentials(cluster, s3_server)
    async with running_operator(operator_config(cluster)):
        await cluster.create(CAMPAIGNS, campaign_manifest("images", NS, storage=s3_server.storage(s3_bucket, "img")))
        first = await wait_until_async(lambda: cluster.jobs(NS, "images").get("cpu"), what="the cpu Job")
        pools = [{"name": "cpu", "accelerator": "cpu", "replicas": 2, "image": "registry.test/custom:2"}]
        await cluster.patch(CAMPAIGNS, NS, "images", {"spec": {"pools": pools}})

        def replaced() -> bool:
            job = cluster.jobs(NS, "images").get("cpu")
            return (
                job is not None
                and job["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.test/custom:2"
            )

        await wait_until_async(replaced, what="a new Job with the new image")
        assert cluster.jobs(NS, "images")["cpu"]["metadata"]["uid"] != first["metadata"]["uid"]


async def test_editing_the_plan_mid_campaign_is_refused_until_reverted(
    cluster: Cluster, s3_server: S3Server, s3_bucket: str
) -> None:
    await add_credentials(cluster, s3_server)
    async with running_operator(operator_config(cluster)):
        await cluster.create(CAMPAIGNS, campaign_manifest("plan", NS, storage=s3_server.storage(s3_bucket, "plan")))
        await wait_until_async(lambda: ready(cluster, "plan"), what="Ready=True")
        await cluster.patch(CAMPAIGNS, NS, "plan", {"spec": {"seed": 7}})
        invalid = await condition_when(cluster, "plan", "InvalidSpec", status="True", what="InvalidSpec=True")
        assert invalid["reason"] == "ImmutableFieldChanged"
        assert "seed" in invalid["message"]
        assert cluster.jobs(NS, "plan")["cpu"]["spec"]["parallelism"] == 2, "the running campaign carries on"
        await cluster.patch(CAMPAIGNS, NS, "plan", {"spec": {"seed": 1}})
        await wait_until_async(
            lambda: condition(cluster.status(NS, "plan"), "InvalidSpec").get("status") == "False",
            what="InvalidSpec=False after the revert",
        )


# ----------------------------------------------------------------------------------- deletion


async def test_deleting_a_campaign_removes_its_jobs_and_secret_and_keeps_its_results(
    cluster: Cluster, s3_server: S3Server, s3_bucket: str, minio_client: Minio
) -> None:
    await add_credentials(cluster, s3_server)
    async with running_operator(operator_config(cluster)) as op:
        await cluster.create(
            CAMPAIGNS,
            campaign_manifest(
                "gone",
                NS,
                storage=s3_server.storage(s3_bucket, "gone"),
                pools=[
                    {"name": "cpu", "accelerator": "cpu", "replicas": 1},
                    {"name": "gpu", "accelerator": "nvidia", "replicas": 1},
                ],
            ),
        )
        await wait_until_async(lambda: len(cluster.jobs(NS, "gone")) == 2, what="two Jobs")
        await wait_until_async(lambda: ready(cluster, "gone"), what="Ready=True")
        token = token_of(cluster, "gone")
        # A result some worker delivered earlier; the operator must never delete results.
        minio_client.put_object(s3_bucket, "gone/ParityMachine/00000/meta.json", _bytes(b"{}"), 2)

        await cluster.delete(CAMPAIGNS, NS, "gone")
        await wait_until_async(lambda: cluster.campaign(NS, "gone") is None, what="the campaign to go")
        assert cluster.jobs(NS, "gone") == {}
        assert cluster.get(SECRETS, NS, pods.secret_name("gone")) is None
        assert cluster.get(SECRETS, NS, "s3-credentials") is not None, "not ours to delete"
        keys = {o.object_name for o in minio_client.list_objects(s3_bucket, prefix="gone/", recursive=True)}
        assert "gone/ParityMachine/00000/meta.json" in keys
        assert any(k.startswith("gone/_mlds/") for k in keys), "the book's last checkpoint stays too"
        code, _ = await lease(op, "gone", token)
        assert code == 401, "its leases are released with it: the lease API no longer serves it"


def _bytes(data: bytes) -> Any:
    return io.BytesIO(data)


# --------------------------------------------------------------------------------- mistakes


INVALID: list[tuple[str, dict[str, Any], str, str]] = [
    (
        "unknown-machine",
        {"workload": {"dataset": "ds1", "machines": ["Parity"]}},
        "InvalidCampaign",
        "unknown machine 'Parity' for ds1",
    ),
    (
        "ds2-machine-in-ds1",
        {"workload": {"dataset": "ds1", "machines": ["XORModified"]}},
        "InvalidCampaign",
        "unknown machine 'XORModified'",
    ),
    (
        "twice-the-same-machine",
        {"workload": {"dataset": "ds2", "machines": ["ParityMachine", "ParityModified"]}},
        "InvalidCampaign",
        "listed twice",
    ),
    (
        "variants-outside-ds4",
        {"workload": {"dataset": "ds1", "variants": ["pixel"]}},
        "InvalidCampaign",
        "variants applies to ds4 only",
    ),
    (
        "shapes-outside-ds5",
        {"workload": {"dataset": "ds1", "shapes": [{"hidden": 8}]}},
        "InvalidCampaign",
        "shapes applies to ds5 only",
    ),
    (
        "machines-on-ds4",
        {"workload": {"dataset": "ds4", "machines": ["ParityMachine"]}},
        "InvalidCampaign",
        "does not apply to ds4",
    ),
    ("duplicate-pools", {"pools": [{"name": "cpu"}, {"name": "cpu"}]}, "InvalidCampaign", "pool names must be unique"),
    ("no-storage", {"storage": None}, "StorageRequired", "spec.storage is required"),
    ("negative-networks", {"networksPerTarget": -5}, "MalformedSpec", "networksPerTarget"),
    ("unknown-dataset", {"workload": {"dataset": "ds7"}}, "MalformedSpec", "workload.dataset"),
]


@pytest.mark.slow
async def test_semantic_mistakes_fail_the_campaign_with_a_readable_condition_and_no_retry_loop(
    cluster: Cluster, s3_server: S3Server, s3_bucket: str
) -> None:
    await add_credentials(cluster, s3_server)
    async with running_operator(operator_config(cluster)):
        for name, spec, _, _ in INVALID:
            manifest = campaign_manifest(name, NS, storage=s3_server.storage(s3_bucket, name))
            manifest["spec"].update(spec)
            if manifest["spec"].get("storage") is None:
                manifest["spec"].pop("storage")
            await cluster.create(CAMPAIGNS, manifest)
        for name, _, reason, fragment in INVALID:

            def invalid_spec(name: str = name) -> dict[str, Any] | None:
                return condition(cluster.status(NS, name), "InvalidSpec") or None

            cond = await wait_until_async(invalid_spec, what=f"the InvalidSpec condition of {name}")
            status = cluster.status(NS, name)
            assert (status["phase"], cond["status"], cond["reason"]) == ("Failed", "True", reason), name
            assert fragment in cond["message"], (name, cond["message"])
            assert condition(status, "Failed")["reason"] == "InvalidSpec"
        await _passes(5)
        for name, _, reason, _ in INVALID:
            assert cluster.jobs(NS, name) == {}, name
            assert cluster.get(SECRETS, NS, pods.secret_name(name)) is None, name
            warnings = [e for e in cluster.events(NS, name) if e["reason"] == reason]
            assert len(warnings) == 1, f"{name}: one Event, not one per pass: {warnings}"
            assert warnings[0]["type"] == "Warning"


async def _passes(n: int) -> None:
    """Let ``n`` status passes go by (the operator's status interval is 0.3 s here)."""
    await asyncio.sleep(n * 0.3)


async def test_a_missing_credentials_secret_waits_and_the_campaign_starts_once_it_appears(
    cluster: Cluster, s3_server: S3Server, s3_bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with running_operator(operator_config(cluster)):
        manifest = campaign_manifest(
            "creds", NS, storage=s3_server.storage(s3_bucket, "creds"), credentials_secret="later"
        )
        await cluster.create(CAMPAIGNS, manifest)
        cond = await condition_when(
            cluster, "creds", "InvalidSpec", status="True", what="InvalidSpec for the missing Secret"
        )
        assert cond["reason"] == "CredentialsSecretMissing"
        assert "'later'" in cond["message"]
        assert cluster.status(NS, "creds")["phase"] == "Pending"
        assert cluster.jobs(NS, "creds") == {}

        bad = credentials_secret(NS, "later", "x", "y")
        bad["data"] = {"username": base64.b64encode(b"x").decode()}
        await cluster.create(SECRETS, bad)
        await wait_until_async(
            lambda: condition(cluster.status(NS, "creds"), "InvalidSpec").get("reason") == "CredentialsSecretInvalid",
            what="CredentialsSecretInvalid",
        )
        await cluster.delete(SECRETS, NS, "later")
        await add_credentials(cluster, s3_server, "later")
        await wait_until_async(lambda: cluster.jobs(NS, "creds").get("cpu"), what="the Job once the Secret exists")
        await wait_until_async(lambda: ready(cluster, "creds"), what="Ready=True")
        assert condition(cluster.status(NS, "creds"), "InvalidSpec")["status"] == "False"
    # The waiting is said by the condition and its Events, not by an ERROR line (and Error Event) per retry.
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], errors


async def test_mnist_files_missing_from_storage_hold_the_campaign_with_a_condition_until_they_are_uploaded(
    cluster: Cluster, s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    # ds4 on MNIST reads four IDX files its owner places under the storage prefix. Without them no worker
    # could train a unit: the campaign waits, saying so, instead of starting Jobs that fail every unit.
    await add_credentials(cluster, s3_server)
    storage = s3_server.storage(s3_bucket, "digits")
    workload = {"dataset": "ds4", "variants": ["clean"], "images": "mnist"}
    async with running_operator(operator_config(cluster)):
        await cluster.create(CAMPAIGNS, campaign_manifest("digits", NS, storage=storage, workload=workload))
        held = await condition_when(
            cluster, "digits", "Ready", reason="InputsMissing", what="Ready=False because the MNIST files are missing"
        )
        assert held["status"] == "False"
        assert "train-images-idx3-ubyte" in held["message"]
        assert "t10k-labels-idx1-ubyte" in held["message"]
        assert cluster.status(NS, "digits")["phase"] == "Pending"
        assert condition(cluster.status(NS, "digits"), "InvalidSpec").get("status") != "True"  # not the spec's fault
        assert cluster.jobs(NS, "digits") == {}
        events = [e for e in cluster.events(NS, "digits") if e["reason"] == "InputsMissing"]
        assert events, cluster.events(NS, "digits")
        assert {e["type"] for e in events} == {"Warning"}

        write_mnist_like(tmp_path / "mnist")
        store = s3_server.open(s3_bucket, "digits")
        for file in sorted((tmp_path / "mnist").iterdir()):
            store.put_bytes(file.name, file.read_bytes())
        await wait_until_async(lambda: cluster.jobs(NS, "digits").get("cpu"), what="the Job once the files are there")
        await wait_until_async(lambda: ready(cluster, "digits"), what="Ready=True")


async def test_a_job_name_taken_by_something_else_is_reported_not_overwritten(
    cluster: Cluster, s3_server: S3Server, s3_bucket: str
) -> None:
    await add_credentials(cluster, s3_server)
    foreign = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "clash-cpu", "namespace": NS}, "spec": {}}
    await cluster.create(JOBS, foreign)
    async with running_operator(operator_config(cluster)):
        await cluster.create(CAMPAIGNS, campaign_manifest("clash", NS, storage=s3_server.storage(s3_bucket, "clash")))
        ready = await condition_when(
            cluster, "clash", "Ready", reason="JobNameTaken", what="Ready=False because the Job name is taken"
        )
        assert ready["status"] == "False"
        assert "clash-cpu" in ready["message"]
        (event,) = [e for e in cluster.events(NS, "clash") if e["reason"] == "JobNameTaken"]
        assert event["type"] == "Warning"
        assert cluster.get(JOBS, NS, "clash-cpu") == {
            **foreign,
            "metadata": cluster.get(JOBS, NS, "clash-cpu")["metadata"],
        }


async def test_a_secret_named_like_the_token_secret_but_not_made_for_the_campaign_is_never_adopted_or_deleted(
    cluster: Cluster, s3_server: S3Server, s3_bucket: str
) -> None:
    # Issue 13: someone else's Secret of that name must not reach worker pods, nor be deleted with the campaign.
    await add_credentials(cluster, s3_server)
    planted = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": pods.secret_name("squat"), "namespace": NS, "labels": {pods.LABEL_CAMPAIGN: "squat"}},
        "data": {pods.TOKEN_KEY: base64.b64encode(b"a-token-someone-chose").decode()},
    }
    await cluster.create(SECRETS, planted)
    async with running_operator(operator_config(cluster)):
        await cluster.create(CAMPAIGNS, campaign_manifest("squat", NS, storage=s3_server.storage(s3_bucket, "squat")))
        await wait_until_async(
            lambda: condition(cluster.status(NS, "squat"), "Ready").get("reason") == "TokenSecretNotOwned",
            what="a TokenSecretNotOwned condition",
        )
        assert cluster.jobs(NS, "squat") == {}  # nothing mounts the planted token

        await cluster.delete(CAMPAIGNS, NS, "squat")
        await wait_until_async(lambda: cluster.campaign(NS, "squat") is None, what="the campaign to go")
        assert cluster.get(SECRETS, NS, pods.secret_name("squat")) is not None, "not ours to delete"
