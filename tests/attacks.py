"""The attacks of issue 13, as a hostile worker sends them: real HTTP requests to a real lease server.

Who uses it: tests/unit/leases/test_attacks.py (the lease API as the operator and ``mlds run`` build it,
served on loopback in the test's loop) and tests/e2e/test_attacks_run.py (a real ``mlds run`` process
with real workers training beside the attacker). Each attack holds only what a worker pod holds: the
campaign's base URL and its bearer token. Each returns what it saw; the tests assert the answers and
then that no published result, checkpoint or manifest changed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from mlds_contract.plan import UnitSpec

from tests.api_fixtures import result_files
from tests.waiting import files_under

__all__ = ["Attacker", "Seen", "published_state"]

#: Files whose bytes must never change under attack: published results, the checkpoint, manifest parts.
_SKIP = ("_mlds/staging/", "_mlds/logs/", "_mlds/run.json", "_mlds/run-token", "_mlds/upload-secret")


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

    async def deliver_forged(self, leased: dict[str, Any], meta: bytes | None = None, **meta_fields: Any) -> Seen:
        """Upload a unit's files with a forged meta.json (``meta`` raw, or fields merged in) and complete it."""
        unit = leased
        spec = UnitSpec.model_validate(unit["spec"])
        files = result_files(spec, pool=self.pool, **meta_fields)
        if meta is not None:
            files["meta.json"] = meta
        for name, data in files.items():
            status = await self.put(unit["uploads"][name], data)
            assert status == 200, (name, status)
        return await self.complete(spec, files)

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
        expires = query["expires"]
        reused = f"{self.server}/v1/objects/{key}?{parts.query}"
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
