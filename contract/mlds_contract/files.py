"""Campaign files: YAML on disk to :class:`~mlds_contract.campaign.TrainingCampaign`, one loader for all.

Who calls it: `mlds run` and `mlds train --campaign` (:func:`load_campaign`), `mlds dataset` when a
source is a campaign file, and `mlds validate` (:func:`check_file`, which lists every problem of a
file instead of stopping at the first). One loader means one strictness: a file that one command
accepts, every command accepts, and it is the file `kubectl apply` would accept.

What is checked, in the order the Kubernetes API server checks a TrainingCampaign:

1. YAML syntax, with the line of the problem (and of the bracket or block it belongs to), and
   duplicate keys (which PyYAML would silently resolve to the last value; kubectl's strict field
   validation rejects them);
2. ``apiVersion`` and ``kind`` (``mlds.dev/v1`` is not a version this API serves);
3. ``metadata.name``: present and a DNS-1123 subdomain;
4. the CRD's structural schema, through the pydantic model it is generated from, strictly: ``"100"``
   is not a number and ``"true"`` not a boolean, unknown fields are errors (with "did you mean" from
   the model's field names);
5. the semantic rules the schema cannot express (:func:`mlds_contract.plan.check_campaign`; the CRD's
   CEL rules are a subset of them): every unknown machine is named, with a close match when there is one.

Every problem carries the file, the line when the file has one for it, and the field path
(``spec.workload.machines[1]``). Imports only pydantic and PyYAML, so every error path is fast: no
torch, pyarrow, aiohttp or kopf is loaded before a file has been judged.
"""

from __future__ import annotations

import difflib
import json
import re
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .campaign import API_GROUP, API_VERSION, DS1_MACHINES, DS2_MACHINES, KIND, Dataset, TrainingCampaign
from .errors import InvalidCampaign, UserError
from .plan import check_campaign

__all__ = ["CampaignFileError", "CheckedFile", "Problem", "check_file", "load_campaign"]

#: What ``apiVersion`` must say.
EXPECTED_API_VERSION = f"{API_GROUP}/{API_VERSION}"
#: metadata.name, as the API server checks it (a DNS-1123 subdomain).
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a campaign file."""

    file: str
    line: int | None  # 1-based; None when the problem has no place in the file (it cannot be read)
    path: str  # field path, e.g. "spec.workload.machines[1]"; "" for the file as a whole
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class CampaignFileError(UserError):
    """A campaign file with problems. ``str()`` is one line: the first problem and how many more."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        more = len(problems) - 1
        suffix = f" (and {more} more problem{'s' if more > 1 else ''}; `mlds validate` lists them)" if more else ""
        super().__init__(f"{problems[0]}{suffix}")


@dataclass
class CheckedFile:
    """What :func:`check_file` found: the campaigns of the file that are valid, and every problem."""

    path: Path
    campaigns: list[TrainingCampaign]
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return not self.problems


def load_campaign(path: Path) -> TrainingCampaign:
    """The one TrainingCampaign of a file, checked as strictly as the API server would.

    Raises :class:`CampaignFileError` (a :class:`UserError`: one line, exit status 2) when the file has
    any problem or does not hold exactly one TrainingCampaign.
    """
    checked = check_file(path)
    if checked.problems:
        raise CampaignFileError(checked.problems)
    if len(checked.campaigns) != 1:
        raise CampaignFileError(
            [
                Problem(
                    str(path),
                    None,
                    "",
                    f"must hold exactly one TrainingCampaign document (found {len(checked.campaigns)})",
                )
            ]
        )
    return checked.campaigns[0]


def check_file(path: Path) -> CheckedFile:
    """Every problem of a campaign file (empty when it is valid) and the campaigns it holds."""
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        return CheckedFile(path, [], [Problem(name, None, "", f"cannot read: {exc.strerror or exc}")])
    except UnicodeDecodeError as exc:
        return CheckedFile(path, [], [Problem(name, None, "", f"cannot read: not UTF-8 text ({exc.reason})")])
    documents, problems = _parse(name, text)
    campaigns: list[TrainingCampaign] = []
    found = 0
    for node, body in documents:
        positions = _positions(node)
        kind = body.get("kind") if isinstance(body, dict) else None
        if isinstance(body, dict) and kind != KIND and not _looks_like_campaign(kind):
            continue  # another kind of object in a multi-document file (a Secret, a Namespace): not ours
        found += 1
        campaign, found_problems = _check_document(name, body, positions)
        problems += found_problems
        if campaign is not None:
            campaigns.append(campaign)
    if found == 0 and not problems:
        problems.append(
            Problem(name, None, "", f"holds no {KIND} document (kind: {KIND}, apiVersion: {EXPECTED_API_VERSION})")
        )
    return CheckedFile(path, campaigns, problems)


# ------------------------------------------------------------------------------------------- YAML


