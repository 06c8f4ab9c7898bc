"""TrainingCampaign conditions: their types and reasons as named constants, and when they flip.

Called by :mod:`mlds_operator.controller.reconcile` (which decides each condition's desired status, reason and
message) and by :mod:`mlds_operator.controller.sync` (which posts an Event per change). Pure: no kopf, no
Kubernetes client; the time is passed in.

A campaign always carries all six conditions (STYLE.md #4, the shape of jobset and kueue), so
``kubectl describe tc`` shows the whole picture and tools can wait on any of them::

    Ready        True while the lease service is open and the worker Jobs are in place
    Progressing  True while units are being trained (or the finished campaign is being finalized)
    Complete     True once every unit succeeded and the manifest is written
    Failed       True when the campaign can never complete: units failed, or the spec is invalid
    Suspended    True while spec.suspend is true
    InvalidSpec  True while the spec cannot be acted on; the message says what to fix

Rules (metav1.Condition): ``lastTransitionTime`` changes only when the status flips; the reason and
message may change without a flip. An Event is due when the status flips *or* the reason changes
(a new reason is news; a new message with the same reason is usually a count going up, which is not),
and when a condition first appears True or with a warning reason (one that first appears False for an
everyday reason, like ``Complete=False UnitsRemaining`` on a new campaign, is the default, not news).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from mlds_contract.campaign import API_GROUP, API_VERSION, KIND, Condition

__all__ = [
    "EVENT_COMPONENT",
    "FALSE",
    "TRUE",
    "WARNING_REASONS",
    "Change",
    "CondType",
    "Desired",
    "Reason",
    "event_manifest",
    "event_type",
    "merge",
    "parse_conditions",
    "rfc3339",
]

TRUE = "True"
FALSE = "False"

#: ``source.component`` / ``reportingComponent`` of our Events (the FROM column of kubectl describe).
EVENT_COMPONENT = "mlds-operator"


class CondType(enum.StrEnum):
    """The condition types, in the order status lists them."""

    Ready = "Ready"
    Progressing = "Progressing"
    Complete = "Complete"
    Failed = "Failed"
    Suspended = "Suspended"
    InvalidSpec = "InvalidSpec"


class Reason(enum.StrEnum):
    """Every reason the operator writes (CamelCase, as metav1.Condition requires)."""

    # Ready
    Serving = "Serving"  # lease service open, Jobs in place
    Finished = "Finished"  # every unit succeeded or failed; nothing left to serve
    WorkerJobFailed = "WorkerJobFailed"  # a pool's Job hit its backoff limit or a FailJob rule
    JobNameTaken = "JobNameTaken"  # a pool's Job name belongs to something else (another campaign's pool)
    StorageUnavailable = "StorageUnavailable"  # the bucket could not be reached (retried)
    InputsMissing = "InputsMissing"  # ds4 on MNIST: the IDX files are not in the campaign's storage (retried)
    # Progressing
    Training = "Training"  # units are leased to workers
    WaitingForWorkers = "WaitingForWorkers"  # units pending, none leased
    Finalizing = "Finalizing"  # all units done, the manifest is being written
    Queued = "Queued"  # every worker Job waits for Kueue to admit it
    # Complete / Failed
    AllUnitsSucceeded = "AllUnitsSucceeded"
    UnitsRemaining = "UnitsRemaining"
    TooManyFailures = "TooManyFailures"  # units failed maxAttempts times: the campaign cannot complete
    NoFailures = "NoFailures"
    # Suspended
    SuspendedBySpec = "SuspendedBySpec"
    NotSuspended = "NotSuspended"
    # InvalidSpec (True) and the shared "because the spec is invalid" reason of the other conditions
    SpecValid = "SpecValid"
    InvalidSpec = "InvalidSpec"
    MalformedSpec = "MalformedSpec"  # the body does not parse into the contract (schema bypassed)
    InvalidCampaign = "InvalidCampaign"  # check_campaign: unknown target, duplicate names, ...
    StorageRequired = "StorageRequired"  # no spec.storage: a cluster cannot use a local folder
    CredentialsSecretMissing = "CredentialsSecretMissing"
    CredentialsSecretInvalid = "CredentialsSecretInvalid"
    StorageRejected = "StorageRejected"  # the store refused the settings (access denied, bad endpoint)
    ImmutableFieldChanged = "ImmutableFieldChanged"  # workload/seed/training/storage edited mid-campaign
    ImageNotAllowed = "ImageNotAllowed"  # a pool names a worker image outside the operator's allow-list
    # Ready (False): a Secret named like the campaign's token Secret that the operator did not create
    TokenSecretNotOwned = "TokenSecretNotOwned"


#: Reasons that make an Event a Warning when their condition turns (or stays) the "bad" way.
WARNING_REASONS: frozenset[str] = frozenset(
    {
        Reason.WorkerJobFailed,
        Reason.JobNameTaken,
        Reason.StorageUnavailable,
        Reason.InputsMissing,
        Reason.TooManyFailures,
        Reason.InvalidSpec,
        Reason.MalformedSpec,
        Reason.InvalidCampaign,
        Reason.StorageRequired,
        Reason.CredentialsSecretMissing,
        Reason.CredentialsSecretInvalid,
        Reason.StorageRejected,
        Reason.ImmutableFieldChanged,
    }
)


@dataclass(frozen=True)
class Desired:
    """What reconcile wants a condition to say now."""

    type: CondType
    status: bool
    reason: Reason
    message: str = ""


@dataclass(frozen=True)
class Change:
    """A condition whose status flipped or whose reason changed (or that appeared): one Event."""

    type: str
    status: str
    reason: str
    message: str
    previous_status: str | None  # None: the condition is new

    @property
    def flipped(self) -> bool:
        return self.previous_status != self.status


def rfc3339(t: datetime) -> str:
    """``2026-01-01T12:00:00Z``: second precision, UTC, as Kubernetes writes times."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge(
    old: Iterable[Condition] | None,
    desired: Iterable[Desired],
    *,
    now: datetime,
    generation: int | None,
) -> tuple[list[Condition], list[Change]]:
    """The new condition list and the changes worth an Event.

    ``lastTransitionTime`` is carried over from ``old`` unless the status flips (or the condition is
    new). Conditions in ``old`` that are not desired any more are dropped.
    """
    previous = {c.type: c for c in old or ()}
    out: list[Condition] = []
    changes: list[Change] = []
    stamp = rfc3339(now)
    for want in desired:
        status = TRUE if want.status else FALSE
        before = previous.get(want.type.value)
        flipped = before is None or before.status != status
        out.append(
            Condition(
                type=want.type.value,
                status=status,
                reason=want.reason.value,
                message=want.message,
                last_transition_time=stamp if flipped or before is None else before.last_transition_time,
                observed_generation=generation,
            )
        )
        # A condition that appears False with an everyday reason is the default state, not news.
        quiet_start = before is None and not want.status and want.reason not in WARNING_REASONS
        reason_changed = before is not None and before.reason != want.reason.value
        if not quiet_start and (flipped or reason_changed):
            changes.append(
                Change(
                    type=want.type.value,
                    status=status,
                    reason=want.reason.value,
                    message=want.message,
                    previous_status=before.status if before is not None else None,
                )
            )
    return out, changes


