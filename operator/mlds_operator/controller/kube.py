"""The one module of the operator that talks to the Kubernetes API (STYLE.md #2), besides kopf itself.

:class:`Kube` wraps the official ``kubernetes`` client: made once at startup (:meth:`Kube.connect`),
kept in kopf's memo, and called by :mod:`mlds_operator.controller.sync` through ``asyncio.to_thread`` (the
client is synchronous; its connection pool is thread-safe). kopf does its own API calls for watching,
status patches and its finalizer; everything the operator *creates* (the token Secret, the worker
Jobs, Events) and everything it reads besides the campaign (storage credential Secrets, Jobs) goes
through here.

Objects travel as plain JSON dicts (``_preload_content=False``): the builders in
:mod:`mlds_operator.controller.pods` produce dicts, and reconcile reads dicts, so no model conversion can drop a
field the client's models do not know.

Errors: a missing object is ``None``/``False``, not an exception; "already exists" on create is
``False`` (a previous pass or another writer made it). Anything that may pass (connection refused,
timeouts, HTTP 429/5xx) raises :class:`KubeUnavailable`, a ``TemporaryError``; so do 401/403, because
RBAC is fixed by a person outside the campaign and the operator should recover without a restart once
it is. Other 4xx answers mean the operator sent something wrong and raise :class:`KubeRejected`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any, Self, TypeVar

import kubernetes  # type: ignore[import-untyped]  # the official client ships no type information
import urllib3
from kubernetes.client.exceptions import ApiException  # type: ignore[import-untyped]  # as above
from mlds_contract.campaign import API_GROUP, API_VERSION, PLURAL
from mlds_contract.errors import MldsError, TemporaryError, UserError

from mlds_operator.controller.pods import LABEL_CAMPAIGN, campaign_label, selector

__all__ = ["REQUEST_TIMEOUT", "HookKube", "Kube", "KubeRejected", "KubeUnavailable"]

log = logging.getLogger(__name__)

#: (connect, read) seconds per API request. The API server answers in milliseconds; a call that
#: hangs longer is an outage, and a reconcile pass must not hang behind it.
REQUEST_TIMEOUT = (5.0, 30.0)
_MERGE_PATCH = "application/merge-patch+json"

T = TypeVar("T")


class KubeUnavailable(TemporaryError):
    """The Kubernetes API could not be reached, was overloaded, or refused us (RBAC): retry later."""


class KubeRejected(MldsError):
    """The Kubernetes API rejected a request as invalid (HTTP 400/422): a bug in what the operator sent."""


class Kube:
    """Typed access to the few API calls the operator makes (see the module docstring)."""

    def __init__(self, api_client: kubernetes.client.ApiClient) -> None:
        self._api = api_client
        self._core = kubernetes.client.CoreV1Api(api_client)
        self._batch = kubernetes.client.BatchV1Api(api_client)
        self._custom = kubernetes.client.CustomObjectsApi(api_client)
        self._apps = kubernetes.client.AppsV1Api(api_client)

    @classmethod
    def connect(cls, kubeconfig: str | None = None, context: str | None = None) -> Self:
        """A client for the cluster: an explicit kubeconfig or ``$KUBECONFIG``, else in-cluster, else ~/.kube/config."""
        cfg = kubernetes.client.Configuration()
        config_file = kubeconfig or os.environ.get("KUBECONFIG")
        try:
            if config_file is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
                kubernetes.config.load_incluster_config(client_configuration=cfg)
            else:
                kubernetes.config.load_kube_config(config_file=config_file, context=context, client_configuration=cfg)
        except kubernetes.config.ConfigException as exc:
            raise UserError(
                f"no usable Kubernetes configuration ({exc}); run in a cluster, or set KUBECONFIG / --kubeconfig"
            ) from exc
        return cls(kubernetes.client.ApiClient(cfg))

    def close(self) -> None:
        self._api.close()

    # ------------------------------------------------------------------------------------ plumbing

    @staticmethod
    def _call(doing: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except ApiException as exc:
            status = exc.status or 0
            if status in (401, 403):
                raise KubeUnavailable(
                    f"{doing}: the API server refused the operator (HTTP {status}); check its RBAC", delay=30.0
                ) from exc
            if status == 429 or status >= 500 or status == 0:
                raise KubeUnavailable(f"{doing}: HTTP {status} {exc.reason}", delay=5.0) from exc
            raise
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise KubeUnavailable(f"{doing}: {exc}", delay=5.0) from exc

    @staticmethod
    def _json(response: Any) -> dict[str, Any]:
        data = response.data
        parsed = json.loads(data) if data else {}
        return parsed if isinstance(parsed, dict) else {}

    def _maybe(self, doing: str, fn: Callable[[], Any], *, missing: int = 404) -> dict[str, Any] | None:
        try:
            return self._json(self._call(doing, fn))
        except ApiException as exc:
            if exc.status == missing:
                return None
            raise KubeRejected(f"{doing}: HTTP {exc.status} {exc.reason}: {_message(exc)}") from exc

    # ----------------------------------------------------------------------------------- campaigns

    def list_campaigns(self, namespaces: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        """Every TrainingCampaign in ``namespaces`` (all namespaces when empty)."""
        if not namespaces:
            listing = self._maybe(
                "listing TrainingCampaigns",
                lambda: self._custom.list_cluster_custom_object(
                    API_GROUP, API_VERSION, PLURAL, _preload_content=False, _request_timeout=REQUEST_TIMEOUT
                ),
            )
            return list((listing or {}).get("items") or [])
        out: list[dict[str, Any]] = []
        for namespace in namespaces:
            listing = self._maybe(
                f"listing TrainingCampaigns in {namespace}",
                functools.partial(
                    self._custom.list_namespaced_custom_object,
                    API_GROUP,
                    API_VERSION,
                    namespace,
                    PLURAL,
                    _preload_content=False,
                    _request_timeout=REQUEST_TIMEOUT,
                ),
            )
            out += (listing or {}).get("items") or []
        return out

    # ------------------------------------------------------------------------------------- secrets

    def get_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._maybe(
            f"reading Secret {namespace}/{name}",
            lambda: self._core.read_namespaced_secret(
                name, namespace, _preload_content=False, _request_timeout=REQUEST_TIMEOUT
            ),
        )

    def create_secret(self, namespace: str, manifest: Mapping[str, Any]) -> bool:
        """Create a Secret; False when one of that name exists already."""
        name = manifest["metadata"]["name"]
        created = self._maybe(
            f"creating Secret {namespace}/{name}",
            lambda: self._core.create_namespaced_secret(
                namespace, dict(manifest), _preload_content=False, _request_timeout=REQUEST_TIMEOUT
            ),
            missing=409,
        )
        return created is not None

    def delete_secret(self, namespace: str, name: str) -> bool:
        gone = self._maybe(
            f"deleting Secret {namespace}/{name}",
            lambda: self._core.delete_namespaced_secret(
                name, namespace, _preload_content=False, _request_timeout=REQUEST_TIMEOUT
            ),
        )
        return gone is not None

    # ---------------------------------------------------------------------------------------- jobs

    def list_jobs(self, namespace: str, campaign: str) -> list[dict[str, Any]]:
        """The campaign's worker Jobs (by label; filtered again here, in case the server ignores selectors)."""
        listing = self._maybe(
            f"listing Jobs in {namespace}",
            lambda: self._batch.list_namespaced_job(
                namespace, label_selector=selector(campaign), _preload_content=False, _request_timeout=REQUEST_TIMEOUT
            ),
        )
        label = campaign_label(campaign)
        items = (listing or {}).get("items") or []
        return [job for job in items if ((job.get("metadata") or {}).get("labels") or {}).get(LABEL_CAMPAIGN) == label]

    def create_job(self, namespace: str, manifest: Mapping[str, Any]) -> bool:
        """Create a Job; False when one of that name exists already (possibly still being deleted)."""
        name = manifest["metadata"]["name"]
        created = self._maybe(
            f"creating Job {namespace}/{name}",
            lambda: self._batch.create_namespaced_job(
                namespace, dict(manifest), _preload_content=False, _request_timeout=REQUEST_TIMEOUT
            ),
            missing=409,
        )
        return created is not None

    def patch_job(self, namespace: str, name: str, patch: Mapping[str, Any]) -> bool:
        """Merge-patch a Job; False when it is gone."""
        patched = self._maybe(
            f"patching Job {namespace}/{name}",
            lambda: self._batch.patch_namespaced_job(
                name,
                namespace,
                dict(patch),
                _content_type=_MERGE_PATCH,
                _preload_content=False,
                _request_timeout=REQUEST_TIMEOUT,
            ),
        )
        return patched is not None

    def delete_job(self, namespace: str, name: str) -> bool:
        """Delete a Job and, in the background, its pods (their workers get SIGTERM and release their leases)."""
        gone = self._maybe(
            f"deleting Job {namespace}/{name}",
            lambda: self._batch.delete_namespaced_job(
                name,
                namespace,
                propagation_policy="Background",
                _preload_content=False,
                _request_timeout=REQUEST_TIMEOUT,
            ),
        )
        return gone is not None

    # -------------------------------------------------------------------------------------- events

    def create_event(self, namespace: str, manifest: Mapping[str, Any]) -> None:
        self._maybe(
            f"posting an Event in {namespace}",
            lambda: self._core.create_namespaced_event(
                namespace, dict(manifest), _preload_content=False, _request_timeout=REQUEST_TIMEOUT
            ),
            missing=409,
        )


