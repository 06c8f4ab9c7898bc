"""The pure reconcile function of the operator: ``reconcile(campaign, observed) -> (actions, status)``.

Called by :mod:`mlds_operator.controller.sync` on every pass (create, update, resume and the status timer
all run the same pass; STYLE.md #3): the controller observes the cluster and the campaign's lease
service, calls :func:`reconcile`, carries out the actions and writes the status. Nothing here does
I/O, knows kopf or reads a clock: what happened is in :class:`Observed`, what to do in the returned
:class:`Outcome`. The unit tests drive it with hand-built observations.

Decisions made here (and why):

- **What to create**: the token Secret once the spec is valid (it also pins the campaign's *plan*:
  the hash of the fields that define its units), then one Job per pool once the lease service is open,
  so a worker never starts before the API that must answer it.
- **Jobs follow the spec by level**: a missing Job is created; parallelism (replicas) and suspend are
  patched in place; a Job whose immutable pod template differs (image, resources, ...) is deleted and
  created again on a later pass; a Job of a pool that left the spec is deleted. A Job that *completed*
  while units remain (a worker exited 0 early, e.g. after a SIGTERM) is replaced, because a completed
  Job starts no new pods. A *failed* Job (backoff limit, FailJob rule) is reported, not replaced:
  a new one would fail the same way until someone changes the pool.
- **The plan is immutable**: workload, networksPerTarget, seed, training and storage decide which
  units exist and where their results go. Editing them mid-campaign would mix two datasets in one
  bucket, so the edit is reported (``InvalidSpec``/``ImmutableFieldChanged``) and not acted on; the
  campaign carries on as created and picks the edit up only if it is reverted.
- **Invalid specs**: a spec the operator can never act on (unknown target, no storage) makes the
  campaign ``Failed`` with ``InvalidSpec`` — unless its lease service already runs (an edit broke a
  running campaign), in which case the edit is reported and the campaign carries on. Problems
  outside the spec (a missing credentials Secret, an unreachable bucket) keep it ``Pending`` and are
  retried every pass.
- **Kueue owns ``suspend`` of queued Jobs** (a pool with a ``queueName``): they are created suspended
  and the operator never patches their ``suspend``, so it never fights Kueue's admission or preemption.
  ``spec.suspend`` deletes a queued pool's Job instead (its Workload and quota go with it) and resume
  creates it again, queued. The campaign is ``Queued`` while every pool's Job waits for admission, and
  ``Running`` once Kueue admitted one (``Progressing`` says which queues it waits for).
- **Finished is final**: once every unit succeeded or failed nothing is created again (a Job deleted
  afterwards stays deleted), and after an operator restart a finished campaign whose status names its
  manifest is not reopened (that would re-read every result in the bucket for nothing).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from mlds_contract.campaign import (
    CampaignSpec,
    CampaignStatus,
    Phase,
    Pool,
    PoolStatus,
    TrainingCampaign,
    UnitCounts,
    campaign_phase,
)
from mlds_contract.errors import InvalidCampaign
from mlds_contract.plan import check_campaign, unit_count
from pydantic import ValidationError

from mlds_operator.controller import pods
from mlds_operator.controller.conditions import Change, CondType, Desired, Reason, merge, parse_conditions, rfc3339

__all__ = [
    "Action",
    "Campaign",
    "ConfigureBook",
    "CreateJob",
    "CreateSecret",
    "DeleteJob",
    "Observed",
    "ObservedJob",
    "Outcome",
    "PatchJob",
    "PoolProgress",
    "Problem",
    "Progress",
    "blocking_problem",
    "parse_campaign",
    "plan_hash",
    "reconcile",
    "status_patch",
    "terminal",
    "validate",
]


# ------------------------------------------------------------------------------------------ inputs


@dataclass(frozen=True)
class Problem:
    """Why the operator cannot act on a campaign (yet)."""

    reason: Reason
    message: str
    #: Only an edit of the campaign can fix it (as opposed to a Secret appearing or the bucket returning).
    permanent: bool = False
    #: It is the spec's fault: ``InvalidSpec`` turns True (an outage leaves the spec valid).
    spec: bool = True


@dataclass(frozen=True)
class Campaign:
    """A TrainingCampaign as read from the API: identity, the parsed spec and the last written status."""

    name: str
    namespace: str
    uid: str | None = None
    generation: int | None = None
    spec: CampaignSpec | None = None  # None when the body does not parse (see parse_campaign's problem)
    status: CampaignStatus | None = None
    raw_conditions: tuple[Any, ...] = ()
    parse_error: str | None = None  # why ``spec`` is None

    @property
    def ref(self) -> pods.CampaignRef:
        return pods.CampaignRef(self.name, self.namespace, self.uid)


def _readable(exc: ValidationError) -> str:
    first = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or "spec"
    more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
    return f"{where}: {first.get('msg', 'invalid')}{more}"


def parse_campaign(body: Mapping[str, Any]) -> tuple[Campaign, Problem | None]:
    """The campaign in a CR body. The CRD schema rejects most mistakes; what gets past it is a problem."""
    meta = body.get("metadata") or {}
    generation = meta.get("generation")
    raw_status = body.get("status") or {}
    status: CampaignStatus | None = None
    if isinstance(raw_status, Mapping) and raw_status:
        try:
            status = CampaignStatus.model_validate({k: v for k, v in raw_status.items() if k != "conditions"})
        except ValidationError:
            status = None  # a status we cannot read is rewritten from scratch
    conditions = tuple(raw_status.get("conditions") or ()) if isinstance(raw_status, Mapping) else ()
    campaign = Campaign(
        name=str(meta.get("name") or ""),
        namespace=str(meta.get("namespace") or ""),
        uid=meta.get("uid"),
        generation=generation if isinstance(generation, int) else None,
        status=status,
        raw_conditions=conditions,
    )
    try:
        parsed = TrainingCampaign.model_validate({"metadata": dict(meta), "spec": body.get("spec")})
    except ValidationError as exc:
        message = _readable(exc)
        return replace(campaign, parse_error=message), Problem(Reason.MalformedSpec, message, permanent=True)
    return replace(campaign, spec=parsed.spec), None


def validate(spec: CampaignSpec) -> Problem | None:
    """Semantic checks (mlds_contract.plan.check_campaign) plus what only a cluster needs."""
    try:
        check_campaign(spec)
    except InvalidCampaign as exc:
        return Problem(Reason.InvalidCampaign, str(exc), permanent=True)
    if spec.storage is None:
        return Problem(
            Reason.StorageRequired,
            "spec.storage is required in a cluster (an S3/MinIO bucket); local folders are for `mlds run`",
            permanent=True,
        )
    return None


def image_problem(spec: CampaignSpec, settings: pods.WorkerSettings) -> Problem | None:
    """A pool naming a worker image outside the operator's allow-list: a condition, and no Job for it."""
    refused = [p.image for p in spec.pools if p.image is not None and not settings.image_allowed(p.image)]
    if not refused:
        return None
    allowed = ", ".join(settings.allowed_image_prefixes)
    return Problem(
        Reason.ImageNotAllowed,
        f"worker image {refused[0]!r} is not under an allowed prefix ({allowed}); use one, or omit pools[].image",
        permanent=False,
    )


