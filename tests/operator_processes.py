"""A real ``mlds operator`` process, and a kubelet that runs its Jobs' pods as local processes.

Who uses it: tests/e2e/test_operator_campaign.py (a whole campaign, a worker and the operator killed),
tests/e2e/test_observability.py, tests/e2e/test_attacks_operator.py (issue 13's attacks on the
operator's lease port) and the chaos driver (tests/chaos.py, ``python bench/chaos.py operator``).

:func:`operator_process` is ``mlds operator`` pointed at the kmock emulator (tests/operator_fixtures.py)
through a kubeconfig, advertising its lease API on loopback. :class:`Kubelet` plays the Job controller
and the kubelet: for every Job the operator creates it starts ``parallelism`` processes of the Job's own
command with the pod's environment (``POD_NAME`` from the downward API, the token file from the Secret
the Job mounts, the pod's emptyDir as HOME), stops them on suspension or deletion, replaces crashed
ones, and writes the Job's status back. Workers get no storage credentials (AWS_* is removed from their
environment): they upload through the presigned URLs of their grants.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import secrets
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tests.operator_fixtures import JOBS, SECRETS, Cluster, free_port
from tests.waiting import cpu_seconds, file_sizes

__all__ = ["NAMESPACE", "JobRun", "Kubelet", "OperatorProcess", "Pod", "operator_process"]

#: The namespace of the e2e campaigns (the Kubelet's default).
NAMESPACE = "research"


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

    def __init__(self, cluster: Cluster, folder: Path, namespace: str = NAMESPACE) -> None:
        self.cluster = cluster
        self.folder = folder
        self.namespace = namespace
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
        jobs = {j["metadata"]["name"]: j for j in self.cluster.all(JOBS, self.namespace)}
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
                await self.cluster.patch_status(JOBS, self.namespace, name, status)

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
                secret = self.cluster.get(SECRETS, self.namespace, volume["secret"]["secretName"])
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
