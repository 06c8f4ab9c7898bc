"""What the lease server accepts from a worker's completion: one small function per check (DESIGN.md §2).

Workers are untrusted: buggy, compromised, or written against the OpenAPI document by someone else.
:class:`~mlds_operator.leases.service.CampaignService` calls these, in order, on a completion's staged
files before anything is published or counted:

1. :func:`check_file_names`: exactly the dataset's result files.
2. (:meth:`~mlds_operator.storage.store.Store.verify`: each staged object is the declared size and SHA-256.)
3. :func:`parse_json_object`: meta.json is one bounded JSON object (size, nesting depth, no duplicate keys,
   no NaN/Infinity, no giant integers).
4. :func:`check_meta`: it names this unit, attempt, target and model, and its measured fields parse
   strictly into :class:`~mlds_contract.results.Measured`.
5. :func:`check_model` (and :func:`check_snapshots` for ds3): the safetensors header holds exactly the
   unit architecture's tensors, float32, with their shapes, and its byte ranges tile the file.
6. :func:`manifest_row`: the row the manifest gets is built by the server from the plan plus the
   measured fields, so nothing a worker writes can make a manifest flush fail.

Each check raises :class:`ResultRejected` with the :class:`~mlds_contract.lease.RejectReason` the
HTTP API turns into a 422. Recovery after a restart (:func:`row_from_published`) reads a published
meta.json back through the same parser and returns None for anything unreadable, so a damaged result
folder is skipped and reported instead of stopping the server.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mlds_contract.campaign import Dataset
from mlds_contract.errors import MldsError
from mlds_contract.lease import CompleteRequest, RejectReason
from mlds_contract.plan import UnitSpec
from mlds_contract.results import (
    MAX_META_BYTES,
    MODEL_FILE,
    Measured,
    image_size_of,
    model_tensors,
    result_files_for,
)
from pydantic import ValidationError

__all__ = [
    "MAX_JSON_DEPTH",
    "Published",
    "ResultRejected",
    "check_file_names",
    "check_meta",
    "check_model",
    "check_snapshots",
    "manifest_row",
    "parse_json_object",
    "read_published",
    "row_json",
]

#: Deepest nesting a meta.json or safetensors header may have. The worker's meta.json is flat (depth 1);
#: Python's json parser recurses per level, so an unbounded depth is a crash (100,000 levels), not a 4xx.
MAX_JSON_DEPTH = 16
#: Largest safetensors header read (a model's header is ~1.5 kB; ds3 snapshots carry a layout of ~2 kB).
MAX_SAFETENSORS_HEADER = 1 << 20
#: Longest integer literal accepted in JSON (an int64 has 19 digits); beyond this it is a number no field takes.
_MAX_INT_DIGITS = 20
_SHA256 = re.compile(r"^[0-9a-f]{64}\Z")
# What _depth_ok looks at: string quotes, escapes and brackets.
_JSON_MARKS = re.compile(r'["\\\[\]{}]')
# A run of digits longer than any integer literal accepted: only then do integers need a look each.
_LONG_DIGITS = re.compile(f"[0-9]{{{_MAX_INT_DIGITS + 1}}}")


class ResultRejected(MldsError):
    """A completion whose files are missing or do not match what the worker declared (HTTP 422)."""

    def __init__(self, message: str, *, reason: RejectReason) -> None:
        super().__init__(message)
        self.reason = reason


def check_file_names(req: CompleteRequest, spec: UnitSpec) -> None:
    """The completion declares exactly the dataset's result files."""
    expected = set(result_files_for(spec.dataset))
    if set(req.files) != expected:
        raise ResultRejected(
            f"unit {req.unit}: expected files {sorted(expected)}, got {sorted(req.files)}",
            reason=RejectReason.bad_files,
        )


def _depth_ok(text: str, limit: int) -> bool:
    """True when ``text``'s brackets nest at most ``limit`` deep (strings skipped). Linear, no recursion.

    Visits only the characters that matter (quotes, backslashes, brackets; found by a regular expression,
    in C), not every character: a meta.json has ~150 of them in ~1,500.
    """
    if text.count("[") + text.count("{") <= limit:
        return True  # cannot nest deeper than it has openings
    depth = 0
    in_string = False
    skip = -1  # the position of an escaped character (it is never a string's end)
    for match in _JSON_MARKS.finditer(text):
        ch, at = match.group(), match.start()
        if in_string:
            if at == skip:
                continue
            if ch == "\\":
                skip = at + 1
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise ValueError(f"integer of {len(text)} digits")
    return int(text)


def parse_json_object(raw: bytes, *, what: str, max_bytes: int = MAX_META_BYTES) -> dict[str, Any]:
    """``raw`` as one JSON object, or ValueError saying why not (size, encoding, depth, duplicates...)."""
    if len(raw) > max_bytes:
        raise ValueError(f"{what} is {len(raw)} bytes, more than {max_bytes}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} is not UTF-8") from exc
    if not _depth_ok(text, MAX_JSON_DEPTH):
        raise ValueError(f"{what} nests deeper than {MAX_JSON_DEPTH} levels")
    # An integer literal has no more digits than the longest run of digits in the text: without a run past
    # the bound, json's own (C) integer parsing needs no check per integer.
    parse_int = _bounded_int if _LONG_DIGITS.search(text) else None
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant, parse_int=parse_int)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"{what} is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{what} is not a JSON object")
    return value


