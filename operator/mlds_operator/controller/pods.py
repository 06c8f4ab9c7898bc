"""What the operator creates for a campaign: the token Secret and one worker Job per pool (pure builders).

Called by :mod:`mlds_operator.controller.reconcile`, which compares these manifests with what the cluster holds;
:mod:`mlds_operator.controller.kube` sends them. Manifests are plain JSON dicts as the API server takes them.

Per pool the Job runs ``mlds worker`` (DESIGN.md §2-3):

- **Image** per accelerator (:class:`WorkerSettings.images`; a pool's ``image`` wins). GPU pools get
  ``nvidia.com/gpu`` / ``amd.com/gpu`` (one unless the pool's resources name a count) and a
  toleration for the matching taint, which GPU node pools commonly carry. ROCm builds of torch report
  through the ``cuda`` device type, so both GPU kinds run with ``MLDS_DEVICE=cuda``.
- **Threads**: CPU workers get ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` equal to their CPU limit,
  rounded up (1 when no limit is set): one network per process, as many threads as the pod may use.
- **Lease API** at ``MLDS_LEASE_URL``; the bearer token is a file mounted from the campaign's Secret
  (never an env var, which ``kubectl describe pod`` would show); ``POD_NAME`` from the downward API
  is the worker id, so the lease book's workers are the pods.
- **Restricted security context** (Pod Security Standards "restricted"): non-root uid 65532,
  read-only root filesystem with an emptyDir at /tmp (``HOME`` points there for library caches),
  no privilege escalation, all capabilities dropped, seccomp RuntimeDefault, no service-account
  token (workers never talk to the Kubernetes API).
- **Platform defaults** (:class:`PodDefaults`, the chart's ``workers.pod`` and ``workers.acceleratorPod``
  values, given to `mlds operator` as ``--worker-pod-defaults``): image pull secrets, extra labels and
  annotations, priority and runtime class, affinity, node selector, tolerations and pod security
  context fields (e.g. ``supplementalGroups`` for ROCm's ``render`` group), for every worker pod and per
  accelerator. The merge rule is :meth:`PodDefaults.over` and :func:`_scheduling`: the accelerator's
  defaults over the common ones, then the pool's own ``nodeSelector``/``tolerations`` over both. What
  the operator itself relies on (its labels, the container's security context, the token and /tmp
  volumes) cannot be overridden.
- **Kueue** (:func:`queue_name`): a pool with a queue (its ``queueName``, else the campaign's) gets the
  ``kueue.x-k8s.io/queue-name`` label on its Job, which is created suspended; from then on Kueue owns
  ``spec.suspend`` (admission unsuspends it, preemption suspends it again) and the operator never
  patches it. The queue name is part of the template hash: Kueue forbids changing it on a running Job.
- **Job semantics**: ``parallelism`` = replicas, ``completions`` unset (each worker exits 0 when the
  campaign is drained, which completes the Job), ``suspend`` = ``spec.suspend`` (queued Jobs: see
  Kueue). A pod disrupted by the cluster (eviction, preemption, node drain) does not count towards
  ``backoffLimit``; a worker exiting :attr:`~mlds_contract.errors.ExitCode.config` (2: a rejected
  request, an unreadable token file) fails the Job at once, since a new pod would fail the same way;
  any other non-zero exit counts towards ``backoffLimit``. No ``ttlSecondsAfterFinished``: finished
  Jobs stay with their pods' logs until the campaign is deleted (owner references remove them).

Parallelism and suspend are patched in place. Everything else is the Job's immutable pod template:
its hash is stored in the ``mlds.dev/template-hash`` annotation, and reconcile replaces a Job whose
hash differs (e.g. after ``image`` or ``resources`` changed).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from mlds_contract.campaign import API_GROUP, API_VERSION, KIND, Accelerator, CampaignSpec, Pool
from mlds_contract.errors import ExitCode

__all__ = [
    "ANNOTATION_PLAN",
    "ANNOTATION_TEMPLATE",
    "CONTAINER",
    "GPU_RESOURCE",
    "KUEUE_QUEUE_LABEL",
    "LABEL_CAMPAIGN",
    "LABEL_CAMPAIGN_UID",
    "LABEL_POOL",
    "TOKEN_KEY",
    "TOKEN_MOUNT",
    "CampaignRef",
    "PodDefaults",
    "WorkerSettings",
    "campaign_label",
    "cpu_threads",
    "default_images",
    "default_lease_base_url",
    "job_name",
    "lease_url",
    "owner_reference",
    "parse_pod_defaults",
    "queue_name",
    "secret_name",
    "selector",
    "template_hash",
    "token_from_secret",
    "token_secret",
    "worker_job",
]

LABEL_CAMPAIGN: Final = f"{API_GROUP}/campaign"
LABEL_CAMPAIGN_UID: Final = f"{API_GROUP}/campaign-uid"
LABEL_POOL: Final = f"{API_GROUP}/pool"
ANNOTATION_TEMPLATE: Final = f"{API_GROUP}/template-hash"
#: On the token Secret: the hash of the spec fields that define the campaign's units (see reconcile).
ANNOTATION_PLAN: Final = f"{API_GROUP}/plan-hash"
TOKEN_KEY: Final = "token"  # noqa: S105 - the key of the token in its Secret, not a token
CONTAINER: Final = "worker"
#: An emptyDir private to the pod (not a shared host /tmp), the only writable path.
TMP_MOUNT: Final = "/tmp"  # noqa: S108 - the pod's own emptyDir
TOKEN_MOUNT: Final = "/var/run/mlds"  # noqa: S105 - a mount path
#: The label that hands a Job to Kueue (the LocalQueue's name, in the Job's namespace).
KUEUE_QUEUE_LABEL: Final = "kueue.x-k8s.io/queue-name"
GPU_RESOURCE: Final[Mapping[Accelerator, str]] = {Accelerator.nvidia: "nvidia.com/gpu", Accelerator.rocm: "amd.com/gpu"}

#: Job names stay short enough that the Job controller's pod names and job-name labels fit 63 characters.
_JOB_NAME_MAX = 52
_LABEL_MAX = 63
_NAME_MAX = 253
_NON_ROOT_UID = 65532  # the conventional "nonroot" uid of distroless-style images
_IMAGE_REPOSITORY = "ghcr.io/mlds/worker"
_IMAGE_FLAVOUR: Final[Mapping[Accelerator, str]] = {
    Accelerator.cpu: "cpu",
    Accelerator.nvidia: "cuda",
    Accelerator.rocm: "rocm",
}


def default_images(version: str, repository: str = _IMAGE_REPOSITORY) -> dict[Accelerator, str]:
    """``ghcr.io/mlds/worker:<version>-cpu`` / ``-cuda`` / ``-rocm``: one image per torch build."""
    return {acc: f"{repository}:{version}-{flavour}" for acc, flavour in _IMAGE_FLAVOUR.items()}


def default_lease_base_url(operator_namespace: str, service: str = "mlds-operator", port: int = 8080) -> str:
    """The in-cluster address of the operator's Service, which serves the lease API."""
    return f"http://{service}.{operator_namespace}.svc:{port}"


