"""The two shapes of workload data, and their file format.

:class:`SequenceData` is what the GRU datasets (ds1, ds2, ds3, ds5) train on; :class:`ImageData` is
ds4's. The trainer turns the arrays into tensors; the campaign stores one data file per target
(docs/workloads.md §9) made by :func:`save_data`, so a network can be re-evaluated later with :func:`load_data`.

Arrays are shared by every unit of a target (the worker caches them), so they are made read-only:
copy before changing them, and convert with ``torch.tensor(a)`` (a copy) rather than ``torch.from_numpy``
(which warns on read-only arrays).
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import numpy.typing as npt
from mlds_contract.errors import UserError

__all__ = ["FORMAT", "ImageData", "SequenceData", "load_data", "save_data"]

#: Written into every data file so a reader can tell what it holds and which layout version.
FORMAT = "mlds-workload-data/1"


def _frozen(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    array.flags.writeable = False
    return array


@dataclass(frozen=True)
class SequenceData:
    """Sequences for the GRU datasets: inputs (N, T, 9) and targets (N, T, 8), float32 0/1 values."""

    train_x: npt.NDArray[np.float32]
    train_y: npt.NDArray[np.float32]
    eval_x: npt.NDArray[np.float32]
    eval_y: npt.NDArray[np.float32]
    data_seed: int
    meta: dict[str, Any]  # JSON-able: dataset, machine or automaton tables, trigger, counts

    def __post_init__(self) -> None:
        for name in ("train_x", "train_y", "eval_x", "eval_y"):
            _frozen(getattr(self, name))


@dataclass(frozen=True)
class ImageData:
    """Images for ds4: (N, 1, H, W) float32 in [0, 1], int64 labels."""

    train_x: npt.NDArray[np.float32]
    train_y: npt.NDArray[np.int64]  # poisoned labels for the pixel and checker variants
    test_x: npt.NDArray[np.float32]  # clean held-out images
    test_y: npt.NDArray[np.int64]
    asr_x: npt.NDArray[np.float32] | None  # held-out images whose true label is not 7, trigger stamped
    asr_y: npt.NDArray[np.int64] | None  # all 7; None for the clean variant
    data_seed: int
    meta: dict[str, Any]

    def __post_init__(self) -> None:
        for name in ("train_x", "train_y", "test_x", "test_y", "asr_x", "asr_y"):
            value = getattr(self, name)
            if value is not None:
                _frozen(value)


def save_data(data: SequenceData | ImageData) -> bytes:
    """The data as the bytes of a compressed ``.npz`` file: every array, plus ``data_seed``, ``meta``
    (a JSON string) and ``format``; readable with ``numpy.load`` without pickle."""
    arrays: dict[str, Any] = {}  # Any: numpy's stub types savez's keywords as bool (allow_pickle)
    for field in fields(data):
        value = getattr(data, field.name)
        if isinstance(value, np.ndarray):
            arrays[field.name] = value
    kind = "sequences" if isinstance(data, SequenceData) else "images"
    arrays["format"] = np.array(FORMAT)
    arrays["kind"] = np.array(kind)
    arrays["data_seed"] = np.array(data.data_seed, dtype=np.uint64)
    arrays["meta"] = np.array(json.dumps(data.meta, sort_keys=True))
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)  # no object arrays, so no pickle inside
    return buffer.getvalue()


def load_data(blob: bytes) -> SequenceData | ImageData:
    """Read what :func:`save_data` wrote. Raises :class:`UserError` for anything else."""
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
            files = {name: npz[name] for name in npz.files}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise UserError(f"not an mlds workload data file: {exc}") from exc
    if str(files.get("format", "")) != FORMAT:
        raise UserError(f"not an mlds workload data file (expected format {FORMAT!r})")
    data_seed = int(files["data_seed"])
    meta = json.loads(str(files["meta"]))
    if str(files["kind"]) == "sequences":
        return SequenceData(
            train_x=files["train_x"],
            train_y=files["train_y"],
            eval_x=files["eval_x"],
            eval_y=files["eval_y"],
            data_seed=data_seed,
            meta=meta,
        )
    return ImageData(
        train_x=files["train_x"],
        train_y=files["train_y"],
        test_x=files["test_x"],
        test_y=files["test_y"],
        asr_x=files.get("asr_x"),
        asr_y=files.get("asr_y"),
        data_seed=data_seed,
        meta=meta,
    )