def _same(value: object, want: object) -> bool:
    """Equal and of the same type: ``0.0`` is not ``0``, ``True`` is not ``1``."""
    return type(value) is type(want) and value == want


def check_meta(raw: bytes, req: CompleteRequest, spec: UnitSpec) -> Measured:
    """meta.json names this unit, attempt, target and model, and its measured fields are well-formed."""
    try:
        meta = parse_json_object(raw, what="meta.json")
    except ValueError as exc:
        raise ResultRejected(f"unit {req.unit}: {exc}", reason=RejectReason.bad_meta) from exc
    problems = []
    for key, want in (
        ("unit", req.unit),
        ("attempt", req.attempt),
        ("target", spec.target),
        ("sha256", req.files[MODEL_FILE].sha256),
        ("converged", req.converged),
    ):
        if not _same(meta.get(key), want):
            problems.append(f"{key} is {meta.get(key)!r:.80}, expected {want!r}")
    if problems:
        raise ResultRejected(f"unit {req.unit}: meta.json {'; '.join(problems)}", reason=RejectReason.bad_meta)
    try:
        measured = Measured.model_validate(meta, strict=True)
    except ValidationError as exc:
        where = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors(include_url=False)[:4]
        )
        raise ResultRejected(f"unit {req.unit}: meta.json {where}", reason=RejectReason.bad_meta) from exc
    if measured.epochs > spec.training.max_epochs:
        raise ResultRejected(
            f"unit {req.unit}: meta.json epochs {measured.epochs} exceeds max_epochs {spec.training.max_epochs}",
            reason=RejectReason.bad_meta,
        )
    return measured


def _check_tensors(data: bytes, what: str, expected: Mapping[str, tuple[int, ...]]) -> None:
    """``data`` is a safetensors file of exactly the ``expected`` float32 tensors; ValueError saying why not."""
    if len(data) < 8:
        raise ValueError(f"{what} is too short for a safetensors file")
    size = int.from_bytes(data[:8], "little")
    if size > MAX_SAFETENSORS_HEADER or 8 + size > len(data):
        raise ValueError(f"{what} has a safetensors header of {size} bytes, more than the file or the limit")
    header = data[8 : 8 + size]
    check = _header_problem_cached if size <= _CACHED_HEADER_BYTES else _header_problem
    problem = check(header, len(data) - 8 - size, what, tuple(expected.items()))
    if problem is not None:
        raise ValueError(problem)


def _header_problem(  # noqa: PLR0911 - one return per way a header can be wrong
    raw: bytes, body: int, what: str, expected: tuple[tuple[str, tuple[int, ...]], ...]
) -> str | None:
    """What is wrong with a safetensors header (``raw``, before ``body`` bytes of tensor data), or None."""
    try:
        header = parse_json_object(raw, what=f"{what} header", max_bytes=MAX_SAFETENSORS_HEADER)
    except ValueError as exc:
        return str(exc)
    header.pop("__metadata__", None)
    names = {name for name, _ in expected}
    if set(header) != names:
        missing, extra = sorted(names - set(header)), sorted(set(header) - names)
        return f"{what} tensors differ from the architecture's (missing {missing[:4]}, extra {extra[:4]})"
    spans = []
    for name, shape in expected:
        entry = header[name]
        if not isinstance(entry, dict) or entry.get("dtype") != "F32":
            return f"{what} tensor {name} is not float32"
        if entry.get("shape") != list(shape):
            return f"{what} tensor {name} has shape {entry.get('shape')!r:.60}, expected {list(shape)}"
        offsets = entry.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            return f"{what} tensor {name} has malformed data_offsets"
        if offsets[1] - offsets[0] != 4 * math.prod(shape):
            return f"{what} tensor {name} covers {offsets[1] - offsets[0]} bytes, not {4 * math.prod(shape)}"
        spans.append((offsets[0], offsets[1]))
    end = 0
    for begin, stop in sorted(spans):
        if begin != end:
            return f"{what} tensor data overlaps or leaves gaps"
        end = stop
    if end != body:
        return f"{what} is {8 + len(raw) + body} bytes; its header describes {8 + len(raw) + end}"
    return None


#: Headers up to this size have their verdict remembered: every model of a campaign's architecture written
#: by the same worker code has the same header bytes, so checking one result's header is a dict lookup.
#: The verdict is a pure function of the key (header bytes, data length, what is expected), so the cache
#: can never accept what the check refuses; 256 entries of at most 16 KiB bound its memory (4 MiB).
_CACHED_HEADER_BYTES = 16 << 10
_header_problem_cached = functools.lru_cache(maxsize=256)(_header_problem)