def _default_resources(accelerator: Accelerator) -> dict[str, Any]:
    # One core and 1 GiB fit one ds1-ds5 network process with room (torch itself is ~400 MB);
    # requests == limits gives the Guaranteed QoS class, so workers are the last to be evicted.
    # GPU workers need host memory for the CUDA/ROCm runtime and a core to feed the device.
    if accelerator is Accelerator.cpu:
        return {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "1Gi"}}
    return {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}}


@dataclass(frozen=True)
class PodDefaults:
    """Defaults of worker pods set by the platform (the chart), for all accelerators or one of them.

    Empty means unset. :meth:`over` is the merge rule the chart's values.yaml documents.
    """

    image_pull_secrets: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    priority_class_name: str = ""
    runtime_class_name: str = ""
    affinity: Mapping[str, Any] = field(default_factory=dict)
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    #: Pod-level securityContext fields merged over the restricted default (e.g. supplementalGroups).
    security_context: Mapping[str, Any] = field(default_factory=dict)

    def over(self, base: PodDefaults) -> PodDefaults:
        """These defaults on top of ``base``: maps merge key by key (ours win), lists add up (without
        repeats), priority class, runtime class and affinity replace ``base``'s when set."""
        return PodDefaults(
            image_pull_secrets=_unique(base.image_pull_secrets + self.image_pull_secrets),
            labels={**base.labels, **self.labels},
            annotations={**base.annotations, **self.annotations},
            priority_class_name=self.priority_class_name or base.priority_class_name,
            runtime_class_name=self.runtime_class_name or base.runtime_class_name,
            affinity=self.affinity or base.affinity,
            node_selector={**base.node_selector, **self.node_selector},
            tolerations=_unique(base.tolerations + self.tolerations),
            security_context={**base.security_context, **self.security_context},
        )


