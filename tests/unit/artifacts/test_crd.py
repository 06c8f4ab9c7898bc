"""The generated TrainingCampaign CRD: not stale, printed by `mlds crd`, structural, readable by Kubernetes tools.

Run from the repository root with ``python -m pytest`` (the fixtures module is imported as ``tests.*``).
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from mlds_cli.main import cli
from mlds_contract.campaign import CRD_NAME, CampaignSpec, CampaignStatus
from mlds_operator.artifacts import generate
from mlds_operator.artifacts.crd import (
    PRINTER_COLUMNS,
    SchemaError,
    crd_manifest,
    openapi_schema,
    render_crd_yaml,
    structural_problems,
    structural_schema,
)
from pydantic import BaseModel, Field

ROOT = Path(__file__).resolve().parents[3]
CRD_FILE = ROOT / "crds" / "trainingcampaigns.mlds.dev.yaml"


# --- the checked-in file is what the contract generates -------------------------------------------------


def test_checked_in_crd_equals_the_generated_one() -> None:
    assert CRD_FILE.read_text(encoding="utf-8") == render_crd_yaml(), "stale: run `make generate`"


def test_generate_check_passes_on_this_checkout() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mlds_operator.artifacts.generate", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "up to date" in result.stdout


def test_generate_check_names_a_stale_file_and_generate_fixes_it(tmp_path: Path, capsys: Any) -> None:
    target = tmp_path / "crds" / "trainingcampaigns.mlds.dev.yaml"
    target.parent.mkdir()
    target.write_text(render_crd_yaml().replace("shortNames:\n    - tc", "shortNames:\n    - camp"), encoding="utf-8")

    assert generate.main(["--check", "--diff", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "stale: crds/trainingcampaigns.mlds.dev.yaml" in err
    assert "-    - camp" in err  # the diff shows what would change
    assert "+    - tc" in err
    assert "make generate" in err

    assert generate.main(["--root", str(tmp_path)]) == 0
    assert "wrote crds/trainingcampaigns.mlds.dev.yaml" in capsys.readouterr().out
    assert target.read_text(encoding="utf-8") == render_crd_yaml()
    assert generate.main(["--check", "--root", str(tmp_path)]) == 0


def test_generate_check_fails_when_a_generated_file_is_missing(tmp_path: Path) -> None:
    problems = generate.stale(tmp_path)
    assert [g.path for g, _ in problems] == [g.path for g in generate.GENERATED]
    assert "missing" in problems[0][1]


def test_generated_files_are_registered_once_each() -> None:
    paths = [g.path for g in generate.GENERATED]
    assert len(paths) == len(set(paths))
    assert "crds/trainingcampaigns.mlds.dev.yaml" in paths
    for generated in generate.GENERATED:
        assert generated.render().endswith("\n")


# --- mlds crd ----------------------------------------------------------------------------------------------


def test_mlds_crd_prints_the_checked_in_yaml() -> None:
    result = CliRunner().invoke(cli, ["crd"])
    assert result.exit_code == 0, result.output
    assert result.output == CRD_FILE.read_text(encoding="utf-8")


def test_mlds_crd_json_is_the_same_object() -> None:
    result = CliRunner().invoke(cli, ["crd", "-o", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == crd_manifest() == yaml.safe_load(CRD_FILE.read_text(encoding="utf-8"))


def test_mlds_crd_runs_as_a_real_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mlds_cli", "crd"], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["metadata"]["name"] == CRD_NAME


# --- what the CRD declares ---------------------------------------------------------------------------------


def test_crd_names_scope_and_version() -> None:
    crd = crd_manifest()
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "trainingcampaigns.mlds.dev"
    assert spec["group"] == "mlds.dev"
    assert spec["scope"] == "Namespaced"
    assert spec["names"] == {
        "kind": "TrainingCampaign",
        "listKind": "TrainingCampaignList",
        "plural": "trainingcampaigns",
        "singular": "trainingcampaign",
        "shortNames": ["tc"],
        "categories": ["mlds"],
    }
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}


def test_printer_columns_are_the_kubectl_get_tc_columns() -> None:
    (version,) = crd_manifest()["spec"]["versions"]
    columns = [(c["name"].upper(), c["jsonPath"], c["type"]) for c in version["additionalPrinterColumns"]]
    assert columns == [
        ("PHASE", ".status.phase", "string"),
        ("DONE", ".status.progress", "string"),
        ("FAILED", ".status.units.failed", "integer"),
        ("RATE", ".status.networksPerHour", "number"),
        ("ETA", ".status.eta", "string"),  # not `date`: kubectl would print the (negative) age of a future time
        ("AGE", ".metadata.creationTimestamp", "date"),
    ]
    assert "networks/h" in version["additionalPrinterColumns"][3]["description"]


@pytest.mark.parametrize("column", [c for c in PRINTER_COLUMNS if c["jsonPath"].startswith(".status")], ids=str)
def test_every_status_printer_column_points_at_a_status_field_of_its_type(column: dict[str, str]) -> None:
    node = openapi_schema()
    for name in column["jsonPath"].lstrip(".").split("."):
        node = node["properties"][name]
    assert node["type"] == column["type"]


def test_schema_requires_spec_and_leaves_metadata_to_kubernetes() -> None:
    schema = openapi_schema()
    assert schema["required"] == ["spec"]
    assert schema["properties"]["metadata"] == {"type": "object"}
    assert schema["properties"]["spec"]["required"] == ["workload", "networksPerTarget"]


def test_resources_keep_unknown_fields() -> None:
    pool = openapi_schema()["properties"]["spec"]["properties"]["pools"]["items"]
    assert pool["properties"]["resources"]["x-kubernetes-preserve-unknown-fields"] is True
    assert pool["properties"]["nodeSelector"]["additionalProperties"] == {"type": "string"}


def test_optional_fields_are_nullable_not_null_typed() -> None:
    spec = openapi_schema()["properties"]["spec"]
    storage = spec["properties"]["storage"]
    assert storage["type"] == "object"
    assert storage["nullable"] is True
    assert "default" not in storage  # `None` defaults are dropped: absent means the same
    assert "nullable" not in spec["properties"]["seed"]


def test_float_bounds_are_written_the_openapi_3_0_way() -> None:
    target_loss = openapi_schema()["properties"]["spec"]["properties"]["training"]["properties"]["targetLoss"]
    assert (target_loss["minimum"], target_loss["exclusiveMinimum"]) == (0, True)


def test_default_factory_defaults_are_written_minimally() -> None:
    spec = openapi_schema()["properties"]["spec"]["properties"]
    assert spec["pools"]["default"] == [{"name": "cpu"}]
    assert spec["leases"]["default"] == {}
    assert spec["training"]["default"] == {}


def _model_descriptions(model: type[BaseModel], path: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, info in model.model_fields.items():
        alias = info.alias or name
        out[f"{path}.{alias}"] = info.description or ""
        for inner in (*getattr(info.annotation, "__args__", ()), info.annotation):
            for candidate in (*getattr(inner, "__args__", ()), inner):
                if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                    out.update(_model_descriptions(candidate, f"{path}.{alias}"))
    return out


def _schema_descriptions(node: dict[str, Any], path: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, sub in (node.get("properties") or {}).items():
        out[f"{path}.{name}"] = sub.get("description", "")
        inner = sub["items"] if sub.get("type") == "array" else sub
        out.update(_schema_descriptions(inner, f"{path}.{name}"))
    return out


@pytest.mark.parametrize(("model", "top"), [(CampaignSpec, "spec"), (CampaignStatus, "status")])
def test_every_contract_field_is_in_the_schema_with_its_description(model: type[BaseModel], top: str) -> None:
    """`kubectl explain tc.spec...` shows the contract's own words, for every field at every depth."""
    expected = _model_descriptions(model, top)
    actual = _schema_descriptions(openapi_schema()["properties"][top], top)
    assert actual == expected
    assert all(expected.values())


