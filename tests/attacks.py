"""The attacks of issue 13, as a hostile worker sends them: real HTTP requests to a real lease server.

Who uses it: tests/unit/leases/test_attacks.py (the lease API as the operator and ``mlds run`` build it,
served on loopback in the test's loop), tests/e2e/test_attacks_run.py and tests/e2e/test_attacks_operator.py
(:func:`attack_set` against a real ``mlds run`` process and a real ``mlds operator`` process, real workers
training beside the attacker), and the chaos driver tests/chaos.py (:class:`Harasser`: hostile traffic
round after round while the server is killed and restarted). Each attack holds only what a worker pod
holds: the campaign's base URL and its bearer token. Each returns what it saw; the tests assert the
answers and then that no published result, checkpoint or manifest changed (:func:`published_state` for a
folder, :func:`published_objects` for any store).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import hmac
import json
import random
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from mlds_contract.plan import UnitSpec
from mlds_operator.storage import manifest as mf
from mlds_operator.storage.store import Store

from tests.api_fixtures import result_files, safetensors_bytes
from tests.waiting import files_under

__all__ = [
    "MUTABLE_KEYS",
    "PROTECTED_KEYS",
    "Attacker",
    "Harasser",
    "Seen",
    "attack_set",
    "changed_objects",
    "published_objects",
    "published_state",
]

#: Files whose bytes must never change under attack: published results, the checkpoint, manifest parts.
_SKIP = ("_mlds/staging/", "_mlds/logs/", "_mlds/run.json", "_mlds/run-token", "_mlds/upload-secret")


#: Keys no upload URL may ever reach: a published result, the checkpoint, the manifest.
PROTECTED_KEYS = ("SingleDirectMachine/00000/model.safetensors", mf.CHECKPOINT_KEY, mf.MANIFEST_KEY)
#: Objects the server itself rewrites as a campaign goes on; every other published object is written once.
MUTABLE_KEYS = frozenset({mf.CHECKPOINT_KEY, mf.MANIFEST_KEY, mf.README_KEY})


def published_state(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root`` but staging, logs and run state."""
    out: dict[str, str] = {}
    for path in sorted(files_under(root)):
        rel = path.relative_to(root).as_posix()
        if not rel.startswith(_SKIP) and ".mlds-tmp-" not in rel:
            try:
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            except FileNotFoundError:  # a temporary file renamed meanwhile: not a published one
                continue
    return out


def published_objects(store: Store) -> dict[str, str]:
    """:func:`published_state` through a store (a folder or an S3 bucket): key -> sha256."""
    out: dict[str, str] = {}
    for key in store.list(""):
        if key.startswith(_SKIP) or ".mlds-tmp-" in key:
            continue
        digest = store.sha256(key)
        if digest is not None:  # deleted meanwhile (a staged upload swept): not a published one
            out[key] = digest
    return out


def changed_objects(before: Mapping[str, str], after: Mapping[str, str]) -> list[str]:
    """Objects written once that were rewritten or removed between two :func:`published_objects` views.

    A result folder is written once whole, meta.json last: the files of a folder that has no meta.json
    yet (a server killed mid-publish) are not a result, and the unit's next publish may replace them.
    """
    out = []
    for key, digest in before.items():
        if key in MUTABLE_KEYS or after.get(key) == digest:
            continue
        folder = key.rpartition("/")[0]
        if not key.startswith(("_mlds/", mf.DATA_PREFIX)) and f"{folder}/meta.json" not in before:
            continue
        out.append(f"{key} {'removed' if key not in after else 'rewritten'}")
    return sorted(out)


@dataclass
class Seen:
    """One answer: status and the problem document's type (or the body)."""

    status: int
    kind: str
    body: Any


