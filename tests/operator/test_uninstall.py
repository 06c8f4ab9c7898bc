"""`helm uninstall` does not trap campaigns: the chart's pre-delete hook against a real operator on the emulator.

The story: an operator runs a campaign (kopf puts the ``mlds.dev/cleanup`` finalizer on it); the hook
(:mod:`mlds_operator.controller.uninstall`) scales the operator's Deployment to zero, waits for its pod
to go (the test plays the Deployment controller: it stops the in-process operator, then reports zero
replicas), and removes the finalizer. The campaign, its Job and its results stay; deleting the campaign
afterwards takes effect at once with no operator running. As a control, without the hook the same
delete leaves the campaign stuck behind its finalizer.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from mlds_operator.controller.handlers import FINALIZER
from mlds_operator.controller.kube import HookKube
from mlds_operator.controller.uninstall import OperatorStillRunning, release_campaigns, stop_operator

from tests.operator_fixtures import (
    CAMPAIGNS,
    SECRETS,
    Cluster,
    campaign_manifest,
    credentials_secret,
    operator_config,
    running_operator,
)
from tests.s3_fixtures import S3Server
from tests.waiting import wait_until_async

pytestmark = pytest.mark.e2e
pytest_plugins = ["tests.s3_fixtures", "tests.operator_fixtures"]

NS = "research"
SYSTEM = "mlds-system"
DEPLOYMENTS = "apps/v1/deployments"


def declare_deployments(cluster: Cluster) -> None:
    from kmock._internal.references import ResourceInfo  # noqa: PLC0415 - kmock 0.8 keeps it private

    verbs = {"list", "watch", "get", "create", "patch", "update", "delete"}
    cluster.k8s.resources[DEPLOYMENTS] = ResourceInfo(
        kind="Deployment", singular="deployment", namespaced=True, verbs=verbs, subresources={"status"}
    )


def deployment(replicas: int) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "mlds-operator", "namespace": SYSTEM},
        "spec": {"replicas": replicas},
        "status": {"replicas": replicas},
    }


async def start_campaign(cluster: Cluster, s3: S3Server, bucket: str, name: str) -> None:
    await cluster.create(SECRETS, credentials_secret(NS, "s3-credentials", s3.access_key, s3.secret_key))
    await cluster.create(CAMPAIGNS, campaign_manifest(name, NS, storage=s3.storage(bucket, name)))
    await wait_until_async(lambda: cluster.jobs(NS, name), what="the campaign's Job")
    await wait_until_async(
        lambda: FINALIZER in ((cluster.campaign(NS, name) or {}).get("metadata", {}).get("finalizers") or ()),
        what="kopf's finalizer",
    )


async def test_after_the_uninstall_hook_deleting_a_campaign_does_not_hang(
    cluster: Cluster, s3_server: S3Server, s3_bucket: str
) -> None:
    declare_deployments(cluster)
    await cluster.create(DEPLOYMENTS, deployment(1))
    async with running_operator(operator_config(cluster)) as op:
        await start_campaign(cluster, s3_server, s3_bucket, "kept")
        kube = HookKube.connect(str(cluster.kubeconfig))

        async def deployment_controller() -> None:
            """Plays the Deployment controller: replicas 0 -> the operator's pod stops -> status says 0."""
            await wait_until_async(
                lambda: (cluster.get(DEPLOYMENTS, SYSTEM, "mlds-operator") or {})["spec"]["replicas"] == 0,
                what="the hook to scale the operator down",
            )
            op.stop.set()
            await asyncio.to_thread(op.thread.join, 60)
            await cluster.patch_status(DEPLOYMENTS, SYSTEM, "mlds-operator", {"replicas": 0})

        playing = asyncio.create_task(deployment_controller())
        await asyncio.to_thread(stop_operator, kube, SYSTEM, "mlds-operator", timeout=600, poll=0.1)
        await playing
        assert not op.thread.is_alive()
        released = await asyncio.to_thread(release_campaigns, kube)
        kube.close()
    assert released == [f"{NS}/kept"]
    campaign = cluster.campaign(NS, "kept")
    assert campaign is not None, "uninstalling keeps the campaigns"
    assert FINALIZER not in (campaign["metadata"].get("finalizers") or ())
    assert cluster.jobs(NS, "kept"), "and their Jobs (a reinstalled operator picks them up)"
    await cluster.delete(CAMPAIGNS, NS, "kept")
    assert cluster.campaign(NS, "kept") is None, "no operator runs, yet the delete took effect at once"


async def test_without_the_hook_a_campaign_deleted_after_the_operator_is_gone_is_stuck(
    cluster: Cluster, s3_server: S3Server, s3_bucket: str
) -> None:
    """The control: what the hook (or the README's `kubectl patch`) is for."""
    async with running_operator(operator_config(cluster)):
        await start_campaign(cluster, s3_server, s3_bucket, "stuck")
    await cluster.delete(CAMPAIGNS, NS, "stuck")
    stuck = cluster.campaign(NS, "stuck")
    assert stuck is not None
    assert stuck["metadata"].get("deletionTimestamp")
    # The README's escape: remove the finalizer by hand.
    await cluster.patch(CAMPAIGNS, NS, "stuck", {"metadata": {"finalizers": None}})
    await wait_until_async(lambda: cluster.campaign(NS, "stuck") is None, what="the campaign to go")


async def test_the_hook_refuses_to_release_finalizers_while_the_operator_still_runs(cluster: Cluster) -> None:
    """A pod that will not stop: releasing now would race with an operator that re-adds the finalizer."""
    declare_deployments(cluster)
    await cluster.create(DEPLOYMENTS, deployment(1))  # its status keeps saying one pod: nobody plays the controller
    kube = HookKube.connect(str(cluster.kubeconfig))
    now = [0.0]

    def sleep(seconds: float) -> None:  # a fake clock: the test never waits for the timeout for real
        now[0] += seconds

    with pytest.raises(OperatorStillRunning, match="still has 1 pod"):
        await asyncio.to_thread(
            stop_operator, kube, SYSTEM, "mlds-operator", timeout=30, clock=lambda: now[0], sleep=sleep
        )
    kube.close()
    assert (cluster.get(DEPLOYMENTS, SYSTEM, "mlds-operator") or {})["spec"]["replicas"] == 0
