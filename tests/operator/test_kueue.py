"""Kueue against a real operator: the test plays Kueue (admission, preemption) and the kubelet on the emulator.

Kueue admits a batch Job by flipping its ``spec.suspend`` to false and preempts it by flipping it back;
here the test does exactly that to the Jobs the operator made, over the emulator's HTTP API. What a
platform engineer checks: the Job carries the ``kueue.x-k8s.io/queue-name`` label and starts suspended,
the campaign says ``Queued`` until admission and ``Running`` after it, the operator never writes a
queued Job's ``suspend`` (every request its Kubernetes client sends is recorded), and an admitted
Job's pod can work: the test plays that pod with the Job's own environment and mounted token, and
leases units from the lease API like ``mlds worker`` does.
"""

from __future__ import annotations

import base64
from typing import Any

import aiohttp
import pytest
from mlds_contract.lease import LeaseGrant, LeaseRequest, ReleaseRequest
from mlds_operator.controller import pods

from tests.operator_fixtures import (
    CAMPAIGNS,
    JOBS,
    SECRETS,
    Cluster,
    campaign_manifest,
    condition,
    credentials_secret,
    operator_config,
    running_operator,
)
from tests.s3_fixtures import S3Server
from tests.waiting import wait_until_async

pytestmark = pytest.mark.e2e
pytest_plugins = ["tests.s3_fixtures", "tests.operator_fixtures"]

NS = "research"
NAME = "queued"
QUEUE = "gpu-queue"
#: Seconds to wait for the operator to react: a few status passes (0.3 s each) on a busy 2-core machine.


def record_job_writes(cluster: Cluster) -> list[dict[str, Any]]:
    """Every write the operator's Kubernetes client sends to a Job (the test's own requests are not recorded)."""
    writes: list[dict[str, Any]] = []
    handle = cluster.k8s._handle

    async def recording(request: Any) -> Any:
        agent = next((v for k, v in request.headers.items() if k.lower() == "user-agent"), "")
        resource = request.resource
        if agent.startswith("OpenAPI") and resource is not None and resource.plural == "jobs" and request.data:
            writes.append({"method": str(request.method.value), "name": request.name, "data": request.data})
        return await handle(request)

    cluster.k8s._handle = recording
    return writes


def job(cluster: Cluster) -> dict[str, Any] | None:
    return cluster.jobs(NS, NAME).get("gpu")


def phase(cluster: Cluster) -> str | None:
    return cluster.status(NS, NAME).get("phase")


async def play_pod(cluster: Cluster, manifest: dict[str, Any]) -> LeaseGrant | None:
    """One pod of the Job asks for work as `mlds worker` would: its env's lease URL, its mounted token."""
    (container,) = manifest["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    (volume,) = [v for v in manifest["spec"]["template"]["spec"]["volumes"] if "secret" in v]
    secret = cluster.get(SECRETS, NS, volume["secret"]["secretName"])
    assert secret is not None
    token = base64.b64decode(secret["data"][pods.TOKEN_KEY]).decode()
    request = LeaseRequest(
        worker=f"{manifest['metadata']['name']}-pod",
        pool=env["MLDS_POOL"] or "",
        accelerator=env["MLDS_ACCELERATOR"] or "",
        device_name="test",
        max_units=1,
    )
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{env['MLDS_LEASE_URL']}/leases",
            data=request.model_dump_json(by_alias=True),
            headers={"Authorization": f"Bearer {token}"},
        ) as resp,
    ):
        body = await resp.json(content_type=None)
        return LeaseGrant.model_validate(body) if resp.status == 200 and "leaseId" in body else None


async def release(manifest: dict[str, Any], cluster: Cluster, grant: LeaseGrant) -> None:
    (container,) = manifest["spec"]["template"]["spec"]["containers"]
    url = {e["name"]: e.get("value") for e in container["env"]}["MLDS_LEASE_URL"]
    token = pods.token_from_secret(cluster.get(SECRETS, NS, pods.secret_name(NAME)))
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{url}/leases/{grant.lease_id}/release",
            data=ReleaseRequest(worker=f"{manifest['metadata']['name']}-pod").model_dump_json(by_alias=True),
            headers={"Authorization": f"Bearer {token}"},
        ) as resp,
    ):
        assert resp.status == 200