@dataclass
class Attacker:
    """A hostile worker: the campaign's base URL and token, nothing else."""

    session: aiohttp.ClientSession
    base: str  # http://host:port/v1/campaigns/<ns>/<name>
    token: str
    pool: str
    worker: str = "intruder-0"

    @property
    def server(self) -> str:
        parts = urllib.parse.urlsplit(self.base)
        return f"{parts.scheme}://{parts.netloc}"

    async def send(
        self, method: str, url: str, body: bytes | Mapping[str, Any] | None = None, *, auth: bool = True
    ) -> Seen:
        data = json.dumps(body).encode() if isinstance(body, Mapping) else body
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if auth:
            headers["Authorization"] = f"Bearer {self.token}"
        target = url if url.startswith("http") else self.base + url
        async with self.session.request(method, target, data=data, headers=headers) as resp:
            raw = await resp.read()
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = raw
            kind = parsed.get("type", "") if isinstance(parsed, dict) else ""
            return Seen(resp.status, kind, parsed)

    async def lease(self, max_units: int = 1) -> dict[str, Any] | None:
        body = {
            "worker": self.worker,
            "pool": self.pool,
            "accelerator": "cpu",
            "deviceName": "cpu",
            "maxUnits": max_units,
        }
        seen = await self.send("POST", "/leases", body)
        assert seen.status == 200, seen
        return seen.body if "leaseId" in seen.body else None

    async def put(self, url: str, data: bytes) -> int:
        headers = {"Content-Type": "application/octet-stream"}
        async with self.session.put(yarl_url(url), data=data, headers=headers) as resp:
            return resp.status

    async def deliver(self, leased: dict[str, Any], files: Mapping[str, bytes]) -> Seen:
        """Upload these files for a leased unit and complete it."""
        for name, data in files.items():
            status = await self.put(leased["uploads"][name], data)
            assert status == 200, (name, status)
        return await self.complete(UnitSpec.model_validate(leased["spec"]), files)

    async def deliver_forged(
        self, leased: dict[str, Any], meta: bytes | None = None, *, model: bytes | None = None, **meta_fields: Any
    ) -> Seen:
        """Upload a unit's files with a forged meta.json (``meta`` raw, or fields merged in) and complete it."""
        return await self.deliver(leased, self.forged_files(leased, meta, model=model, **meta_fields))

    def forged_files(
        self, leased: dict[str, Any], meta: bytes | None = None, *, model: bytes | None = None, **meta_fields: Any
    ) -> dict[str, bytes]:
        """A leased unit's result files, forged: ``meta`` (raw) or ``meta_fields`` in meta.json, ``model``."""
        files = result_files(UnitSpec.model_validate(leased["spec"]), pool=self.pool, **meta_fields)
        if meta is not None:
            files["meta.json"] = meta
        if model is not None:
            files["model.safetensors"] = model
        return files

    async def complete(self, spec: UnitSpec, files: Mapping[str, bytes], **override: Any) -> Seen:
        body = {
            "worker": self.worker,
            "pool": self.pool,
            "unit": spec.unit,
            "attempt": spec.attempt,
            "converged": True,
            "files": {n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for n, d in files.items()},
            "trainingSeconds": 1.0,
            "epochs": 1,
            **override,
        }
        return await self.send("POST", f"/units/{spec.unit}/complete", body)

    def forged_upload_urls(self, granted: str, key: str) -> list[str]:
        """Upload URLs for ``key`` made from a granted one: its signature reused, and the old derivable secret."""
        parts = urllib.parse.urlsplit(granted)
        query = dict(urllib.parse.parse_qsl(parts.query))
        expires = query.get("expires", "9999999999")  # an S3 presigned URL says X-Amz-Expires instead
        reused = f"{self.server}/v1/objects/{key}?{parts.query}"  # on the lease port, where local uploads land
        # Before issue 13, `mlds run` signed with sha256("mlds-uploads/" + token): any worker could compute it.
        derived = hashlib.sha256(b"mlds-uploads/" + self.token.encode()).digest()
        old_sig = hmac.new(derived, f"PUT\n{key}\n{expires}".encode(), hashlib.sha256).hexdigest()
        new_sig = hmac.new(derived, f"PUT\n{key}\n{expires}\n".encode(), hashlib.sha256).hexdigest()
        return [
            reused,
            f"{self.server}/v1/objects/{key}?expires={expires}&sig={old_sig}",
            f"{self.server}/v1/objects/{key}?expires={expires}&scope=&sig={new_sig}",
        ]


def yarl_url(url: str) -> Any:
    """Send a URL exactly as written (no re-quoting of what the server signed)."""
    import yarl  # noqa: PLC0415 - aiohttp's own dependency, only needed here

    return yarl.URL(url, encoded=True)