def plan_hash(spec: CampaignSpec) -> str:
    """Hash of the fields that define the campaign's units and where their results live."""
    storage = spec.storage
    plan = {
        "workload": spec.workload.wire(),
        "networksPerTarget": spec.networks_per_target,
        "seed": spec.seed,
        "training": spec.training.wire(),
        "storage": [storage.endpoint, storage.bucket, storage.prefix.strip("/")] if storage else None,
    }
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]


def blocking_problem(campaign: Campaign, pinned_plan: str | None) -> Problem | None:
    """A spec problem that stops the operator from acting: unparsable, invalid, or an immutable field edited."""
    if campaign.spec is None:
        return Problem(Reason.MalformedSpec, campaign.parse_error or "spec does not parse", permanent=True)
    problem = validate(campaign.spec)
    if problem is not None:
        return problem
    if pinned_plan is not None and pinned_plan != plan_hash(campaign.spec):
        return Problem(
            Reason.ImmutableFieldChanged,
            "workload, networksPerTarget, seed, training and storage cannot change once a campaign has "
            "started; revert the edit, or create a new campaign",
            permanent=True,
        )
    return None


@dataclass(frozen=True)
class PoolProgress:
    """One pool's figures in the lease book."""

    name: str
    succeeded: int = 0
    failed: int = 0
    workers: int = 0


