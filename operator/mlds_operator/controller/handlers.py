"""The kopf handlers of `mlds operator`: thin, all alike (STYLE.md #2-#5).

Built into a fresh :class:`kopf.OperatorRegistry` by :func:`build_registry` (called by
:func:`mlds_operator.controller.command.run_operator`), so the status interval is a setting and tests can run several
operators in one process. Every handler hands the CR body to the
:class:`~mlds_operator.controller.sync.Controller` kept in kopf's ``memo``, writes the status patch it
returns through kopf's ``patch`` (one PATCH per pass, none when nothing changed) and returns None, so
kopf writes no bookkeeping into our status. Create, update (of the spec), resume and the status timer
all run the same level-based pass; there is no chain of handlers keyed on phases.

What happens next is said by the exception a change handler raises after the status is written:

- :class:`InvalidSpecError` (a ``kopf.PermanentError``): the spec must be edited; kopf does not retry,
  and the next edit runs the update handler again.
- Nothing for a problem outside the spec (the bucket or the API server is unreachable, a credentials
  Secret or MNIST's files are missing): the status timer's next tick is the retry, and the status, an
  Event on the condition's change and a warning in the log already say what is wrong. (Raising
  ``kopf.TemporaryError`` would only add kopf's ERROR line and Error Event per retry, for nothing.)

:class:`OutageError` is kept for the deletion handler, whose cleanup kopf must retry (the finalizer
waits on it).

kopf's own storage lives in annotations under ``mlds.dev/`` (progress of retried handlers, the last
handled spec), its finalizer is ``mlds.dev/cleanup``, and it posts Events only for warnings and errors:
the operator posts its own Events for condition changes.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import kopf
from mlds_contract.campaign import API_GROUP, API_VERSION, PLURAL
from mlds_contract.errors import TemporaryError

from mlds_operator.controller.sync import Controller, PassResult

__all__ = ["FINALIZER", "InvalidSpecError", "OutageError", "build_registry"]

FINALIZER = f"{API_GROUP}/cleanup"
_RESOURCE = (API_GROUP, API_VERSION, PLURAL)


class InvalidSpecError(kopf.PermanentError):
    """The campaign's spec cannot be acted on until someone edits it (status says why)."""


class OutageError(kopf.TemporaryError):
    """Storage, the Kubernetes API or a Secret the campaign needs is not there yet: retry later."""


class _QuietTimer(logging.Filter):
    """Drops kopf's "Timer 'status' succeeded." line: one per campaign per status interval is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.INFO and record.getMessage() == "Timer 'status' succeeded.")


def _write(patch: kopf.Patch, result: PassResult) -> None:
    if result.status_patch is not None:
        patch.status.update(result.status_patch)


def _raise_for(result: PassResult) -> None:
    if result.problem is not None and result.problem.permanent:
        raise InvalidSpecError(f"{result.problem.reason.value}: {result.problem.message}")
    # Anything else is fixable outside the spec (a Secret, the bucket) or by reverting an edit: the timer
    # checks again every status interval (see the module docstring).


def build_registry(*, status_interval: float = 5.0) -> kopf.OperatorRegistry:
    """The operator's handlers; ``status_interval`` is the seconds between timer passes (the status rate bound)."""
    registry = kopf.OperatorRegistry()

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        # One operator per cluster: the lease books live in its memory, so a second one would be a split
        # brain however it peered. The chart runs one replica with the Recreate strategy.
        settings.peering.standalone = True
        settings.persistence.finalizer = FINALIZER
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=API_GROUP, key="last-handled-configuration"
        )
        settings.posting.level = logging.WARNING
        # On shutdown, let a status pass in flight finish (they take well under a second) instead of
        # orphaning it mid-request: its checkpoint and status write are worth the wait.
        settings.background.instant_exit_timeout = 10.0
        objects = logging.getLogger("kopf.objects")
        if not any(isinstance(f, _QuietTimer) for f in objects.filters):
            objects.addFilter(_QuietTimer())

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # The same precedence as mlds_operator.controller.kube.Kube.connect: $KUBECONFIG, else in-cluster, else ~/.kube.
        if os.environ.get("KUBECONFIG"):
            return kopf.login_with_kubeconfig(**kwargs)
        info: kopf.ConnectionInfo | None = kopf.login_with_service_account(**kwargs)
        return info or kopf.login_with_kubeconfig(**kwargs)

    @kopf.on.cleanup(registry=registry)
    async def shutdown(memo: kopf.Memo, **_: Any) -> None:
        controller: Controller = memo.controller
        await controller.close()

    async def reconcile_pass(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: Any, **_: Any) -> None:
        controller: Controller = memo.controller
        try:
            result = await controller.sync(body, logger)
        except TemporaryError as exc:  # the API server or the bucket went away mid-pass
            logger.warning("reconcile pass failed; the status timer retries: %s", exc)
            return
        _write(patch, result)
        _raise_for(result)

    kopf.on.resume(*_RESOURCE, id="reconcile-on-resume", registry=registry)(reconcile_pass)
    kopf.on.create(*_RESOURCE, id="reconcile-on-create", registry=registry)(reconcile_pass)
    kopf.on.update(*_RESOURCE, id="reconcile-on-update", field="spec", registry=registry)(reconcile_pass)

    @kopf.timer(*_RESOURCE, id="status", interval=status_interval, registry=registry)
    async def status_pass(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: Any, **_: Any) -> None:
        controller: Controller = memo.controller
        try:
            result = await controller.sync(body, logger)
        except TemporaryError as exc:
            logger.warning("status pass failed; the next one retries: %s", exc)
            return
        _write(patch, result)

    @kopf.on.delete(*_RESOURCE, id="cleanup", registry=registry)
    async def cleanup(body: kopf.Body, memo: kopf.Memo, logger: Any, **_: Any) -> None:
        controller: Controller = memo.controller
        try:
            await controller.remove(
                body.metadata.namespace or "", body.metadata.name or "", logger, uid=body.metadata.uid
            )
        except TemporaryError as exc:
            raise OutageError(str(exc), delay=exc.delay) from exc

    return registry
