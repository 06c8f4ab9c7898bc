"""An offline stand-in for what the Kubernetes API server does with a TrainingCampaign on create.

Who uses it: tests/unit/test_crd_validation.py, and any test that wants the API server's verdict on a
manifest (kmock stores objects as they come, with no defaulting or schema validation: DESIGN.md §6).

:func:`admit` follows the API server's order for a CRD with a structural schema:

1. nulls in fields that are not ``nullable`` are dropped (then defaulted, if they have a default);
2. defaults are applied, nested defaults inside defaulted values included;
3. the OpenAPI schema is checked with ``jsonschema`` (Draft 4, whose boolean ``exclusiveMinimum`` is
   OpenAPI 3.0's), ``nullable: true`` read as "or null", and unknown fields reported as errors: that is
   what ``kubectl apply`` asks of the server by default (``--validate=strict``, Kubernetes >= 1.27);
4. ``x-kubernetes-list-type`` ``map`` and ``set``: duplicate keys or items are errors;
5. ``x-kubernetes-validations`` CEL rules, evaluated with ``cel-python`` when it is installed
   (``cel=True`` insists on it; Kubernetes adds CEL libraries our rules do not use). As in the API
   server, a null field of an object is absent to CEL (``has()`` is false).

Not emulated: pruning of unknown fields (step 3 rejects them instead, as strict field validation
does), formats, and CEL cost limits (our rules are constant-cost; see mlds_operator.artifacts.crd).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import jsonschema
from mlds_operator.artifacts.crd import openapi_schema

__all__ = ["Admission", "admit", "apply_defaults", "cel_available", "draft4_schema", "nodes_with_defaults", "validator"]


@dataclass
class Admission:
    """The API server's verdict: the object as it would be stored, and why it was refused."""

    stored: Any
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def _path(parts: Iterator[Any] | list[Any]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def draft4_schema(node: dict[str, Any]) -> dict[str, Any]:
    """The openAPIV3Schema as JSON Schema Draft 4, for ``jsonschema``: nullable and strict fields."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: draft4_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = draft4_schema(value)
        elif key == "nullable" or key == "default" or key.startswith("x-kubernetes-"):
            continue
        else:
            out[key] = copy.deepcopy(value)
    if node.get("nullable"):
        out["type"] = [node["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False  # strict field validation: unknown fields are errors
    return out


def _is_integer(checker: Any, value: Any) -> bool:
    # Kubernetes (like JSON Schema after draft 4) takes 1.0 as an integer.
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, float) and value.is_integer())


_VALIDATOR: Any = jsonschema.validators.extend(
    jsonschema.Draft4Validator,
    type_checker=jsonschema.Draft4Validator.TYPE_CHECKER.redefine("integer", _is_integer),
)


def _prune_nulls(value: Any, schema: dict[str, Any]) -> None:
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for key in list(value):
            sub = props.get(key) or (schema.get("additionalProperties") if not props else None)
            if sub is None:
                continue
            if value[key] is None and not sub.get("nullable") and "default" not in sub:
                del value[key]
            else:
                _prune_nulls(value[key], sub)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            _prune_nulls(item, schema["items"])


def apply_defaults(value: Any, schema: dict[str, Any]) -> None:
    """Kubernetes' structural defaulting, in place: absent (or non-nullable null) fields take their default,
    then defaulting recurses into every field, defaulted ones included."""
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for key, sub in props.items():
            if "default" in sub and (key not in value or (value[key] is None and not sub.get("nullable"))):
                value[key] = copy.deepcopy(sub["default"])
        for key, item in value.items():
            if key in props:
                apply_defaults(item, props[key])
            elif isinstance(schema.get("additionalProperties"), dict):
                apply_defaults(item, schema["additionalProperties"])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            apply_defaults(item, schema["items"])


def _walk_values(value: Any, schema: dict[str, Any], path: list[Any]) -> Iterator[tuple[Any, dict[str, Any], str]]:
    yield value, schema, _path(path)
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for key, item in value.items():
            sub = props.get(key) if props else schema.get("additionalProperties")
            if isinstance(sub, dict):
                yield from _walk_values(item, sub, [*path, key])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            yield from _walk_values(item, schema["items"], [*path, i])


def _list_errors(value: Any, schema: dict[str, Any], path: str) -> Iterator[str]:
    list_type = schema.get("x-kubernetes-list-type")
    if not isinstance(value, list) or list_type not in ("map", "set"):
        return
    seen: set[str] = set()
    keys = schema.get("x-kubernetes-list-map-keys") or []
    for i, item in enumerate(value):
        ident = repr([item.get(k) for k in keys]) if list_type == "map" and isinstance(item, dict) else repr(item)
        if ident in seen:
            yield f"{path}[{i}]: Duplicate value: {ident}"
        seen.add(ident)


@functools.cache
def _cel_program(rule: str) -> Any:
    import celpy  # noqa: PLC0415 - optional: only when CEL rules are evaluated

    env = celpy.Environment()
    return env.program(env.compile(rule))


def _cel_view(value: Any, schema: dict[str, Any]) -> Any:
    """The value as the API server shows it to CEL: in an object with properties, a null field is absent."""
    if isinstance(value, dict):
        props = schema.get("properties")
        if props:
            return {k: _cel_view(v, props.get(k) or {}) for k, v in value.items() if v is not None}
        extra = schema.get("additionalProperties")
        return {k: _cel_view(v, extra if isinstance(extra, dict) else {}) for k, v in value.items()}
    if isinstance(value, list):
        items = schema.get("items") if isinstance(schema.get("items"), dict) else {}
        return [_cel_view(v, items) for v in value]
    return value


def _cel_errors(value: Any, schema: dict[str, Any], path: str) -> Iterator[str]:
    import celpy  # noqa: PLC0415 - optional: only when CEL rules are evaluated

    for rule in schema.get("x-kubernetes-validations") or []:
        try:
            result = _cel_program(rule["rule"]).evaluate({"self": celpy.json_to_cel(_cel_view(value, schema))})
        except celpy.CELEvalError as exc:
            result = exc
        if result is not True and not (isinstance(result, celpy.celtypes.BoolType) and bool(result)):
            yield f"{path}: Invalid value: {rule.get('message') or rule['rule']}"


def validator(schema: dict[str, Any]) -> Any:
    """A ``jsonschema`` validator for one openAPIV3Schema node, read as the API server reads it."""
    return _VALIDATOR(draft4_schema(schema))


def cel_available() -> bool:
    return importlib.util.find_spec("celpy") is not None


def admit(obj: Any, schema: dict[str, Any] | None = None, *, cel: bool | None = None) -> Admission:
    """What the API server makes of ``obj`` on create: the stored object, or the reasons it is refused.

    ``cel``: None evaluates CEL rules if ``cel-python`` is installed; True requires it; False skips them.
    """
    schema = schema if schema is not None else openapi_schema()
    if cel is None:
        cel = cel_available()
    stored = copy.deepcopy(obj)
    _prune_nulls(stored, schema)
    apply_defaults(stored, schema)
    validator = _VALIDATOR(draft4_schema(schema))
    errors = [
        f"{_path(list(e.absolute_path))}: {e.message}"
        for e in sorted(validator.iter_errors(stored), key=lambda e: list(map(str, e.absolute_path)))
    ]
    for value, node, path in _walk_values(stored, schema, []):
        errors.extend(_list_errors(value, node, path))
    if cel and not errors:  # CEL sees only values that passed the schema (the API server skips the rest)
        for value, node, path in _walk_values(stored, schema, []):
            errors.extend(_cel_errors(value, node, path))
    return Admission(stored=stored, errors=errors)


def nodes_with_defaults(schema: dict[str, Any], path: str = "<root>") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node that declares a default, with its path."""
    if "default" in schema:
        yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from nodes_with_defaults(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from nodes_with_defaults(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from nodes_with_defaults(schema["additionalProperties"], f"{path}.*")
