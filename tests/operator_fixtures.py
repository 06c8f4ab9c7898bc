"""Operator tests' cluster: the kmock Kubernetes emulator on loopback, made a little more like an API server.

Who uses it: tests/operator (kopf in a thread), the e2e tests that run a real operator process
(tests/operator_processes.py) and the chaos driver (tests/chaos.py). Import the helpers
explicitly (``from tests.operator_fixtures import ...``); :func:`cluster` is a fixture for modules that
list this file in ``pytest_plugins``.

kopf and the operator's ``kubernetes`` client talk to the emulator over real HTTP with a kubeconfig
pointing at it (``$KUBECONFIG`` is set for the test). kmock 0.8 stores objects as merged JSON and
serves discovery, lists, watches and CRUD (DESIGN.md §6); :class:`Emulator` adds the few API-server
behaviours these tests and ``kubectl`` rely on, and nothing more:

- on create, the metadata an API server fills in: ``uid``, ``creationTimestamp``, ``generation: 1``;
- a new ``resourceVersion`` on every write, and a JSON patch whose ``test`` of the resourceVersion
  fails is refused with 422: kopf relies on both to tell the echo of its own patch from older events
  (without them it runs handlers again on stale bodies);
- ``metadata.generation`` goes up when a merge patch changes ``spec`` (observedGeneration needs it);
- lists carry ``kind: <Kind>List`` and ``apiVersion`` (kubectl refuses lists without a kind);
- server-side printing: a list or get asked for ``as=Table`` (what ``kubectl get`` asks for) is
  answered with a meta.k8s.io/v1 Table built from the CRD's ``additionalPrinterColumns`` the way the
  API server's CRD table convertor does (JSONPath values; ``date`` columns as ages like ``5m10s``),
  so ``kubectl get tc`` prints the real columns; kubectl does the formatting;
- discovery lists subresources without the short names and categories of their resource (kubectl
  warned that "tc" could also mean ``trainingcampaigns/status``).

Still not emulated (tested elsewhere or not needed): label-selector filtering (the operator filters
Jobs by label itself), defaulting and schema validation (tests/unit/test_crd_validation.py), garbage
collection by owner references (the operator deletes what it made explicitly), and pods: the test
plays the kubelet where it needs workers.

PYTEST_DONT_REWRITE: test modules both list this plugin and import its helpers; pytest would otherwise
warn that it was imported before it could rewrite its asserts.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import itertools
import json
import socket
import threading
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import kmock
import pytest
import pytest_asyncio
from kmock._internal import enums, rendering  # kmock 0.8 keeps these out of its public names
from kmock._internal.references import ResourceInfo
from mlds_contract.campaign import (
    API_GROUP,
    API_VERSION,
    CATEGORIES,
    KIND,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    Accelerator,
    Storage,
)
from mlds_operator.artifacts.crd import PRINTER_COLUMNS
from mlds_operator.controller import pods
from mlds_operator.controller.command import OperatorConfig, run_operator
from mlds_operator.controller.sync import OperatorSettings
from mlds_operator.leases.service import ServiceSettings

from tests.waiting import HANG_GUARD_SECONDS, wait_until_async

__all__ = [
    "CAMPAIGNS",
    "EVENTS",
    "JOBS",
    "RELAXED_LOSS",
    "SECRETS",
    "TEST_IMAGES",
    "Cluster",
    "Emulator",
    "RunningOperator",
    "campaign_manifest",
    "cluster",
    "condition",
    "credentials_secret",
    "free_port",
    "human_duration",
    "running_operator",
]

CAMPAIGNS = f"{API_GROUP}/{API_VERSION}/{PLURAL}"
JOBS = "batch/v1/jobs"
SECRETS = "v1/secrets"
EVENTS = "v1/events"
_VERBS = {"list", "watch", "get", "create", "patch", "update", "delete"}

#: ds1 networks reach this evaluation loss in a few epochs (seconds): campaigns of 20 stay fast.
RELAXED_LOSS = 0.05
TEST_IMAGES = {
    Accelerator.cpu: "registry.test/mlds/worker:t-cpu",
    Accelerator.nvidia: "registry.test/mlds/worker:t-cuda",
    Accelerator.rocm: "registry.test/mlds/worker:t-rocm",
}

T = TypeVar("T")


def human_duration(seconds: float) -> str:
    """Kubernetes' duration.HumanDuration (what ``kubectl`` and the API server print as ages)."""
    s = int(seconds)
    if s < -1:
        return "<invalid>"
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        return f"{minutes}m{s % 60}s" if s % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = s // 3600
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{hours // 24}d{hours % 24}h" if hours % 24 else f"{hours // 24}d"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    return f"{hours // (24 * 365)}y"


def _json_path(obj: Mapping[str, Any], path: str) -> Any:
    value: Any = obj
    for part in path.lstrip(".").split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


class Emulator(kmock.KubernetesEmulator):  # type: ignore[misc]  # kmock ships no type information to mypy here
    """kmock's KubernetesEmulator plus the API-server behaviours listed in the module docstring."""

    #: Printer columns per resource key ("group/version/plural"), as in the CRD.
    printer_columns: dict[str, list[dict[str, Any]]]

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.printer_columns = {}
        self.revision = itertools.count(1000)

    async def _handle(self, request: rendering.Request) -> Any:
        if request.resource is not None and request.action == enums.action.CREATE and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
            meta.setdefault("generation", 1)
            meta["resourceVersion"] = str(next(self.revision))
        elif request.resource is not None and request.action == enums.action.UPDATE and request.name:
            self._new_revision(request)
        return await super()._handle(request)

    def _new_revision(self, request: rendering.Request) -> None:
        """Every write gets a new resourceVersion (kopf tells its own patches' echoes from older events by it)."""
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return  # kmock answers 404
        current = self.objects[key].raw
        revision = str(next(self.revision))
        if isinstance(request.data, dict):
            if "spec" in request.data and not request.subresource:
                self._bump_generation(current, request.data)
            request.data.setdefault("metadata", {})["resourceVersion"] = revision
        elif isinstance(request.data, list):
            # A JSON patch: kopf guards its finalizer edits with a test of the resourceVersion. Answer a
            # failed test as the API server does (422), so kopf retries on a fresh body.
            have = (current.get("metadata") or {}).get("resourceVersion")
            for op in request.data:
                if op.get("op") == "test" and op.get("path") == "/metadata/resourceVersion" and op.get("value") != have:
                    raise kmock.KubernetesError(status=422, reason="Invalid", message="the resourceVersion changed")
            request.data.append({"op": "add", "path": "/metadata/resourceVersion", "value": revision})

    @staticmethod
    def _bump_generation(current: Mapping[str, Any], patch: dict[str, Any]) -> None:
        merged = copy.deepcopy(current.get("spec") or {})
        _merge(merged, patch["spec"])
        if merged != current.get("spec"):
            generation = int((current.get("metadata") or {}).get("generation") or 1) + 1
            patch.setdefault("metadata", {})["generation"] = generation

    def _key(self, request: rendering.Request) -> str:
        r = request.resource
        return f"{r.group}/{r.version}/{r.plural}" if r.group else f"{r.version}/{r.plural}"

    def _kind(self, request: rendering.Request) -> str:
        info = self.resources.get(request.resource)
        return (info.kind if info is not None and info.kind else str(request.resource.plural).capitalize()) or ""

    def _table(self, request: rendering.Request, items: list[dict[str, Any]]) -> dict[str, Any]:
        columns = self.printer_columns[self._key(request)]
        now = datetime.now(UTC)
        rows = []
        for item in items:
            cells: list[Any] = [(item.get("metadata") or {}).get("name")]
            for col in columns:
                value = _json_path(item, col["jsonPath"])
                if col["type"] == "date" and isinstance(value, str):
                    then = datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
                    value = human_duration((now - then).total_seconds())
                cells.append(value)
            rows.append(
                {
                    "cells": cells,
                    "object": {
                        "kind": "PartialObjectMetadata",
                        "apiVersion": "meta.k8s.io/v1",
                        "metadata": item.get("metadata") or {},
                    },
                }
            )
        definitions = [
            {
                "name": "Name",
                "type": "string",
                "format": "name",
                "description": "Name must be unique within a namespace.",
                "priority": 0,
            }
        ] + [
            {
                "name": c["name"],
                "type": c["type"],
                "format": c.get("format", ""),
                "description": c.get("description", ""),
                "priority": c.get("priority", 0),
            }
            for c in columns
        ]
        return {
            "kind": "Table",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": {"resourceVersion": "1"},
            "columnDefinitions": definitions,
            "rows": rows,
        }

    def _wants_table(self, request: rendering.Request) -> bool:
        accept = next((v for k, v in request.headers.items() if k.lower() == "accept"), "")
        return "as=Table" in accept and self._key(request) in self.printer_columns

    async def _serve_list(self, request: rendering.Request) -> Any:
        listing = await super()._serve_list(request)
        if self._wants_table(request):
            return self._table(request, listing["items"])
        r = request.resource
        listing["apiVersion"] = f"{r.group}/{r.version}" if r.group else r.version
        listing["kind"] = f"{self._kind(request)}List"
        listing["metadata"] = {"resourceVersion": "1"}
        return listing

    async def _serve_fetch(self, request: rendering.Request) -> Any:
        obj = await super()._serve_fetch(request)
        if self._wants_table(request):
            return self._table(request, [obj])
        return obj

    async def _serve_version(self, request: rendering.Request) -> Any:
        reply = await super()._serve_version(request)
        for entry in reply.get("resources", []):
            if "/" in entry["name"]:  # a subresource: no short names or categories of its own
                entry["shortNames"] = []
                entry["categories"] = []
                entry["singularName"] = ""
        return reply


def _merge(target: dict[str, Any], patch: Mapping[str, Any]) -> None:
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Cluster:
    """The emulated cluster of one test: the emulator, its HTTP server, and a kubeconfig for it."""

    k8s: Emulator
    server: Any  # kmock.Server
    kubeconfig: Path

    @property
    def url(self) -> str:
        return str(self.server.url).rstrip("/")

    # -------------------------------------------------------------------------------- API requests

    @staticmethod
    def _path(resource: str, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
        group_version, plural = resource.rsplit("/", 1)
        base = f"/apis/{group_version}" if "/" in group_version else f"/api/{group_version}"
        path = f"{base}/namespaces/{namespace}/{plural}"
        if name:
            path += f"/{name}"
        if subresource:
            path += f"/{subresource}"
        return path

    async def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        async with self.server.client.request(method, path, **kwargs) as resp:
            body = await resp.json(content_type=None)
            if resp.status >= 400:
                raise AssertionError(f"{method} {path} -> HTTP {resp.status}: {body}")
            return body if isinstance(body, dict) else {}

    async def create(self, resource: str, manifest: Mapping[str, Any]) -> dict[str, Any]:
        namespace = manifest["metadata"].get("namespace") or "default"
        return await self._request("POST", self._path(resource, namespace), json=dict(manifest))

    async def patch(self, resource: str, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        return await self._request(
            "PATCH",
            self._path(resource, namespace, name),
            json=dict(patch),
            headers={"Content-Type": "application/merge-patch+json"},
        )

    async def patch_status(self, resource: str, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        await self._request(
            "PATCH",
            self._path(resource, namespace, name, "status"),
            json={"status": dict(status)},
            headers={"Content-Type": "application/merge-patch+json"},
        )

    async def delete(self, resource: str, namespace: str, name: str) -> None:
        await self._request("DELETE", self._path(resource, namespace, name))

    # ------------------------------------------------------------------------------------- reading

    def get(self, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        key = (kmock.resource(resource), namespace, name)  # membership is a hash lookup: no string keys
        if key not in self.k8s.objects:
            return None
        obj = self.k8s.objects[key]
        if obj.deleted:
            return None
        result: dict[str, Any] = json.loads(json.dumps(obj.raw, default=dict))
        return result

    def all(self, resource: str, namespace: str | None = None) -> list[dict[str, Any]]:
        out = []
        for (res, ns, name), obj in list(self.k8s.objects.items()):
            if res == kmock.resource(resource) and (namespace is None or ns == namespace) and not obj.deleted:
                got = self.get(resource, ns, name)
                if got is not None:
                    out.append(got)
        return out

    def campaign(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.get(CAMPAIGNS, namespace, name)

    def status(self, namespace: str, name: str) -> dict[str, Any]:
        return (self.campaign(namespace, name) or {}).get("status") or {}

    def jobs(self, namespace: str, campaign: str | None = None) -> dict[str, dict[str, Any]]:
        """Jobs by pool (or by name for Jobs without a pool label)."""
        out = {}
        for job in self.all(JOBS, namespace):
            labels = job["metadata"].get("labels") or {}
            if campaign is not None and labels.get(pods.LABEL_CAMPAIGN) != pods.campaign_label(campaign):
                continue
            out[labels.get(pods.LABEL_POOL) or job["metadata"]["name"]] = job
        return out

    def events(self, namespace: str, name: str) -> list[dict[str, Any]]:
        return [e for e in self.all(EVENTS, namespace) if e["involvedObject"]["name"] == name]


def condition(status: Mapping[str, Any], type_: str) -> dict[str, Any]:
    """The condition of that type in a status (an empty dict when absent)."""
    for cond in status.get("conditions") or ():
        if cond.get("type") == type_:
            return dict(cond)
    return {}


def credentials_secret(namespace: str, name: str, access_key: str, secret_key: str) -> dict[str, Any]:
    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "data": {"accessKey": b64(access_key), "secretKey": b64(secret_key)},
    }


def campaign_manifest(
    name: str,
    namespace: str,
    *,
    storage: Storage | None,
    credentials_secret: str | None = "s3-credentials",
    pools: list[dict[str, Any]] | None = None,
    machines: list[str] | None = None,
    networks_per_target: int = 10,
    lease_seconds: int = 10,
    max_attempts: int = 3,
    suspend: bool = False,
    **spec: Any,
) -> dict[str, Any]:
    """A ds1 TrainingCampaign whose networks converge in a few epochs (``RELAXED_LOSS``)."""
    body: dict[str, Any] = {
        "workload": {"dataset": "ds1", "machines": machines or ["SingleDirectMachine", "SingleInvertMachine"]},
        "networksPerTarget": networks_per_target,
        "seed": 1,
        "training": {"targetLoss": RELAXED_LOSS},
        "pools": pools or [{"name": "cpu", "accelerator": "cpu", "replicas": 2, "unitsPerLease": 1}],
        "leases": {"durationSeconds": lease_seconds, "maxAttempts": max_attempts},
        "suspend": suspend,
    }
    if storage is not None:
        wire = storage.wire()
        if credentials_secret:
            wire["credentialsSecret"] = credentials_secret
        body["storage"] = wire
    body.update(spec)
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": body,
    }


def _declare(k8s: Emulator) -> None:
    k8s.resources[CAMPAIGNS] = ResourceInfo(
        kind=KIND,
        singular=SINGULAR,
        namespaced=True,
        verbs=_VERBS,
        subresources={"status"},
        shortnames=set(SHORT_NAMES),
        categories=set(CATEGORIES),
    )
    k8s.resources[JOBS] = ResourceInfo(
        kind="Job", singular="job", namespaced=True, verbs=_VERBS, subresources={"status"}
    )
    k8s.resources[SECRETS] = ResourceInfo(kind="Secret", singular="secret", namespaced=True, verbs=_VERBS)
    k8s.resources[EVENTS] = ResourceInfo(kind="Event", singular="event", namespaced=True, verbs=_VERBS)
    # Declared without verbs: kopf then skips observing namespaces (kmock 0.8 cannot list them).
    k8s.resources["v1/namespaces"] = ResourceInfo(kind="Namespace", namespaced=False)
    k8s.printer_columns[CAMPAIGNS] = [dict(c) for c in PRINTER_COLUMNS]


@contextlib.asynccontextmanager
async def emulated_cluster(folder: Path) -> AsyncIterator[Cluster]:
    """An emulator on a loopback port and a kubeconfig for it in ``folder``."""
    async with Emulator() as k8s, kmock.Server(k8s) as server:
        _declare(k8s)
        url = str(server.url).rstrip("/")
        kubeconfig = folder / "kubeconfig"
        kubeconfig.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "kmock", "cluster": {"server": url}}],
                    "users": [{"name": "test", "user": {"token": "test-token"}}],
                    "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "test"}}],
                    "current-context": "kmock",
                }
            )
        )
        yield Cluster(k8s=k8s, server=server, kubeconfig=kubeconfig)


