"""The mlds exception tree: every exception says what happens next.

    MldsError                      base of everything mlds raises on purpose
    ├── UserError                  a person's mistake (bad file, unknown target, bad flag):
    │   │                          the CLI prints one line and exits 2; never a traceback
    │   └── InvalidCampaign        a well-formed spec asking for something that does not exist;
    │                              the operator sets an InvalidSpec condition (kopf PermanentError)
    ├── TemporaryError             an outage (object store, lease server, Kubernetes API): retry
    │   │                          with backoff; the operator maps it to kopf TemporaryError(delay)
    │   └── StorageUnavailable
    └── UnitError                  one unit could not be trained or delivered. `retry` says which
                                   lease-protocol failure kind the worker reports:
                                   retry=True  -> "release": the unit goes back to pending and the
                                                  attempt is not counted (e.g. worker shutting down)
                                   retry=False -> "fail": the attempt counts towards maxAttempts

The operator wraps UserError/TemporaryError in kopf's PermanentError/TemporaryError at the handler
boundary (the contract does not import kopf).
"""

from __future__ import annotations

__all__ = ["InvalidCampaign", "MldsError", "StorageUnavailable", "TemporaryError", "UnitError", "UserError"]


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
    """A unit could not be trained or delivered."""

    def __init__(self, message: str, *, retry: bool = False) -> None:
        super().__init__(message)
        self.retry = retry
