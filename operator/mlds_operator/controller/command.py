"""`mlds operator`: the kopf operator and the lease API, in one process and one event loop.

Registered in :mod:`mlds_cli.main` as ``mlds_operator.controller.command:operator_command``. :func:`run_operator` is
the whole operator as a coroutine (the tests run it in-process against the kmock emulator):

1. connect the Kubernetes client (:meth:`Kube.connect`: ``$KUBECONFIG``, else in-cluster);
2. reopen every existing campaign's lease service (book from the checkpoint, results after it), then
   start the lease API (:func:`mlds_operator.leases.http.create_app`) for every campaign on ``--listen``;
3. run kopf with the handlers of :mod:`mlds_operator.controller.handlers`, the controller in its memo, its
   liveness endpoint, and all namespaces or the ``--namespace`` ones;
4. on SIGTERM/SIGINT, kopf stops, every campaign is checkpointed, the lease API closes. Workers
   keep training; they reconnect to the next operator, which honours their leases.

Every setting is a flag with an environment variable, so the Helm chart can set them either way.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import kopf
from aiohttp import web
from mlds_contract.campaign import Accelerator
from mlds_contract.errors import MldsError

from mlds_operator.controller import pods
from mlds_operator.controller.handlers import build_registry
from mlds_operator.controller.kube import Kube
from mlds_operator.controller.sync import Controller, OperatorSettings
from mlds_operator.leases.http import create_app
from mlds_operator.leases.metrics import ServerMetrics
from mlds_operator.leases.registry import Campaigns
from mlds_operator.leases.service import ServiceSettings

__all__ = ["OperatorConfig", "operator_command", "run_operator"]

log = logging.getLogger("mlds.operator")

_SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
#: Where the operator runs when nothing says otherwise (the chart's default namespace).
DEFAULT_OPERATOR_NAMESPACE = "mlds-system"


@dataclass(frozen=True)
class OperatorConfig:
    """Everything `mlds operator` is told on its command line."""

    settings: OperatorSettings
    listen_host: str = "0.0.0.0"  # noqa: S104 - the lease API must be reachable by worker pods
    listen_port: int = 8080
    #: Where ``/metrics`` is served: a port of its own, never the lease API's (worker pods reach that one).
    metrics_host: str = "0.0.0.0"  # noqa: S104 - Prometheus scrapes the pod
    metrics_port: int = 9464
    namespaces: tuple[str, ...] = ()  # empty: all namespaces
    #: Seconds between status passes (the status timer): the bound on status writes per campaign.
    status_interval: float = 5.0
    #: kopf's liveness probe endpoint, e.g. http://0.0.0.0:8081/healthz; None: none.
    liveness: str | None = None
    kubeconfig: str | None = None


async def run_operator(
    config: OperatorConfig,
    *,
    stop_flag: asyncio.Event | None = None,
    ready_flag: asyncio.Event | None = None,
) -> None:
    """Run the operator until ``stop_flag`` is set (or a signal arrives, when in the main thread)."""
    kube = await asyncio.to_thread(Kube.connect, config.kubeconfig)
    campaigns = Campaigns()
    controller = Controller(kube, campaigns, config.settings)
    server_metrics = ServerMetrics(campaigns, component="operator")
    app = create_app(campaigns, observer=server_metrics.observe_request)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    metrics_runner: web.AppRunner | None = None
    try:
        metrics_runner = await server_metrics.serve(config.metrics_host, config.metrics_port)
        await _reopen_campaigns(kube, controller, config.namespaces)
        await web.TCPSite(runner, config.listen_host, config.listen_port, reuse_address=True).start()
        controller.start_checkpoints()
        log.info(
            "lease API listening on %s:%d; workers are told %s",
            config.listen_host,
            config.listen_port,
            config.settings.workers.lease_base_url,
        )
        await kopf.operator(
            registry=build_registry(status_interval=config.status_interval),
            memo=kopf.Memo(controller=controller),
            clusterwide=not config.namespaces,
            namespaces=list(config.namespaces),
            liveness_endpoint=config.liveness,
            standalone=True,
            stop_flag=stop_flag,
            ready_flag=ready_flag,
        )
    finally:
        await controller.close()  # idempotent; kopf's cleanup handler usually did it already
        await runner.cleanup()
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        kube.close()


class _CampaignLog(logging.LoggerAdapter[logging.Logger]):
    """Prefixes the campaign, as kopf's per-object logger does, for passes run outside kopf."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[{self.extra['campaign'] if self.extra else '?'}] {msg}", kwargs