@dataclass(frozen=True)
class Progress:
    """The campaign's lease service as observed (None in :class:`Observed` while it is not open)."""

    counts: UnitCounts
    pools: tuple[PoolProgress, ...] = ()
    failed_units: str = ""
    networks_per_hour: float | None = None
    eta: datetime | None = None
    finished: bool = False  # every unit succeeded or failed
    finalized: bool = False  # ... and the manifest is written
    manifest: str | None = None
    lease_url: str | None = None
    book_paused: bool = False
    book_max_attempts: int = 3
    book_lease_seconds: float = 600.0


@dataclass(frozen=True)
class ObservedJob:
    """What reconcile needs to know of an existing worker Job."""

    name: str
    pool: str | None
    campaign_uid: str | None = None
    parallelism: int | None = None
    suspend: bool = False
    template_hash: str | None = None
    active: int = 0
    succeeded: int = 0
    failed: int = 0
    complete: bool = False
    failure: str | None = None  # "Reason: message" of a Failed condition
    deleting: bool = False
    queue: str | None = None  # the Kueue queue-name label: Kueue decides its suspend

    @property
    def waiting_for_kueue(self) -> bool:
        """Queued and not (or no longer) admitted: Kueue keeps it suspended."""
        return self.queue is not None and self.suspend and not self.deleting

    @classmethod
    def from_manifest(cls, job: Mapping[str, Any]) -> ObservedJob:
        meta = job.get("metadata") or {}
        labels = meta.get("labels") or {}
        spec = job.get("spec") or {}
        status = job.get("status") or {}
        complete = False
        failure = None
        for cond in status.get("conditions") or ():
            if cond.get("status") != "True":
                continue
            if cond.get("type") == "Complete":
                complete = True
            elif cond.get("type") == "Failed":
                failure = f"{cond.get('reason') or 'Failed'}: {cond.get('message') or 'the Job failed'}"
        return cls(
            name=str(meta.get("name") or ""),
            pool=labels.get(pods.LABEL_POOL),
            campaign_uid=labels.get(pods.LABEL_CAMPAIGN_UID),
            parallelism=spec.get("parallelism"),
            suspend=bool(spec.get("suspend", False)),
            template_hash=(meta.get("annotations") or {}).get(pods.ANNOTATION_TEMPLATE),
            active=int(status.get("active") or 0),
            succeeded=int(status.get("succeeded") or 0),
            failed=int(status.get("failed") or 0),
            complete=complete,
            failure=failure,
            deleting=bool(meta.get("deletionTimestamp")),
            queue=labels.get(pods.KUEUE_QUEUE_LABEL) or None,
        )


@dataclass(frozen=True)
class Observed:
    """Everything reconcile looks at, gathered by the controller."""

    now: datetime
    token: str  # the campaign's token: from its Secret, or a new one if there is none yet
    secret_exists: bool = False
    pinned_plan: str | None = None  # the plan hash annotated on the token Secret
    jobs: Sequence[ObservedJob] = ()
    progress: Progress | None = None
    #: A problem met while opening the lease service (credentials, storage); spec problems are found here.
    problem: Problem | None = None
    #: Conditions as last written by this process (fresher than the body's when kopf's view lags).
    previous_conditions: Sequence[Any] | None = None
    #: Names of Jobs the last pass could not create: the name exists, but not as this campaign's Job.
    taken_job_names: frozenset[str] = frozenset()


# ----------------------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class CreateSecret:
    manifest: dict[str, Any]


@dataclass(frozen=True)
class CreateJob:
    manifest: dict[str, Any]