def _parse(name: str, text: str) -> tuple[list[tuple[yaml.Node, Any]], list[Problem]]:
    """Each document's node tree (for line numbers) and value; a syntax error ends the parse."""
    loader = yaml.SafeLoader(text)
    documents: list[tuple[yaml.Node, Any]] = []
    problems: list[Problem] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            problems += _duplicate_keys(name, node)
            documents.append((node, loader.construct_document(node)))
    except yaml.MarkedYAMLError as exc:
        problems.append(_yaml_problem(name, exc))
    except yaml.YAMLError as exc:  # unmarked: rare (e.g. a reader error without position)
        problems.append(Problem(name, None, "", f"is not valid YAML: {' '.join(str(exc).split())}"))
    finally:
        loader.dispose()
    return [(n, b) for n, b in documents if b is not None], problems


def _yaml_problem(name: str, exc: yaml.MarkedYAMLError) -> Problem:
    """PyYAML's several-line message as one line, at the line of the problem (and of its context)."""
    mark = exc.problem_mark or exc.context_mark
    problem = exc.problem or exc.context or "syntax error"
    context = ""
    if exc.context and exc.context_mark is not None and exc.problem_mark is not None:
        if exc.context_mark.line != exc.problem_mark.line:
            context = f" ({exc.context} at line {exc.context_mark.line + 1})"
        else:
            context = f" ({exc.context})"
    column = f", column {mark.column + 1}" if mark is not None else ""
    opened = exc.context_mark
    if exc.context and exc.context.startswith("while parsing a flow") and opened is not None and mark is not None:
        # An unclosed [ or {: PyYAML notices lines later; the mistake is where the bracket opened.
        what = exc.context.removeprefix("while parsing a ")
        return Problem(
            name,
            opened.line + 1,
            "",
            f"is not valid YAML: the {what} opened at column {opened.column + 1} is not closed "
            f"(at line {mark.line + 1}, column {mark.column + 1}: {problem})",
        )
    return Problem(name, mark.line + 1 if mark else None, "", f"is not valid YAML: {problem}{column}{context}")


def _duplicate_keys(name: str, node: yaml.Node, loc: Loc = ()) -> list[Problem]:
    out: list[Problem] = []
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            k = str(key.value)
            if k in seen:
                out.append(
                    Problem(
                        name,
                        key.start_mark.line + 1,
                        _path((*loc, k)),
                        f"duplicate key (first at line {seen[k]}); only one may be given",
                    )
                )
            else:
                seen[k] = key.start_mark.line + 1
            out += _duplicate_keys(name, value, (*loc, k))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out += _duplicate_keys(name, item, (*loc, i))
    return out


def _positions(node: yaml.Node) -> dict[Loc, int]:
    """Field path -> 1-based line: of the key for mapping entries, of the item for list items."""
    out: dict[Loc, int] = {(): node.start_mark.line + 1}

    def walk(n: yaml.Node, loc: Loc) -> None:
        if isinstance(n, yaml.MappingNode):
            for key, value in n.value:
                child = (*loc, str(key.value))
                out.setdefault(child, key.start_mark.line + 1)
                walk(value, child)
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                out.setdefault((*loc, i), item.start_mark.line + 1)
                walk(item, (*loc, i))

    walk(node, ())
    return out


def _line(positions: dict[Loc, int], loc: Loc) -> int:
    """The line of ``loc``, or of its nearest ancestor present in the file (a missing field's parent)."""
    while loc not in positions:
        loc = loc[:-1]
    return positions[loc]