def test_cel_rules_are_documented_with_a_one_line_message() -> None:
    workload = openapi_schema()["properties"]["spec"]["properties"]["workload"]
    rules = workload["x-kubernetes-validations"]
    assert [r["message"] for r in rules] == [
        "workload.machines applies to ds1, ds2 and ds5 only",
        "workload.variants applies to ds4 only",
        "workload.shapes applies to ds5 only",
    ]


def test_cel_rules_compile() -> None:
    celpy = pytest.importorskip("celpy")
    env = celpy.Environment()
    workload = openapi_schema()["properties"]["spec"]["properties"]["workload"]
    for rule in workload["x-kubernetes-validations"]:
        env.compile(rule["rule"])


# --- structural: the walker, on our schema and on schemas broken on purpose ---------------------------------


def test_generated_schema_is_structural() -> None:
    assert structural_problems(openapi_schema()) == []


def _broken(mutate: Any) -> dict[str, Any]:
    schema = copy.deepcopy(openapi_schema())
    mutate(schema)
    return schema


def _spec(schema: dict[str, Any]) -> dict[str, Any]:
    props: dict[str, Any] = schema["properties"]["spec"]["properties"]
    return props


BROKEN = {
    "a $ref left in": (lambda s: _spec(s).update(leases={"$ref": "#/$defs/LeaseSettings"}), "references are forbidden"),
    "null as a type (anyOf) instead of nullable": (
        lambda s: _spec(s).update(seed={"anyOf": [{"type": "integer"}, {"type": "null"}], "description": "x"}),
        "anyOf",
    ),
    "additionalProperties beside properties": (
        lambda s: s["properties"]["spec"].update(additionalProperties={"type": "string"}),
        "mutually exclusive",
    ),
    "additionalProperties: false (pydantic's extra=forbid)": (
        lambda s: s["properties"]["spec"].update(additionalProperties=False),
        "must be a schema",
    ),
    "additionalProperties as a boolean": (
        lambda s: _spec(s)["pools"]["items"]["properties"]["resources"].update(additionalProperties=True),
        "must be a schema",
    ),
    "a field without a type": (lambda s: _spec(s)["seed"].pop("type"), "type is missing"),
    "a field without a description": (lambda s: _spec(s)["seed"].pop("description"), "description is missing"),
    "an array without items": (lambda s: _spec(s)["pools"].pop("items"), "needs a single items schema"),
    "a numeric exclusiveMinimum (JSON Schema 2020-12)": (
        lambda s: _spec(s)["training"]["properties"]["targetLoss"].update(exclusiveMinimum=0),
        "must be a boolean",
    ),
    "a title": (lambda s: _spec(s)["seed"].update(title="Seed"), "noise"),
    "a keyword Kubernetes does not know": (lambda s: _spec(s)["seed"].update(examples=[1]), "unknown keyword"),
    "metadata with properties": (
        lambda s: s["properties"]["metadata"].update(properties={"name": {"type": "string"}}),
        "Kubernetes owns object metadata",
    ),
    "a default of the wrong type": (lambda s: _spec(s)["seed"].update(default="one"), "is not a integer"),
    "a default of null": (lambda s: _spec(s)["seed"].update(default=None), "default null"),
    "uniqueItems": (lambda s: _spec(s)["pools"].update(uniqueItems=True), "quadratic"),
    "a list map keyed by a missing field": (
        lambda s: _spec(s)["pools"].update({"x-kubernetes-list-map-keys": ["id"]}),
        "is not an item property",
    ),
    "a set of objects": (lambda s: _spec(s)["pools"].update({"x-kubernetes-list-type": "set"}), "must be scalars"),
    "required names a field that does not exist": (
        lambda s: s["properties"]["spec"]["required"].append("networks"),
        "'networks' is not a property",
    ),
    "an enum value of the wrong type": (
        lambda s: _spec(s)["workload"]["properties"]["dataset"]["enum"].append(6),
        "enum value 6",
    ),
    "a CEL message over two lines": (
        lambda s: _spec(s)["workload"]["x-kubernetes-validations"][0].update(message="a\nb"),
        "line break",
    ),
}