@dataclass(frozen=True)
class PatchJob:
    name: str
    patch: dict[str, Any]  # a merge patch of the Job


@dataclass(frozen=True)
class DeleteJob:
    name: str
    why: str


@dataclass(frozen=True)
class ConfigureBook:
    """Bring the lease book in line with the spec: pause (suspend), attempts and lease length."""

    paused: bool
    max_attempts: int
    lease_seconds: float


Action = CreateSecret | CreateJob | PatchJob | DeleteJob | ConfigureBook


@dataclass(frozen=True)
class Outcome:
    """What a pass should do and what the campaign's status is."""

    actions: list[Action]
    status: CampaignStatus
    changes: list[Change] = field(default_factory=list)  # condition changes: one Event each


# --------------------------------------------------------------------------------------- reconcile


def reconcile(campaign: Campaign, observed: Observed, settings: pods.WorkerSettings) -> Outcome:
    """One reconcile pass (see the module docstring)."""
    old = campaign.status
    spec = campaign.spec
    problem = blocking_problem(campaign, observed.pinned_plan if observed.secret_exists else None)
    if problem is None and spec is not None:
        problem = image_problem(spec, settings)
    progress = observed.progress
    actions: list[Action] = []

    if spec is None or (problem is not None and problem.permanent and progress is None):
        # Nothing can be done until the spec is fixed.
        assert problem is not None
        return _finish(campaign, observed, Phase.Failed, _invalid_conditions(spec, problem), old_units(campaign), [])

    if progress is None and old is not None and terminal(old):
        # A finished campaign after an operator restart: its status is final; nothing to reopen or create.
        return Outcome(actions=[], status=old.model_copy(update={"conditions": _old_conditions(campaign)}))

    if problem is None and not observed.secret_exists:
        actions.append(CreateSecret(pods.token_secret(campaign.ref, observed.token, plan_hash=plan_hash(spec))))

    if progress is None:
        # The lease service is not open: a problem outside the spec (or a spec problem found first).
        blocker = problem or observed.problem or Problem(Reason.StorageUnavailable, "opening the lease service")
        return _finish(
            campaign, observed, Phase.Pending, _blocked_conditions(spec, blocker), old_units(campaign), actions
        )

    job_failure: str | None = None
    job_failure_reason = Reason.WorkerJobFailed
    if problem is None:
        book = ConfigureBook(spec.suspend, spec.leases.max_attempts, float(spec.leases.duration_seconds))
        if (book.paused, book.max_attempts, book.lease_seconds) != (
            progress.book_paused,
            progress.book_max_attempts,
            progress.book_lease_seconds,
        ):
            actions.append(book)
        job_actions, job_failure = _jobs(campaign, spec, observed.jobs, progress, settings)
        actions += job_actions
        taken = sorted(
            a.manifest["metadata"]["name"]
            for a in job_actions
            if isinstance(a, CreateJob) and a.manifest["metadata"]["name"] in observed.taken_job_names
        )
        if taken and job_failure is None:
            job_failure = (
                f"Job {', '.join(taken)} exists but is not this campaign's (another campaign's pool, or someone "
                "else's Job); rename the pool or delete that Job"
            )
            job_failure_reason = Reason.JobNameTaken
    kueue = _kueue(campaign.name, spec, observed.jobs)
    # The spec's suspend, not the book's: this pass's ConfigureBook brings the book in line with it.
    phase = campaign_phase(
        progress.counts,
        paused=spec.suspend,
        finalized=progress.finalized,
        queued=kueue.queued,
        admitted=kueue.admitted,
    )
    conditions = _progress_conditions(spec, progress, phase, problem, job_failure, job_failure_reason, kueue)
    return _finish(campaign, observed, phase, conditions, progress.counts, actions, progress)


