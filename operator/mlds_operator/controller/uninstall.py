"""The chart's pre-delete hook: stop the operator, then release every campaign from its finalizer.

Run by the Job of ``charts/mlds/templates/uninstall.yaml`` on ``helm uninstall`` (``python -m
mlds_operator.controller.uninstall``), in the operator image, before Helm deletes the Deployment.

Why: kopf puts the ``mlds.dev/cleanup`` finalizer on every campaign, so that deleting one always closes
its lease service and removes its Jobs and token Secret. Once the operator is gone nobody removes that
finalizer, and ``kubectl delete tc`` would hang for ever (the CRD and the campaigns outlive the chart:
Helm never deletes CRDs). So, in order:

1. scale the operator's Deployment to zero and wait until its pod is gone: on SIGTERM the operator
   checkpoints every campaign, and a stopped operator cannot put the finalizer back;
2. remove ``mlds.dev/cleanup`` from every campaign in the watched namespaces (all when none is given),
   each patch guarded by the campaign's resourceVersion.

What stays: the campaigns, their worker Jobs (their workers keep retrying the lease API, and an operator
installed again picks them up), the token Secrets and every result in the bucket. Deleting a campaign
afterwards is immediate: the garbage collector removes its Jobs and Secret through their owner
references. Nothing here deletes anything.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import click
from mlds_contract.errors import MldsError

from mlds_operator.controller.handlers import FINALIZER
from mlds_operator.controller.kube import HookKube

__all__ = ["OperatorStillRunning", "main", "release_campaigns", "stop_operator"]

log = logging.getLogger("mlds.uninstall")


class OperatorStillRunning(MldsError):
    """The operator's pod did not go away in time: releasing the finalizers now would race with it."""


def stop_operator(
    kube: HookKube,
    namespace: str,
    deployment: str,
    *,
    timeout: float = 180.0,
    poll: float = 2.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Scale the operator to zero and wait until it has no pod left (a missing Deployment counts as stopped)."""
    if not kube.scale_deployment(namespace, deployment, 0):
        log.info("deployment=%s/%s is gone already", namespace, deployment)
        return
    deadline = clock() + timeout
    while True:
        left = kube.deployment_pods(namespace, deployment)
        if not left:
            log.info("deployment=%s/%s scaled to zero; the operator checkpointed and stopped", namespace, deployment)
            return
        if clock() >= deadline:
            raise OperatorStillRunning(
                f"Deployment {namespace}/{deployment} still has {left} pod(s) after {timeout:.0f} s; "
                "not releasing finalizers while an operator may still add them"
            )
        sleep(poll)


def release_campaigns(kube: HookKube, namespaces: Sequence[str] = ()) -> list[str]:
    """Remove the operator's finalizer from every campaign in ``namespaces`` (all when empty); their names."""
    released: list[str] = []
    for body in kube.list_campaigns(tuple(namespaces)):
        meta = body.get("metadata") or {}
        finalizers = list(meta.get("finalizers") or ())
        if FINALIZER not in finalizers:
            continue
        name, namespace = str(meta.get("name")), str(meta.get("namespace"))
        kept = [f for f in finalizers if f != FINALIZER]
        if kube.set_campaign_finalizers(namespace, name, kept, meta.get("resourceVersion")):
            released.append(f"{namespace}/{name}")
            log.info("campaign=%s/%s released from %s", namespace, name, FINALIZER)
    return released


@click.command("uninstall")
@click.option("--operator-namespace", envvar="POD_NAMESPACE", required=True, help="Namespace of the operator.")
@click.option("--deployment", required=True, help="Name of the operator's Deployment.")
@click.option(
    "--namespace",
    "-n",
    "namespaces",
    multiple=True,
    envvar="MLDS_NAMESPACES",
    help="Namespaces the operator watched (repeatable; env: space-separated). Default: all.",
)
@click.option("--timeout", type=click.FloatRange(1, 3600), default=180.0, show_default=True)
def main(operator_namespace: str, deployment: str, namespaces: tuple[str, ...], timeout: float) -> None:
    """Stop the operator and release every campaign from its finalizer (the chart's pre-delete hook)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    names = tuple(n for value in namespaces for n in value.split() if n)
    kube = HookKube.connect()
    try:
        stop_operator(kube, operator_namespace, deployment, timeout=timeout)
        released = release_campaigns(kube, names)
    except MldsError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        kube.close()
    click.echo(f"released {len(released)} campaign(s) from {FINALIZER}; campaigns, Jobs and results are kept")


if __name__ == "__main__":
    main()
