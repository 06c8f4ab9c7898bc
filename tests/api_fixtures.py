"""Builders for lease-API tests: a campaign service over a LocalStore, served by aiohttp on loopback.

Who uses it: tests/unit/test_api.py (protocol stories and error answers) and tests/e2e/test_api_fuzz.py
(schema-driven fuzzing). pytest-aiohttp is not a dependency, so :func:`open_api` starts the app with
aiohttp's own :class:`~aiohttp.test_utils.TestServer` (a real server on 127.0.0.1, random port) and
talks to it through :class:`~aiohttp.test_utils.TestClient`; :func:`serve_in_thread` serves it from a
background thread for synchronous clients such as schemathesis.

Time is a :class:`tests.clock.FakeClock`: the lease book reads it as its monotonic clock, and the service's wall
clock and the store's URL-expiry clock read ``WALL_EPOCH + clock()``, so one ``clock.advance(s)`` moves
deadlines, lease expiry and presigned-URL expiry together and no test sleeps.

Typical use::

    async with open_api(tmp_path, networks=8) as api:
        grant = await api.lease("w-1", max_units=2)
        files = result_files(grant.units[0].spec)
        await api.upload(grant.units[0], files)
        status, body = await api.post(api.complete_path(0), api.completion(grant.units[0], files, worker="w-1"))
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import io
import json
import math
import threading
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from mlds_contract.campaign import CampaignSpec, LeaseSettings, Pool, Workload
from mlds_contract.lease import (
    CompleteRequest,
    FileDigest,
    LeasedUnit,
    LeaseGrant,
    LeaseRequest,
    NoLease,
)
from mlds_contract.plan import UnitSpec
from mlds_contract.results import SNAPSHOTS_FILE, model_tensors, result_files_for
from mlds_operator.leases.http import RequestObserver, create_app
from mlds_operator.leases.registry import Campaigns
from mlds_operator.leases.service import CampaignService, ServiceSettings
from mlds_operator.storage.store import LocalStore
from pydantic import BaseModel, TypeAdapter

from tests.clock import WALL_EPOCH, FakeClock
from tests.waiting import HANG_GUARD_SECONDS

__all__ = [
    "NAME",
    "NAMESPACE",
    "POOL",
    "TOKEN",
    "WALL_EPOCH",
    "ApiHarness",
    "FakeClock",
    "ThreadedApi",
    "a_campaign",
    "digests",
    "open_api",
    "result_files",
    "safetensors_bytes",
    "serve_in_thread",
]

NAMESPACE = "research"
NAME = "parity"
POOL = "cpu"
TOKEN = "campaign-token-0123456789abcdef"  # a test value, never a real credential

_GRANT_OR_NONE: TypeAdapter[LeaseGrant | NoLease] = TypeAdapter(LeaseGrant | NoLease)


def a_campaign(
    *, networks: int = 8, lease_seconds: int = 600, max_attempts: int = 3, suspend: bool = False, dataset: str = "ds1"
) -> CampaignSpec:
    """One ParityMachine target (ds1), ``networks`` units, one pool named ``cpu``."""
    machines = ["ParityMachine"] if dataset in ("ds1", "ds2") else None
    return CampaignSpec(
        workload=Workload(dataset=dataset, machines=machines),
        networks_per_target=networks,
        pools=[Pool(name=POOL, units_per_lease=4)],
        leases=LeaseSettings(duration_seconds=lease_seconds, max_attempts=max_attempts),
        suspend=suspend,
    )


def safetensors_bytes(tensors: Mapping[str, tuple[int, ...]], *, fill: int = 0) -> bytes:
    """A float32 safetensors file with these tensors (every byte ``fill``), as safetensors writes it."""
    header: dict[str, Any] = {}
    offset = 0
    for name, shape in tensors.items():
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head + bytes([fill % 256]) * offset


def result_files(
    spec: UnitSpec, *, converged: bool = True, pool: str = POOL, epochs: int = 1, **meta_fields: Any
) -> dict[str, bytes]:
    """Plausible result files of one unit (what a worker uploads), meta.json agreeing with the model.

    The model is a real safetensors file of the unit's architecture (zeros but for a byte that differs per
    unit and attempt); ``meta_fields`` override or add meta.json fields (a hostile worker's).
    """
    model = safetensors_bytes(model_tensors(spec), fill=spec.unit * 7 + spec.attempt)
    files: dict[str, bytes] = {
        "model.safetensors": model,
        "history.csv": b"epoch,train_loss,eval_loss,seconds\n0,0.25,0.25,0.1\n",
    }
    if SNAPSHOTS_FILE in result_files_for(spec.dataset):
        parameters = sum(math.prod(s) for s in model_tensors(spec).values())
        files[SNAPSHOTS_FILE] = safetensors_bytes({"snapshots": (epochs, parameters)})
    meta: dict[str, Any] = {
        "dataset": spec.dataset.value,
        "target": spec.target,
        "unit": spec.unit,
        "replica": spec.replica,
        "attempt": spec.attempt,
        "converged": converged,
        "sha256": hashlib.sha256(model).hexdigest(),
        "pool": pool,
        "epochs": epochs,
        "train_loss": 0.25,
        "eval_loss": 0.25,
        "seconds": 0.1,
        "device_type": "cpu",
        "device_name": "cpu",
        "started": "2026-01-01T00:00:00.000Z",
        "ended": "2026-01-01T00:00:00.100Z",
    }
    meta.update(meta_fields)
    files["meta.json"] = json.dumps(meta).encode()
    return files


def digests(files: Mapping[str, bytes]) -> dict[str, FileDigest]:
    return {name: FileDigest(sha256=hashlib.sha256(data).hexdigest(), size=len(data)) for name, data in files.items()}


@dataclass
class ApiHarness:
    """A served campaign and the means to talk to it (see the module docstring)."""

    client: TestClient[Any, Any]
    service: CampaignService
    store: LocalStore
    campaigns: Campaigns
    clock: FakeClock
    spec: CampaignSpec
    settings: ServiceSettings
    token: str = TOKEN

    @property
    def base(self) -> str:
        return f"/v1/campaigns/{NAMESPACE}/{NAME}"

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def complete_path(self, unit: int | str) -> str:
        return f"{self.base}/units/{unit}/complete"

    def fail_path(self, unit: int | str) -> str:
        return f"{self.base}/units/{unit}/fail"

    def heartbeat_path(self, lease_id: str) -> str:
        return f"{self.base}/leases/{lease_id}/heartbeat"

    def release_path(self, lease_id: str) -> str:
        return f"{self.base}/leases/{lease_id}/release"

    async def request(
        self,
        method: str,
        path: str,
        body: BaseModel | Mapping[str, Any] | bytes | None = None,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, dict[str, str], Any]:
        """Send one request (authorised unless ``headers`` are given); returns status, headers, parsed JSON body."""
        if isinstance(body, BaseModel):
            data: bytes | None = body.model_dump_json(by_alias=True).encode()
        elif isinstance(body, Mapping):
            data = json.dumps(body).encode()
        else:
            data = body
        sent = dict(self.auth if headers is None else headers)
        if data is not None:
            sent.setdefault("Content-Type", "application/json")
        # BytesIO: aiohttp warns (a ResourceWarning, an error here) about sending large raw bytes.
        payload = io.BytesIO(data) if data is not None else None
        async with self.client.request(method, path, data=payload, headers=sent) as resp:
            raw = await resp.read()
            parsed = json.loads(raw) if raw and resp.content_type.endswith("json") else raw
            return resp.status, dict(resp.headers), parsed

    async def post(
        self, path: str, body: BaseModel | Mapping[str, Any] | bytes | None, *, headers: Mapping[str, str] | None = None
    ) -> tuple[int, Any]:
        status, _, parsed = await self.request("POST", path, body, headers=headers)
        return status, parsed

    async def lease(
        self, worker: str = "w-1", *, max_units: int = 1, speculative: bool = False, bundles: bool = False
    ) -> LeaseGrant | NoLease:
        body = LeaseRequest(
            worker=worker,
            pool=POOL,
            accelerator="cpu",
            device_name="cpu",
            max_units=max_units,
            allow_speculative=speculative,
            bundle_uploads=bundles,
        )
        status, reply = await self.post(f"{self.base}/leases", body)
        assert status == 200, reply
        return _GRANT_OR_NONE.validate_python(reply)

    async def grant(self, worker: str = "w-1", *, max_units: int = 1, bundles: bool = False) -> LeaseGrant:
        """A lease that must be granted (``bundles``: asking for bundle upload URLs, as the worker does)."""
        reply = await self.lease(worker, max_units=max_units, bundles=bundles)
        assert isinstance(reply, LeaseGrant), reply
        return reply

    async def upload(self, leased: LeasedUnit, files: Mapping[str, bytes]) -> None:
        """PUT each file to its presigned URL, as the worker does (octet-stream, no bearer token)."""
        for name, data in files.items():
            async with self.client.session.put(
                leased.uploads[name], data=data, headers={"Content-Type": "application/octet-stream"}
            ) as resp:
                assert resp.status == 200, await resp.text()

    async def upload_bundle(self, leased: LeasedUnit, body: bytes) -> int:
        """PUT a unit's files as one body to its bundle URL, as the worker does; returns the HTTP status."""
        assert leased.bundle_upload is not None, "the grant offered no bundle URL"
        async with self.client.session.put(
            leased.bundle_upload, data=body, headers={"Content-Type": "application/octet-stream"}
        ) as resp:
            return resp.status

    def completion(
        self,
        leased: LeasedUnit,
        files: Mapping[str, bytes],
        *,
        worker: str = "w-1",
        converged: bool = True,
        declared: Mapping[str, FileDigest] | None = None,
        bundled: bool = False,
    ) -> CompleteRequest:
        """The completion a worker sends for ``files`` (``declared`` overrides the digests it claims)."""
        return CompleteRequest(
            worker=worker,
            pool=POOL,
            unit=leased.spec.unit,
            attempt=leased.spec.attempt,
            converged=converged,
            files=dict(declared) if declared is not None else digests(files),
            training_seconds=12.5,
            epochs=1,
            bundled=bundled,
        )

    async def deliver(self, leased: LeasedUnit, *, worker: str = "w-1") -> tuple[int, Any]:
        """Upload a unit's files and complete it; returns the completion's status and body."""
        files = result_files(leased.spec)
        await self.upload(leased, files)
        return await self.post(self.complete_path(leased.spec.unit), self.completion(leased, files, worker=worker))

    async def restart(self) -> CampaignService:
        """Simulate a server restart: checkpoint, then serve a service opened afresh from the same store."""
        await self.service.flush()
        service = await CampaignService.open(
            NAME, self.spec, self.store, token=self.token, clock=self.clock, settings=self.settings
        )
        service.wall = self.clock.wall
        self.campaigns.add(NAMESPACE, NAME, service)
        self.service = service
        return service


@asynccontextmanager
async def open_api(
    tmp_path: Path,
    *,
    spec: CampaignSpec | None = None,
    networks: int = 8,
    lease_seconds: int = 600,
    max_attempts: int = 3,
    suspend: bool = False,
    settings: ServiceSettings | None = None,
    observer: RequestObserver | None = None,
) -> AsyncIterator[ApiHarness]:
    """Serve one campaign (``research/parity``, token :data:`TOKEN`) over a LocalStore in ``tmp_path``."""
    clock = FakeClock()
    spec = spec or a_campaign(
        networks=networks, lease_seconds=lease_seconds, max_attempts=max_attempts, suspend=suspend
    )
    # durable=False: no fsync per file, which only costs time in tests (atomic renames still apply).
    store = LocalStore(tmp_path / "store", clock=clock.wall, durable=False)
    store.ensure_root()
    settings = settings or ServiceSettings()
    service = await CampaignService.open(NAME, spec, store, token=TOKEN, clock=clock, settings=settings)
    service.wall = clock.wall
    campaigns = Campaigns()
    campaigns.add(NAMESPACE, NAME, service)
    client: TestClient[Any, Any] = TestClient(
        TestServer(create_app(campaigns, local_store=store, observer=observer), host="127.0.0.1")
    )
    await client.start_server()
    store.upload_base_url = str(client.make_url("")).rstrip("/")
    try:
        yield ApiHarness(
            client=client, service=service, store=store, campaigns=campaigns, clock=clock, spec=spec, settings=settings
        )
    finally:
        await client.close()


@dataclass
class ThreadedApi:
    """A campaign served from a background thread's event loop, for synchronous clients (requests, schemathesis)."""

    url: str  # http://127.0.0.1:PORT
    service: CampaignService
    store: LocalStore
    loop: asyncio.AbstractEventLoop  # the serving thread's: run the service's coroutines there
    token: str = TOKEN

    @property
    def base(self) -> str:
        return f"{self.url}/v1/campaigns/{NAMESPACE}/{NAME}"


@contextmanager
def serve_in_thread(tmp_path: Path, *, spec: CampaignSpec | None = None, networks: int = 8) -> Iterator[ThreadedApi]:
    """Serve one campaign (real clock) on 127.0.0.1 from a daemon thread until the block ends."""
    spec = spec or a_campaign(networks=networks)
    loop = asyncio.new_event_loop()
    ready: concurrent.futures.Future[ThreadedApi] = concurrent.futures.Future()
    stop = asyncio.Event()

    async def main() -> None:
        store = LocalStore(tmp_path / "store", durable=False)
        store.ensure_root()
        service = await CampaignService.open(NAME, spec, store, token=TOKEN)
        campaigns = Campaigns()
        campaigns.add(NAMESPACE, NAME, service)
        runner = web.AppRunner(create_app(campaigns, local_store=store), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        store.upload_base_url = f"http://127.0.0.1:{port}"
        ready.set_result(ThreadedApi(url=store.upload_base_url, service=service, store=store, loop=loop))
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    def run() -> None:
        try:
            loop.run_until_complete(main())
        except BaseException as exc:  # surface a failed start to the waiting test instead of hanging it
            if not ready.done():
                ready.set_exception(exc)
            raise
        finally:
            loop.close()

    thread = threading.Thread(target=run, name="lease-api", daemon=True)
    thread.start()
    try:
        yield ready.result(timeout=HANG_GUARD_SECONDS)  # a safety net; the thread reports a failed start
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=HANG_GUARD_SECONDS)
