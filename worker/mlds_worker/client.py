"""The worker's client of the lease API (:mod:`mlds_operator.leases.http` serves it).

The wire types (:mod:`mlds_contract.lease`) and the routes (:mod:`mlds_contract.routes`) are the
contract's, shared with the server; every route here is below the campaign's base URL: POSTs of JSON,
and one GET of a file (``input``: a campaign input such as an MNIST IDX file, which only the store holds).

Used by the worker loop (:mod:`mlds_worker.loop`). Maps HTTP answers onto what the worker does next:

    LeaseApiError
    ├── Unauthorized   401: wrong token or campaign gone: the worker exits non-zero (a config error)
    ├── NotHeld        409: the lease is not ours (any more): stop training its units; on an upload,
    │                  the lease is unknown until a heartbeat re-establishes it (after a server restart)
    ├── Rejected       422/404/400/403: our request or result was refused; ``reason`` names a refused
    │                  completion's RejectReason (a staged copy lost or torn is uploaded afresh once)
    └── Unreachable    connection errors, timeouts, 5xx, 503: retry with backoff (a server restart
                       or an outage; the lease survives it, see HeartbeatRequest)
"""

from __future__ import annotations

import json
import logging
from types import TracebackType
from typing import Any, TypeVar

import aiohttp
from mlds_contract.errors import MldsError
from mlds_contract.lease import (
    CompleteReply,
    CompleteRequest,
    FailReply,
    FailRequest,
    HeartbeatReply,
    HeartbeatRequest,
    LeaseGrant,
    LeaseRequest,
    NoLease,
    RejectReason,
    ReleaseReply,
    ReleaseRequest,
)
from mlds_contract.routes import COMPLETE, FAIL, HEARTBEAT, INPUT, LEASE, RELEASE
from pydantic import BaseModel, TypeAdapter, ValidationError

__all__ = ["LeaseApiError", "LeaseClient", "NotHeld", "Rejected", "Unauthorized", "Unreachable", "upload"]

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
_GRANT_OR_NONE: TypeAdapter[LeaseGrant | NoLease] = TypeAdapter(LeaseGrant | NoLease)


