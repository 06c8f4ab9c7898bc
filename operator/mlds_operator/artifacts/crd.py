"""The TrainingCampaign CustomResourceDefinition, generated from the pydantic contract.

Who calls it: `mlds crd` (prints the CRD), :mod:`mlds_operator.artifacts.generate` (writes
``crds/trainingcampaigns.mlds.dev.yaml`` and fails CI when the checked-in copy is stale), and the tests.
Nobody edits the YAML by hand: change :mod:`mlds_contract.campaign` and run ``make generate``.

From pydantic's JSON Schema (draft 2020-12) to a Kubernetes *structural* schema (OpenAPI v3.0 subset,
STYLE.md #1); each rule below is something the API server would otherwise refuse or misread:

- ``$ref``/``$defs`` are inlined; a field's own description wins over its class docstring.
- ``X | None`` (``anyOf: [X, {type: null}]``) becomes X with ``nullable: true``; a ``None`` default is
  dropped (absent and null mean the same to the model). Any other ``anyOf``/``oneOf``/``allOf`` is not
  expressible structurally and stops the generator with an error naming the field.
- ``additionalProperties: false`` (pydantic's ``extra="forbid"``) is dropped: it is forbidden beside
  ``properties``; Kubernetes prunes unknown fields instead, and ``kubectl``'s default strict field
  validation reports them. ``additionalProperties: true`` (``dict[str, Any]``) becomes
  ``x-kubernetes-preserve-unknown-fields: true``, so nothing under it is pruned.
- Numeric ``exclusiveMinimum: 0`` (2020-12) becomes ``minimum: 0, exclusiveMinimum: true`` (OpenAPI 3.0).
- ``title`` is dropped (noise in ``kubectl explain``); enums, bounds, patterns and item counts are kept.
- Defaults are kept, including those pydantic computes with ``default_factory`` (``leases: {}``,
  ``pools: [{name: cpu}]``), written minimally: the API server applies nested defaults inside a
  defaulted value, so ``kubectl get tc -o yaml`` shows the settings in force.
- ``metadata`` is ``type: object`` only (Kubernetes owns it); ``apiVersion``/``kind`` are plain strings.

Kubernetes-only semantics that pydantic cannot express are added here by schema path
(:data:`LIST_TYPES`, :data:`CEL_RULES`), and the generator fails if a path no longer exists:

- ``spec.pools`` and ``status.pools`` are ``x-kubernetes-list-type: map`` keyed by ``name``, and
  ``status.conditions`` by ``type`` (the metav1 convention): the API server rejects duplicate keys and
  server-side apply merges entries by key. ``workload.machines`` and ``workload.variants`` are
  ``set``s (duplicates rejected). :func:`mlds_contract.plan.check_campaign` enforces the same, so
  ``mlds run`` and the operator agree with ``kubectl apply``.
- Three CEL rules on ``spec.workload`` reject fields that do not apply to the dataset (``machines`` for
  ds3/ds4, ``variants`` outside ds4, ``shapes`` outside ds5) at ``kubectl apply`` time. They use only
  ``has()``, ``==`` and ``in`` over a literal list: constant cost, so they never approach the API
  server's CEL cost budget. The API server treats a null field of an object as absent in CEL, so
  ``variants: null`` passes, as it does in the model. Everything else that needs workload knowledge
  (is this a ds1 machine?) stays in ``check_campaign`` and surfaces as a condition.

:func:`structural_problems` walks a schema and lists what the API server would refuse; the generator
runs it on its own output, and the tests run it on hand-broken schemas to show that it can fail.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from typing import Any, Final

import click
import yaml
from mlds_contract.campaign import (
    API_GROUP,
    API_VERSION,
    CATEGORIES,
    CRD_NAME,
    KIND,
    LIST_KIND,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    CampaignSpec,
    CampaignStatus,
    TrainingCampaign,
)
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import core_schema

__all__ = [
    "CEL_RULES",
    "LIST_TYPES",
    "PRINTER_COLUMNS",
    "SchemaError",
    "crd_command",
    "crd_manifest",
    "openapi_schema",
    "render_crd_yaml",
    "structural_problems",
    "structural_schema",
]


#: `kubectl get tc` columns. ETA is a string column: a `date` column prints the time *since* a
#: timestamp, which for a future ETA is "<invalid>".
PRINTER_COLUMNS: Final[tuple[dict[str, str], ...]] = (
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Where the campaign is."},
    {"name": "Done", "type": "string", "jsonPath": ".status.progress", "description": "Succeeded/total units."},
    {"name": "Failed", "type": "integer", "jsonPath": ".status.units.failed", "description": "Failed units."},
    {
        "name": "Rate",
        "type": "number",
        "jsonPath": ".status.networksPerHour",
        "description": "Recent rate of verified networks (networks/h).",
    },
    {"name": "ETA", "type": "string", "jsonPath": ".status.eta", "description": "Estimated completion (RFC 3339)."},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp", "description": "Time since creation."},
)

#: Path of a list in the schema (dots between property names) -> its Kubernetes list semantics.
LIST_TYPES: Final[dict[str, dict[str, Any]]] = {
    "spec.pools": {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    "spec.workload.machines": {"x-kubernetes-list-type": "set"},
    "spec.workload.variants": {"x-kubernetes-list-type": "set"},
    "status.pools": {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    "status.conditions": {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
}

#: Path of an object in the schema -> CEL validation rules (see the module docstring).
CEL_RULES: Final[dict[str, list[dict[str, str]]]] = {
    "spec.workload": [
        {
            "rule": "!has(self.machines) || self.dataset in ['ds1', 'ds2', 'ds5']",
            "message": "workload.machines applies to ds1, ds2 and ds5 only",
        },
        {
            "rule": "!has(self.variants) || self.dataset == 'ds4'",
            "message": "workload.variants applies to ds4 only",
        },
        {
            "rule": "!has(self.shapes) || self.dataset == 'ds5'",
            "message": "workload.shapes applies to ds5 only",
        },
    ],
}

_API_VERSION_DOC = (
    "APIVersion defines the versioned schema of this representation of an object. Servers should convert "
    "recognized schemas to the latest internal value, and may reject unrecognized values. More info: "
    "https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#resources"
)
_KIND_DOC = (
    "Kind is a string value representing the REST resource this object represents. Servers may infer this "
    "from the endpoint the client submits requests to. Cannot be updated. In CamelCase. More info: "
    "https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#types-kinds"
)

_ROOT_DOC = (
    "A TrainingCampaign trains networksPerTarget converged networks for every target of an MLDS dataset "
    "(docs/workloads.md in the mlds repository) on pools of worker pods, and stores weights, metadata and a "
    "manifest in a bucket."
)

_TYPES: Final = frozenset({"object", "array", "string", "integer", "number", "boolean"})
#: JSON Schema keywords copied through unchanged (after their sub-schemas are converted).
_KEPT: Final = frozenset(
    {
        "type",
        "description",
        "enum",
        "default",
        "format",
        "minimum",
        "maximum",
        "multipleOf",
        "minLength",
        "maxLength",
        "pattern",
        "minItems",
        "maxItems",
        "minProperties",
        "maxProperties",
        "required",
        "x-kubernetes-preserve-unknown-fields",
        "x-kubernetes-int-or-string",
        "x-kubernetes-embedded-resource",
        "x-kubernetes-list-type",
        "x-kubernetes-list-map-keys",
        "x-kubernetes-map-type",
        "x-kubernetes-validations",
    }
)


class SchemaError(ValueError):
    """The contract uses a JSON Schema construct that a structural CRD schema cannot express."""


class _ContractJsonSchema(GenerateJsonSchema):
    """pydantic's generator, plus the defaults that come from ``default_factory``.

    pydantic leaves those out of the JSON Schema. A model default is written minimally (only fields
    that differ from their own defaults), because the API server fills in nested defaults itself.
    """

    def get_default_value(self, schema: core_schema.WithDefaultSchema) -> Any:
        factory = schema.get("default_factory")
        if factory is not None and not schema.get("default_factory_takes_data"):
            return _minimal(factory())  # type: ignore[call-arg]
        return super().get_default_value(schema)


def _minimal(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", by_alias=True, exclude_defaults=True)
    if isinstance(value, list):
        return [_minimal(v) for v in value]
    return value


def _pydantic_schema(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_json_schema(by_alias=True, mode="validation", schema_generator=_ContractJsonSchema)


def structural_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural (Kubernetes) schema of any contract model. Raises :class:`SchemaError`."""
    raw = _pydantic_schema(model)
    defs: dict[str, Any] = raw.pop("$defs", {})
    return _convert(raw, defs, model.__name__)


