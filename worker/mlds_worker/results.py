"""A trained network as files: ``model.safetensors``, ``meta.json``, ``history.csv`` (docs/workloads.md §9).

The file names are the contract's (:mod:`mlds_contract.results`); this module builds their bytes.

Called by `mlds train` (writes them to a folder) and by the worker loop (uploads the same bytes to
presigned URLs under ``<target>/<replica as 5 digits>/``). The bytes are built in memory first so that
the sha256 a worker declares is the sha256 of exactly what it uploads.

- ``model.safetensors``: the final state dict, float32, names as in :mod:`mlds_worker.nets`. Its
  header carries no time or host, so identical weights give an identical file and sha256.
- ``meta.json``: one flat JSON object (it becomes a row of the campaign's ``manifest.parquet``); the
  keys are listed in :data:`META_FIELDS`, in that order. Absent values are ``null``, never missing,
  so every row of a dataset has the same columns.
- ``history.csv``: ``epoch,train_loss,eval_loss,seconds`` (ds4 adds ``accuracy,attack_success_rate``),
  one line per epoch, ``seconds`` being that epoch's wall time.
- ds3 only, ``snapshots.safetensors``: tensor ``snapshots`` float32 ``[epochs, parameters]``, the
  flattened weights after each epoch in ``named_parameters()`` order; its metadata key ``layout`` is a
  JSON list of ``[name, shape]`` pairs to cut a row back into a state dict (see :func:`unflatten`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from mlds_contract.campaign import Dataset
from mlds_contract.errors import StorageUnavailable
from mlds_contract.results import HISTORY_FILE, META_FILE, MODEL_FILE, SNAPSHOTS_FILE
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from . import __version__
from .train import SGD_MOMENTUM, TrainResult

__all__ = [
    "META_FIELDS",
    "load_snapshots",
    "load_state_dict",
    "meta_record",
    "result_files",
    "sha256_hex",
    "snapshot_layout",
    "unflatten",
    "write_result",
]

#: The keys of meta.json, in order. Adding a key is compatible; renaming or removing one is not.
META_FIELDS: tuple[str, ...] = (
    "mlds_version",
    "campaign",
    "dataset",
    "target",
    "machine",  # ds1, ds2, ds5
    "automaton",  # ds3
    "variant",  # ds4
    "images",  # ds4: digits8 or mnist
    "unit",
    "replica",
    "attempt",
    "campaign_seed",
    "init_seed",
    "sgd_seed",
    "data_seed",
    "data_generator",  # the workload generator and its version, e.g. mlds-machines/1
    "automaton_states",  # ds3: hidden states of the transducer
    "automaton_sha256",  # ds3: hash of its canonical tables (unique within a campaign)
    "architecture",  # GRUNet or DigitsCNN
    "shape",  # GRU: slug such as h12-g4-l4; ds4: image size such as 8x8
    "gru_layers",
    "hidden",
    "linear_layers",
    "parameters",
    "optimizer",  # adam or sgd
    "learning_rate",
    "momentum",  # sgd only
    "batch_size",
    "max_epochs",
    "target_loss",  # GRU convergence threshold on evaluation MSE
    "epochs",
    "converged",
    "train_loss",
    "eval_loss",
    "accuracy",  # ds4
    "attack_success_rate",  # ds4 poisoned variants
    "seconds",  # training wall time, sum of the epochs
    "sha256",  # of model.safetensors
    "torch_version",
    "device_type",  # cpu, nvidia or rocm
    "device_name",
    "pool",
    "started",  # UTC, RFC 3339
    "ended",
)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _rfc3339(moment: Any) -> str:
    return str(moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"))


def _number(value: float | None) -> float | None:
    """JSON has no NaN: a diverged loss is recorded as null."""
    return None if value is None or not math.isfinite(value) else value


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def _integer(value: object) -> int | None:
    return value if isinstance(value, int) else None


def meta_record(result: TrainResult, *, sha256: str, pool: str | None = None) -> dict[str, Any]:
    """The meta.json object of ``result``, keys in :data:`META_FIELDS` order."""
    unit = result.unit
    shape = unit.shape if unit.dataset is not Dataset.ds4 else None
    if shape is not None:
        shape_text: str | None = shape.slug
    elif result.image_size is not None:
        shape_text = "x".join(str(n) for n in result.image_size)
    else:
        shape_text = None
    is_sgd = unit.dataset is Dataset.ds4
    record: dict[str, Any] = {
        "mlds_version": __version__,
        "campaign": unit.campaign,
        "dataset": unit.dataset.value,
        "target": unit.target,
        "machine": unit.machine,
        "automaton": unit.automaton,
        "variant": unit.variant.value if unit.variant is not None else None,
        "images": unit.images.value if unit.dataset is Dataset.ds4 else None,
        "unit": unit.unit,
        "replica": unit.replica,
        "attempt": unit.attempt,
        "campaign_seed": unit.campaign_seed,
        "init_seed": unit.init_seed,
        "sgd_seed": unit.sgd_seed,
        "data_seed": result.data_seed if result.data_seed is not None else unit.data_seed,
        "data_generator": _text(result.data_meta.get("generator")),
        "automaton_states": _integer(result.data_meta.get("states")) if unit.dataset is Dataset.ds3 else None,
        "automaton_sha256": _text(result.data_meta.get("sha256")) if unit.dataset is Dataset.ds3 else None,
        "architecture": result.architecture,
        "shape": shape_text,
        "gru_layers": shape.gru_layers if shape is not None else None,
        "hidden": shape.hidden if shape is not None else None,
        "linear_layers": shape.linear_layers if shape is not None else None,
        "parameters": result.parameters,
        "optimizer": "sgd" if is_sgd else "adam",
        "learning_rate": unit.training.learning_rate,
        "momentum": SGD_MOMENTUM if is_sgd else None,
        "batch_size": unit.training.batch_size,
        "max_epochs": unit.training.max_epochs,
        "target_loss": None if is_sgd else unit.training.target_loss,
        "epochs": result.epochs,
        "converged": result.converged,
        "train_loss": _number(result.train_loss),
        "eval_loss": _number(result.eval_loss),
        "accuracy": _number(result.accuracy),
        "attack_success_rate": _number(result.attack_success_rate),
        "seconds": round(result.seconds, 3),
        "sha256": sha256,
        "torch_version": torch.__version__,
        "device_type": result.device_type,
        "device_name": result.device_name,
        "pool": pool,
        "started": _rfc3339(result.started),
        "ended": _rfc3339(result.ended),
    }
    return record


def _history_csv(result: TrainResult) -> bytes:
    image = result.unit.dataset is Dataset.ds4
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    header = ["epoch", "train_loss", "eval_loss", "seconds"]
    writer.writerow([*header, "accuracy", "attack_success_rate"] if image else header)
    for r in result.history:
        row: list[object] = [r.epoch, repr(r.train_loss), repr(r.eval_loss), f"{r.seconds:.4f}"]
        if image:
            row += [
                "" if r.accuracy is None else repr(r.accuracy),
                "" if r.attack_success_rate is None else repr(r.attack_success_rate),
            ]
        writer.writerow(row)
    return out.getvalue().encode()


def snapshot_layout(state_dict: Mapping[str, torch.Tensor]) -> list[tuple[str, list[int]]]:
    """``[name, shape]`` of each parameter, in the order a flattened snapshot row holds them."""
    return [(name, list(t.shape)) for name, t in state_dict.items()]


def unflatten(row: torch.Tensor, layout: list[tuple[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Cut one flattened weight vector (a snapshot row) back into a state dict."""
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for name, shape in layout:
        n = math.prod(shape)
        out[name] = row[offset : offset + n].reshape(shape).clone()
        offset += n
    if offset != row.numel():
        raise ValueError(f"layout covers {offset} values, the row has {row.numel()}")
    return out


