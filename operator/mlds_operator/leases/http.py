"""The lease HTTP API: workers lease units, heartbeat, complete and fail them (DESIGN.md §2).

Served by the operator (all campaigns of the cluster) and by ``mlds run`` (one campaign), from the
same :func:`create_app`. Each campaign is a :class:`~mlds_operator.leases.service.CampaignService` in
the :class:`~mlds_operator.leases.registry.Campaigns` registry, addressed as
``/v1/campaigns/{namespace}/{name}``; a worker is given that base URL and its campaign's bearer token.
The routes, their bodies and their error statuses are the table :data:`mlds_contract.routes.ROUTES`:
:func:`create_app` registers one handler per route and :func:`openapi_document` describes the same table.

Errors are RFC 9457 problem details (``ErrorReply``): 401 missing or wrong token (the same answer for
an unknown campaign, so tokens cannot be probed per campaign), 404 unknown unit (unit ids in URLs are
ASCII digits only) or input file (the ``input`` route serves a campaign's input files, e.g. MNIST's,
from its store to workers, which hold no storage credentials), 409 a lease the worker does not hold,
413 a body over :data:`MAX_BODY`, 422 a malformed body (types are checked strictly), a pool that is not
the campaign's, an attempt the server never issued, or a result that fails verification, 503 storage
outage (with Retry-After). A finished campaign the operator knows by its token only (it restarted after
the campaign ended: :meth:`Campaigns.add_finished`) answers a lease request ``finished``, so its last
workers exit 0, a heartbeat or release 409 (it holds no lease), and anything else 401, as a campaign
that is gone. Anything else is a bug and answers 500 with no internals; the fuzzers
(tests/e2e/test_api_fuzz.py) hunt for those.

This port serves the lease API, health and the OpenAPI document only: metrics are served on a port of
their own (:func:`mlds_operator.leases.metrics.serve_metrics`), so a worker pod that can reach the lease
API learns nothing about other campaigns.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web
from mlds_contract.errors import StorageUnavailable, TemporaryError
from mlds_contract.lease import (
    PROBLEM_JSON,
    PROBLEM_TYPE_PREFIX,
    CompleteBatchItem,
    CompleteBatchReply,
    CompleteBatchRequest,
    CompleteReply,
    CompleteRequest,
    ErrorReply,
    FailReply,
    FailRequest,
    HeartbeatReply,
    HeartbeatRequest,
    LeaseGrant,
    LeaseRequest,
    NoLease,
    NoLeaseReason,
    ReleaseReply,
    ReleaseRequest,
)
from mlds_contract.results import MAX_RESULT_FILE_BYTES
from mlds_contract.routes import (
    CAMPAIGN_PATH,
    COMPLETE,
    COMPLETE_BATCH,
    ERRORS,
    FAIL,
    HEALTH,
    HEARTBEAT,
    INPUT,
    LEASE,
    OPENAPI,
    RELEASE,
    ROUTES,
    UPLOAD,
)
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema

from mlds_operator.leases.book import NotHolder, NotIssued, UnknownLease, UnknownPool, UnknownUnit
from mlds_operator.leases.registry import Campaigns
from mlds_operator.leases.service import CampaignService, ResultRejected, UnknownInput
from mlds_operator.storage.store import LocalStore

__all__ = ["RequestObserver", "create_app", "openapi_document", "render_openapi_json"]

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

#: Largest request body accepted: a completion lists its files' digests (well under a kB); uploads are separate.
MAX_BODY = 1 << 20
#: Largest result file accepted by the local upload route (the contract's bound on any result file).
MAX_UPLOAD = MAX_RESULT_FILE_BYTES

#: (endpoint, status code, seconds) after each request; the metrics layer hooks here.
RequestObserver = Callable[[str, int, float], None]


CAMPAIGNS: web.AppKey[Campaigns] = web.AppKey("campaigns", Campaigns)
LOCAL_STORE: web.AppKey[LocalStore | None] = web.AppKey("local_store")
OBSERVER: web.AppKey[RequestObserver | None] = web.AppKey("observer")


def problem(
    status: int,
    title: str,
    detail: str,
    *,
    kind: str,
    request: web.Request | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = ErrorReply(
        type=PROBLEM_TYPE_PREFIX + kind,
        title=title,
        status=status,
        detail=detail,
        instance=request.path if request is not None else None,
    )
    return web.Response(
        status=status,
        body=body.model_dump_json(by_alias=True, exclude_none=True),
        content_type=PROBLEM_JSON,
        headers=headers,
    )


def _reply(model: BaseModel) -> web.Response:
    return web.Response(body=model.model_dump_json(by_alias=True), content_type="application/json")


def _readable(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False)[:8]:
        where = ".".join(str(p) for p in err.get("loc", ())) or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    more = len(exc.errors()) - 8
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")


async def _body(request: web.Request) -> bytes:
    """The request body, refused past MAX_BODY (the app's client_max_size is the upload route's, far larger)."""
    too_large = _HttpProblem(413, "Too large", f"request bodies are limited to {MAX_BODY} bytes", kind="too-large")
    if request.content_length is not None:
        if request.content_length > MAX_BODY:
            raise too_large
        return await request.read()  # reads exactly Content-Length bytes (faster than iterating chunks)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(1 << 16):  # chunked bodies announce no length
        size += len(chunk)
        if size > MAX_BODY:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _parse(request: web.Request, model: type[M]) -> M:
    raw = await _body(request)
    try:
        # Strict: "2", 2.0 and true are not an integer, "yes" is not a boolean (the OpenAPI document's types).
        return model.model_validate_json(raw or b"null", strict=True)
    except ValidationError as exc:
        raise _HttpProblem(422, "Malformed request body", _readable(exc), kind="malformed") from exc


class _HttpProblem(Exception):
    def __init__(self, status: int, title: str, detail: str, *, kind: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.title, self.detail, self.kind, self.headers = status, title, detail, kind, headers


def _unauthorized(kind: type[_HttpProblem] = _HttpProblem) -> _HttpProblem:
    return kind(
        401,
        "Unauthorized",
        "missing or wrong bearer token for this campaign",
        kind="unauthorized",
        headers={"WWW-Authenticate": 'Bearer realm="mlds"'},
    )


class _Finished(_HttpProblem):
    """A finished campaign known by its token only, and the right token: 401 unless the route knows better."""


def _not_held_when_finished() -> _HttpProblem:
    detail = "the campaign is finished: it holds no leases"
    return _HttpProblem(409, "Not the lease holder", detail, kind="not-holder")


def _service(request: web.Request) -> CampaignService:
    campaigns = request.app[CAMPAIGNS]
    namespace, name = request.match_info["namespace"], request.match_info["name"]
    service = campaigns.get(namespace, name)
    authorization = request.headers.get("Authorization")
    if service is None and campaigns.finished(namespace, name, authorization):
        raise _unauthorized(_Finished)
    # Unknown campaign and wrong token look the same: a token holder learns nothing about other campaigns.
    if service is None or not service.authorized(authorization):
        raise _unauthorized()
    return service


def _int(request: web.Request, name: str) -> int:
    text = request.match_info[name]
    # isascii(): str.isdigit() is also true for '²' or '٣', which int() refuses or reads as another number.
    if not (text.isascii() and text.isdigit()) or len(text) > 12:
        raise _HttpProblem(
            404, "Unknown unit", f"{name} must be a non-negative integer, got {text!r}", kind="unknown-unit"
        )
    return int(text)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    response: web.StreamResponse
    try:
        response = await handler(request)
    except _HttpProblem as p:
        response = problem(p.status, p.title, p.detail, kind=p.kind, request=request, headers=p.headers)
    except ResultRejected as exc:
        response = problem(422, "Result rejected", str(exc), kind=exc.reason.problem_kind, request=request)
    except UnknownPool as exc:
        response = problem(422, "Unknown pool", str(exc), kind="unknown-pool", request=request)
    except NotIssued as exc:
        response = problem(422, "Attempt not issued", str(exc), kind="not-issued", request=request)
    except (NotHolder, UnknownLease) as exc:
        response = problem(409, "Not the lease holder", str(exc), kind="not-holder", request=request)
    except UnknownUnit as exc:
        response = problem(404, "Unknown unit", str(exc), kind="unknown-unit", request=request)
    except UnknownInput as exc:
        response = problem(404, "Unknown input", str(exc), kind="unknown-input", request=request)
    except (StorageUnavailable, TemporaryError) as exc:
        delay = str(max(1, round(exc.delay)))
        response = problem(
            503,
            "Temporarily unavailable",
            str(exc),
            kind="unavailable",
            request=request,
            headers={"Retry-After": delay},
        )
    except web.HTTPException as exc:
        response = problem(exc.status, exc.reason, exc.text or exc.reason, kind="http", request=request)
    except Exception:
        log.exception("lease API bug on %s %s", request.method, request.path)
        response = problem(
            500, "Internal error", "the lease server hit a bug; see its log", kind="internal", request=request
        )
    observer = request.app.get(OBSERVER)
    if observer is not None:
        route = request.match_info.route.resource
        endpoint = route.canonical if route is not None else "unmatched"
        observer(endpoint, response.status, time.perf_counter() - started)
    return response


async def _lease(request: web.Request) -> web.Response:
    try:
        service: CampaignService | None = _service(request)
    except _Finished:
        service = None
    body = await _parse(request, LeaseRequest)
    if service is None:  # a finished campaign known by its token only: the worker exits
        return _reply(NoLease(reason=NoLeaseReason.finished, retry_after_seconds=0))
    reply: LeaseGrant | NoLease = await service.grant(body)
    return _reply(reply)


async def _heartbeat(request: web.Request) -> web.Response:
    try:
        service = _service(request)
    except _Finished:
        raise _not_held_when_finished() from None
    body = await _parse(request, HeartbeatRequest)
    reply: HeartbeatReply = service.heartbeat(request.match_info["lease"], body)
    return _reply(reply)


async def _release(request: web.Request) -> web.Response:
    try:
        service = _service(request)
    except _Finished:
        raise _not_held_when_finished() from None
    body = await _parse(request, ReleaseRequest)
    reply: ReleaseReply = service.release(request.match_info["lease"], body)
    return _reply(reply)


def _check_unit_matches(request: web.Request, unit: int) -> None:
    if _int(request, "unit") != unit:
        raise _HttpProblem(422, "Malformed request body", f"body unit {unit} differs from the URL's", kind="malformed")


async def _complete(request: web.Request) -> web.Response:
    service = _service(request)
    body = await _parse(request, CompleteRequest)
    _check_unit_matches(request, body.unit)
    reply: CompleteReply = await service.complete(body)
    return _reply(reply)


def _item_problem(exc: Exception, path: str) -> ErrorReply:
    """The problem a refused completion of a batch gets: what the single-unit route would have answered."""
    if isinstance(exc, ResultRejected):
        status, title, kind = 422, "Result rejected", exc.reason.problem_kind
    elif isinstance(exc, UnknownUnit):
        status, title, kind = 404, "Unknown unit", "unknown-unit"
    elif isinstance(exc, (StorageUnavailable, TemporaryError)):
        status, title, kind = 503, "Temporarily unavailable", "unavailable"
    else:
        raise exc  # a bug: the middleware answers 500
    return ErrorReply(type=PROBLEM_TYPE_PREFIX + kind, title=title, status=status, detail=str(exc), instance=path)


async def _complete_batch(request: web.Request) -> web.Response:
    service = _service(request)
    body = await _parse(request, CompleteBatchRequest)
    items = []
    for req, outcome in zip(body.completions, await service.complete_many(body.completions), strict=True):
        if isinstance(outcome, CompleteReply):
            items.append(CompleteBatchItem(unit=req.unit, status=outcome.status, state=outcome.state))
        else:
            items.append(CompleteBatchItem(unit=req.unit, error=_item_problem(outcome, request.path)))
    return _reply(CompleteBatchReply(results=items))


async def _fail(request: web.Request) -> web.Response:
    service = _service(request)
    body = await _parse(request, FailRequest)
    _check_unit_matches(request, body.unit)
    reply: FailReply = service.fail(body)
    return _reply(reply)


async def _input(request: web.Request) -> web.Response:
    service = _service(request)
    data = await service.input_file(request.match_info["file"])
    return web.Response(body=data, content_type="application/octet-stream")


async def _upload(request: web.Request) -> web.Response:
    store = request.app[LOCAL_STORE]
    if store is None:
        raise _HttpProblem(404, "Not found", "this server hosts no local-folder store", kind="not-found")
    key = request.match_info["key"]
    q = request.query
    scope = q.get("scope", "")
    if not store.check_upload(key, q.get("expires", ""), q.get("sig", ""), scope=scope):
        raise _HttpProblem(403, "Forbidden", "upload URL is invalid, for another key, or expired", kind="forbidden")
    # A valid signature is not enough: the right dies with the lease it was granted under. 409, not 403:
    # after a restart the lease is unknown until its worker's heartbeat re-adopts it, so the worker retries.
    owners = [s for _, s in request.app[CAMPAIGNS].items() if s.store is store]
    if not any(s.upload_allowed(key, scope) for s in owners):
        raise _HttpProblem(
            409,
            "Not the lease holder",
            "the lease this upload URL was granted under no longer holds it",
            kind="not-holder",
        )
    if request.content_length is not None and request.content_length > MAX_UPLOAD:
        raise _HttpProblem(413, "Too large", f"uploads are limited to {MAX_UPLOAD} bytes", kind="too-large")
    data = await request.read()
    rel = key  # LocalStore keys carry no prefix: the key is the path under its root
    await asyncio.to_thread(store.put_upload, rel, data)
    return web.Response(status=200)


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "campaigns": len(request.app[CAMPAIGNS].items())})


async def _openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


#: Route operation (mlds_contract.routes) -> its handler.
_HANDLERS: dict[str, Handler] = {
    LEASE.operation: _lease,
    HEARTBEAT.operation: _heartbeat,
    RELEASE.operation: _release,
    COMPLETE.operation: _complete,
    COMPLETE_BATCH.operation: _complete_batch,
    FAIL.operation: _fail,
    INPUT.operation: _input,
    HEALTH.operation: _health,
    OPENAPI.operation: _openapi,
    UPLOAD.operation: _upload,
}


def create_app(
    campaigns: Campaigns,
    *,
    local_store: LocalStore | None = None,
    observer: RequestObserver | None = None,
) -> web.Application:
    """The lease API as an aiohttp application over ``campaigns``."""
    app = web.Application(middlewares=[_errors], client_max_size=MAX_UPLOAD)
    app[CAMPAIGNS] = campaigns
    app[LOCAL_STORE] = local_store
    app[OBSERVER] = observer
    for route in ROUTES:
        path = route.path
        for param in route.multi_segment:  # aiohttp's syntax for a parameter that may contain slashes
            path = path.replace("{" + param + "}", "{" + param + ":.+}")
        app.router.add_route(route.method, path, _HANDLERS[route.operation])
    return app


# ------------------------------------------------------------------------------------------- OpenAPI


def openapi_document() -> dict[str, Any]:
    """The lease API's OpenAPI 3.1 document, generated from the wire models."""
    documented = [route for route in ROUTES if route.documented]
    models: list[type[BaseModel]] = [ErrorReply]
    for route in documented:
        if route.request is not None:
            models.append(route.request)
        models.extend(route.replies)
    _, schema = models_json_schema(
        [(m, "validation") for m in dict.fromkeys(models)],
        ref_template="#/components/schemas/{model}",
        by_alias=True,
    )
    schemas = schema.get("$defs", {})

    def ref(m: type[BaseModel]) -> dict[str, str]:
        return {"$ref": f"#/components/schemas/{m.__name__}"}

    paths: dict[str, Any] = {}
    for route in documented:
        ok: dict[str, Any] = {"description": "OK"}
        if route.replies:
            replies = route.replies
            ok_schema = ref(replies[0]) if len(replies) == 1 else {"oneOf": [ref(r) for r in replies]}
            ok["content"] = {"application/json": {"schema": ok_schema}}
        elif route.octet_stream:
            ok["content"] = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
        responses: dict[str, Any] = {"200": ok}
        for status in route.errors:
            responses[str(status)] = {
                "description": ERRORS[status],
                "content": {PROBLEM_JSON: {"schema": ref(ErrorReply)}},
            }
        op: dict[str, Any] = {"operationId": route.operation, "summary": route.summary, "responses": responses}
        if route.path.startswith(CAMPAIGN_PATH):
            op["security"] = [{"bearer": []}]
        if route.parameters:
            op["parameters"] = [
                {
                    "name": p,
                    "in": "path",
                    "required": True,
                    "schema": {"type": "integer", "minimum": 0} if p == "unit" else {"type": "string"},
                }
                for p in route.parameters
            ]
        if route.request is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref(route.request)}}}
        paths.setdefault(route.path, {})[route.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "mlds lease API",
            "version": "v1",
            "description": "Workers lease workunits, heartbeat, and report results (DESIGN.md §2).",
        },
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


def render_openapi_json() -> str:
    """The document as checked in under docs/ (generated; see mlds_operator.artifacts.generate)."""
    return json.dumps(openapi_document(), indent=2, sort_keys=True) + "\n"