def deep_json(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def deep_meta(depth: int) -> bytes:
    return b'{"unit": 0, "x": ' + deep_json(depth) + b"}"


def wrong_model() -> bytes:
    """A safetensors file of no unit's architecture (its header is checked before acceptance)."""
    return safetensors_bytes({"out.weight": (8, 12), "payload": (1 << 10,)})


def forged_result(name: str, intruder: Attacker, leased: dict[str, Any]) -> dict[str, bytes]:
    """The result files of forgery ``name`` (one of :data:`FORGERIES`) for a unit the intruder leased."""
    spec = UnitSpec.model_validate(leased["spec"])
    if name == "epochs past uint64":
        return intruder.forged_files(leased, epochs=18446744073709551616)
    if name == "a float unit":
        return intruder.forged_files(leased, unit=float(spec.unit))
    if name == "a NaN loss":
        return intruder.forged_files(leased, eval_loss=float("nan"))
    if name == "meta nested 100,000 deep":
        return intruder.forged_files(leased, deep_meta(100_000))
    if name == "a model of another architecture":
        model = wrong_model()
        return intruder.forged_files(leased, model=model, sha256=hashlib.sha256(model).hexdigest())
    if name == "a truncated model":
        model = result_files(spec)["model.safetensors"][:-4]
        return intruder.forged_files(leased, model=model, sha256=hashlib.sha256(model).hexdigest())
    raise ValueError(f"no forgery {name!r}")


#: Forged results, each a 422 that puts the unit back to pending uncounted (never a manifest row).
FORGERIES = (
    "epochs past uint64",
    "a float unit",
    "a NaN loss",
    "meta nested 100,000 deep",
    "a model of another architecture",
    "a truncated model",
)


async def attack_set(intruder: Attacker, *, metrics_url: str) -> dict[str, int]:
    """Every attack of issue 13 once, against the campaign ``intruder`` reaches; attack name -> status.

    The three forged deliveries each lease a pending unit (a rejected result goes back to pending), so
    run it while units are pending; an attack that found none is missing from the answer. Upload URLs are
    forged for the lease port (where ``mlds run``'s local store takes uploads; the operator has no such
    route). ``metrics_url`` is the server's /metrics on its own port, which must answer.
    """
    got: dict[str, int] = {}
    for forgery in ("epochs past uint64", "a model of another architecture"):
        grant = await intruder.lease()
        if grant is None:  # the honest workers hold everything pending right now
            continue
        leased = grant["units"][0]
        got[forgery] = (await intruder.deliver(leased, forged_result(forgery, intruder, leased))).status
    grant = await intruder.lease()
    if grant is not None:
        leased = grant["units"][0]
        got["meta nested 100,000 deep"] = (await intruder.deliver_forged(leased, deep_meta(100_000))).status
        granted = leased["uploads"]["model.safetensors"]
        for key in PROTECTED_KEYS:
            statuses = {await intruder.put(url, b"x") for url in intruder.forged_upload_urls(granted, key)}
            got[f"upload to {key}"] = max(statuses)
        spec = UnitSpec.model_validate(leased["spec"])
        fail = {
            "worker": intruder.worker,
            "pool": intruder.pool,
            "unit": spec.unit,
            "attempt": 1_000_000,
            "kind": "fail",
        }
        got["fail of attempt 1,000,000"] = (await intruder.send("POST", f"/units/{spec.unit}/fail", fail)).status
        await intruder.send("POST", f"/leases/{grant['leaseId']}/release", {"worker": intruder.worker})
    for name, (method, url, body, auth) in _requests(intruder).items():
        got[name] = (await intruder.send(method, url, body, auth=auth)).status
    async with intruder.session.get(metrics_url) as resp:
        got["/metrics on its own port"] = resp.status
    return got


def _requests(intruder: Attacker) -> dict[str, tuple[str, str, bytes | Mapping[str, Any] | None, bool]]:
    """The attacks that need no lease: name -> (method, URL, body, send the token)."""
    worker, pool = intruder.worker, intruder.pool
    beat = {"worker": worker, "pool": pool, "units": [{"unit": u, "attempt": 0} for u in range(6)]}
    invented = {"worker": worker, "pool": "invented", "accelerator": "cpu", "deviceName": "x", "maxUnits": 1}
    fail_2 = {"worker": worker, "pool": pool, "unit": 2, "attempt": 0, "kind": "fail"}
    namespace, _ = intruder.base.rsplit("/", 2)[-2:]
    foreign = f"{intruder.server}/v1/campaigns/{namespace}/another-campaign/leases"
    honest = {"worker": worker, "pool": pool, "accelerator": "cpu", "deviceName": "cpu", "maxUnits": 1}
    sig = f"{intruder.server}/v1/objects/_mlds/staging/0/0-w/meta.json?expires=9999999999&sig=\u00e9"
    return {
        "heartbeat of an invented lease": ("POST", "/leases/invented-0000/heartbeat", beat, True),
        "an invented pool": ("POST", "/leases", invented, True),
        "a Unicode digit as unit": ("POST", "/units/\u00b2/fail", fail_2, True),
        "a non-ASCII signature": ("PUT", sig, b"x", False),
        "another campaign with this token": ("POST", foreign, honest, True),
        "no token": ("POST", "/leases", honest, False),
        "/metrics on the lease port": ("GET", f"{intruder.server}/metrics", None, True),
    }


@dataclass
class Harasser:
    """Hostile traffic for the chaos driver (tests/chaos.py): forged results and forbidden requests, round after round.

    ``target`` says where the campaign is now (base URL and token, re-read every round: a restarted
    ``mlds run`` may move), or None while it is unknown. Each round leases a unit when one is pending,
    uploads a forged result (:data:`FORGERIES`, in turn), holds it a random moment (so that kills land while
    a hostile completion is in flight), completes it, forges upload URLs for :data:`PROTECTED_KEYS`, fails
    an attempt never issued, releases what is left, then sends the lease-less attacks. Every hostile
    request must be refused with a 4xx, or (a forged completion of a unit someone else finished
    meanwhile) answered "duplicate"; anything else is a breach. A server that is down is counted, not
    judged: that is the chaos.
    """

    target: Callable[[], tuple[str, str] | None]
    pool: str
    rng: random.Random
    #: Longest hold of a forged result between upload and completion (seconds).
    hold_seconds: float = 2.0
    #: "attack: answer" -> how many times.
    answers: collections.Counter[str] = field(default_factory=collections.Counter)
    breaches: list[str] = field(default_factory=list)
    #: A forged result is uploaded and its completion not yet answered.
    holding: bool = False
    rounds: int = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Harass until ``stop`` is set."""
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            turn = 0
            while not stop.is_set():
                where = self.target()
                if where is None:
                    await asyncio.sleep(0.2)
                    continue
                intruder = Attacker(session, where[0], where[1], self.pool, worker="intruder-chaos")
                try:
                    await self._round(intruder, FORGERIES[turn % len(FORGERIES)])
                except (TimeoutError, aiohttp.ClientError, ConnectionError):
                    self.answers["server down"] += 1
                    await asyncio.sleep(0.2)
                finally:
                    self.holding = False
                turn += 1
                self.rounds += 1

    @property
    def refused(self) -> int:
        return sum(n for answer, n in self.answers.items() if answer != "server down")

    def judge(self, attack: str, seen: Seen) -> None:
        """Count an answer to a hostile request; a breach unless a 4xx (or a duplicate completion, or a 503)."""
        duplicate = seen.status == 200 and isinstance(seen.body, dict) and seen.body.get("status") == "duplicate"
        answer = "duplicate" if duplicate else str(seen.status)
        self.answers[f"{attack}: {answer}"] += 1
        # 503: storage unavailable, a documented answer (the S3 stand-in under load), never a result taken.
        if not (400 <= seen.status < 500 or duplicate or seen.status == 503):
            self.breaches.append(f"{attack}: {seen.status} {str(seen.body)[:300]}")

    async def _round(self, intruder: Attacker, forgery: str) -> None:
        body = {"worker": intruder.worker, "pool": self.pool, "accelerator": "cpu", "deviceName": "cpu", "maxUnits": 1}
        grant = await intruder.send("POST", "/leases", body)
        if grant.status == 200 and isinstance(grant.body, dict) and "leaseId" in grant.body:
            await self._forge(intruder, grant.body, forgery)
        for name, (method, url, req, auth) in _requests(intruder).items():
            self.judge(name, await intruder.send(method, url, req, auth=auth))
        await asyncio.sleep(self.rng.uniform(0.0, 0.5))

    async def _forge(self, intruder: Attacker, grant: dict[str, Any], forgery: str) -> None:
        leased = grant["units"][0]
        spec = UnitSpec.model_validate(leased["spec"])
        files = forged_result(forgery, intruder, leased)
        self.holding = True
        for name, data in files.items():
            with contextlib.suppress(aiohttp.ClientError):  # a lease lost to a restart: 409, uploads nothing
                await intruder.put(leased["uploads"][name], data)
        await asyncio.sleep(self.rng.uniform(0.0, self.hold_seconds))
        self.judge(f"forged result ({forgery})", await intruder.complete(spec, files))
        self.holding = False
        granted = leased["uploads"]["model.safetensors"]
        for key in PROTECTED_KEYS:
            for url in intruder.forged_upload_urls(granted, key):
                status = await intruder.put(url, b"overwritten")
                self.judge(f"upload to {key}", Seen(status, "", None))
        fail = {"worker": intruder.worker, "pool": self.pool, "unit": spec.unit, "attempt": 1_000_000, "kind": "fail"}
        self.judge("fail of attempt 1,000,000", await intruder.send("POST", f"/units/{spec.unit}/fail", fail))
        # What a rejected result did not already give back (a 409 after a restart is fine: nothing held).
        await intruder.send("POST", f"/leases/{grant['leaseId']}/release", {"worker": intruder.worker})