async def _reopen_campaigns(kube: Kube, controller: Controller, namespaces: tuple[str, ...]) -> None:
    """Open every existing campaign's lease service before the lease API listens.

    Workers outlive an operator restart. Were the API to listen before their campaign is open again,
    it would answer them 401 (an unknown campaign looks like a wrong token) and they would exit;
    a refused connection instead makes them back off and retry, so they re-attach to their leases.
    """
    try:
        bodies = await asyncio.to_thread(kube.list_campaigns, namespaces)
    except MldsError as exc:
        log.warning("could not list campaigns before serving; kopf will resume them: %s", exc)
        return
    for body in bodies:
        meta = body.get("metadata") or {}
        logger = _CampaignLog(log, {"campaign": f"{meta.get('namespace')}/{meta.get('name')}"})
        try:
            await controller.sync(body, logger)
        except MldsError as exc:
            logger.warning("could not reopen the campaign before serving; kopf will retry: %s", exc)


def _operator_namespace(given: str | None) -> str:
    if given:
        return given
    try:
        return _SA_NAMESPACE.read_text().strip() or DEFAULT_OPERATOR_NAMESPACE
    except OSError:
        return DEFAULT_OPERATOR_NAMESPACE


def _listen(value: str, flag: str = "--listen") -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise click.BadParameter(f"expected HOST:PORT, got {value!r}", param_hint=flag)
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - see OperatorConfig.listen_host


def _version() -> str:
    try:
        return importlib.metadata.version("mlds")
    except importlib.metadata.PackageNotFoundError:
        return "latest"