def _unique(items: Sequence[Any]) -> tuple[Any, ...]:
    out: list[Any] = []
    for item in items:
        if item not in out:
            out.append(item)
    return tuple(out)


_DEFAULT_KEYS: Final = {
    "imagePullSecrets",
    "labels",
    "annotations",
    "priorityClassName",
    "runtimeClassName",
    "affinity",
    "nodeSelector",
    "tolerations",
    "securityContext",
}
_SCOPES: Final = ("all", *(a.value for a in Accelerator))


def _str_map(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {type(value).__name__}")
    return {str(k): str(v) for k, v in value.items()}


def _pod_defaults(raw: Any, where: str) -> PodDefaults:
    if raw is None:
        return PodDefaults()
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _DEFAULT_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_DEFAULT_KEYS))}")
    secrets: list[str] = []
    for item in raw.get("imagePullSecrets") or ():
        name = item.get("name") if isinstance(item, Mapping) else item
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}.imagePullSecrets: expected names or {{name: ...}} objects, got {item!r}")
        secrets.append(name)
    tolerations = raw.get("tolerations") or ()
    if not isinstance(tolerations, Sequence) or not all(isinstance(t, Mapping) for t in tolerations):
        raise ValueError(f"{where}.tolerations: expected a list of tolerations")
    for key in ("affinity", "securityContext"):
        if not isinstance(raw.get(key) or {}, Mapping):
            raise ValueError(f"{where}.{key}: expected a mapping")
    return PodDefaults(
        image_pull_secrets=_unique(secrets),
        labels=_str_map(raw.get("labels"), f"{where}.labels"),
        annotations=_str_map(raw.get("annotations"), f"{where}.annotations"),
        priority_class_name=str(raw.get("priorityClassName") or ""),
        runtime_class_name=str(raw.get("runtimeClassName") or ""),
        affinity=copy.deepcopy(dict(raw.get("affinity") or {})),
        node_selector=_str_map(raw.get("nodeSelector"), f"{where}.nodeSelector"),
        tolerations=tuple(copy.deepcopy(dict(t)) for t in tolerations),
        security_context=copy.deepcopy(dict(raw.get("securityContext") or {})),
    )


def parse_pod_defaults(text: str | None) -> tuple[PodDefaults, dict[Accelerator, PodDefaults]]:
    """``--worker-pod-defaults``: JSON ``{"all": {...}, "cpu": {...}, "nvidia": {...}, "rocm": {...}}``,
    each with the camelCase keys of the chart's ``workers.pod``. Raises ValueError naming the bad key."""
    if not text or not text.strip():
        return PodDefaults(), {}
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from exc
    if not isinstance(raw, Mapping):
        raise ValueError("expected a JSON object with the keys all, cpu, nvidia, rocm")
    unknown = sorted(set(raw) - set(_SCOPES))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)}; known: {', '.join(_SCOPES)}")
    common = _pod_defaults(raw.get("all"), "all")
    per = {a: _pod_defaults(raw.get(a.value), a.value) for a in Accelerator if raw.get(a.value)}
    return common, per


