"""The Helm chart's generated README: its values table comes from the ``# --`` comments of values.yaml.

Called by :mod:`mlds_operator.artifacts.generate` (``make generate`` writes ``charts/mlds/README.md``; ``make
check-generated`` fails when it is stale) and by the chart tests. The chart's CRD copy is the same text as
``crds/`` (:func:`mlds_operator.artifacts.crd.render_crd_yaml`), so it needs nothing here.

A value is documented by a comment block right above its key whose first line starts with ``# --``
(the helm-docs convention; later ``#`` lines continue it). A key without one must be a mapping whose
keys are all documented; anything else raises :class:`UndocumentedValue`, so the README cannot list a
value without saying what it does. Keys under a documented mapping (``resources.requests.cpu``) are
part of its default and get no row of their own.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import yaml

from mlds_operator.artifacts.generate import default_root

__all__ = [
    "CHART_DIR",
    "PERMISSIONS",
    "Permission",
    "UndocumentedValue",
    "ValueDoc",
    "render_chart_readme",
    "value_docs",
]

#: The chart, relative to the repository root.
CHART_DIR = "charts/mlds"

_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][A-Za-z0-9_]*):(?:\s|$)")
_COMMENT = re.compile(r"^(?P<indent> *)#(?P<text>.*)$")


class UndocumentedValue(ValueError):
    """A key of values.yaml has no ``# --`` comment (and is not a mapping of documented keys)."""


@dataclass(frozen=True)
class ValueDoc:
    """One row of the values table."""

    path: str  # dotted, e.g. "operator.image.tag"
    description: str
    default: Any


def _lookup(values: Any, path: list[str]) -> Any:
    for part in path:
        values = values[part]
    return values