def _path(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# ------------------------------------------------------------------------------------------ checks


def _looks_like_campaign(kind: object) -> bool:
    """A misspelt kind (``TrainingCampain``) is a mistake to report, not another object to skip."""
    return not isinstance(kind, str) or bool(difflib.get_close_matches(kind, [KIND], n=1, cutoff=0.75))


def _check_document(name: str, body: Any, positions: dict[Loc, int]) -> tuple[TrainingCampaign | None, list[Problem]]:
    def problem(loc: Loc, message: str) -> Problem:
        return Problem(name, _line(positions, loc), _path(loc), message)

    if not isinstance(body, dict):
        return None, [problem((), f"a {KIND} document is a mapping, not {type(body).__name__}")]
    problems: list[Problem] = []
    kind = body.get("kind")
    if kind != KIND:
        problems.append(
            problem(
                ("kind",), f"{kind!r} is not a kind of this API; did you mean {KIND}?" if kind else f"missing: {KIND}"
            )
        )
    version = body.get("apiVersion")
    if version is None:
        problems.append(problem(("apiVersion",), f"missing: {EXPECTED_API_VERSION}"))
    elif version != EXPECTED_API_VERSION:
        problems.append(
            problem(("apiVersion",), f"{version!r} is not served; the {KIND} API is {EXPECTED_API_VERSION}")
        )
    named = _check_metadata(body.get("metadata"), problem)
    problems += named
    machines = _check_machines(body, problem)
    problems += machines
    doc = {k: v for k, v in body.items() if k != "status"}  # status is the operator's; kubectl apply ignores it
    try:
        # Strict, like the API server: "100" is not a number, "true" is not a boolean. Through JSON so
        # that enums and nested models take their wire form (strict Python mode refuses a str for an enum).
        campaign = TrainingCampaign.model_validate_json(json.dumps(doc, default=str), strict=True)
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            loc = tuple(error.get("loc", ()))
            if named and not loc and "metadata." in str(error.get("msg", "")):
                continue  # the model's own name check: already said above, with its line
            problems.append(problem(loc, _message(error, loc)))
        return None, problems
    if not machines:
        problems += _check_rules(campaign, problem)
    return (campaign if not problems else None), problems


def _check_metadata(metadata: object, problem: Any) -> list[Problem]:
    if metadata is None:
        return [problem(("metadata",), "missing: a campaign needs metadata.name")]
    if not isinstance(metadata, dict):
        return []  # the schema check names the type error
    value = metadata.get("name")
    if value is None:
        return [problem(("metadata", "name"), "missing: every campaign has a name")]
    if not isinstance(value, str) or len(value) > 253 or not _NAME.match(value):
        return [
            problem(
                ("metadata", "name"),
                f"{value!r} is not a valid name (a DNS-1123 subdomain): lower-case letters, digits, '-' and '.', "
                "starting and ending with a letter or digit, at most 253 characters",
            )
        ]
    return []


def _message(error: Any, loc: Loc) -> str:
    kind, msg = error.get("type"), str(error.get("msg"))
    if kind == "extra_forbidden" and loc and isinstance(loc[-1], str):
        known = _fields_at(loc[:-1])
        close = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else (f"; known fields: {', '.join(known)}" if known else "")
        return f"unknown field{hint}"
    if kind == "missing":
        return "missing: this field is required"
    if kind == "enum" and isinstance(error.get("input"), str):
        expected = re.findall(r"'([^']*)'", str(error.get("ctx", {}).get("expected", "")))
        close = difflib.get_close_matches(error["input"], expected, n=1, cutoff=0.6)
        if close:
            return f"{msg}, not {error['input']!r}; did you mean {close[0]}?"
    value = error.get("input")
    if kind and kind.endswith("_type") and not isinstance(value, dict | list):
        return f"{msg}, not {value!r}"
    return msg


def _fields_at(loc: Loc) -> list[str]:
    """The camelCase field names of the model at ``loc`` (for "did you mean"); [] outside the models."""
    model: Any = TrainingCampaign
    for part in loc:
        if isinstance(part, int):
            continue  # an item of a list: same model as the list's
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
        field = next((f for n, f in model.model_fields.items() if (f.alias or n) == part), None)
        if field is None:
            return []
        model = _inner_model(field.annotation)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return [f.alias or n for n, f in model.model_fields.items()]
    return []


def _inner_model(annotation: Any) -> Any:
    """``Pool`` from ``list[Pool]``, ``Storage`` from ``Storage | None``; else the annotation itself."""
    for arg in _flatten(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return annotation


def _flatten(annotation: Any) -> Iterator[Any]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list):
        for arg in typing.get_args(annotation):
            yield from _flatten(arg)
    else:
        yield annotation


def _check_machines(body: dict[str, Any], problem: Any) -> list[Problem]:
    """Every unknown machine, placed and with a close match; from the raw document, so that they are
    reported together with any schema problem rather than after it is fixed."""
    spec = body.get("spec")
    workload = spec.get("workload") if isinstance(spec, dict) else None
    if not isinstance(workload, dict) or not isinstance(workload.get("machines"), list):
        return []
    dataset = workload.get("dataset")
    allowed = (
        {
            Dataset.ds1.value: DS1_MACHINES,
            Dataset.ds2.value: DS2_MACHINES + DS1_MACHINES,  # ds2 also takes the ds1 spelling
            Dataset.ds5.value: DS1_MACHINES + DS2_MACHINES,
        }.get(dataset)
        if isinstance(dataset, str)
        else None
    )
    if allowed is None:
        return []  # a dataset without machines, or a bad dataset: the schema or the rules say so
    out = []
    for i, machine in enumerate(workload["machines"]):
        if isinstance(machine, str) and machine not in allowed:
            close = difflib.get_close_matches(machine, allowed, n=1, cutoff=0.8)  # "Machine" alone is no match
            choices = ", ".join(dict.fromkeys(allowed))
            hint = f"; did you mean {close[0]}?" if close else f"; expected one of {choices}"
            out.append(problem(("spec", "workload", "machines", i), f"unknown machine {machine!r} for {dataset}{hint}"))
    return out


def _check_rules(campaign: TrainingCampaign, problem: Any) -> list[Problem]:
    """The operator's rules the schema cannot express (:func:`check_campaign`)."""
    try:
        check_campaign(campaign.spec)
    except InvalidCampaign as exc:
        return [problem(_rule_loc(str(exc)), str(exc))]
    return []


def _rule_loc(message: str) -> Loc:
    """Where a :func:`check_campaign` message points: the field it names, else the spec."""
    if message.startswith("pool names"):
        return ("spec", "pools")
    named = re.match(r"workload\.(\w+)", message)
    if named:
        return ("spec", "workload", named[1])
    if "machine" in message:
        return ("spec", "workload", "machines")
    if "variant" in message:
        return ("spec", "workload", "variants")
    if "shape" in message:
        return ("spec", "workload", "shapes")
    return ("spec",)