@dataclass(frozen=True)
class WorkerSettings:
    """Operator-wide settings of the worker pods (flags of `mlds operator`)."""

    #: The lease API as workers reach it (no trailing slash); the campaign's path is appended.
    lease_base_url: str
    images: Mapping[Accelerator, str] = field(default_factory=lambda: default_images("latest"))
    image_pull_policy: str = "IfNotPresent"
    #: Failed worker pods (crashes, OOM kills) a Job tolerates before it fails. Pods disrupted by the
    #: cluster do not count. Generous: a failed pod's units just go back to the pool after its lease.
    backoff_limit: int = 20
    #: Seconds between SIGTERM and SIGKILL. A worker stops at the next epoch and releases its lease,
    #: which takes well under a second for ds1-ds5 networks; the rest is slack for slow nodes.
    termination_grace_seconds: int = 60
    #: Size limit of the /tmp emptyDir (library caches; results go straight to the bucket).
    tmp_size_limit: str = "1Gi"
    #: The platform's defaults of every worker pod, and per accelerator (merged over those).
    pod_defaults: PodDefaults = field(default_factory=PodDefaults)
    accelerator_pod_defaults: Mapping[Accelerator, PodDefaults] = field(default_factory=dict)
    #: Image prefixes a campaign's ``pools[].image`` may start with (e.g. ``registry.example.com/mlds/``);
    #: empty: any image. Worker pods run what a campaign names with the campaign's token, so a platform can
    #: pin them to its own registry. The operator's default images are always allowed.
    allowed_image_prefixes: tuple[str, ...] = ()

    def image_allowed(self, image: str) -> bool:
        """May a campaign name this worker image?"""
        return not self.allowed_image_prefixes or any(image.startswith(p) for p in self.allowed_image_prefixes)

    def defaults_for(self, accelerator: Accelerator) -> PodDefaults:
        """The defaults a pool of this accelerator gets (see :meth:`PodDefaults.over`)."""
        own = self.accelerator_pod_defaults.get(accelerator)
        return own.over(self.pod_defaults) if own is not None else self.pod_defaults


@dataclass(frozen=True)
class CampaignRef:
    """Which campaign a manifest belongs to (for names, labels and owner references)."""

    name: str
    namespace: str
    uid: str | None


def _bounded(base: str, suffix: str, limit: int) -> str:
    """``base + suffix`` if it fits ``limit``, else ``base`` cut and a hash of it appended (stable, unique)."""
    full = base + suffix
    if len(full) <= limit:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:8]
    keep = limit - len(suffix) - len(digest) - 1
    return f"{base[:keep].rstrip('-.')}-{digest}{suffix}"


def job_name(campaign: str, pool: str) -> str:
    return _bounded(campaign, f"-{pool}", _JOB_NAME_MAX)


def secret_name(campaign: str) -> str:
    return _bounded(campaign, "-lease-token", _NAME_MAX)


def campaign_label(campaign: str) -> str:
    """The campaign's name as a label value (names may be longer than a label value's 63 characters)."""
    if len(campaign) <= _LABEL_MAX:
        return campaign
    return _bounded(campaign, "", _LABEL_MAX)


def selector(campaign: str) -> str:
    """Label selector of everything the operator made for a campaign."""
    return f"{LABEL_CAMPAIGN}={campaign_label(campaign)}"


def lease_url(base: str, namespace: str, name: str) -> str:
    """The campaign's lease API base URL, as workers get it in ``MLDS_LEASE_URL``."""
    return f"{base.rstrip('/')}/v1/campaigns/{namespace}/{name}"


def owner_reference(ref: CampaignRef) -> dict[str, Any]:
    """Makes the campaign the controller of an object: the garbage collector deletes it with the campaign."""
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "name": ref.name,
        "uid": ref.uid or "",
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _labels(ref: CampaignRef, component: str, pool: str | None = None) -> dict[str, str]:
    labels = {
        "app.kubernetes.io/name": "mlds",
        "app.kubernetes.io/instance": campaign_label(ref.name),
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "mlds-operator",
        LABEL_CAMPAIGN: campaign_label(ref.name),
    }
    if ref.uid:
        labels[LABEL_CAMPAIGN_UID] = ref.uid[:_LABEL_MAX]
    if pool is not None:
        labels[LABEL_POOL] = pool
    return labels


def _metadata(ref: CampaignRef, name: str, component: str, pool: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": ref.namespace,
        "labels": _labels(ref, component, pool),
    }
    if ref.uid:
        meta["ownerReferences"] = [owner_reference(ref)]
    return meta


def token_secret(ref: CampaignRef, token: str, *, plan_hash: str) -> dict[str, Any]:
    """The campaign's bearer-token Secret (workers mount it). Also pins the campaign's plan hash."""
    meta = _metadata(ref, secret_name(ref.name), "lease-token")
    meta["annotations"] = {ANNOTATION_PLAN: plan_hash}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": meta,
        "data": {TOKEN_KEY: base64.b64encode(token.encode()).decode()},
    }