def _resolve(ref: str, defs: dict[str, Any], path: str) -> dict[str, Any]:
    prefix = "#/$defs/"
    if not ref.startswith(prefix) or ref[len(prefix) :] not in defs:
        raise SchemaError(f"{path}: cannot resolve $ref {ref!r}")
    target: dict[str, Any] = defs[ref[len(prefix) :]]
    return target


def _base(node: dict[str, Any], defs: dict[str, Any], path: str) -> dict[str, Any]:
    """The converted schema a node builds on: its ``$ref`` target, or the X of ``X | None``. Pops both."""
    if "$ref" in node:
        return _convert(_resolve(node.pop("$ref"), defs, path), defs, path)
    if "anyOf" in node:
        branches = node.pop("anyOf")
        others = [b for b in branches if b != {"type": "null"}]
        if len(others) != 1 or len(others) == len(branches):
            raise SchemaError(f"{path}: anyOf other than `X | None` has no structural form: {json.dumps(branches)}")
        return {**_convert(others[0], defs, path), "nullable": True}
    return {}


def _convert(node: dict[str, Any], defs: dict[str, Any], path: str) -> dict[str, Any]:
    node = {k: v for k, v in node.items() if k != "title"}
    out = _base(node, defs, path)
    for keyword in ("oneOf", "allOf", "not", "const", "prefixItems", "discriminator"):
        if keyword in node:
            raise SchemaError(f"{path}: {keyword} has no structural form")
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: _convert(sub, defs, f"{path}.{name}") for name, sub in value.items()}
        elif key == "items":
            out[key] = _convert(value, defs, f"{path}[]")
        elif key == "additionalProperties":
            if isinstance(value, dict):
                out[key] = _convert(value, defs, f"{path}.*")
            elif value is True:
                out["x-kubernetes-preserve-unknown-fields"] = True
            # False: dropped. Kubernetes prunes (and kubectl reports) unknown fields instead.
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        elif key in _KEPT:
            out[key] = value
        else:
            raise SchemaError(f"{path}: JSON Schema keyword {key!r} is not supported in a CRD schema")
    if "default" in out and out["default"] is None:
        del out["default"]  # `X | None = None`: absent and null mean the same
    return out