@pytest_asyncio.fixture
async def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cluster]:
    """A fresh emulated cluster; ``$KUBECONFIG`` points at it for the test (kopf, the client, kubectl)."""
    async with emulated_cluster(tmp_path) as c:
        monkeypatch.setenv("KUBECONFIG", str(c.kubeconfig))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        yield c


@dataclass
class RunningOperator:
    """An operator running in a thread of the test process (see :func:`running_operator`)."""

    config: OperatorConfig
    thread: threading.Thread
    stop: threading.Event

    @property
    def lease_base_url(self) -> str:
        return self.config.settings.workers.lease_base_url


def operator_config(
    cluster: Cluster,
    *,
    port: int | None = None,
    status_interval: float = 0.3,
    checkpoint_seconds: float = 1.0,
) -> OperatorConfig:
    """Settings for a test operator: loopback lease API, fast status passes and checkpoints, test images."""
    port = port or free_port()
    return OperatorConfig(
        settings=OperatorSettings(
            workers=pods.WorkerSettings(lease_base_url=f"http://127.0.0.1:{port}", images=dict(TEST_IMAGES)),
            service=ServiceSettings(checkpoint_seconds=checkpoint_seconds, idle_retry_seconds=1.0),
            instance="test-operator",
        ),
        listen_host="127.0.0.1",
        listen_port=port,
        metrics_host="127.0.0.1",
        metrics_port=0,  # a free port: /metrics is never on the lease port
        status_interval=status_interval,
        liveness=None,
        kubeconfig=str(cluster.kubeconfig),
    )