def owns_secret(ref: CampaignRef, secret: Mapping[str, Any]) -> bool:
    """Did the operator make ``secret`` for this campaign? Its labels and a controller ownerReference say so.

    The operator adopts, mounts and deletes only such Secrets (issue 13): a Secret of the same name made by
    someone else (or left by an earlier campaign of that name) is never handed to worker pods or removed.
    """
    meta = secret.get("metadata") or {}
    labels = meta.get("labels") or {}
    if labels.get("app.kubernetes.io/managed-by") != "mlds-operator" or labels.get(LABEL_CAMPAIGN) != campaign_label(
        ref.name
    ):
        return False
    for owner in meta.get("ownerReferences") or ():
        if (
            isinstance(owner, Mapping)
            and owner.get("kind") == KIND
            and owner.get("apiVersion") == f"{API_GROUP}/{API_VERSION}"
            and owner.get("name") == ref.name
            and owner.get("controller") is True
            and (not ref.uid or owner.get("uid") == ref.uid)
        ):
            return True
    return False


def token_from_secret(secret: Mapping[str, Any] | None) -> str | None:
    """The token a Secret holds (None when absent, empty or not base64)."""
    if not secret:
        return None
    raw = (secret.get("data") or {}).get(TOKEN_KEY)
    if not isinstance(raw, str):
        return None
    try:
        token = base64.b64decode(raw, validate=True).decode().strip()
    except ValueError:
        return None
    return token or None


_QUANTITY = re.compile(r"^(?P<num>[0-9]+(\.[0-9]+)?)(?P<milli>m?)$")


def cpu_threads(resources: Mapping[str, Any] | None) -> int:
    """Threads for a CPU worker: its CPU limit rounded up ("500m" -> 1, "2" -> 2, "2.5" -> 3); 1 if unset."""
    limits = (resources or {}).get("limits") or {}
    value = limits.get("cpu") if isinstance(limits, Mapping) else None
    if value is None:
        return 1
    match = _QUANTITY.match(str(value).strip())
    if match is None:
        return 1  # not a quantity the API server would accept either; the pod will be rejected
    cores = float(match["num"]) / (1000.0 if match["milli"] else 1.0)
    return max(1, math.ceil(cores - 1e-9))


def _resources(pool: Pool) -> dict[str, Any]:
    resources = copy.deepcopy(pool.resources) if pool.resources is not None else _default_resources(pool.accelerator)
    gpu = GPU_RESOURCE.get(pool.accelerator)
    if gpu is not None:
        requests = resources.setdefault("requests", {})
        limits = resources.setdefault("limits", {})
        # Extended resources cannot be overcommitted: the limit is what counts (and requests must equal
        # it when given). One device per worker unless the pool asks for more.
        count = limits.get(gpu, requests.get(gpu, 1))
        limits[gpu] = count
        if gpu in requests:
            requests[gpu] = count
    return resources


def _tolerations(pool: Pool, defaults: PodDefaults) -> list[dict[str, Any]]:
    """The pool's tolerations, then the platform's defaults not already there, then the GPU taint's."""
    tolerations = [t.wire() for t in pool.tolerations or ()]
    tolerations += [dict(t) for t in defaults.tolerations if dict(t) not in tolerations]
    gpu = GPU_RESOURCE.get(pool.accelerator)
    if gpu is not None and not any(t.get("key") == gpu for t in tolerations):
        tolerations.append({"key": gpu, "operator": "Exists", "effect": "NoSchedule"})
    return tolerations


def _env(ref: CampaignRef, pool: Pool, settings: WorkerSettings, resources: Mapping[str, Any]) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "MLDS_LEASE_URL", "value": lease_url(settings.lease_base_url, ref.namespace, ref.name)},
        {"name": "MLDS_TOKEN_FILE", "value": f"{TOKEN_MOUNT}/{TOKEN_KEY}"},
        {"name": "MLDS_POOL", "value": pool.name},
        {"name": "MLDS_ACCELERATOR", "value": pool.accelerator.value},
        {"name": "MLDS_DEVICE", "value": "cpu" if pool.accelerator is Accelerator.cpu else "cuda"},
        {"name": "MLDS_UNITS_PER_LEASE", "value": str(pool.units_per_lease)},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}},
        # Caches of torch and friends go to the pod's private emptyDir: the root filesystem is read-only.
        {"name": "HOME", "value": TMP_MOUNT},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if pool.accelerator is Accelerator.cpu:
        threads = str(cpu_threads(resources))
        env += [{"name": "OMP_NUM_THREADS", "value": threads}, {"name": "MKL_NUM_THREADS", "value": threads}]
    return env