def value_docs(text: str) -> list[ValueDoc]:
    """The documented values of a values.yaml text, in file order (see the module docstring)."""
    values = yaml.safe_load(text) or {}
    docs: list[ValueDoc] = []
    stack: list[tuple[int, str]] = []  # (indent, key) of the mappings enclosing the current line
    documented_above: int | None = None  # indent of the innermost documented key we are inside
    pending: list[str] | None = None  # the comment block just above, when it is a `# --` doc
    undocumented: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            pending = None
            continue
        comment = _COMMENT.match(line)
        if comment:
            body = comment["text"].strip()
            if body.startswith("--"):
                pending = [body[2:].strip()]
            elif pending is not None:
                pending.append(body)
            continue
        key = _KEY.match(line)
        if key is None:
            pending = None  # a list item or a flow continuation inside some value
            continue
        indent = len(key["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if documented_above is not None and indent <= documented_above:
            documented_above = None
        path = [k for _, k in stack] + [key["key"]]
        stack.append((indent, key["key"]))
        if documented_above is not None:
            pending = None
            continue  # part of a documented value's default
        value = _lookup(values, path)
        if pending:
            docs.append(ValueDoc(".".join(path), " ".join(p for p in pending if p), value))
            documented_above = indent
        elif not (isinstance(value, dict) and value):
            undocumented.append(".".join(path))
        pending = None
    if undocumented:
        raise UndocumentedValue("values.yaml keys without a `# --` comment: " + ", ".join(undocumented))
    return docs


def _type(value: Any) -> str:
    match value:
        case bool():
            return "bool"
        case int():
            return "int"
        case float():
            return "float"
        case str():
            return "string"
        case list():
            return "list"
        case _:
            return "object"


@dataclass(frozen=True)
class Permission:
    """One row of the chart's permissions table: a rule of one of its roles, and why it is there.

    The table is the chart's documented account of its RBAC; ``tests/e2e/test_chart.py`` checks that the
    rows of each role are exactly the rules the rendered chart grants it (and those, that the operator
    calls nothing else), so a rule cannot be added or widened without saying why here.
    """

    role: str  # the role's name after "<fullname>-"
    group: str  # API group; "" is the core group
    resource: str
    verbs: tuple[str, ...]
    why: str


#: Every rule the chart grants, by role, with the reason it is needed (rendered into the chart README).
PERMISSIONS: tuple[Permission, ...] = (
    Permission(
        "campaigns",
        "mlds.dev",
        "trainingcampaigns",
        ("list", "watch"),
        "kopf watches campaigns (a watch starts with a list); at start-up the operator lists them to reopen "
        "every campaign's lease book before the lease API listens, so no worker is told a lease is unknown.",
    ),
    Permission(
        "campaigns",
        "mlds.dev",
        "trainingcampaigns",
        ("patch",),
        "kopf adds and removes the `mlds.dev/cleanup` finalizer and keeps its handler progress in annotations.",
    ),
    Permission(
        "campaigns",
        "mlds.dev",
        "trainingcampaigns/status",
        ("patch",),
        "The status (phase, counts, conditions) is written by one merge patch per reconcile pass.",
    ),
    Permission(
        "campaigns",
        "batch",
        "jobs",
        ("list", "create", "patch", "delete"),
        "One worker Job per pool: listed by label each pass, created, scaled and suspended by patch, deleted "
        "when its image or pod template changes (Jobs are immutable there), when its pool is removed, or "
        "with the campaign.",
    ),
    Permission(
        "campaigns",
        "",
        "secrets",
        ("get", "create", "delete"),
        "`create`: the campaign's lease-token Secret (labelled and owned by the campaign). `get`: the storage "
        "credentials the campaign names, by name (never list or watch), and an existing token Secret, to "
        "refuse one the operator did not create. `delete`: its own token Secret when the campaign goes.",
    ),
    Permission(
        "campaigns",
        "",
        "events",
        ("create",),
        "Events on the campaign: condition changes, kopf's handler warnings and errors (`kubectl describe`).",
    ),
    Permission(
        "discovery",
        "apiextensions.k8s.io",
        "customresourcedefinitions",
        ("list", "watch"),
        "Cluster-scoped, whatever the operator watches: kopf notices the CRD being installed or removed at "
        "run time and starts or stops its watch. Read-only; CRDs hold no secrets.",
    ),
    Permission(
        "discovery",
        "",
        "namespaces",
        ("list", "watch"),
        "Only with `operator.watchNamespaces`: kopf resolves the listed namespaces (and follows ones created "
        "later). Cluster-scoped by nature; read-only names and labels.",
    ),
    Permission(
        "uninstall",
        "apps",
        "deployments",
        ("get", "patch"),
        "`helm uninstall`'s pre-delete hook only, in the release namespace, on the operator's Deployment by "
        "name: scale it to zero and see it stop before finalizers are released.",
    ),
    Permission(
        "uninstall",
        "mlds.dev",
        "trainingcampaigns",
        ("list", "patch"),
        "The same hook, in the watched namespaces: remove the operator's finalizer from every campaign, so "
        "deleting one later never hangs. Hook objects exist only while it runs.",
    ),
)


def _permissions_table() -> list[str]:
    lines = [
        "## Permissions",
        "",
        "Every rule the chart grants, and why. `campaigns` is bound cluster-wide, or, with "
        "`operator.watchNamespaces`, by one RoleBinding per listed namespace (nothing elsewhere); `discovery` "
        "is always cluster-wide because its resources are cluster-scoped; `uninstall` exists only while "
        "`helm uninstall` runs. A chart test checks that this table, the rendered roles and the API calls "
        "the operator and kopf make are the same set.",
        "",
        "| Role | API group | Resource | Verbs | Why |",
        "|------|-----------|----------|-------|-----|",
    ]
    for p in PERMISSIONS:
        group = f"`{p.group}`" if p.group else "core"
        verbs = ", ".join(p.verbs)
        lines.append(f"| `<fullname>-{p.role}` | {group} | `{p.resource}` | {verbs} | {_cell(p.why)} |")
    return [*lines, ""]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


_INTRO = """\
Installs the mlds operator: the `TrainingCampaign` CRD, the operator Deployment (kopf, one replica), its
ServiceAccount with least-privilege RBAC, and the Service of the lease API and `/metrics`. The worker pods
are not part of the chart: the operator creates one Job per pool of each campaign, with the worker image of
the pool's accelerator (below). Optional, all off by default: a Prometheus Operator `ServiceMonitor` and
`PrometheusRule`, a ConfigMap with the Grafana dashboard for the Grafana sidecar, and a `NetworkPolicy`
for the operator pod.

```sh
helm install mlds charts/mlds --namespace mlds-system --create-namespace
kubectl -n mlds-system rollout status deployment/mlds-operator
```

See the repository README ("Install on a cluster") for storage, example campaigns and the dataset.

**CRDs** are in `crds/` (generated from the API contract, the same file as the repository's `crds/`).
Helm installs them with the chart but never upgrades or deletes them: after upgrading the chart, apply the
new one with `kubectl apply --server-side -f charts/mlds/crds/`.

**RBAC**: the ClusterRole `<fullname>-campaigns` grants exactly what the operator does: campaigns
(list, watch, patch; status: patch), Jobs (list, create, patch, delete), Secrets (get, create, delete),
Events (create). It is bound cluster-wide, or with `operator.watchNamespaces` by one RoleBinding per
namespace. `<fullname>-discovery` lets kopf list and watch CRDs (and namespaces, when watching a list of
them). The table under "Permissions" says why each rule is there; a test compares these rules with the API
calls the code makes.

**One replica**: every campaign's lease book lives in the operator's memory (checkpointed to the bucket),
so the Deployment has exactly one replica and the `Recreate` strategy; workers keep training through an
operator restart and re-attach to their leases.

**Worker images** default to `<workers.image.repository>:<tag>-cpu`, `-cuda` and `-rocm` (tag: the
chart's appVersion), built from `Dockerfile.worker` (targets `worker-cpu`, `worker-cuda`, `worker-rocm`;
the operator image is its `operator` target) and pushed by `.github/workflows/release.yaml` on a release tag.
A pool's own `image` in a campaign wins over these. `global.imageRegistry` moves every chart image to a
mirror and `global.imagePullSecrets` reaches the operator, the test and hook pods and every worker pod.

**Worker pods**: `workers.pod` (all) and `workers.acceleratorPod.<cpu|nvidia|rocm>` set pull secrets,
labels, annotations, priority and runtime class, affinity, node selector, tolerations and pod security
context fields of the worker pods the operator creates (merge rule in values.yaml); a campaign pool's own
settings win. Campaigns and pools with a `queueName` run through Kueue (see the repository README).

**User roles**: with `rbac.aggregateToUserRoles` the built-in `edit`/`admin` roles may manage
TrainingCampaigns and `view` may read them. **`helm test`** runs a pod that asks the operator's Service for
`/healthz` and `/metrics`. **`helm uninstall`** runs a pre-delete hook (`uninstall.releaseFinalizers`) that
stops the operator and removes its `mlds.dev/cleanup` finalizer from every campaign, so that campaigns can
be deleted later without it; the CRD, the campaigns, their Jobs and every result in the bucket are kept.
"""


def render_chart_readme() -> str:
    """``charts/mlds/README.md``: Chart.yaml's name and description, the notes above, the values table."""
    chart_dir = default_root() / CHART_DIR
    chart = yaml.safe_load((chart_dir / "Chart.yaml").read_text(encoding="utf-8"))
    docs = value_docs((chart_dir / "values.yaml").read_text(encoding="utf-8"))
    lines = [
        "<!-- Generated from Chart.yaml and the comments of values.yaml by `python -m mlds_operator.artifacts.generate`"
        " (make generate). DO NOT EDIT. -->",
        "",
        f"# {chart['name']}",
        "",
        f"Chart version {chart['version']}, app version {chart['appVersion']}, Kubernetes {chart['kubeVersion']}.",
        "",
        " ".join(str(chart["description"]).split()),
        "",
        _INTRO,
        *_permissions_table(),
        "## Values",
        "",
        "| Key | Type | Default | Description |",
        "|-----|------|---------|-------------|",
    ]
    for doc in docs:
        default = json.dumps(doc.default, separators=(",", ":"), sort_keys=False)
        lines.append(f"| `{doc.path}` | {_type(doc.default)} | `{_cell(default)}` | {_cell(doc.description)} |")
    return "\n".join(lines) + "\n"