async def test_kueue_admission_takes_a_queued_campaign_from_queued_to_running_and_the_operator_never_touches_suspend(
    cluster: Cluster, s3_server: S3Server, s3_bucket: str
) -> None:
    await cluster.create(SECRETS, credentials_secret(NS, "s3-credentials", s3_server.access_key, s3_server.secret_key))
    writes = record_job_writes(cluster)
    manifest = campaign_manifest(
        NAME,
        NS,
        storage=s3_server.storage(s3_bucket, NAME),
        pools=[{"name": "gpu", "accelerator": "nvidia", "replicas": 2, "unitsPerLease": 1}],
        queueName=QUEUE,
    )
    async with running_operator(operator_config(cluster)):
        await cluster.create(CAMPAIGNS, manifest)

        # 1. Queued: the Job waits for Kueue, suspended, with the queue label.
        made = await wait_until_async(lambda: job(cluster), what="the gpu Job")
        assert made["metadata"]["labels"][pods.KUEUE_QUEUE_LABEL] == QUEUE
        assert made["spec"]["suspend"] is True
        await wait_until_async(lambda: phase(cluster) == "Queued", what="phase Queued")
        progressing = condition(cluster.status(NS, NAME), "Progressing")
        assert (progressing["status"], progressing["reason"]) == ("False", "Queued")
        assert f"LocalQueue {QUEUE}" in progressing["message"]

        # 2. Kueue admits the Job: the campaign runs, and the Job's pod gets work from the lease API.
        await cluster.patch(JOBS, NS, made["metadata"]["name"], {"spec": {"suspend": False}})
        await wait_until_async(lambda: phase(cluster) == "Running", what="phase Running after admission")
        admitted = job(cluster)
        assert admitted is not None
        assert admitted["spec"]["suspend"] is False, "the operator must leave an admitted Job running"
        grant = await wait_until_async(lambda: play_pod(cluster, admitted), what="a lease for the pod")
        await wait_until_async(
            lambda: condition(cluster.status(NS, NAME), "Progressing").get("reason") == "Training",
            what="Progressing=True Training",
        )
        assert cluster.status(NS, NAME)["units"]["leased"] == 1

        # 3. Kueue preempts it: Queued again, and the operator does not unsuspend it.
        await release(admitted, cluster, grant)
        await cluster.patch(JOBS, NS, made["metadata"]["name"], {"spec": {"suspend": True}})
        await wait_until_async(lambda: phase(cluster) == "Queued", what="phase Queued after preemption")
        assert (job(cluster) or {})["spec"]["suspend"] is True
        await wait_until_async(
            lambda: "Queued" in {e["reason"] for e in cluster.events(NS, NAME)}, what="a Queued Event"
        )

        # 4. spec.suspend: the queued Job goes (its quota with it); resuming queues a new one.
        await cluster.patch(CAMPAIGNS, NS, NAME, {"spec": {"suspend": True}})
        await wait_until_async(lambda: job(cluster) is None, what="the queued Job to be deleted")
        await wait_until_async(lambda: phase(cluster) == "Suspended", what="phase Suspended")
        await cluster.patch(CAMPAIGNS, NS, NAME, {"spec": {"suspend": False}})
        again = await wait_until_async(lambda: job(cluster), what="a new queued Job")
        assert again["metadata"]["uid"] != made["metadata"]["uid"]
        assert (again["spec"]["suspend"], again["metadata"]["labels"][pods.KUEUE_QUEUE_LABEL]) == (True, QUEUE)
        await wait_until_async(lambda: phase(cluster) == "Queued", what="phase Queued after resuming")

    creates = [w for w in writes if w["method"].upper() == "POST"]
    assert len(creates) == 2
    assert all(w["data"]["spec"]["suspend"] is True for w in creates)
    patches = [w for w in writes if w["method"].upper() == "PATCH"]
    assert [p for p in patches if "suspend" in (p["data"].get("spec") or {})] == [], patches