def _jobs(
    campaign: Campaign,
    spec: CampaignSpec,
    jobs: Sequence[ObservedJob],
    progress: Progress,
    settings: pods.WorkerSettings,
) -> tuple[list[Action], str | None]:
    """Actions that bring the worker Jobs in line with the spec, and the failures of Jobs that gave up."""
    actions: list[Action] = []
    failures: list[str] = []
    wanted = {pool.name: pool for pool in spec.pools}
    by_pool: dict[str, ObservedJob] = {}
    for job in jobs:
        stale = campaign.uid is not None and job.campaign_uid not in (None, campaign.uid)
        if stale or job.pool not in wanted:
            # A leftover of a deleted campaign of the same name, or a pool that left the spec.
            if not job.deleting:
                why = "it belongs to an earlier campaign of this name" if stale else "its pool left the spec"
                actions.append(DeleteJob(job.name, why))
            if stale and job.pool is not None:
                by_pool[job.pool] = job  # its name stays taken until it is gone
            continue
        by_pool[job.pool or ""] = job
    for name, pool in wanted.items():
        current = by_pool.get(name)
        if current is not None and current.failure is not None:
            failures.append(f"Job {current.name} failed ({current.failure})")
            continue
        action = _job_action(campaign, spec, pool, current, progress, settings)
        if action is not None:
            actions.append(action)
    return actions, "; ".join(failures) or None


def _job_action(
    campaign: Campaign,
    spec: CampaignSpec,
    pool: Pool,
    job: ObservedJob | None,
    progress: Progress,
    settings: pods.WorkerSettings,
) -> Action | None:
    """What one pool's Job needs (None: nothing). A failed Job is handled by the caller."""
    if progress.finished:
        return None  # the workers exit on their own; nothing is created or changed any more
    desired = pods.worker_job(campaign.ref, spec, pool, settings)
    queued = pods.queue_name(spec, pool) is not None
    if job is None:
        # A suspended campaign keeps no Job in Kueue's queue (see below).
        return None if queued and spec.suspend else CreateJob(desired)
    if job.deleting or (campaign.uid is not None and job.campaign_uid not in (None, campaign.uid)):
        return None  # wait until it is gone, then create ours
    why = None
    if job.template_hash != desired["metadata"]["annotations"][pods.ANNOTATION_TEMPLATE]:
        why = "its pod template changed; a new Job replaces it"
    elif job.complete:
        why = "it completed while units remain; a new Job replaces it"
    elif queued and spec.suspend:
        # Kueue would undo a suspend of an admitted Job; deleting it gives its quota back, and resume makes it anew.
        why = "spec.suspend is true: a queued Job leaves Kueue's queue and frees its quota"
    if why is not None:
        return DeleteJob(job.name, why)
    patch: dict[str, Any] = {}
    if job.parallelism != pool.replicas:
        patch["parallelism"] = pool.replicas
    if not queued and job.suspend != spec.suspend:  # a queued Job's suspend is Kueue's
        patch["suspend"] = spec.suspend
    return PatchJob(job.name, {"spec": patch}) if patch else None


def terminal(status: CampaignStatus) -> bool:
    """A finished campaign whose manifest is written: nothing will change any more."""
    return status.phase in (Phase.Succeeded, Phase.Failed) and bool(status.manifest)


@dataclass(frozen=True)
class _Kueue:
    """The campaign's worker Jobs as Kueue sees them."""

    waiting: tuple[tuple[str, str], ...] = ()  # (Job, LocalQueue) of the pools Kueue has not admitted
    queued: bool = False  # every pool is queued and none is admitted: the campaign waits for Kueue
    admitted: bool = False  # Kueue admitted (unsuspended) at least one pool's Job


def _kueue(name: str, spec: CampaignSpec, jobs: Sequence[ObservedJob]) -> _Kueue:
    by_pool = {j.pool: j for j in jobs if not j.deleting and j.queue is not None}
    waiting: list[tuple[str, str]] = []
    admitted = False
    for pool in spec.pools:
        queue = pods.queue_name(spec, pool)
        current = by_pool.get(pool.name)
        if queue is None:
            continue
        if current is not None and not current.suspend:
            admitted = True
        else:  # suspended by Kueue, or about to be created (suspended)
            waiting.append((current.name if current else pods.job_name(name, pool.name), queue))
    every_pool_queued = all(pods.queue_name(spec, pool) for pool in spec.pools)
    return _Kueue(waiting=tuple(waiting), queued=every_pool_queued and not admitted, admitted=admitted)