class LeaseApiError(MldsError):
    """An answer of the lease API that is not a success."""

    def __init__(self, message: str, *, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class Unauthorized(LeaseApiError):
    """401: the token is wrong, or the campaign no longer exists."""


class NotHeld(LeaseApiError):
    """409: the worker does not hold this lease."""


class Rejected(LeaseApiError):
    """4xx other than 401/409: the request or the result was refused; repeating it will not help.

    ``reason``: why a completion was refused (from the problem's type); None for any other refusal.
    """

    def __init__(self, message: str, *, status: int | None = None, reason: RejectReason | None = None) -> None:
        super().__init__(message, status=status)
        self.reason = reason


class Unreachable(LeaseApiError):
    """The server could not be reached or answered 5xx: retry later."""


class LeaseClient:
    """An aiohttp session bound to one campaign's base URL and token."""

    def __init__(self, base_url: str, token: str, *, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=min(timeout, 10.0))
        self._session: aiohttp.ClientSession | None = None
        self._bundles = True  # False once the server refused LeaseRequest.bundle_uploads (it predates them)

    async def __aenter__(self) -> LeaseClient:
        self._session = aiohttp.ClientSession(timeout=self._timeout, headers={"Authorization": f"Bearer {self._token}"})
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("LeaseClient is used outside `async with`")
        return self._session

    async def _post(self, path: str, body: BaseModel) -> Any:
        url = f"{self.base_url}{path}"
        try:
            async with self.session.post(
                url, data=body.model_dump_json(by_alias=True), headers={"Content-Type": "application/json"}
            ) as resp:
                text = await resp.text()
                if resp.status == 200:
                    return text
                raise _error(resp.status, text, resp.headers.get("Retry-After"))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Unreachable(f"lease server unreachable at {url}: {exc!r}") from exc

    async def input_file(self, name: str) -> bytes:
        """The bytes of one of the campaign's input files (:func:`mlds_workloads.input_files`).

        Tens of MB for MNIST: only a stalled transfer times out (after the client's timeout without a
        byte), not a slow one. Raises :class:`Rejected` (404: not there) or :class:`Unreachable`.
        """
        url = f"{self.base_url}{INPUT.campaign_path(file=name)}"
        timeout = aiohttp.ClientTimeout(connect=self._timeout.connect, sock_read=self._timeout.total)
        try:
            async with self.session.get(url, timeout=timeout) as resp:
                if resp.status == 200:
                    return await resp.read()
                raise _error(resp.status, await resp.text(), resp.headers.get("Retry-After"))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Unreachable(f"lease server unreachable at {url}: {exc!r}") from exc

    async def _call(self, path: str, body: BaseModel, reply: type[M]) -> M:
        text = await self._post(path, body)
        try:
            return reply.model_validate_json(text)
        except ValidationError as exc:
            raise Unreachable(f"unexpected reply from {path}: {exc}") from exc

    async def lease(self, req: LeaseRequest) -> LeaseGrant | NoLease:
        """Lease units. A worker asks for bundle uploads; a server that predates them refuses the field (422),
        and from then on this client asks without it."""
        if req.bundle_uploads and not self._bundles:
            req = req.model_copy(update={"bundle_uploads": False})
        try:
            text = await self._post(LEASE.campaign_path(), req)
        except Rejected as exc:
            if not (req.bundle_uploads and exc.status == 422):
                raise
            log.info("the lease server does not take bundleUploads (%s); uploading file by file", exc)
            self._bundles = False
            text = await self._post(LEASE.campaign_path(), req.model_copy(update={"bundle_uploads": False}))
        try:
            return _GRANT_OR_NONE.validate_json(text)
        except ValidationError as exc:
            raise Unreachable(f"unexpected lease reply: {exc}") from exc

    async def heartbeat(self, lease_id: str, req: HeartbeatRequest) -> HeartbeatReply:
        return await self._call(HEARTBEAT.campaign_path(lease=lease_id), req, HeartbeatReply)

    async def release(self, lease_id: str, req: ReleaseRequest) -> ReleaseReply:
        return await self._call(RELEASE.campaign_path(lease=lease_id), req, ReleaseReply)

    async def complete(self, req: CompleteRequest) -> CompleteReply:
        return await self._call(COMPLETE.campaign_path(unit=req.unit), req, CompleteReply)

    async def fail(self, req: FailRequest) -> FailReply:
        return await self._call(FAIL.campaign_path(unit=req.unit), req, FailReply)


async def upload(session: aiohttp.ClientSession, url: str, data: bytes) -> None:
    """PUT one result file (or a unit's files in one body: a bundle) to its presigned URL.

    Always ``application/octet-stream``: some S3 servers store a body sent with a form content type as an
    empty object. Raises :class:`Unreachable` (retry), :class:`NotHeld` (a local-folder store's upload
    right lives with the lease: refused until a heartbeat re-establishes it after a server restart) or
    :class:`Rejected` (e.g. an expired URL).
    """
    try:
        # A bare request: presigned URLs carry their own authorisation and must not get our bearer token.
        async with session.put(
            url, data=data, headers={"Content-Type": "application/octet-stream"}, skip_auto_headers=["Authorization"]
        ) as resp:
            if resp.status in (200, 201, 204):
                return
            text = (await resp.text())[:300]
            if resp.status >= 500:
                raise Unreachable(f"upload failed with HTTP {resp.status}: {text}", status=resp.status)
            if resp.status == 409:
                raise NotHeld(f"upload refused with HTTP 409: {text}", status=resp.status)
            raise Rejected(f"upload refused with HTTP {resp.status}: {text}", status=resp.status)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise Unreachable(f"upload failed: {exc!r}") from exc


def _error(status: int, text: str, retry_after: str | None) -> LeaseApiError:
    detail, kind = text, ""
    try:
        body = json.loads(text)
        if isinstance(body, dict):
            detail = str(body.get("detail") or body.get("title") or text)
            kind = str(body.get("type") or "")
    except ValueError:
        pass
    delay = float(retry_after) if retry_after and retry_after.replace(".", "", 1).isdigit() else None
    if status == 401:
        return Unauthorized(f"unauthorized: {detail}", status=status)
    if status == 409:
        return NotHeld(detail, status=status)
    if status >= 500 or status == 429:
        return Unreachable(f"HTTP {status}: {detail}", status=status, retry_after=delay)
    return Rejected(f"HTTP {status}: {detail}", status=status, reason=RejectReason.of_problem(kind))
