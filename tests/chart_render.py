"""Render charts/mlds with the real Helm library: ``helm install`` into the kmock emulator over HTTP.

Who uses it: tests/e2e/test_chart.py, as a subprocess (``python -m tests.chart_render SCENARIO...``):
Helm must keep its release record in memory (``HELM_DRIVER=memory``; its Secret driver sends protobuf,
which kmock cannot read), and the Go library inside helm-sdkpy sees only the environment the process
started with: run without the variable, this module starts itself again with it.

Usage: ``python -m tests.chart_render [--chart DIR] SCENARIO...``. For each scenario (``default``, the
name of a ``charts/mlds/ci/<name>-values.yaml``, or the path of a values file) it prints one
JSON line: the scenario, Helm's rendered release manifest (after values.schema.json accepted the
values), its hooks (the ``helm test`` pod, the pre-delete hook), its notes, and the CRDs Helm created
from ``crds/``. helm-sdkpy has no ``helm template``; an
install is what users run anyway. The emulator gets what Helm's client needs and kmock 0.8 lacks: a
server version the chart's kubeVersion admits, a core-group discovery document client-go can map, and
CRDs that report Established (Helm waits for that after installing ``crds/``).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "mlds"
NAMESPACE = "mlds-system"
RELEASE = "mlds"

_KINDS = {
    "v1/serviceaccounts": ("ServiceAccount", True),
    "v1/services": ("Service", True),
    "v1/configmaps": ("ConfigMap", True),
    "v1/secrets": ("Secret", True),
    "apps/v1/deployments": ("Deployment", True),
    "rbac.authorization.k8s.io/v1/clusterroles": ("ClusterRole", False),
    "batch/v1/jobs": ("Job", True),
    "v1/pods": ("Pod", True),
    "rbac.authorization.k8s.io/v1/clusterrolebindings": ("ClusterRoleBinding", False),
    "rbac.authorization.k8s.io/v1/roles": ("Role", True),
    "rbac.authorization.k8s.io/v1/rolebindings": ("RoleBinding", True),
    "networking.k8s.io/v1/networkpolicies": ("NetworkPolicy", True),
    "apiextensions.k8s.io/v1/customresourcedefinitions": ("CustomResourceDefinition", False),
    "monitoring.coreos.com/v1/servicemonitors": ("ServiceMonitor", True),
    "monitoring.coreos.com/v1/prometheusrules": ("PrometheusRule", True),
}


def scenario_values(scenario: str) -> dict[str, Any]:
    """The values of a scenario: none for ``default``, a ``ci/<scenario>-values.yaml``, or a YAML file's path."""
    if scenario == "default":
        return {}
    path = Path(scenario) if scenario.endswith((".yaml", ".yml")) else CHART / "ci" / f"{scenario}-values.yaml"
    return yaml.safe_load(path.read_text()) or {}


async def install(scenario: str, folder: Path, chart: Path = CHART) -> dict[str, Any]:
    import helm_sdkpy  # noqa: PLC0415 - loaded only in the process that has HELM_DRIVER set
    import kmock  # noqa: PLC0415
    from kmock._internal import enums, rendering  # noqa: PLC0415 - kmock 0.8 keeps these private
    from kmock._internal.references import ResourceInfo  # noqa: PLC0415

    from tests.operator_fixtures import Emulator  # noqa: PLC0415

    class HelmCluster(Emulator):  # type: ignore[misc]  # kmock ships no type information
        async def _serve_server_version(self, request: rendering.Request) -> Any:
            reply = dict(await super()._serve_server_version(request))
            reply.update(major="1", minor="32", gitVersion="v1.32.0")  # kmock says 1.26; the chart wants >= 1.27
            return reply

        async def _serve_version(self, request: rendering.Request) -> Any:
            reply = await super()._serve_version(request)
            # kmock answers /api/v1 with groupVersion "/v1"; client-go's REST mapper then finds no core kinds.
            reply["groupVersion"] = str(reply.get("groupVersion", "")).lstrip("/")
            return reply

        async def _handle(self, request: rendering.Request) -> Any:
            if (
                request.action == enums.action.CREATE
                and request.resource is not None
                and request.resource.plural == "customresourcedefinitions"
                and isinstance(request.data, dict)
            ):
                request.data["status"] = {
                    "conditions": [
                        {"type": "Established", "status": "True"},
                        {"type": "NamesAccepted", "status": "True"},
                    ],
                    "acceptedNames": request.data["spec"]["names"],
                }
            return await super()._handle(request)

    async with HelmCluster() as k8s, kmock.Server(k8s) as server:
        verbs = {"list", "watch", "get", "create", "patch", "update", "delete"}
        for key, (kind, namespaced) in _KINDS.items():
            k8s.resources[key] = ResourceInfo(kind=kind, singular=kind.lower(), namespaced=namespaced, verbs=verbs)
        kubeconfig = folder / f"kubeconfig-{Path(scenario).stem}"
        kubeconfig.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "kmock", "cluster": {"server": str(server.url).rstrip("/")}}],
                    "users": [{"name": "test", "user": {"token": "test-token"}}],
                    "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "test"}}],
                    "current-context": "kmock",
                }
            )
        )
        config = helm_sdkpy.Configuration(namespace=NAMESPACE, kubeconfig=str(kubeconfig))
        release = await helm_sdkpy.Install(config).run(
            RELEASE, str(chart), values=scenario_values(scenario) or None, wait=False, timeout=60
        )
        crd_key = kmock.resource("apiextensions.k8s.io/v1/customresourcedefinitions")
        crds = sorted(name for (res, _, name), obj in k8s.objects.items() if res == crd_key and not obj.deleted)
    return {
        "scenario": scenario,
        "manifest": release["manifest"],
        "notes": str((release.get("info") or {}).get("notes") or ""),
        # Hooks (helm test, pre-delete) are not part of the manifest; Helm keeps them beside it.
        "hooks": [
            {"events": list(h.get("events") or ()), "manifest": str(h.get("manifest") or "")}
            for h in release.get("hooks") or ()
        ],
        "crds": crds,
    }


async def _main(scenarios: list[str], folder: Path, chart: Path) -> None:
    for scenario in scenarios:
        print(json.dumps(await install(scenario, folder, chart)), flush=True)


def main() -> int:
    if os.environ.get("HELM_DRIVER") != "memory":
        # The Go library sees only the environment this process started with: start again with the variable.
        os.execvpe(
            sys.executable,
            [sys.executable, "-m", "tests.chart_render", *sys.argv[1:]],
            {**os.environ, "HELM_DRIVER": "memory"},
        )
    args = sys.argv[1:]
    chart = CHART
    if args[:1] == ["--chart"]:
        chart, args = Path(args[1]), args[2:]
    with tempfile.TemporaryDirectory(prefix="mlds-helm-") as folder:  # this run's kubeconfigs only
        asyncio.run(_main(args or ["default"], Path(folder), chart))
    return 0


if __name__ == "__main__":
    sys.exit(main())
