"""Wire types of the lease HTTP protocol between workers and the lease server (DESIGN.md §2).

The lease server (the operator, or `mlds run`) owns a lease book (``mlds_operator.leases.book``); worker
pods pull units from it over HTTP. This module is the one definition of the request and reply bodies:
the server parses requests with these models, the worker builds them, and the lease API's OpenAPI
document is generated from them. Fields are snake_case in Python and camelCase on the wire, unknown
keys are rejected (``extra="forbid"``), and every field carries a description.

The routes that carry these bodies, and the errors each may answer, are listed once in
:data:`mlds_contract.routes.ROUTES` (the server's routes, its OpenAPI document and the worker's client
all come from that table). Every error is an :class:`ErrorReply` (``application/problem+json``); a
refused completion names its :class:`RejectReason`.

Completions and failures are keyed by unit (and the worker that reports them), not by lease: a verified
result is accepted even when the lease it was trained under expired or the server restarted and no
longer knows the lease id; but only for an attempt the server issued. A heartbeat for a lease the
server does not know re-establishes it for the units the server's last checkpoint says that lease held
(see ``HeartbeatRequest``). Workers are untrusted: the server believes what it issued and what it can
check (DESIGN.md §2).
"""

from __future__ import annotations

import enum
from typing import Annotated, Self

from pydantic import AwareDatetime, Field, StringConstraints, model_validator

from .campaign import Accelerator, Model
from .plan import UnitSpec
from .results import MAX_RESULT_FILE_BYTES

__all__ = [
    "MAX_COMPLETE_BATCH",
    "PROBLEM_JSON",
    "PROBLEM_TYPE_PREFIX",
    "CompleteBatchItem",
    "CompleteBatchReply",
    "CompleteBatchRequest",
    "CompleteReply",
    "CompleteRequest",
    "ErrorReply",
    "FailKind",
    "FailReply",
    "FailRequest",
    "FileDigest",
    "FileName",
    "HeartbeatReply",
    "HeartbeatRequest",
    "LeaseGrant",
    "LeaseId",
    "LeaseRequest",
    "LeasedUnit",
    "NoLease",
    "NoLeaseReason",
    "Outcome",
    "PoolName",
    "RejectReason",
    "ReleaseReply",
    "ReleaseRequest",
    "StackReport",
    "UnitAttempt",
    "UnitState",
    "WorkerId",
]

#: Media type of :class:`ErrorReply` bodies (RFC 9457 problem details).
PROBLEM_JSON = "application/problem+json"
#: What every :class:`ErrorReply` type starts with; the rest names the problem (``not-holder``, ``result-missing``).
PROBLEM_TYPE_PREFIX = "urn:mlds:lease:"

