"""One reconcile pass of a campaign, around the pure :func:`mlds_operator.controller.reconcile.reconcile`.

The kopf handlers (:mod:`mlds_operator.controller.handlers`) call :meth:`Controller.sync` on create, update,
resume and every status-timer tick, and :meth:`Controller.remove` on deletion. Nothing here knows
kopf: a pass takes the CR body and a logger and returns the status patch and what went wrong. A pass:

1. **Observe**: the token Secret (its token, and the plan hash it pins), the campaign's lease service
   (opened on the first pass: credentials from ``spec.storage.credentialsSecret``, then
   :func:`~mlds_operator.leases.registry.open_campaign`, the same as ``mlds run``'s, which opens the store
   and :meth:`CampaignService.open`; that rebuilds the lease book from the store's checkpoint and the
   results after it, so an operator restart loses no finished unit), housekeeping of that service
   (:meth:`CampaignService.tick`: lease expiry, checkpoints, the manifest at the end) and the worker Jobs.
2. **Reconcile** (pure): actions and the new status.
3. **Act**: the Secret and Jobs through :mod:`mlds_operator.controller.kube`, the book's pause and settings
   in memory; an Event per condition change.
4. **Report**: the merge patch from the status the API holds to the new one (None when unchanged),
   which the handler writes through kopf's ``patch``: one status write per pass at most.

Passes of one campaign are serialised by a per-campaign lock: kopf runs the timer beside the
change handlers. Campaigns are independent; their passes interleave freely.

Passes come every status interval (5 s by default, plus the pass itself), too rarely to checkpoint
a fresh lease within ``ServiceSettings.grant_checkpoint_seconds`` of its grant (a restart honours only
leases the checkpoint knows), so :meth:`Controller.start_checkpoints` also runs
:meth:`Campaigns.checkpoint_leases` every second until :meth:`Controller.close`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import secrets
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from mlds_contract.campaign import Condition
from mlds_contract.errors import MldsError, StorageUnavailable, TemporaryError, UserError

from mlds_operator.controller import pods
from mlds_operator.controller.conditions import Change, Reason, event_manifest
from mlds_operator.controller.kube import Kube
from mlds_operator.controller.reconcile import (
    Action,
    Campaign,
    ConfigureBook,
    CreateJob,
    CreateSecret,
    DeleteJob,
    Observed,
    ObservedJob,
    PatchJob,
    PoolProgress,
    Problem,
    Progress,
    blocking_problem,
    parse_campaign,
    reconcile,
    status_patch,
    terminal,
)
from mlds_operator.leases.registry import Campaigns, open_campaign
from mlds_operator.leases.service import CampaignService, InputsMissing, ServiceSettings

__all__ = ["Controller", "OperatorSettings", "PassResult"]

#: Keys of the storage credentials Secret (spec.storage.credentialsSecret), as DESIGN.md §3 names them.
ACCESS_KEY = "accessKey"
SECRET_KEY = "secretKey"  # noqa: S105 - the name of a key in a Secret, not a secret

Logger = logging.Logger | logging.LoggerAdapter[Any]


@dataclass(frozen=True)
class OperatorSettings:
    """What the operator needs besides the cluster: worker pod settings and lease service tunables."""

    workers: pods.WorkerSettings
    service: ServiceSettings = field(default_factory=ServiceSettings)
    #: Names this operator instance in its Events (``reportingInstance``); the pod name in a cluster.
    instance: str = field(default_factory=socket.gethostname)


@dataclass(frozen=True)
class PassResult:
    """What a pass produced, for the handler to write; a problem of the spec stops kopf's retries.

    Outages met during the pass are logged and said in the status; the next pass (the status timer's)
    is their retry.
    """

    status_patch: dict[str, Any] | None
    problem: Problem | None = None  # why the campaign cannot run (InvalidSpec & co.)


@dataclass
class _Runtime:
    """What the operator keeps in memory per campaign between passes."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    service: CampaignService | None = None
    token: str | None = None
    conditions: list[Condition] | None = None  # as last computed (the body seen by a timer may lag)
    taken_jobs: set[str] = field(default_factory=set)  # Job names found taken by something else
    uid: str | None = None  # the campaign object this runtime belongs to


class Controller:
    """Runs reconcile passes for all campaigns of this operator (see the module docstring)."""

    def __init__(
        self,
        kube: Kube,
        campaigns: Campaigns,
        settings: OperatorSettings,
        *,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.kube = kube
        self.campaigns = campaigns
        self.settings = settings
        self._now = now
        self._runtimes: dict[tuple[str, str], _Runtime] = {}
        self._event_seq = 0
        self._closed = False
        self._stop_checkpoints = asyncio.Event()
        self._checkpoints: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------------------------------ pass

    async def sync(self, body: Mapping[str, Any], logger: Logger) -> PassResult:
        """One reconcile pass over a campaign's CR body."""
        campaign, _ = parse_campaign(body)
        if self._closed or (body.get("metadata") or {}).get("deletionTimestamp"):
            # Shutting down (kopf may run a last timer after the cleanup), or the campaign is being deleted
            # (a pass that waited for the lock while remove() ran): opening a service now would leak it.
            return PassResult(status_patch=None)
        key = (campaign.namespace, campaign.name)
        rt = self._runtimes.setdefault(key, _Runtime())
        async with rt.lock:
            return await self._sync_locked(campaign, body, rt, logger)

    async def _sync_locked(
        self, campaign: Campaign, body: Mapping[str, Any], rt: _Runtime, logger: Logger
    ) -> PassResult:
        ns, name = campaign.namespace, campaign.name
        if rt.uid is not None and campaign.uid is not None and rt.uid != campaign.uid:
            # Deleted and created again while no deletion handler ran (e.g. its finalizer was removed by
            # hand while the operator was down): the new campaign starts from its own state, not the old one's.
            logger.warning("campaign was re-created (uid %s, was %s); reopening it", campaign.uid, rt.uid)
            await self._close_service(ns, name, logger)
            rt.service, rt.token, rt.conditions, rt.taken_jobs = None, None, None, set()
        rt.uid = campaign.uid
        secret = await asyncio.to_thread(self.kube.get_secret, ns, pods.secret_name(name))
        external: Problem | None = None
        foreign = secret is not None and not pods.owns_secret(campaign.ref, secret)
        if foreign:
            # Never adopt (mount into worker pods, take the token from) a Secret someone else made (issue 13).
            external = Problem(
                Reason.TokenSecretNotOwned,
                f"Secret {pods.secret_name(name)!r} exists but was not created by mlds for this campaign (no "
                "ownerReference to it); the operator neither uses nor deletes it: remove or rename it",
                spec=False,
            )
            await self._close_service(ns, name, logger)  # also forgets a finished campaign's token
            rt.service = None
        token = (None if foreign else pods.token_from_secret(secret)) or rt.token or secrets.token_urlsafe(32)
        rt.token = token
        pinned = (
            None if foreign else ((secret or {}).get("metadata", {}).get("annotations") or {}).get(pods.ANNOTATION_PLAN)
        )
        problem = blocking_problem(campaign, pinned if secret is not None else None)
        finished_before = campaign.status is not None and terminal(campaign.status)
        if rt.service is None and problem is None and not finished_before and not foreign:
            external = await self._open(campaign, token, rt, logger)
        elif rt.service is None and finished_before and not foreign:
            # Not reopened (that would re-read every result), but its last workers hear "finished" and exit 0.
            self.campaigns.add_finished(ns, name, token)
        progress: Progress | None = None
        if rt.service is not None:
            try:
                await rt.service.tick()
            except StorageUnavailable as exc:
                logger.warning("storage unavailable during housekeeping (retried): %s", exc)
            progress = self._progress(rt.service, campaign)
        jobs = [ObservedJob.from_manifest(j) for j in await asyncio.to_thread(self.kube.list_jobs, ns, name)]
        observed = Observed(
            now=self._now(),
            token=token,
            secret_exists=secret is not None,
            pinned_plan=pinned,
            jobs=jobs,
            progress=progress,
            problem=external,
            previous_conditions=rt.conditions,
            taken_job_names=frozenset(rt.taken_jobs),
        )
        outcome = reconcile(campaign, observed, self.settings.workers)
        try:
            await self._apply(campaign, outcome.actions, rt, logger)
        except TemporaryError as exc:
            logger.warning("could not carry out the reconcile actions (retried): %s", exc)
        rt.conditions = list(outcome.status.conditions or ())
        await self._post_events(campaign, outcome.changes, logger)
        return PassResult(
            status_patch=status_patch(body.get("status"), outcome.status),
            problem=problem or (external if external is not None and external.spec else None),
        )

    async def _open(self, campaign: Campaign, token: str, rt: _Runtime, logger: Logger) -> Problem | None:
        """Open the campaign's store and lease service and serve it; a Problem when that is not possible yet."""
        spec = campaign.spec
        # blocking_problem said so:
        assert spec is not None
        assert spec.storage is not None
        storage = spec.storage
        ns, name = campaign.namespace, campaign.name
        access_key = secret_key = None
        if storage.credentials_secret:
            creds = await asyncio.to_thread(self.kube.get_secret, ns, storage.credentials_secret)
            if creds is None:
                return Problem(
                    Reason.CredentialsSecretMissing,
                    f"Secret {storage.credentials_secret!r} (spec.storage.credentialsSecret) does not exist "
                    f"in namespace {ns}",
                )
            access_key = _secret_value(creds, ACCESS_KEY)
            secret_key = _secret_value(creds, SECRET_KEY)
            if not access_key or not secret_key:
                return Problem(
                    Reason.CredentialsSecretInvalid,
                    f"Secret {storage.credentials_secret!r} needs the keys {ACCESS_KEY} and {SECRET_KEY}",
                )
        try:
            service = await open_campaign(
                self.campaigns,
                ns,
                name,
                spec,
                token=token,
                access_key=access_key,
                secret_key=secret_key,
                settings=self.settings.service,
            )
        except StorageUnavailable as exc:
            return Problem(Reason.StorageUnavailable, str(exc), spec=False)
        except InputsMissing as exc:  # not the spec's fault: the files may be uploaded any time (retried)
            return Problem(Reason.InputsMissing, str(exc), spec=False)
        except UserError as exc:  # the store refused the credentials, the bucket or a read
            return Problem(Reason.StorageRejected, str(exc))
        rt.service = service
        stats = service.book.stats()
        logger.info(
            "lease service open: %d/%d units succeeded, %d failed, results in %s",
            stats.succeeded,
            stats.total,
            stats.failed,
            service.store.url,
        )
        return None

    def _progress(self, service: CampaignService, campaign: Campaign) -> Progress:
        snap = service.snapshot()
        stats = snap.stats
        return Progress(
            counts=stats.unit_counts(),
            pools=tuple(PoolProgress(p.name, p.succeeded, p.failed, p.workers) for p in stats.pools),
            failed_units=stats.failed_units,
            networks_per_hour=snap.networks_per_hour,
            eta=snap.eta,
            finished=stats.finished,
            finalized=service.finalized,
            manifest=service.manifest_url,
            lease_url=pods.lease_url(self.settings.workers.lease_base_url, campaign.namespace, campaign.name),
            book_paused=service.book.paused,
            book_max_attempts=service.book.max_attempts,
            book_lease_seconds=service.book.lease_seconds,
        )

    async def _apply(self, campaign: Campaign, actions: list[Action], rt: _Runtime, logger: Logger) -> None:
        ns = campaign.namespace
        for action in actions:
            match action:
                case ConfigureBook() if rt.service is not None:
                    book = rt.service.book
                    if book.paused != action.paused:
                        logger.info("lease book %s", "paused (suspend: true)" if action.paused else "resumed")
                    book.paused = action.paused
                    book.max_attempts = action.max_attempts
                    book.lease_seconds = action.lease_seconds
                case CreateSecret() if await asyncio.to_thread(self.kube.create_secret, ns, action.manifest):
                    logger.info("created Secret %s", action.manifest["metadata"]["name"])
                case CreateJob():
                    name = action.manifest["metadata"]["name"]
                    spec = action.manifest["spec"]
                    if await asyncio.to_thread(self.kube.create_job, ns, action.manifest):
                        suspended = ", suspended" if spec["suspend"] else ""
                        logger.info("created Job %s (parallelism %d%s)", name, spec["parallelism"], suspended)
                        rt.taken_jobs.discard(name)
                    elif name not in rt.taken_jobs:
                        # Not among this campaign's Jobs, yet the name is taken: another campaign's pool
                        # ("a-b" + "c" and "a" + "b-c") or someone else's Job. The next pass reports it as
                        # Ready=False/JobNameTaken and keeps trying, in case that Job goes away.
                        logger.warning("Job %s exists but is not this campaign's", name)
                        rt.taken_jobs.add(name)
                case PatchJob() if await asyncio.to_thread(self.kube.patch_job, ns, action.name, action.patch):
                    logger.info("patched Job %s: %s", action.name, action.patch["spec"])
                case DeleteJob() if await asyncio.to_thread(self.kube.delete_job, ns, action.name):
                    logger.info("deleted Job %s: %s", action.name, action.why)
                case _:
                    pass  # nothing done: the object existed already, or was gone

    async def _post_events(self, campaign: Campaign, changes: list[Change], logger: Logger) -> None:
        for change in changes:
            logger.info("condition %s=%s (%s) %s", change.type, change.status, change.reason, change.message)
            self._event_seq = (self._event_seq + 1) % 256
            manifest = event_manifest(
                change,
                name=campaign.name,
                namespace=campaign.namespace,
                uid=campaign.uid,
                now=self._now(),
                instance=self.settings.instance,
                sequence=self._event_seq,
            )
            try:
                await asyncio.to_thread(self.kube.create_event, campaign.namespace, manifest)
            except MldsError as exc:  # an Event is a courtesy: never fail a pass over one
                logger.warning("could not post an Event (%s): %s", change.reason, exc)

    # -------------------------------------------------------------------------------------- deletion

    async def remove(self, namespace: str, name: str, logger: Logger, *, uid: str | None = None) -> None:
        """A campaign is being deleted: stop serving it, delete its Jobs and (its own) Secret; never its results."""
        rt = self._runtimes.setdefault((namespace, name), _Runtime())
        async with rt.lock:
            await self._close_service(namespace, name, logger)
            for job in await asyncio.to_thread(self.kube.list_jobs, namespace, name):
                job_name = job["metadata"]["name"]
                if await asyncio.to_thread(self.kube.delete_job, namespace, job_name):
                    logger.info("deleted Job %s", job_name)
            secret = await asyncio.to_thread(self.kube.get_secret, namespace, pods.secret_name(name))
            ref = pods.CampaignRef(name=name, namespace=namespace, uid=uid)
            if secret is not None and not pods.owns_secret(ref, secret):
                logger.warning("Secret %s is not this campaign's (no ownerReference to it): left alone", ref.name)
            elif await asyncio.to_thread(self.kube.delete_secret, namespace, pods.secret_name(name)):
                logger.info("deleted Secret %s", pods.secret_name(name))
            self._runtimes.pop((namespace, name), None)

    async def _close_service(self, namespace: str, name: str, logger: Logger) -> None:
        """Stop serving a campaign: its lease API answers 401 from now on; a last checkpoint is written."""
        service = self.campaigns.remove(namespace, name)
        if service is None:
            return
        try:
            await service.flush()  # a campaign re-created on the same prefix resumes from here
        except MldsError as exc:
            logger.warning("final checkpoint failed; results in the bucket are safe: %s", exc)
        service.store.close()

    def start_checkpoints(self) -> None:
        """Checkpoint fresh leases of every served campaign within seconds (see the module docstring)."""
        if self._checkpoints is None and not self._closed:
            self._checkpoints = asyncio.create_task(self._checkpoint_leases(), name="mlds lease checkpoints")

    async def _checkpoint_leases(self) -> None:
        every = max(0.1, self.settings.service.grant_checkpoint_seconds / 2)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_checkpoints.wait(), timeout=every)
            if self._stop_checkpoints.is_set():
                return
            try:
                await self.campaigns.checkpoint_leases()
            except Exception:  # a bug, not an outage (those are logged per campaign): say so and keep going
                logging.getLogger(__name__).exception("lease checkpoints failed; retried in %.1f s", every)

    async def close(self) -> None:
        """Operator shutdown: checkpoint every open campaign (workers keep training meanwhile)."""
        self._closed = True
        if self._checkpoints is not None:
            # Stopped, not cancelled: a checkpoint being written finishes before the last ones are written.
            self._stop_checkpoints.set()
            await self._checkpoints
        for (ns, name), service in self.campaigns.items():
            try:
                await service.flush()
            except MldsError as exc:
                logging.getLogger(__name__).warning("campaign=%s/%s final checkpoint failed: %s", ns, name, exc)
            service.store.close()
            self.campaigns.remove(ns, name)
        self._runtimes.clear()


def _secret_value(secret: Mapping[str, Any], key: str) -> str | None:
    raw = (secret.get("data") or {}).get(key)
    if not isinstance(raw, str):
        return None
    try:
        return base64.b64decode(raw, validate=True).decode().strip() or None
    except ValueError:
        return None
