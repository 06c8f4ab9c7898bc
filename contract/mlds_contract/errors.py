"""The mlds exception tree: every exception says what happens next.

    MldsError                      base of everything mlds raises on purpose
    ├── UserError                  a person's mistake (bad file, unknown target, bad flag):
    │   │                          the CLI prints one line and exits 2; never a traceback
    │   └── InvalidCampaign        a well-formed spec asking for something that does not exist;
    │                              the operator sets an InvalidSpec condition (kopf PermanentError)
    ├── TemporaryError             an outage (object store, lease server, Kubernetes API): retry
    │   │                          with backoff; the operator maps it to kopf TemporaryError(delay)
    │   └── StorageUnavailable
    └── UnitError                  one unit cannot be trained as asked (data of the wrong shape, a
                                   network that does not fit it): the worker reports the attempt
                                   "fail" (counted towards maxAttempts; retried with new seeds)

A unit given back through no fault of its own (the worker is shutting down) is not an exception: the
worker loop releases its lease, and those attempts are not counted.

The operator wraps UserError/TemporaryError in kopf's PermanentError/TemporaryError at the handler
boundary (the contract does not import kopf).

How a command ends is the other half of "what happens next": :class:`ExitCode` names the exit statuses
of ``mlds`` commands. The worker's matter most: the operator's worker Job keys its ``podFailurePolicy``
on them (:func:`mlds_operator.controller.pods.worker_job`).
"""

from __future__ import annotations

import enum

__all__ = ["ExitCode", "InvalidCampaign", "MldsError", "StorageUnavailable", "TemporaryError", "UnitError", "UserError"]


class ExitCode(enum.IntEnum):
    """Exit statuses of ``mlds`` commands (``mlds worker`` above all), and what each makes the cluster do.

    A worker pod's status decides its Job's next step: 0 completes it (once every pod exits 0), ``config``
    fails the whole Job at once (its podFailurePolicy ``FailJob`` rule: a new pod would fail the same
    way), and anything else counts towards the Job's ``backoffLimit`` (a new pod is started).
    """

    #: Done: the campaign is drained (or the worker was told to stop and released its lease).
    ok = 0
    #: An unexpected error (a bug, a crash): a new pod may do better, up to backoffLimit.
    failed = 1
    #: A configuration error a new pod would repeat: a UserError (bad flag, unreadable token file) or a
    #: request the lease API refused as malformed. Fails the worker Job at once.
    config = 2
    #: The lease API refused the token (401): a wrong token, or a campaign the server does not serve.
    #: Not ``config``: an operator that has just restarted answers 401 until its first pass reopens the
    #: campaign, so a new pod can succeed; the Job's backoffLimit bounds the retries.
    unauthorized = 3
    #: Interrupted by Ctrl-C (128 + SIGINT), as shells report it.
    interrupted = 130


class MldsError(Exception):
    """Base of every exception mlds raises on purpose."""


class UserError(MldsError):
    """A mistake in what a person asked for. Shown as one line; exit status 2."""


class InvalidCampaign(UserError):
    """A campaign spec that is well-formed but asks for something that does not exist."""


class TemporaryError(MldsError):
    """An outage that is expected to pass: retry after ``delay`` seconds."""

    def __init__(self, message: str, *, delay: float = 5.0) -> None:
        super().__init__(message)
        self.delay = delay


class StorageUnavailable(TemporaryError):
    """The object store (or local folder) could not be reached or written."""


class UnitError(MldsError):
    """A unit cannot be trained as asked: its attempt fails (FailKind.fail), like any training error."""