def queue_name(spec: CampaignSpec, pool: Pool) -> str | None:
    """The Kueue LocalQueue of a pool's Job: the pool's ``queueName``, else the campaign's; None: no Kueue."""
    return pool.queue_name or spec.queue_name or None


def worker_job(ref: CampaignRef, spec: CampaignSpec, pool: Pool, settings: WorkerSettings) -> dict[str, Any]:
    """The worker Job of one pool (see the module docstring), with its template hash annotated."""
    resources = _resources(pool)
    defaults = settings.defaults_for(pool.accelerator)
    queue = queue_name(spec, pool)
    # The platform's extra labels first: the operator's own (selectors, ownership) always win.
    pod_labels = {**defaults.labels, **_labels(ref, "worker", pool.name)}
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": pool.image or settings.images[pool.accelerator],
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["mlds", "worker"],
        "env": _env(ref, pool, settings, resources),
        "resources": resources,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "token", "mountPath": TOKEN_MOUNT, "readOnly": True},
            {"name": "tmp", "mountPath": TMP_MOUNT},
        ],
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",  # required by podFailurePolicy; the Job makes replacement pods
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": settings.termination_grace_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": _NON_ROOT_UID,
            "runAsGroup": _NON_ROOT_UID,
            "fsGroup": _NON_ROOT_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
            **copy.deepcopy(dict(defaults.security_context)),
        },
        "containers": [container],
        "volumes": [
            {
                "name": "token",
                "secret": {
                    "secretName": secret_name(ref.name),
                    "items": [{"key": TOKEN_KEY, "path": TOKEN_KEY}],
                    "defaultMode": 0o440,
                },
            },
            {"name": "tmp", "emptyDir": {"sizeLimit": settings.tmp_size_limit}},
        ],
    }
    if defaults.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": name} for name in defaults.image_pull_secrets]
    if defaults.priority_class_name:
        pod_spec["priorityClassName"] = defaults.priority_class_name
    if defaults.runtime_class_name:
        pod_spec["runtimeClassName"] = defaults.runtime_class_name
    if defaults.affinity:
        pod_spec["affinity"] = copy.deepcopy(dict(defaults.affinity))
    node_selector = {**defaults.node_selector, **(pool.node_selector or {})}  # the pool's keys win
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    tolerations = _tolerations(pool, defaults)
    if tolerations:
        pod_spec["tolerations"] = tolerations
    pod_meta: dict[str, Any] = {"labels": pod_labels}
    if defaults.annotations:
        pod_meta["annotations"] = dict(defaults.annotations)
    job_spec: dict[str, Any] = {
        "parallelism": pool.replicas,
        # A queued Job starts suspended and Kueue unsuspends it on admission (see queue_name).
        "suspend": True if queue else spec.suspend,
        "backoffLimit": settings.backoff_limit,
        "podFailurePolicy": {
            "rules": [
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                {
                    "action": "FailJob",
                    "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [int(ExitCode.config)]},
                },
            ]
        },
        "template": {"metadata": pod_meta, "spec": pod_spec},
    }
    meta = _metadata(ref, job_name(ref.name, pool.name), "worker", pool.name)
    meta["labels"] = {**defaults.labels, **meta["labels"]}
    if queue:
        meta["labels"][KUEUE_QUEUE_LABEL] = queue
    meta["annotations"] = {ANNOTATION_TEMPLATE: template_hash(job_spec, queue=queue)}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}


def template_hash(job_spec: Mapping[str, Any], *, queue: str | None = None) -> str:
    """Hash of a Job spec without the fields patched in place (parallelism, suspend), and of its Kueue queue.

    The queue counts only when set, so Jobs made before queues existed keep their hash.
    """
    fixed: dict[str, Any] = {k: v for k, v in job_spec.items() if k not in ("parallelism", "suspend")}
    if queue:
        fixed = {"job": fixed, "kueueQueue": queue}
    return hashlib.sha256(json.dumps(fixed, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