class HookKube(Kube):
    """The calls of the chart's pre-delete hook (:mod:`mlds_operator.controller.uninstall`), besides listing
    campaigns. A class of their own so that the operator's RBAC and the hook's each stay exactly what is called."""

    def scale_deployment(self, namespace: str, name: str, replicas: int) -> bool:
        """Set a Deployment's replicas; False when it is gone."""
        patched = self._maybe(
            f"scaling Deployment {namespace}/{name}",
            lambda: self._apps.patch_namespaced_deployment(
                name,
                namespace,
                {"spec": {"replicas": replicas}},
                _content_type=_MERGE_PATCH,
                _preload_content=False,
                _request_timeout=REQUEST_TIMEOUT,
            ),
        )
        return patched is not None

    def deployment_pods(self, namespace: str, name: str) -> int | None:
        """Pods a Deployment still has (``status.replicas``, which counts terminating ones); None when it is gone."""
        found = self._maybe(
            f"reading Deployment {namespace}/{name}",
            lambda: self._apps.read_namespaced_deployment(
                name, namespace, _preload_content=False, _request_timeout=REQUEST_TIMEOUT
            ),
        )
        if found is None:
            return None
        return int((found.get("status") or {}).get("replicas") or 0)

    def set_campaign_finalizers(
        self, namespace: str, name: str, finalizers: list[str], resource_version: str | None
    ) -> bool:
        """Replace a campaign's finalizers, guarded by its resourceVersion (a conflict raises); False when gone."""
        meta: dict[str, Any] = {"finalizers": finalizers}
        if resource_version:
            meta["resourceVersion"] = resource_version  # optimistic concurrency: 409 if it changed meanwhile
        patched = self._maybe(
            f"patching TrainingCampaign {namespace}/{name}",
            lambda: self._custom.patch_namespaced_custom_object(
                API_GROUP,
                API_VERSION,
                namespace,
                PLURAL,
                name,
                {"metadata": meta},
                _content_type=_MERGE_PATCH,
                _preload_content=False,
                _request_timeout=REQUEST_TIMEOUT,
            ),
        )
        return patched is not None


def _message(exc: ApiException) -> str:
    try:
        body = json.loads(exc.body or b"{}")
    except ValueError:
        return str(exc.body)[:200]
    return str(body.get("message") or "")[:500] if isinstance(body, dict) else ""