def _node_at(schema: dict[str, Any], path: str) -> dict[str, Any]:
    node = schema
    for name in path.split("."):
        props = node.get("properties", {})
        if name not in props:
            raise SchemaError(f"{path}: no such field in the generated schema (update LIST_TYPES/CEL_RULES)")
        node = props[name]
    return node


def openapi_schema() -> dict[str, Any]:
    """The CRD's ``openAPIV3Schema``: spec and status from the contract, the rest left to Kubernetes."""
    fields = TrainingCampaign.model_fields
    spec = structural_schema(CampaignSpec)
    spec["description"] = fields["spec"].description
    status = structural_schema(CampaignStatus)
    status["description"] = fields["status"].description
    schema: dict[str, Any] = {
        "description": _ROOT_DOC,
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": _API_VERSION_DOC},
            "kind": {"type": "string", "description": _KIND_DOC},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }
    for path, extension in LIST_TYPES.items():
        node = _node_at(schema, path)
        if node.get("type") != "array":
            raise SchemaError(f"{path}: list semantics on a {node.get('type')!r} field")
        node.update(copy.deepcopy(extension))
    for path, rules in CEL_RULES.items():
        _node_at(schema, path)["x-kubernetes-validations"] = copy.deepcopy(rules)
    return schema


def crd_manifest() -> dict[str, Any]:
    """The whole CustomResourceDefinition. Raises :class:`SchemaError` if the schema is not structural."""
    schema = openapi_schema()
    problems = structural_problems(schema)
    if problems:
        raise SchemaError("the generated schema is not structural:\n  " + "\n  ".join(problems))
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME},
        "spec": {
            "group": API_GROUP,
            "names": {
                "kind": KIND,
                "listKind": LIST_KIND,
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": list(CATEGORIES),
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [dict(c) for c in PRINTER_COLUMNS],
                }
            ],
        },
    }


_HEADER = """\
# Generated from contract/mlds_contract/campaign.py by `python -m mlds_operator.artifacts.generate` (make generate).
# DO NOT EDIT: `make check-generated` fails when this file differs from what the contract generates.
"""


def render_crd_yaml() -> str:
    """The CRD as the YAML document checked in under ``crds/`` (stable: keys sorted)."""
    body = yaml.safe_dump(crd_manifest(), sort_keys=True, default_flow_style=False, allow_unicode=True, width=100)
    return _HEADER + "---\n" + body