def event_type(change: Change) -> str:
    """``Warning`` for bad news (a warning reason), ``Normal`` otherwise."""
    return "Warning" if change.reason in WARNING_REASONS else "Normal"


def event_manifest(
    change: Change,
    *,
    name: str,
    namespace: str,
    uid: str | None,
    now: datetime,
    instance: str,
    sequence: int,
) -> dict[str, Any]:
    """A core/v1 Event about a campaign's condition change (what ``kubectl describe`` lists).

    ``sequence`` makes the Event's name unique (the API server does not generate names for Events
    created with ``generateName`` in every client, and the emulator does not generate them at all).
    """
    stamp = rfc3339(now)
    if change.previous_status is None:
        text = f"{change.type} is {change.status}"
    elif change.flipped:
        text = f"{change.type} changed to {change.status}"
    else:
        text = f"{change.type} is still {change.status}, now because {change.reason}"
    message = f"{text}: {change.message}" if change.message else text
    involved: dict[str, Any] = {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "name": name,
        "namespace": namespace,
    }
    if uid:
        involved["uid"] = uid
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{name}.{int(now.timestamp() * 1e6):x}{sequence:02x}", "namespace": namespace},
        "involvedObject": involved,
        "type": event_type(change),
        "reason": change.reason,
        "message": message[:1024],  # the API server caps Event messages at 1 kB
        "action": f"Set{change.type}",
        "source": {"component": EVENT_COMPONENT},
        "reportingComponent": EVENT_COMPONENT,
        "reportingInstance": instance,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }


def parse_conditions(raw: object) -> list[Condition]:
    """Conditions from a status as read from the API (entries that do not parse are skipped)."""
    if not isinstance(raw, list):
        return []
    out = []
    for item in raw:
        if isinstance(item, Condition):
            out.append(item)
        elif isinstance(item, Mapping):
            try:
                out.append(Condition.model_validate(dict(item)))
            except ValueError:
                continue
    return out