def check_model(data: bytes, req: CompleteRequest, spec: UnitSpec) -> None:
    """``model.safetensors`` holds exactly the unit architecture's float32 tensors (header only: cheap)."""
    try:
        _check_tensors(data, MODEL_FILE, model_tensors(spec))
    except ValueError as exc:
        raise ResultRejected(f"unit {req.unit}: {exc}", reason=RejectReason.bad_model) from exc


def check_snapshots(data: bytes, req: CompleteRequest, spec: UnitSpec, epochs: int) -> None:
    """ds3's ``snapshots.safetensors``: one float32 row of every parameter per epoch."""
    parameters = sum(math.prod(s) for s in model_tensors(spec).values())
    try:
        _check_tensors(data, "snapshots.safetensors", {"snapshots": (epochs, parameters)})
    except ValueError as exc:
        raise ResultRejected(f"unit {req.unit}: {exc}", reason=RejectReason.bad_model) from exc


def manifest_row(spec: UnitSpec, measured: Measured, *, sha256: str, pool: str, key: str) -> dict[str, Any]:
    """A manifest row (and the published meta.json): the plan's fields, then what the worker measured.

    Every value has a fixed type per column (int, float, str, bool or null), so rows of any workers
    always make a manifest part.
    """
    tensors = model_tensors(spec)
    gru = spec.dataset is not Dataset.ds4
    shape = spec.shape if gru else None
    if shape is not None:
        shape_text = shape.slug
    else:
        height, width = image_size_of(spec.images)
        shape_text = f"{height}x{width}"
    training = spec.training
    return {
        "mlds_version": measured.mlds_version,
        "campaign": spec.campaign,
        "dataset": spec.dataset.value,
        "target": spec.target,
        "machine": spec.machine,
        "automaton": spec.automaton,
        "variant": spec.variant.value if spec.variant is not None else None,
        "images": spec.images.value if not gru else None,
        "unit": spec.unit,
        "replica": spec.replica,
        "attempt": spec.attempt,
        "campaign_seed": spec.campaign_seed,
        "init_seed": spec.init_seed,
        "sgd_seed": spec.sgd_seed,
        "data_seed": spec.data_seed,
        "data_generator": measured.data_generator,
        "automaton_states": measured.automaton_states if spec.dataset is Dataset.ds3 else None,
        "automaton_sha256": measured.automaton_sha256 if spec.dataset is Dataset.ds3 else None,
        "architecture": "GRUNet" if gru else "DigitsCNN",
        "shape": shape_text,
        "gru_layers": shape.gru_layers if shape is not None else None,
        "hidden": shape.hidden if shape is not None else None,
        "linear_layers": shape.linear_layers if shape is not None else None,
        "parameters": sum(math.prod(s) for s in tensors.values()),
        "optimizer": "adam" if gru else "sgd",
        "learning_rate": float(training.learning_rate),
        "momentum": None if gru else 0.9,
        "batch_size": training.batch_size,
        "max_epochs": training.max_epochs,
        "target_loss": float(training.target_loss) if gru else None,
        "epochs": measured.epochs,
        "converged": measured.converged,
        "train_loss": _float(measured.train_loss),
        "eval_loss": _float(measured.eval_loss),
        "accuracy": _float(measured.accuracy),
        "attack_success_rate": _float(measured.attack_success_rate),
        "seconds": float(measured.seconds),
        "sha256": sha256,
        "torch_version": measured.torch_version,
        "device_type": measured.device_type,
        "device_name": measured.device_name,
        "pool": pool,
        "started": measured.started,
        "ended": measured.ended,
        "key": key,
    }


def row_json(row: Mapping[str, Any]) -> bytes:
    """A manifest row as the published meta.json: exactly ``json.dumps(row, indent=2) + "\\n"``, encoded.

    ``indent`` makes the json module use its pure-Python encoder (a third of a result's verification
    time); a row is flat (scalars only, see :func:`manifest_row`), so the C encoder with the indented
    separators writes the same text.
    """
    if not row:
        return b"{}\n"
    body = json.dumps(row, separators=(",\n  ", ": "))
    return f"{{\n  {body[1:-1]}\n}}\n".encode()


def _float(value: float | None) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True)
class Published:
    """What recovery reads back from a published meta.json (written by the server from a checked result)."""

    attempt: int
    sha256: str
    pool: str
    measured: Measured


def read_published(raw: bytes | None, *, unit: int, target: str) -> Published | None:
    """A published result folder's meta.json, parsed as strictly as a completion's; None when unusable.

    None when the file is missing, unreadable, or names another unit or target: recovery skips it (and
    reports it) rather than let one damaged object stop the server.
    """
    if raw is None:
        return None
    try:
        meta = parse_json_object(raw, what="meta.json")
        measured = Measured.model_validate(meta, strict=True)
    except (ValueError, ValidationError):
        return None
    sha, pool, attempt = meta.get("sha256"), meta.get("pool"), meta.get("attempt")
    if not (isinstance(sha, str) and _SHA256.match(sha) and isinstance(pool, str) and type(attempt) is int):
        return None
    if not (_same(meta.get("unit"), unit) and _same(meta.get("target"), target) and 0 <= attempt < 1 << 16):
        return None
    return Published(attempt=attempt, sha256=sha, pool=pool, measured=measured)