def _suspended(spec: CampaignSpec | None) -> Desired:
    if spec is not None and spec.suspend:
        return Desired(CondType.Suspended, True, Reason.SuspendedBySpec, "spec.suspend is true: no leases are granted")
    return Desired(CondType.Suspended, False, Reason.NotSuspended)


def _spec_condition(problem: Problem | None) -> Desired:
    if problem is not None and problem.spec:
        return Desired(CondType.InvalidSpec, True, problem.reason, problem.message)
    return Desired(CondType.InvalidSpec, False, Reason.SpecValid)


def _invalid_conditions(spec: CampaignSpec | None, problem: Problem) -> list[Desired]:
    why = f"{problem.reason.value}: {problem.message}"
    return [
        Desired(CondType.Ready, False, Reason.InvalidSpec, why),
        Desired(CondType.Progressing, False, Reason.InvalidSpec, "fix the spec; nothing runs until then"),
        Desired(CondType.Complete, False, Reason.InvalidSpec),
        Desired(CondType.Failed, True, Reason.InvalidSpec, why),
        _suspended(spec),
        _spec_condition(problem),
    ]


def _blocked_conditions(spec: CampaignSpec, problem: Problem) -> list[Desired]:
    return [
        Desired(CondType.Ready, False, problem.reason, problem.message),
        Desired(CondType.Progressing, False, problem.reason, "waiting for the lease service to open"),
        Desired(CondType.Complete, False, Reason.UnitsRemaining),
        Desired(CondType.Failed, False, Reason.NoFailures),
        _suspended(spec),
        _spec_condition(problem),
    ]


def _progress_conditions(
    spec: CampaignSpec,
    progress: Progress,
    phase: Phase,
    problem: Problem | None,
    job_failure: str | None,
    job_failure_reason: Reason = Reason.WorkerJobFailed,
    kueue: _Kueue | None = None,
) -> list[Desired]:
    c = progress.counts
    done = f"{c.succeeded}/{c.total} units succeeded"
    counts = f"{done}, {c.leased} leased, {c.pending} pending, {c.failed} failed"
    failed_text = (
        f"{c.failed} of {c.total} units failed {spec.leases.max_attempts} attempts each (units {progress.failed_units})"
    )
    serving = f"lease API at {progress.lease_url}" if progress.lease_url else "lease API serving"
    if progress.finished and progress.finalized:
        manifest = f"manifest at {progress.manifest}" if progress.manifest else "manifest written"
        ready = Desired(CondType.Ready, False, Reason.Finished, f"every unit succeeded or failed; {manifest}")
        progressing = Desired(CondType.Progressing, False, Reason.Finished, done)
        if c.failed == 0:
            complete = Desired(CondType.Complete, True, Reason.AllUnitsSucceeded, f"{done}; {manifest}")
            failed = Desired(CondType.Failed, False, Reason.NoFailures)
        else:
            complete = Desired(CondType.Complete, False, Reason.TooManyFailures, failed_text)
            failed = Desired(CondType.Failed, True, Reason.TooManyFailures, f"{failed_text}; {manifest}")
    else:
        if job_failure is not None:
            ready = Desired(CondType.Ready, False, job_failure_reason, job_failure)
        elif phase is Phase.Suspended:
            ready = Desired(CondType.Ready, False, Reason.SuspendedBySpec, "spec.suspend is true")
        else:
            ready = Desired(CondType.Ready, True, Reason.Serving, serving)
        if progress.finished:
            progressing = Desired(CondType.Progressing, True, Reason.Finalizing, f"{done}; writing the manifest")
        elif phase is Phase.Suspended:
            progressing = Desired(CondType.Progressing, False, Reason.SuspendedBySpec, counts)
        elif phase is Phase.Queued:
            jobs = ", ".join(f"{job} (LocalQueue {queue})" for job, queue in (kueue.waiting if kueue else ()))
            progressing = Desired(
                CondType.Progressing,
                False,
                Reason.Queued,
                f"waiting for Kueue to admit the worker Jobs{': ' + jobs if jobs else ''}; {counts}",
            )
        elif c.leased:
            progressing = Desired(CondType.Progressing, True, Reason.Training, counts)
        else:
            progressing = Desired(CondType.Progressing, True, Reason.WaitingForWorkers, counts)
        complete = Desired(CondType.Complete, False, Reason.UnitsRemaining, done)
        failed = Desired(CondType.Failed, False, Reason.NoFailures)
    return [ready, progressing, complete, failed, _suspended(spec), _spec_condition(problem)]


