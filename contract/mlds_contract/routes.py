"""The lease API's routes, listed once: method, path, bodies, summary and the errors each may answer.

Three sides read this table, so they cannot drift apart:

- the lease server (:func:`mlds_operator.leases.http.create_app`) registers one handler per route;
- its OpenAPI document (:func:`mlds_operator.leases.http.openapi_document`, checked in as
  ``docs/lease-api.openapi.json``) is generated from it;
- the worker's client (:class:`mlds_worker.client.LeaseClient`) builds its request paths with
  :meth:`Route.campaign_path` below the campaign's base URL it was given (``MLDS_LEASE_URL``).

Each campaign is served under :data:`CAMPAIGN_PATH`; its bearer token authorises only that prefix. The
bodies are the wire types of :mod:`mlds_contract.lease`; every error answer is an
:class:`~mlds_contract.lease.ErrorReply` (RFC 9457 problem details) whose status is one of the route's
``errors`` (:data:`ERRORS` says what each means). A 500 is never listed: it is a bug.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from pydantic import BaseModel

from .lease import (
    CompleteBatchReply,
    CompleteBatchRequest,
    CompleteReply,
    CompleteRequest,
    FailReply,
    FailRequest,
    HeartbeatReply,
    HeartbeatRequest,
    LeaseGrant,
    LeaseRequest,
    NoLease,
    ReleaseReply,
    ReleaseRequest,
)

__all__ = [
    "CAMPAIGN_PATH",
    "COMPLETE",
    "COMPLETE_BATCH",
    "ERRORS",
    "FAIL",
    "HEALTH",
    "HEARTBEAT",
    "INPUT",
    "LEASE",
    "OPENAPI",
    "RELEASE",
    "ROUTES",
    "UPLOAD",
    "Route",
]

#: Where one campaign's lease API lives; a worker's ``MLDS_LEASE_URL`` is a server address plus this path.
CAMPAIGN_PATH: Final = "/v1/campaigns/{namespace}/{name}"

#: What each error status means on this API (the OpenAPI document's response descriptions).
ERRORS: Final[dict[int, str]] = {
    401: "Missing or wrong bearer token (a campaign this server does not serve answers the same).",
    403: "The upload URL is invalid, for another key, or expired.",
    404: (
        "Unknown unit; for an input, not one of the campaign's input files or not under its storage prefix; "
        "for an upload, no local-folder store behind this server."
    ),
    409: "The worker does not hold this lease.",
    413: "The body is larger than the server accepts.",
    422: "Malformed body; for a completion also a result that failed verification (urn:mlds:lease:result-<reason>).",
    503: "Storage unavailable; retry after Retry-After seconds.",
}

_PARAM = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class Route:
    """One route of the lease API."""

    #: The OpenAPI operationId; the server's handler table is keyed by it.
    operation: str
    method: str
    #: The full path template; ``{param}`` segments are path parameters.
    path: str
    summary: str
    #: The JSON request body's model (None: no JSON body).
    request: type[BaseModel] | None
    #: The models a 200 answer may carry (empty: no JSON body, or the bytes of a file: ``octet_stream``).
    replies: tuple[type[BaseModel], ...]
    #: Error statuses the route may answer (each an ErrorReply), besides 500.
    errors: tuple[int, ...]
    #: Path parameters whose value spans several segments (an object key with slashes).
    multi_segment: frozenset[str] = frozenset()
    #: In the OpenAPI document. False for a route a client never composes itself.
    documented: bool = True
    #: A 200 answer carries a file's bytes (``application/octet-stream``).
    octet_stream: bool = False

    @property
    def parameters(self) -> tuple[str, ...]:
        """The path parameters, in path order."""
        return tuple(_PARAM.findall(self.path))

    def campaign_path(self, **params: str | int) -> str:
        """The path below a campaign's base URL, parameters filled in: ``/leases/L1/heartbeat``.

        What a worker appends to its ``MLDS_LEASE_URL``. Values are inserted as they are: lease ids are
        URL-safe by their pattern and units are integers. ValueError for a route outside a campaign.
        """
        if not self.path.startswith(CAMPAIGN_PATH + "/"):
            raise ValueError(f"{self.operation} is not a campaign route: {self.path}")
        return self.path.removeprefix(CAMPAIGN_PATH).format(**params)


LEASE: Final = Route(
    "lease",
    "POST",
    f"{CAMPAIGN_PATH}/leases",
    "Lease up to maxUnits units, or learn why there are none (paused, busy, finished).",
    LeaseRequest,
    (LeaseGrant, NoLease),
    (401, 413, 422, 503),  # 503: signing upload URLs may ask S3 for the bucket's region once
)
HEARTBEAT: Final = Route(
    "heartbeat",
    "POST",
    f"{CAMPAIGN_PATH}/leases/{{lease}}/heartbeat",
    "Extend a lease; re-establishes it after a server restart when its units are free.",
    HeartbeatRequest,
    (HeartbeatReply,),
    (401, 409, 413, 422),
)
RELEASE: Final = Route(
    "release",
    "POST",
    f"{CAMPAIGN_PATH}/leases/{{lease}}/release",
    "Give back every unit still held under a lease, uncounted (worker shutting down).",
    ReleaseRequest,
    (ReleaseReply,),
    (401, 409, 413, 422),
)
COMPLETE: Final = Route(
    "complete",
    "POST",
    f"{CAMPAIGN_PATH}/units/{{unit}}/complete",
    "Report a trained unit whose files were uploaded; verified in storage before it counts.",
    CompleteRequest,
    (CompleteReply,),
    (401, 404, 413, 422, 503),
)
#: Several completions in one request (a stack's members that finished together): the server verifies them
#: concurrently and answers one item per completion, so a refused result refuses only itself.
COMPLETE_BATCH: Final = Route(
    "completeBatch",
    "POST",
    f"{CAMPAIGN_PATH}/completions",
    "Report several trained units at once; each is verified and counted exactly as by complete.",
    CompleteBatchRequest,
    (CompleteBatchReply,),
    (401, 413, 422),  # per-completion refusals (404, 422, 503) are items of the 200 answer
)
FAIL: Final = Route(
    "fail",
    "POST",
    f"{CAMPAIGN_PATH}/units/{{unit}}/fail",
    "Give one unit back: fail (attempt counted) or release (not counted).",
    FailRequest,
    (FailReply,),
    (401, 404, 413, 422),
)
#: The files a campaign's data is read from that no worker can make (ds4 with ``images: mnist``: the MNIST IDX
#: files placed under the storage prefix; :func:`mlds_workloads.input_files` names them). Workers hold no
#: storage credentials, so the server reads them from the store; a worker fetches each once.
INPUT: Final = Route(
    "input",
    "GET",
    f"{CAMPAIGN_PATH}/inputs/{{file}}",
    "Download one input file of the campaign's data (ds4 on MNIST: an IDX file under the storage prefix).",
    None,
    (),
    (401, 404, 503),
    octet_stream=True,
)
HEALTH: Final = Route("health", "GET", "/healthz", "Liveness.", None, (), ())
OPENAPI: Final = Route("openapi", "GET", "/openapi.json", "This document.", None, (), ())
#: Result uploads to a local-folder store (``mlds run``): the URL is presigned by
#: :meth:`mlds_operator.storage.store.LocalStore.presign_put` and handed out in a grant, so no client
#: composes it; with an S3 store, workers upload to S3 itself.
UPLOAD: Final = Route(
    "upload",
    "PUT",
    "/v1/objects/{key}",
    "Store one result file at a presigned key (local-folder stores only).",
    None,
    (),
    (403, 404, 409, 413),  # 409: the lease the URL was granted under is unknown (until re-established) or gone
    multi_segment=frozenset({"key"}),
    documented=False,
)

#: Every route the lease server serves (besides ``GET /metrics``, which the metrics layer adds).
ROUTES: Final = (LEASE, HEARTBEAT, RELEASE, COMPLETE, COMPLETE_BATCH, FAIL, INPUT, HEALTH, OPENAPI, UPLOAD)