#: A worker's identity: its pod name in a cluster, ``<host>-<n>`` under `mlds run`. Up to a DNS name's length.
WorkerId = Annotated[str, StringConstraints(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9]([-._A-Za-z0-9]*)$")]
#: A pool name, as in the campaign's ``pools[].name`` (a DNS label).
PoolName = Annotated[str, StringConstraints(min_length=1, max_length=40, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")]
#: A result file name inside a unit's folder (``model.safetensors``, ``meta.json``...). No slashes and no
#: leading dot, so a name can never climb out of the unit's folder or hide a file.
FileName = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_][-._A-Za-z0-9]*$")]
#: Lease ids are opaque, URL-safe tokens chosen by the server.
LeaseId = Annotated[str, StringConstraints(min_length=8, max_length=128, pattern=r"^[-_A-Za-z0-9]+$")]


class UnitState(enum.StrEnum):
    """Where one unit is in its life. ``succeeded`` and ``failed`` are the terminal states."""

    pending = "pending"
    leased = "leased"
    succeeded = "succeeded"
    failed = "failed"


class Outcome(enum.StrEnum):
    """What the server did with a completion or failure report."""

    accepted = "accepted"  # it changed the unit's state (counted, retried or released)
    duplicate = "duplicate"  # already accounted for (the unit is done, or this attempt was counted): nothing changed


class FailKind(enum.StrEnum):
    """The two ways a worker gives a unit back."""

    fail = "fail"  # the attempt counts towards maxAttempts; the unit is retried with new seeds until then
    release = "release"  # not the unit's fault (worker shutting down): back to pending, attempt not counted


class RejectReason(enum.StrEnum):
    """Why the server refused a completion (HTTP 422, problem type ``urn:mlds:lease:result-<reason>``).

    The same values label the ``mlds_results_rejected_total`` metric. A rejection of the staged copy
    (:attr:`cured_by_upload`) is answered by one fresh upload per reason; after any other, or a second
    of the same reason, the worker reports the attempt failed.
    """

    missing = "missing"  # a declared file was never uploaded (or vanished from staging)
    size_mismatch = "size_mismatch"  # the stored object's size is not the declared one
    sha_mismatch = "sha_mismatch"  # the stored object's SHA-256 is not the declared one
    bad_files = "bad_files"  # the declared file names are not the dataset's result files
    bad_meta = "bad_meta"  # meta.json is not one bounded JSON object, contradicts the completion, or a field is invalid
    bad_model = "bad_model"  # a safetensors file's header is not the unit architecture's float32 tensors

    @property
    def cured_by_upload(self) -> bool:
        """The staged copy is missing or is not what the worker declared: an upload lost or torn on its way.

        A fresh upload of the same bytes can cure it. The other reasons are about the result itself, which
        the same bytes would only repeat: the server lets such a unit go at once, for another worker.
        """
        return self in (RejectReason.missing, RejectReason.size_mismatch, RejectReason.sha_mismatch)

    @property
    def problem_kind(self) -> str:
        """The kind of problem a refusal for this reason names (its type is :data:`PROBLEM_TYPE_PREFIX` + kind)."""
        return f"result-{self.value}"

    @classmethod
    def of_problem(cls, problem_type: str) -> RejectReason | None:
        """The reason an :class:`ErrorReply` of type ``problem_type`` names; None for any other problem."""
        kind = problem_type.removeprefix(PROBLEM_TYPE_PREFIX)
        if kind == problem_type:
            return None
        return next((reason for reason in cls if reason.problem_kind == kind), None)


class NoLeaseReason(enum.StrEnum):
    """Why a lease request got no units, and so what the worker does next."""

    paused = "paused"  # the campaign is suspended: ask again after retryAfterSeconds
    busy = "busy"  # nothing pending, but leased units may come back (expiry, failure): ask again later
    finished = "finished"  # every unit succeeded or failed: the worker exits


#: What ``cancel`` means in every reply but a heartbeat's (issue 14: a losing speculative copy stops promptly).
_CANCEL_OTHERS = (
    "Units of any lease this worker holds that another worker completed since the server last told it: stop "
    "training them. Told once (a heartbeat still lists a lease's own under its cancel). Empty for most replies."
)


#: Bound of a stack report's time totals: a million slots for a year, in seconds (far above any real worker).
_MAX_STACK_SECONDS = 1_048_576 * 366 * 86_400.0


class StackReport(Model):
    """How full a worker's stack of networks is (issue 14): slots, live members, and time-weighted totals.

    A worker training S networks as one stacked model reports it with every lease request and heartbeat;
    the server exports occupancy (live / slots) per pool and the mean over the campaign
    (``memberSeconds / slotSeconds``). Workers that train one network at a time send nothing.
    """

    slots: int = Field(ge=1, le=1_048_576, description="Networks the worker's stack holds when full (its width S).")
    live: int = Field(ge=0, le=1_048_576, description="Networks training in the stack now.")
    member_seconds: float = Field(
        0.0,
        ge=0,
        le=_MAX_STACK_SECONDS,
        allow_inf_nan=False,
        description="Since the worker started: the sum over its training rounds of seconds x live members.",
    )
    slot_seconds: float = Field(
        0.0,
        ge=0,
        le=_MAX_STACK_SECONDS,
        allow_inf_nan=False,
        description="Since the worker started: the sum over its training rounds of seconds x slots.",
    )

    @model_validator(mode="after")
    def _never_fuller_than_full(self) -> Self:
        # A report the server folds into occupancy means must be one a real stack can produce: a hostile
        # worker could otherwise push a pool's mean occupancy over 100% (or to inf/NaN).
        if self.live > self.slots:
            raise ValueError(f"live ({self.live}) exceeds slots ({self.slots})")
        if self.member_seconds > self.slot_seconds:
            raise ValueError("memberSeconds exceeds slotSeconds: a stack is never more than full")
        return self


class LeaseRequest(Model):
    """A worker asks for work."""

    worker: WorkerId = Field(description="The worker's id (pod name); the same in every later request.")
    pool: PoolName = Field(description="The worker's pool, as named in the campaign's spec.pools.")
    accelerator: Accelerator = Field(description="What the worker trains on: cpu, nvidia or rocm.")
    device_name: str = Field(
        max_length=200, description="Device the worker found, e.g. 'NVIDIA H100 80GB HBM3' or 'cpu'; for logs."
    )
    max_units: int = Field(
        ge=1, le=4096, description="Most units the worker takes in this lease (its pool's unitsPerLease)."
    )
    allow_speculative: bool = Field(
        False,
        description=(
            "When nothing is pending, accept a speculative copy of units other workers are training "
            "(the first verified completion wins)."
        ),
    )
    stack: StackReport | None = Field(
        None,
        description=(
            "A worker training a continuous stack: its occupancy. Such a worker holds several leases at once, "
            "asking for a small top-up lease (maxUnits = free slots) whenever members finish."
        ),
    )
    bundle_uploads: bool = Field(
        False,
        # Sent only when true: a server older than this field refuses unknown keys (the worker then asks without).
        exclude_if=lambda v: not v,
        description=(
            "The worker can upload each unit's files as one body: the grant then gives every unit a bundleUpload "
            "URL besides its per-file uploads. Servers that predate bundles answer 422 to this field."
        ),
    )


class LeasedUnit(Model):
    """One unit of a lease: what to train, and where to put the result."""

    spec: UnitSpec = Field(description="The unit: target, seeds (of this attempt) and resolved hyper-parameters.")
    uploads: dict[FileName, str] = Field(
        description="Result file name -> presigned PUT URL scoped to this unit's key (workers hold no credentials)."
    )
    bundle_upload: str | None = Field(
        None,
        # Absent unless asked for (LeaseRequest.bundleUploads): workers that predate it refuse unknown keys.
        exclude_if=lambda v: v is None,
        description=(
            "Only when the lease request set bundleUploads: a presigned PUT URL for all of the unit's files in one "
            "body, the files concatenated in the order uploads lists them (at most 256 MiB in all). A worker "
            "that uses it sets bundled in its completion, which declares each file's size and sha256 as usual."
        ),
    )


class LeaseGrant(Model):
    """Units leased to a worker until a deadline, which heartbeats extend."""

    lease_id: LeaseId = Field(description="Opaque, unguessable lease id; names the lease in heartbeat URLs.")
    deadline: AwareDatetime = Field(description="When the lease expires unless a heartbeat extends it (RFC 3339).")
    lease_seconds: float = Field(
        gt=0, description="Seconds from now to the deadline; workers time by this, immune to clock skew."
    )
    heartbeat_seconds: float = Field(gt=0, description="Suggested seconds between heartbeats (a third of the lease).")
    speculative: bool = Field(
        False, description="True when these units are also leased to another worker; the first completion wins."
    )
    units: list[LeasedUnit] = Field(min_length=1, description="The units, lowest index first.")
    cancel: list[int] = Field(default_factory=list, description=_CANCEL_OTHERS)


class NoLease(Model):
    """The answer to a lease request when there is nothing to lease now."""

    reason: NoLeaseReason = Field(description="paused, busy (ask again later) or finished (exit).")
    retry_after_seconds: float = Field(ge=0, description="When to ask again (ignored when finished).")
    cancel: list[int] = Field(default_factory=list, description=_CANCEL_OTHERS)


class UnitAttempt(Model):
    """A unit index and the attempt a worker is training it as."""

    unit: int = Field(ge=0, description="Unit index within the campaign.")
    attempt: int = Field(ge=0, description="Attempt number the lease gave for this unit (from 0).")


class HeartbeatRequest(Model):
    """A worker says it is alive and still training the units of a lease.

    If the server does not know the lease (it restarted), it re-establishes the lease under the same id
    for the listed units its last checkpoint says that lease held, at those attempts, that are still free
    (not done, failed or leased to another worker), and cancels the rest; if none is, the reply is 409
    (stop training this lease).
    """

    worker: WorkerId = Field(description="The worker's id; must be the lease's holder.")
    pool: PoolName = Field(description="The worker's pool (used when the lease is re-established).")
    units: list[UnitAttempt] = Field(
        description="Units of the lease the worker is still training (not yet completed or failed), with attempts."
    )
    stack: StackReport | None = Field(None, description="A worker training a continuous stack: its occupancy.")

    @model_validator(mode="after")
    def _units_unique(self) -> Self:
        seen: set[int] = set()
        for u in self.units:
            if u.unit in seen:
                raise ValueError(f"unit {u.unit} is listed twice")
            seen.add(u.unit)
        return self


class HeartbeatReply(Model):
    """The lease's new deadline, and units to stop training."""

    deadline: AwareDatetime = Field(description="The lease's new deadline (RFC 3339).")
    lease_seconds: float = Field(gt=0, description="Seconds from now to the new deadline.")
    cancel: list[int] = Field(
        default_factory=list,
        description=(
            "Units to stop training: completed by another worker or no longer held by this lease. "
            "Uploading or completing them anyway is harmless (a duplicate)."
        ),
    )
    readopted: bool = Field(
        False, description="True when the server did not know the lease and re-established it (after a restart)."
    )


class FileDigest(Model):
    """What a worker declares about one uploaded file; the server checks the stored object against it."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="Lower-case hex SHA-256 of the file's bytes.")
    size: int = Field(
        ge=0,
        le=MAX_RESULT_FILE_BYTES,
        description="File size in bytes (at most 256 MiB: the server holds a file in memory to verify it).",
    )


class CompleteRequest(Model):
    """A worker finished a unit and uploaded its files. The server verifies them in storage before counting it."""

    worker: WorkerId = Field(description="The worker's id.")
    pool: PoolName = Field(description="The worker's pool; the unit is counted for it.")
    unit: int = Field(ge=0, description="Unit index (the same as in the URL).")
    attempt: int = Field(ge=0, description="Attempt the unit was trained as (its seeds derive from it).")
    converged: bool = Field(
        description="False when training hit the epoch cap: a failed attempt, retried with new seeds."
    )
    files: dict[FileName, FileDigest] = Field(
        min_length=1, description="Uploaded file name -> its sha256 and size (model.safetensors, meta.json, ...)."
    )
    training_seconds: float = Field(ge=0, description="Wall-clock seconds spent training this unit.")
    epochs: int = Field(ge=0, description="Epochs run.")
    bundled: bool = Field(
        False,
        exclude_if=lambda v: not v,  # sent only when true: servers that predate bundles refuse unknown keys
        description=(
            "The files were uploaded as one body to the unit's bundleUpload URL (in the order the grant's "
            "uploads lists them), not one by one."
        ),
    )


class CompleteReply(Model):
    """What the server made of a completion."""

    status: Outcome = Field(description="accepted, or duplicate (the unit was already done: nothing counted twice).")
    state: UnitState = Field(description="The unit's state after this report.")
    cancel: list[int] = Field(default_factory=list, description=_CANCEL_OTHERS)


class FailRequest(Model):
    """A worker gives one unit back."""

    worker: WorkerId = Field(description="The worker's id.")
    pool: PoolName = Field(description="The worker's pool; a counted failure is charged to it.")
    unit: int = Field(ge=0, description="Unit index (the same as in the URL).")
    attempt: int = Field(ge=0, description="Attempt the unit was trained as.")
    kind: FailKind = Field(description="fail (the attempt counts) or release (back to pending, not counted).")
    reason: str = Field("", max_length=4096, description="Why, for logs and events (an exception's message).")


class FailReply(Model):
    """What the server made of a failure report."""

    status: Outcome = Field(description="accepted, or duplicate (already accounted for: nothing changed).")
    state: UnitState = Field(description="The unit's state after this report.")


class ReleaseRequest(Model):
    """A worker gives back every unit it still holds under a lease (shutting down): none is counted as failed."""

    worker: WorkerId = Field(description="The worker's id; must be the lease's holder.")
    reason: str = Field("", max_length=4096, description="Why, for logs.")


class ReleaseReply(Model):
    """Units a release returned to pending."""

    released: list[int] = Field(description="Unit indices given back, lowest first.")


class ErrorReply(Model):
    """A problem-details body (RFC 9457) for every error answer of the lease API."""

    type: str = Field("about:blank", description="A URI naming the kind of problem, e.g. urn:mlds:lease:not-holder.")
    title: str = Field(description="A short, fixed summary of the kind of problem, e.g. 'Not the lease holder'.")
    status: int | None = Field(None, ge=100, le=599, description="The HTTP status code, repeated for convenience.")
    detail: str | None = Field(None, description="What went wrong this time, in a sentence a person can act on.")
    instance: str | None = Field(None, description="The request path the problem occurred on.")


#: Most completions in one ``complete-batch`` request: a K-unit lease's worth for any pool (``unitsPerLease``
#: is at most this), and ~0.5 MB of JSON, inside the server's 1 MiB request-body limit.
MAX_COMPLETE_BATCH = 1024


class CompleteBatchRequest(Model):
    """Several units finished at once (a stack's members): each is verified and counted as if completed alone."""

    completions: list[CompleteRequest] = Field(
        min_length=1,
        max_length=MAX_COMPLETE_BATCH,
        description="The completions, each as the single-unit route takes it; at most one per unit.",
    )

    @model_validator(mode="after")
    def _distinct_units(self) -> Self:
        units = [c.unit for c in self.completions]
        if len(set(units)) != len(units):
            raise ValueError("each unit may appear at most once in a batch")
        return self


class CompleteBatchItem(Model):
    """What the server made of one completion of a batch: a reply, or the problem a single completion would answer."""

    unit: int = Field(ge=0, description="The completion's unit.")
    status: Outcome | None = Field(None, description="accepted or duplicate; absent when the completion was refused.")
    state: UnitState | None = Field(None, description="The unit's state after this report; absent when refused.")
    error: ErrorReply | None = Field(
        None, description="Why this completion was refused (the single-unit route's 404, 422 or 503 answer)."
    )


class CompleteBatchReply(Model):
    """One item per completion, in the request's order; one refused result never refuses the others."""

    results: list[CompleteBatchItem] = Field(description="Per completion, in request order.")