def old_units(campaign: Campaign) -> UnitCounts:
    """Unit counts while the service is not open: the last status's, or the total of a valid spec."""
    if campaign.status is not None and campaign.status.units.total:
        return campaign.status.units
    if campaign.spec is not None:
        try:
            total = unit_count(campaign.spec)
        except InvalidCampaign:
            return UnitCounts()
        return UnitCounts(total=total, pending=total)
    return UnitCounts()


def _old_conditions(campaign: Campaign) -> list[Any] | None:
    parsed = parse_conditions(list(campaign.raw_conditions))
    return parsed or None


def _finish(
    campaign: Campaign,
    observed: Observed,
    phase: Phase,
    desired: list[Desired],
    counts: UnitCounts,
    actions: list[Action],
    progress: Progress | None = None,
) -> Outcome:
    previous = observed.previous_conditions
    old = parse_conditions(list(previous)) if previous is not None else parse_conditions(list(campaign.raw_conditions))
    conditions, changes = merge(old, desired, now=observed.now, generation=campaign.generation)
    spec = campaign.spec
    pools: list[PoolStatus] | None = None
    if spec is not None:
        figures = {p.name: p for p in progress.pools} if progress is not None else {}
        old_pools = {p.name: p for p in (campaign.status.pools or ())} if campaign.status else {}
        pools = []
        for pool in spec.pools:
            fig = figures.get(pool.name)
            if fig is not None:
                pools.append(
                    PoolStatus(
                        name=pool.name,
                        accelerator=pool.accelerator,
                        workers=fig.workers,
                        succeeded=fig.succeeded,
                        failed=fig.failed,
                    )
                )
            elif pool.name in old_pools and progress is None:
                pools.append(old_pools[pool.name].model_copy(update={"workers": 0}))
            else:
                pools.append(PoolStatus(name=pool.name, accelerator=pool.accelerator))
    rate = None
    eta = None
    failed_units = None
    manifest = None
    if progress is not None:
        if progress.networks_per_hour is not None and not progress.finished:
            rate = round(progress.networks_per_hour, 1)
        if progress.eta is not None and not progress.finished:
            eta = rfc3339(progress.eta)
        failed_units = progress.failed_units or None
        manifest = progress.manifest if progress.finalized else None
    elif campaign.status is not None:
        failed_units = campaign.status.failed_units
    status = CampaignStatus(
        phase=phase,
        observed_generation=campaign.generation,
        units=counts,
        progress=f"{counts.succeeded}/{counts.total}" if counts.total else None,
        networks_per_hour=rate,
        eta=eta,
        pools=pools,
        failed_units=failed_units,
        manifest=manifest,
        conditions=conditions,
    )
    return Outcome(actions=actions, status=status, changes=changes)


def status_patch(old: Mapping[str, Any] | None, new: CampaignStatus) -> dict[str, Any] | None:
    """The merge patch turning status ``old`` (as read from the API) into ``new``; None when equal.

    Keys of ``old`` that ``new`` lacks are nulled (a merge patch deletes them); lists are replaced whole,
    as merge patches do.
    """
    wire = new.wire()
    current = dict(old or {})
    if _plain(current) == _plain(wire):
        return None
    patch: dict[str, Any] = dict(wire)
    for key in current:
        if key not in wire:
            patch[key] = None
    return patch


def _plain(value: Any) -> Any:
    """JSON-equal form (the API may hand back ints where we wrote floats and vice versa)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))
