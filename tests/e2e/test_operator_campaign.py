"""A whole campaign through `mlds operator`, with the test playing the kubelet.

The operator is a real ``mlds operator`` process, pointed at the kmock emulator (kubeconfig) and told
to advertise its lease API on loopback. The test plays the Job controller and the kubelet
(:class:`Kubelet`): for every Job the operator creates it starts ``parallelism`` processes of the Job's
own command with the pod's environment (``POD_NAME`` from the downward API, the token file from the
Secret the Job mounts, the pod's emptyDir as HOME), stops them on suspension or deletion, replaces
crashed ones, and writes the Job's status back. Workers train on CPU and store to a real S3 protocol
server (moto); they get no storage credentials (the test removes AWS_* from their environment).

The story (issue 4's must-shows): 20 ds1 networks in two pools; mid-campaign a worker is killed with
SIGKILL and the operator is killed with SIGKILL and started again; the campaign still ends Succeeded
with DONE 20/20, 20 results and a manifest of 20 distinct rows in the bucket; ``kubectl get tc`` and
``kubectl describe tc`` show it (their output is saved to docs/kubectl-example.txt when
MLDS_WRITE_KUBECTL_EXAMPLE=1); deleting the campaign removes its Jobs and Secret and keeps the results.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest
from mlds_operator.controller import pods
from mlds_operator.storage.manifest import read_manifest

from tests.operator_fixtures import (
    CAMPAIGNS,
    JOBS,
    SECRETS,
    Cluster,
    campaign_manifest,
    condition,
    credentials_secret,
    free_port,
)
from tests.s3_fixtures import S3Server
from tests.waiting import cpu_seconds, file_sizes, wait_until_async

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
pytest_plugins = ["tests.s3_fixtures", "tests.operator_fixtures"]

NS = "research"
NAME = "ds1-two-pools"
ROOT = Path(__file__).resolve().parents[2]
KUBECTL_EXAMPLE = ROOT / "docs" / "kubectl-example.txt"


# ---------------------------------------------------------------------------------- the operator


@dataclass
class OperatorProcess:
    """`mlds operator` as a child process, its log in a file."""

    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    def start(self) -> None:
        if self._log is None:
            self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        """SIGKILL: no cleanup handler, no final checkpoint, as when a node dies."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def operator_process(cluster: Cluster, folder: Path, port: int, metrics_port: int | None = None) -> OperatorProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLDS_")}
    env.update(KUBECONFIG=str(cluster.kubeconfig), PYTHONUNBUFFERED="1")
    argv = [
        *(sys.executable, "-m", "mlds_cli", "operator", "--all-namespaces"),
        *("--listen", f"127.0.0.1:{port}", "--lease-url", f"http://127.0.0.1:{port}"),
        *("--metrics-listen", f"127.0.0.1:{metrics_port or free_port()}"),
        *("--status-interval", "0.5", "--checkpoint-seconds", "1", "--liveness", ""),
        *("--worker-image-cpu", "registry.test/mlds/worker:e2e-cpu"),
    ]
    return OperatorProcess(argv=argv, env=env, log_path=folder / "operator.log")


# ----------------------------------------------------------------------------------- the kubelet


@dataclass
class Pod:
    name: str
    proc: subprocess.Popen[bytes]
    log: IO[bytes]
    stopping: bool = False


@dataclass
class JobRun:
    """What the Job controller knows of one Job: its pods, their exits, whether it completed."""

    uid: str
    pods: list[Pod] = field(default_factory=list)
    succeeded: int = 0
    failed: int = 0
    exit_codes: list[int] = field(default_factory=list)


