"""A whole campaign through `mlds operator`, with the test playing the kubelet.

The operator is a real ``mlds operator`` process, pointed at the kmock emulator (kubeconfig) and told
to advertise its lease API on loopback; the test plays the Job controller and the kubelet
(:class:`~tests.operator_processes.Kubelet`: the Jobs' pods as local processes). Workers train on CPU
and store to a real S3 protocol server (moto) through the presigned URLs of their grants.

The story (issue 4's must-shows): 20 ds1 networks in two pools; mid-campaign a worker is killed with
SIGKILL and the operator is killed with SIGKILL and started again; the campaign still ends Succeeded
with DONE 20/20, 20 results and a manifest of 20 distinct rows in the bucket; ``kubectl get tc`` and
``kubectl describe tc`` show it (their output is saved to docs/kubectl-example.txt when
MLDS_WRITE_KUBECTL_EXAMPLE=1); deleting the campaign removes its Jobs and Secret and keeps the results.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from pathlib import Path

import aiohttp
import pytest
from mlds_contract.lease import LeaseRequest, NoLease, NoLeaseReason
from mlds_operator.controller import pods
from mlds_operator.storage.manifest import read_manifest

from tests.operator_fixtures import (
    CAMPAIGNS,
    SECRETS,
    Cluster,
    campaign_manifest,
    condition,
    credentials_secret,
    free_port,
)
from tests.operator_processes import NAMESPACE, Kubelet, operator_process
from tests.s3_fixtures import S3Server
from tests.waiting import wait_until_async

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
pytest_plugins = ["tests.s3_fixtures", "tests.operator_fixtures"]

NS = NAMESPACE
NAME = "ds1-two-pools"
ROOT = Path(__file__).resolve().parents[2]
KUBECTL_EXAMPLE = ROOT / "docs" / "kubectl-example.txt"


# ------------------------------------------------------------------------------------ kubectl


async def kubectl(cluster: Cluster, *args: str) -> str:
    binary = shutil.which("kubectl")
    if binary is None:
        pytest.skip("kubectl is not installed")
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    proc = await asyncio.create_subprocess_exec(
        binary, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, f"kubectl {' '.join(args)}: {err.decode()}"
    return out.decode()


# ------------------------------------------------------------------------------------ the test


async def test_a_campaign_survives_a_killed_worker_and_a_restarted_operator_and_ends_20_of_20(
    cluster: Cluster, s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    await cluster.create(SECRETS, credentials_secret(NS, "s3-credentials", s3_server.access_key, s3_server.secret_key))
    port = free_port()
    operator = operator_process(cluster, tmp_path, port)
    kubelet = Kubelet(cluster, tmp_path)
    manifest = campaign_manifest(
        NAME,
        NS,
        storage=s3_server.storage(s3_bucket, NAME),
        pools=[
            {"name": "small", "accelerator": "cpu", "replicas": 2, "unitsPerLease": 1},
            {"name": "large", "accelerator": "cpu", "replicas": 1, "unitsPerLease": 2},
        ],
        lease_seconds=10,
    )
    transcript: list[str] = []
    operator.start()
    kubelet.start()
    try:
        await cluster.create(CAMPAIGNS, manifest)
        jobs = await wait_until_async(
            lambda: len(cluster.jobs(NS, NAME)) == 2 and cluster.jobs(NS, NAME), what="two Jobs"
        )
        for job in jobs.values():
            (c,) = job["spec"]["template"]["spec"]["containers"]
            assert c["image"] == "registry.test/mlds/worker:e2e-cpu"
            assert c["resources"]["limits"] == {"cpu": "1", "memory": "1Gi"}

        def progress() -> object:
            return cluster.status(NS, NAME).get("units"), kubelet.progress()

        await wait_until_async(
            lambda: cluster.status(NS, NAME).get("units", {}).get("succeeded", 0) >= 4,
            what="the first networks",
            progress=progress,
        )
        transcript.append("$ kubectl get tc -n research -o wide    # while it runs\n")
        transcript.append(await kubectl(cluster, "get", "tc", "-n", NS, "-o", "wide"))

        victim = kubelet.alive()[0]
        victim.proc.send_signal(signal.SIGKILL)  # its lease expires; another worker trains its units
        operator.kill()
        await asyncio.sleep(1.0)  # workers find the lease API gone and back off
        operator.start()

        done = await wait_until_async(
            lambda: cluster.status(NS, NAME).get("phase") in ("Succeeded", "Failed") and cluster.status(NS, NAME),
            what="the campaign to finish",
            progress=progress,
        )
        assert done["phase"] == "Succeeded", done
        assert done["progress"] == "20/20"
        assert done["units"]["succeeded"] == 20
        assert done["units"]["failed"] == 0
        assert done["manifest"] == f"s3://{s3_bucket}/{NAME}/manifest.parquet"
        assert condition(done, "Complete")["status"] == "True"
        assert [p["name"] for p in done["pools"]] == ["small", "large"]
        assert 0 < sum(p["succeeded"] for p in done["pools"]) <= 20, done["pools"]

        store = s3_server.open(s3_bucket, NAME)
        try:
            rows = read_manifest(store).to_pylist()
            results = [
                k for k in store.list("") if k.endswith("/meta.json") and not k.startswith(("_mlds/", "unconverged/"))
            ]
        finally:
            store.close()
        keys = [r["key"] for r in rows]
        assert len(rows) == 20, keys
        assert len(set(keys)) == 20, "no network twice in the manifest"
        assert sorted({r["unit"] for r in rows}) == list(range(20))
        assert len(results) == 20

        # The workers exit on their own once the campaign is drained (exit 0 completes their Jobs).
        await wait_until_async(lambda: not kubelet.alive(), what="the workers to exit", progress=kubelet.progress)
        exits = sorted(c for run in kubelet.runs.values() for c in run.exit_codes)
        assert exits.count(-signal.SIGKILL) == 1, exits
        assert all(c == 0 for c in exits if c != -signal.SIGKILL), exits

        # Restarted after the end, the operator does not reopen the campaign (its status is final), but a
        # worker still asking for work (one idling on Retry-After as it ended) hears "finished" and exits 0,
        # not 401 (exit 3, a failed pod and a Job that retries it for nothing).
        operator.kill()
        logged = len(operator.log())
        operator.start()
        token = pods.token_from_secret(cluster.get(SECRETS, NS, pods.secret_name(NAME)))
        assert token
        url = pods.lease_url(f"http://127.0.0.1:{port}", NS, NAME) + "/leases"
        ask = LeaseRequest(worker="late-worker", pool="small", accelerator="cpu", device_name="cpu", max_units=1)

        async def answer() -> tuple[int, object] | None:
            try:
                async with (
                    aiohttp.ClientSession() as session,
                    session.post(
                        url, data=ask.model_dump_json(by_alias=True), headers={"Authorization": f"Bearer {token}"}
                    ) as resp,
                ):
                    got = (resp.status, await resp.json(content_type=None))
            except aiohttp.ClientConnectionError:
                return None  # not listening yet
            return got if got[0] == 200 else None  # 401 until its first pass over the campaign

        _, body = await wait_until_async(
            answer, what="the restarted operator to answer the lease API", progress=lambda: len(operator.log())
        )
        assert NoLease.model_validate(body).reason is NoLeaseReason.finished
        assert cluster.status(NS, NAME)["phase"] == "Succeeded"
        assert "lease service open" not in operator.log()[logged:], "a finished campaign is not reopened"

        transcript.append("\n$ kubectl get tc -n research -o wide    # finished\n")
        transcript.append(await kubectl(cluster, "get", "tc", "-n", NS, "-o", "wide"))
        transcript.append(f"\n$ kubectl describe tc -n research {NAME}\n")
        described = await kubectl(cluster, "describe", "tc", "-n", NS, NAME)
        transcript.append(described)
        listing = transcript[-3]
        header = listing.splitlines()[0].split()
        assert header == ["NAME", "PHASE", "DONE", "FAILED", "RATE", "ETA", "AGE"], listing
        assert listing.splitlines()[1].split()[:4] == [NAME, "Succeeded", "20/20", "0"], listing
        for text in ("Conditions:", "AllUnitsSucceeded", "Events:", "manifest.parquet"):
            assert text in described, described
        if os.environ.get("MLDS_WRITE_KUBECTL_EXAMPLE") == "1":
            KUBECTL_EXAMPLE.write_text(
                "# Real output of kubectl v1.32 against the test cluster of tests/e2e/test_operator_campaign.py\n"
                "# (regenerate: MLDS_WRITE_KUBECTL_EXAMPLE=1 pytest tests/e2e/test_operator_campaign.py)\n\n"
                + "".join(transcript)
            )

        await cluster.delete(CAMPAIGNS, NS, NAME)
        await wait_until_async(lambda: cluster.campaign(NS, NAME) is None, what="the campaign to go")
        assert cluster.jobs(NS, NAME) == {}
        assert cluster.get(SECRETS, NS, pods.secret_name(NAME)) is None
        store = s3_server.open(s3_bucket, NAME)
        try:
            assert store.stat("manifest.parquet") is not None, "the results stay"
        finally:
            store.close()
    except BaseException:
        print("---- operator log ----\n" + operator.log()[-20000:])
        raise
    finally:
        await kubelet.close()
        operator.stop()