def result_files(result: TrainResult, *, pool: str | None = None) -> dict[str, bytes]:
    """The files of one result, name -> bytes (model first; meta.json carries the model's sha256)."""
    # The state dict of both networks holds parameters only (no buffers), in named_parameters() order,
    # which is also the order flatten_parameters() and the snapshots use.
    model = save_safetensors(result.state_dict, metadata={"format": "pt"})
    files = {MODEL_FILE: model}
    if result.snapshots is not None:
        layout = json.dumps(snapshot_layout(result.state_dict), separators=(",", ":"))
        files[SNAPSHOTS_FILE] = save_safetensors(
            {"snapshots": result.snapshots.to(torch.float32).contiguous()},
            metadata={"format": "pt", "layout": layout},
        )
    meta = meta_record(result, sha256=sha256_hex(model), pool=pool)
    files[META_FILE] = (json.dumps(meta, indent=2) + "\n").encode()
    files[HISTORY_FILE] = _history_csv(result)
    return files


def write_result(folder: Path, files: Mapping[str, bytes]) -> None:
    """Write ``files`` into ``folder`` (created if missing), each atomically (temporary file, then rename).

    A reader never sees half a file; meta.json is written last, so its presence means the rest is there.
    Raises :class:`StorageUnavailable` if the folder cannot be written.
    """
    order = sorted(files, key=lambda name: name == META_FILE)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name in order:
            # Not tempfile.mkstemp: it creates 0600 files, and results are meant to be read by others (umask).
            tmp = folder / f".{name}.{uuid.uuid4().hex}.tmp"
            try:
                with tmp.open("xb") as fh:
                    fh.write(files[name])
                os.replace(tmp, folder / name)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
    except OSError as exc:
        raise StorageUnavailable(f"cannot write results to {folder}: {exc.strerror or exc}") from exc


def load_state_dict(data: bytes) -> dict[str, torch.Tensor]:
    """The state dict in a ``model.safetensors`` (bytes), ready for ``load_state_dict(strict=True)``."""
    return load_safetensors(data)


def load_snapshots(data: bytes) -> tuple[torch.Tensor, list[tuple[str, list[int]]]]:
    """The ``[epochs, parameters]`` tensor of a ``snapshots.safetensors`` (bytes) and its layout.

    Cut a row back into a state dict with :func:`unflatten`.
    """
    # safetensors: 8-byte little-endian header length, then the JSON header with "__metadata__".
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    layout = [(str(name), [int(n) for n in shape]) for name, shape in json.loads(header["__metadata__"]["layout"])]
    return load_safetensors(data)["snapshots"], layout