@click.command("operator")
@click.option(
    "--namespace",
    "-n",
    "namespaces",
    multiple=True,
    envvar="MLDS_NAMESPACES",
    help="Watch this namespace (repeatable; env: space-separated). Default: all namespaces.",
)
@click.option("--all-namespaces", "-A", is_flag=True, help="Watch all namespaces (the default without -n).")
@click.option(
    "--listen",
    envvar="MLDS_LISTEN",
    default="0.0.0.0:8080",
    show_default=True,
    help="Address of the lease API served to worker pods.",
)
@click.option(
    "--metrics-listen",
    envvar="MLDS_METRICS_LISTEN",
    default="0.0.0.0:9464",
    show_default=True,
    help="Address of /metrics (Prometheus). Its own port: the lease port serves only the lease API and health.",
)
@click.option(
    "--lease-url",
    envvar="MLDS_ADVERTISED_URL",
    default=None,
    help="Lease API base URL as workers reach it. Default: http://mlds-operator.<operator namespace>.svc:8080.",
)
@click.option(
    "--operator-namespace",
    envvar="POD_NAMESPACE",
    default=None,
    help="Namespace of the operator's Service (for the default --lease-url). Default: this pod's namespace.",
)
@click.option("--worker-image-cpu", envvar="MLDS_WORKER_IMAGE_CPU", default=None, help="Image of cpu pools.")
@click.option("--worker-image-nvidia", envvar="MLDS_WORKER_IMAGE_NVIDIA", default=None, help="Image of nvidia pools.")
@click.option("--worker-image-rocm", envvar="MLDS_WORKER_IMAGE_ROCM", default=None, help="Image of rocm pools.")
@click.option(
    "--image-pull-policy",
    envvar="MLDS_IMAGE_PULL_POLICY",
    type=click.Choice(["IfNotPresent", "Always", "Never"]),
    default="IfNotPresent",
    show_default=True,
)
@click.option(
    "--worker-pod-defaults",
    envvar="MLDS_WORKER_POD_DEFAULTS",
    default=None,
    metavar="JSON",
    help=(
        'Defaults of every worker pod: {"all": {...}, "cpu": {...}, "nvidia": {...}, "rocm": {...}}, each with '
        "imagePullSecrets, labels, annotations, priorityClassName, runtimeClassName, affinity, nodeSelector, "
        "tolerations, securityContext (the chart's workers.pod and workers.acceleratorPod values)."
    ),
)
@click.option(
    "--allowed-image-prefix",
    "allowed_image_prefixes",
    multiple=True,
    envvar="MLDS_ALLOWED_IMAGE_PREFIXES",
    help=(
        "A prefix a campaign's pools[].image must start with (repeatable; env: space-separated). Others get an "
        "ImageNotAllowed condition and no Job. Default: any image."
    ),
)
@click.option(
    "--worker-backoff-limit",
    envvar="MLDS_WORKER_BACKOFF_LIMIT",
    type=click.IntRange(0, 10_000),
    default=20,
    show_default=True,
    help="Crashed worker pods a pool's Job tolerates before it fails (disrupted pods do not count).",
)
@click.option(
    "--status-interval",
    envvar="MLDS_STATUS_INTERVAL",
    type=click.FloatRange(0.1, 3600),
    default=5.0,
    show_default=True,
    help="Seconds between status passes: at most one status write per campaign per interval.",
)
@click.option(
    "--checkpoint-seconds",
    envvar="MLDS_CHECKPOINT_SECONDS",
    type=click.FloatRange(0.1, 86_400),
    default=30.0,
    show_default=True,
    help="Seconds between manifest parts + lease-book checkpoints to the bucket (new leases: within ~2 s).",
)
@click.option(
    "--liveness",
    envvar="MLDS_LIVENESS",
    default="http://0.0.0.0:8081/healthz",
    show_default=True,
    help="kopf's liveness endpoint; empty to disable.",
)
@click.option("--kubeconfig", envvar="KUBECONFIG", default=None, help="kubeconfig file. Default: in-cluster.")
@click.option(
    "--log-format",
    envvar="MLDS_LOG_FORMAT",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
)
@click.option("--verbose", "-v", is_flag=True, help="Log at DEBUG level.")
def operator_command(
    namespaces: tuple[str, ...],
    all_namespaces: bool,
    listen: str,
    metrics_listen: str,
    lease_url: str | None,
    operator_namespace: str | None,
    worker_image_cpu: str | None,
    worker_image_nvidia: str | None,
    worker_image_rocm: str | None,
    image_pull_policy: str,
    worker_pod_defaults: str | None,
    allowed_image_prefixes: tuple[str, ...],
    worker_backoff_limit: int,
    status_interval: float,
    checkpoint_seconds: float,
    liveness: str,
    kubeconfig: str | None,
    log_format: str,
    verbose: bool,
) -> None:
    """Run the TrainingCampaign operator (kopf) and the lease API for its worker pods."""
    if all_namespaces and namespaces:
        raise click.UsageError("--all-namespaces and --namespace exclude each other")
    # MLDS_NAMESPACES="a b" arrives as one value; split it like several -n flags.
    names = tuple(n for value in namespaces for n in value.split() if n)
    kopf.configure(verbose=verbose, log_format=kopf.LogFormat.JSON if log_format == "json" else kopf.LogFormat.FULL)
    host, port = _listen(listen)
    metrics_host, metrics_port = _listen(metrics_listen, "--metrics-listen")
    if (metrics_host, metrics_port) == (host, port):
        raise click.BadParameter("/metrics needs a port of its own, not the lease API's", param_hint="--metrics-listen")
    try:
        pod_defaults, accelerator_pod_defaults = pods.parse_pod_defaults(worker_pod_defaults)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--worker-pod-defaults / MLDS_WORKER_POD_DEFAULTS") from exc
    images = pods.default_images(_version())
    for accelerator, image in (
        (Accelerator.cpu, worker_image_cpu),
        (Accelerator.nvidia, worker_image_nvidia),
        (Accelerator.rocm, worker_image_rocm),
    ):
        if image:
            images[accelerator] = image
    base = lease_url or pods.default_lease_base_url(_operator_namespace(operator_namespace), port=port)
    config = OperatorConfig(
        settings=OperatorSettings(
            workers=pods.WorkerSettings(
                lease_base_url=base.rstrip("/"),
                images=images,
                image_pull_policy=image_pull_policy,
                backoff_limit=worker_backoff_limit,
                allowed_image_prefixes=tuple(p for value in allowed_image_prefixes for p in value.split() if p),
                pod_defaults=pod_defaults,
                accelerator_pod_defaults=accelerator_pod_defaults,
            ),
            service=ServiceSettings(checkpoint_seconds=checkpoint_seconds),
            instance=os.environ.get("POD_NAME") or os.uname().nodename,
        ),
        listen_host=host,
        listen_port=port,
        metrics_host=metrics_host,
        metrics_port=metrics_port,
        namespaces=names,
        status_interval=status_interval,
        liveness=liveness or None,
        kubeconfig=kubeconfig,
    )
    asyncio.run(run_operator(config))