# --- the structural-schema walker --------------------------------------------------------------------------

#: Every keyword apiextensions.k8s.io/v1 JSONSchemaProps knows; anything else is an unknown field.
_JSON_SCHEMA_PROPS: Final = _KEPT | {
    "$ref",
    "$schema",
    "id",
    "title",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "uniqueItems",
    "items",
    "properties",
    "additionalProperties",
    "patternProperties",
    "dependencies",
    "additionalItems",
    "definitions",
    "allOf",
    "anyOf",
    "oneOf",
    "not",
    "nullable",
    "example",
    "externalDocs",
}
#: Known to Kubernetes but refused in a v1 CRD, or in our structural subset (value validations in
#: anyOf/allOf/oneOf/not are allowed by Kubernetes but never needed by this contract, and they are
#: where non-structural schemas come from), or noise.
_FORBIDDEN: Final = {
    "$ref": "references are forbidden; inline the definition",
    "$schema": "forbidden in a CRD schema",
    "id": "forbidden in a CRD schema",
    "definitions": "forbidden in a CRD schema",
    "patternProperties": "forbidden in a CRD schema",
    "dependencies": "forbidden in a CRD schema",
    "additionalItems": "forbidden in a CRD schema",
    "anyOf": "not structural here: use `nullable: true` for X | None",
    "oneOf": "not structural here",
    "allOf": "not structural here",
    "not": "not structural here",
    "title": "noise: the description says it",
}
_LIST_TYPE_VALUES: Final = ("atomic", "set", "map")
_SCALARS: Final = ("string", "integer", "number", "boolean")