@contextlib.asynccontextmanager
async def running_operator(config: OperatorConfig) -> AsyncIterator[RunningOperator]:
    """``run_operator`` in its own thread and event loop: ready (kopf watching) on entry, stopped on exit.

    Its own loop, because kopf ends by cancelling every task of its loop that it did not find at
    startup, which in the test's loop would include the emulator's request handlers.
    """
    stop = threading.Event()
    ready = threading.Event()
    failure: list[BaseException] = []

    def main() -> None:
        try:
            asyncio.run(run_operator(config, stop_flag=stop, ready_flag=ready))
        except BaseException as exc:  # reported to the test below
            failure.append(exc)

    thread = threading.Thread(target=main, name="operator", daemon=True)
    thread.start()
    try:
        await wait_until_async(
            lambda: ready.is_set() or not thread.is_alive(), what="the operator to start watching", interval=0.05
        )
    finally:
        if not ready.is_set():
            stop.set()
            await asyncio.to_thread(thread.join, HANG_GUARD_SECONDS)  # a safety net, not a verdict
    if not ready.is_set():
        if failure:
            raise failure[0]
        pytest.fail("the operator ended before it was ready")
    try:
        yield RunningOperator(config=config, thread=thread, stop=stop)
    finally:
        stop.set()
        await wait_until_async(lambda: not thread.is_alive(), what="the operator to stop", interval=0.05)
        if failure:
            raise failure[0]