class Kubelet:
    """Runs the pods of the operator's Jobs as local processes (see the module docstring)."""

    def __init__(self, cluster: Cluster, folder: Path) -> None:
        self.cluster = cluster
        self.folder = folder
        self.runs: dict[str, JobRun] = {}
        self.every_pod: list[Pod] = []  # including those of deleted Jobs
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
        for pod in self.every_pod:
            self._terminate(pod)
        for pod in self.every_pod:
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(pod.proc.wait, 20)
            if pod.proc.poll() is None:
                pod.proc.kill()
                pod.proc.wait()
            pod.log.close()

    def progress(self) -> dict[str, object]:
        """What the pods have done so far (a wait's progress signal): started, ended, bytes of log, CPU used.

        CPU seconds count because a worker training a network writes nothing until it is trained, which
        on a busy machine can take minutes.
        """
        running = [p.proc.pid for p in self.every_pod if p.proc.poll() is None]
        logs = file_sizes([Path(p.log.name) for p in self.every_pod])
        return {
            "pods": len(self.every_pod),
            "ended": len(self.every_pod) - len(running),
            "log bytes": sum(logs.values()),
            "cpu s": cpu_seconds(running),
        }

    def alive(self) -> list[Pod]:
        return [p for run in self.runs.values() for p in run.pods if p.proc.poll() is None]

    async def _loop(self) -> None:
        while not self._stop.is_set():
            await self._sync()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=0.2)

    async def _sync(self) -> None:
        jobs = {j["metadata"]["name"]: j for j in self.cluster.all(JOBS, NS)}
        for name, run in list(self.runs.items()):
            job = jobs.get(name)
            if job is None or job["metadata"]["uid"] != run.uid:
                for pod in run.pods:  # the Job was deleted: its pods go with it
                    self._terminate(pod)
                if all(p.proc.poll() is not None for p in run.pods):
                    del self.runs[name]
        for name, job in jobs.items():
            run = self.runs.setdefault(name, JobRun(uid=job["metadata"]["uid"]))
            if run.uid != job["metadata"]["uid"]:
                continue  # the old Job's pods are still stopping
            await self._sync_job(name, job, run)

    async def _sync_job(self, name: str, job: dict[str, Any], run: JobRun) -> None:
        spec = job["spec"]
        finished = [p for p in run.pods if p.proc.poll() is not None]
        run.exit_codes = [p.proc.returncode for p in finished]
        run.succeeded = sum(1 for c in run.exit_codes if c == 0)
        run.failed = sum(1 for c in run.exit_codes if c != 0)
        failure = _job_failure(spec, run)
        active = [p for p in run.pods if p.proc.poll() is None]
        want = 0 if spec.get("suspend") else int(spec.get("parallelism") or 0)
        if failure is not None:
            for pod in active:
                self._terminate(pod)
        # The Job controller's rule with completions unset: once a pod succeeded, no new pods start.
        elif run.succeeded == 0:
            for pod in active[want:]:
                self._terminate(pod)
            for _ in range(want - len(active)):
                run.pods.append(await self._start_pod(name, job))
        elif spec.get("suspend"):
            for pod in active:
                self._terminate(pod)
        active = [p for p in run.pods if p.proc.poll() is None]
        status: dict[str, Any] = {"active": len(active), "succeeded": run.succeeded, "failed": run.failed}
        if failure is not None:
            status["conditions"] = [{"type": "Failed", "status": "True", "reason": failure[0], "message": failure[1]}]
        elif run.succeeded and not active:
            status["conditions"] = [{"type": "Complete", "status": "True", "reason": "CompletionsReached"}]
        if (job.get("status") or {}) != status:
            with contextlib.suppress(AssertionError):  # the Job may be gone meanwhile
                await self.cluster.patch_status(JOBS, NS, name, status)

    async def _start_pod(self, job_name: str, job: dict[str, Any]) -> Pod:
        pod_name = f"{job_name}-{secrets.token_hex(3)}"
        template = job["spec"]["template"]["spec"]
        (container,) = template["containers"]
        root = self.folder / "pods" / pod_name
        mounts: dict[str, Path] = {}
        volumes = {v["name"]: v for v in template.get("volumes") or ()}
        for mount in container.get("volumeMounts") or ():
            local = root / mount["name"]
            local.mkdir(parents=True, exist_ok=True)
            volume = volumes[mount["name"]]
            if "secret" in volume:
                secret = self.cluster.get(SECRETS, NS, volume["secret"]["secretName"])
                assert secret is not None, f"{job_name} mounts a Secret that does not exist"
                for item in volume["secret"]["items"]:
                    (local / item["path"]).write_bytes(base64.b64decode(secret["data"][item["key"]]))
            mounts[mount["mountPath"]] = local
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("AWS_", "MLDS_", "KUBE")) and k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
        }
        for var in container.get("env") or ():
            if "value" in var:
                value = str(var["value"])
                for path in sorted(mounts, key=len, reverse=True):  # the pod's paths -> this machine's
                    if value == path or value.startswith(path + "/"):
                        value = str(mounts[path]) + value[len(path) :]
                        break
                env[var["name"]] = value
            elif var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name":
                env[var["name"]] = pod_name
        command = list(container["command"])
        assert command[0] == "mlds", command
        argv = [sys.executable, "-m", "mlds_cli", *command[1:]]
        log = (self.folder / f"{pod_name}.log").open("wb")
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        pod = Pod(name=pod_name, proc=proc, log=log)
        self.every_pod.append(pod)
        return pod

    @staticmethod
    def _terminate(pod: Pod) -> None:
        if pod.proc.poll() is None and not pod.stopping:
            pod.stopping = True
            pod.proc.send_signal(signal.SIGTERM)


def _job_failure(spec: dict[str, Any], run: JobRun) -> tuple[str, str] | None:
    """The Job controller's verdict: a FailJob exit code, or more failed pods than backoffLimit."""
    for rule in (spec.get("podFailurePolicy") or {}).get("rules") or ():
        codes = (rule.get("onExitCodes") or {}).get("values") or []
        if rule.get("action") == "FailJob" and any(c in codes for c in run.exit_codes):
            return "PodFailurePolicy", f"a worker exited with one of {codes}"
    if run.failed > int(spec.get("backoffLimit", 6)):
        return "BackoffLimitExceeded", "Job has reached the specified backoff limit"
    return None


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