def _walk(node: Any, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    if not isinstance(node, dict):
        return
    for name, sub in (node.get("properties") or {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}.*")


def _matches_type(value: Any, type_: str) -> bool:
    checks: dict[str, Any] = {
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
    }
    return bool(checks[type_](value)) if type_ in checks else True


def _keyword_problems(node: dict[str, Any], path: str) -> Iterator[str]:
    for key in node:
        if key not in _JSON_SCHEMA_PROPS:
            yield f"{path}: unknown keyword {key!r} (not a JSONSchemaProps field)"
        elif key in _FORBIDDEN:
            yield f"{path}: {key}: {_FORBIDDEN[key]}"
    if node.get("x-kubernetes-preserve-unknown-fields") not in (None, True):
        yield f"{path}: x-kubernetes-preserve-unknown-fields must be true or absent"
    if "nullable" in node and not isinstance(node["nullable"], bool):
        yield f"{path}: nullable must be a boolean"
    if node.get("uniqueItems"):
        yield f"{path}: uniqueItems is forbidden (quadratic); use x-kubernetes-list-type: set"
    for i, rule in enumerate(node.get("x-kubernetes-validations") or []):
        if not str(rule.get("rule", "")).strip():
            yield f"{path}: x-kubernetes-validations[{i}] has no rule"
        if "\n" in str(rule.get("message", "")):
            yield f"{path}: x-kubernetes-validations[{i}] message has a line break"


def _shape_problems(node: dict[str, Any], path: str, root: bool) -> Iterator[str]:
    type_ = node.get("type")
    if type_ is None:
        if not (node.get("x-kubernetes-preserve-unknown-fields") or node.get("x-kubernetes-int-or-string")):
            yield f"{path}: type is missing"
    elif type_ not in _TYPES:
        yield f"{path}: type {type_!r} is not one of {sorted(_TYPES)}"
    if root and type_ != "object":
        yield f"{path}: the root must be type: object"
    props = node.get("properties")
    if props is not None and type_ != "object":
        yield f"{path}: properties on a {type_!r} node"
    yield from _map_problems(node, path, root)
    if type_ == "array" and not isinstance(node.get("items"), dict):
        yield f"{path}: an array needs a single items schema"
    if "items" in node and type_ != "array":
        yield f"{path}: items on a {type_!r} node"
    for name in node.get("required") or []:
        if name not in (props or {}):
            yield f"{path}: required field {name!r} is not a property"


def _map_problems(node: dict[str, Any], path: str, root: bool) -> Iterator[str]:
    extra = node.get("additionalProperties")
    if extra is None:
        return
    if not isinstance(extra, dict):
        yield f"{path}: additionalProperties must be a schema, not {extra!r} (unknown fields are pruned)"
    if node.get("properties"):
        yield f"{path}: additionalProperties and properties are mutually exclusive"
    if root:
        yield f"{path}: additionalProperties must not be used at the root"


def _value_problems(node: dict[str, Any], path: str) -> Iterator[str]:
    for bound, limit in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if bound in node:
            if not isinstance(node[bound], bool):
                yield f"{path}: {bound} must be a boolean (OpenAPI 3.0), got {node[bound]!r}"
            elif limit not in node:
                yield f"{path}: {bound} without {limit}"
    if "pattern" in node:
        try:
            re.compile(node["pattern"])
        except re.error as exc:
            yield f"{path}: pattern does not compile: {exc}"
    type_ = node.get("type")
    if not (isinstance(type_, str) and type_ in _TYPES):
        return
    for value in node.get("enum") or []:
        if not _matches_type(value, type_):
            yield f"{path}: enum value {value!r} is not a {type_}"
    if "default" in node:
        if node["default"] is None:
            yield f"{path}: default null (drop it; absent means the same)"
        elif not _matches_type(node["default"], type_):
            yield f"{path}: default {node['default']!r} is not a {type_}"


def _node_problems(node: dict[str, Any], path: str, root: bool) -> Iterator[str]:
    yield from _keyword_problems(node, path)
    yield from _shape_problems(node, path, root)
    yield from _value_problems(node, path)
    yield from _list_problems(node, path)


def _list_problems(node: dict[str, Any], path: str) -> Iterator[str]:
    type_ = node.get("type")
    list_type = node.get("x-kubernetes-list-type")
    keys = node.get("x-kubernetes-list-map-keys")
    if list_type is None:
        if keys:
            yield f"{path}: x-kubernetes-list-map-keys needs x-kubernetes-list-type: map"
        return
    if type_ != "array":
        yield f"{path}: x-kubernetes-list-type on a {type_!r} node"
        return
    if list_type not in _LIST_TYPE_VALUES:
        yield f"{path}: x-kubernetes-list-type {list_type!r} is not one of {_LIST_TYPE_VALUES}"
    items: dict[str, Any] = node["items"] if isinstance(node.get("items"), dict) else {}
    if list_type == "set" and items.get("type") not in _SCALARS:
        yield f"{path}: a set's items must be scalars"
    if list_type == "map":
        if not keys:
            yield f"{path}: a map list needs x-kubernetes-list-map-keys"
        item_props = items.get("properties") or {}
        for key in keys or []:
            key_node = item_props.get(key)
            if key_node is None:
                yield f"{path}: list map key {key!r} is not an item property"
            elif key_node.get("type") not in _SCALARS:
                yield f"{path}: list map key {key!r} must be a scalar"
            elif key not in (items.get("required") or []) and "default" not in key_node:
                yield f"{path}: list map key {key!r} must be required or defaulted"
            elif key_node.get("nullable"):
                yield f"{path}: list map key {key!r} must not be nullable"


def structural_problems(schema: dict[str, Any]) -> list[str]:
    """What the API server would refuse in an ``openAPIV3Schema`` (plus our own hygiene rules).

    An empty list means: structural, no references, nullable instead of null types, a type and a
    description on every property, valid list semantics, and ``metadata`` left to Kubernetes.
    """
    problems: list[str] = []
    for path, node in _walk(schema, "<root>"):
        if not isinstance(node, dict):
            problems.append(f"{path}: a schema must be an object, not {node!r}")
            continue
        problems.extend(_node_problems(node, path, root=path == "<root>"))
        for name, sub in (node.get("properties") or {}).items():
            exempt = path == "<root>" and name == "metadata"  # Kubernetes documents ObjectMeta itself
            if isinstance(sub, dict) and not exempt and not str(sub.get("description", "")).strip():
                problems.append(f"{path}.{name}: description is missing")
    metadata = (schema.get("properties") or {}).get("metadata")
    if metadata is not None and metadata != {"type": "object"}:
        problems.append("<root>.metadata: must be exactly {type: object}: Kubernetes owns object metadata")
    return problems


@click.command("crd", help="Print the TrainingCampaign CustomResourceDefinition (`mlds crd | kubectl apply -f -`).")
@click.option(
    "-o", "--output", type=click.Choice(["yaml", "json"]), default="yaml", show_default=True, help="Output format."
)
def crd_command(output: str) -> None:
    if output == "json":
        click.echo(json.dumps(crd_manifest(), indent=2, sort_keys=True, ensure_ascii=False))
    else:
        click.echo(render_crd_yaml(), nl=False)