@pytest.mark.parametrize(("mutate", "expected"), BROKEN.values(), ids=BROKEN.keys())
def test_walker_reports_what_the_api_server_would_refuse(mutate: Any, expected: str) -> None:
    problems = structural_problems(_broken(mutate))
    assert any(expected in p for p in problems), problems


# --- the converter refuses what it cannot express ----------------------------------------------------------


class _Union(BaseModel):
    value: int | str = Field(description="Either.")


class _Constant(BaseModel):
    kind: str = Field("x", description="Fixed.", json_schema_extra={"const": "x"})


@pytest.mark.parametrize(
    ("model", "expected"),
    [(_Union, "_Union.value: anyOf"), (_Constant, "_Constant.kind: const")],
    ids=["union", "const"],
)
def test_converter_refuses_constructs_without_a_structural_form(model: type[BaseModel], expected: str) -> None:
    with pytest.raises(SchemaError, match=expected):
        structural_schema(model)


# --- real Kubernetes tools read it ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.29", "1.32"])
def test_crd_validates_against_the_kubernetes_crd_schema(version: str) -> None:
    """kubernetes-validate checks the CRD object against the API's own schema, unknown keys rejected."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(crd_manifest(), version, strict=True)


def test_kubernetes_crd_schema_rejects_a_2020_12_style_bound() -> None:
    """The same check fails on the mistake a naive pydantic export makes."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    crd = crd_manifest()
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    spec["properties"]["training"]["properties"]["targetLoss"]["exclusiveMinimum"] = 0
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(crd, "1.32", strict=True)


def test_kubectl_reads_the_checked_in_crd(tmp_path: Path) -> None:
    """kubectl (offline, --local) parses the file with Go's YAML reader and gets the same object."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("", encoding="utf-8")  # never touch a real cluster's config
    result = subprocess.run(
        [kubectl, "annotate", "--local", "-f", str(CRD_FILE), "-o", "json", "mlds.dev/checked=true"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={"KUBECONFIG": str(kubeconfig), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    parsed = json.loads(result.stdout)
    assert parsed["metadata"].pop("annotations") == {"mlds.dev/checked": "true"}
    assert parsed == crd_manifest()
