"""The files of one trained network, as the worker writes them and the server checks and publishes them.

One list shared by every side (docs/workloads.md §9): the worker builds these files
(:func:`mlds_worker.results.result_files`) and uploads exactly the names the server presigned; the lease
service (:mod:`mlds_operator.leases.service`) signs uploads for :func:`result_files_for` and refuses a
completion that declares any other set; the manifest and the researchers' API (:mod:`mlds_data`) read
them back from ``<target>/<replica:05d>/``.

Workers are untrusted (DESIGN.md §2), so this module also says what the server may believe of a result:
:func:`model_tensors` is the tensor layout a unit's ``model.safetensors`` must have (the server checks
the file's header against it before accepting the result), and :class:`Measured` is the part of
``meta.json`` the server takes from the worker (what it measured: losses, epochs, times, device), each
field strictly typed and bounded. Everything else in a manifest row (campaign, unit, target, replica,
seeds, shape, hyper-parameters) the server derives from the plan itself.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Final

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from .campaign import Dataset, Images
from .plan import DEFAULT_SHAPE, UnitSpec

__all__ = [
    "HISTORY_FILE",
    "MAX_META_BYTES",
    "MAX_RESULT_FILE_BYTES",
    "META_FILE",
    "MODEL_FILE",
    "SNAPSHOTS_FILE",
    "UNCONVERGED_PREFIX",
    "Measured",
    "image_size_of",
    "model_tensors",
    "result_files_for",
]

#: The final weights (float32 safetensors); meta.json records its sha256.
MODEL_FILE: Final = "model.safetensors"
#: One flat JSON object per network: a row of the campaign's manifest. Written last, so a result folder
#: holding it is whole.
META_FILE: Final = "meta.json"
#: One line per epoch: ``epoch,train_loss,eval_loss,seconds`` (ds4 adds accuracy columns).
HISTORY_FILE: Final = "history.csv"
#: ds3 only: the flattened weights after every epoch.
SNAPSHOTS_FILE: Final = "snapshots.safetensors"
#: Attempts that hit the epoch cap keep their files under ``unconverged/<target>/<replica>/attempt-<n>/``
#: beneath the campaign prefix, out of the manifest.
UNCONVERGED_PREFIX: Final = "unconverged/"

#: Largest result file the server accepts, uploaded or declared (ds3 snapshots of 4,096 epochs are ~70 MB).
#: The server holds a file in memory while it verifies and publishes it, so this bounds that memory.
MAX_RESULT_FILE_BYTES: Final = 256 << 20


def result_files_for(dataset: Dataset) -> tuple[str, ...]:
    """The files a worker uploads per unit (meta.json last: its presence marks a whole result)."""
    if dataset is Dataset.ds3:
        return (MODEL_FILE, HISTORY_FILE, SNAPSHOTS_FILE, META_FILE)
    return (MODEL_FILE, HISTORY_FILE, META_FILE)


#: Largest meta.json the server reads (the worker's is ~1.5 kB; 64 KiB leaves room for long device names
#: and future fields, and bounds what a hostile worker can make the server parse).
MAX_META_BYTES: Final = 64 << 10

#: The GRU network's input and output widths (command bus in, outputs out; docs/workloads.md §3).
GRU_INPUTS: Final = 9
GRU_OUTPUTS: Final = 8
#: ds4's classes (digits 0-9).
DIGITS_CLASSES: Final = 10


def image_size_of(images: Images) -> tuple[int, int]:
    """The input resolution of a ds4 network: 8x8 scikit-learn digits or 28x28 MNIST."""
    return (28, 28) if images is Images.mnist else (8, 8)


def model_tensors(spec: UnitSpec) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a unit's ``model.safetensors`` (all float32), in ``named_parameters()`` order.

    The worker's networks (:mod:`mlds_worker.nets`) must have exactly these parameters; a test builds
    each and compares. The server checks an uploaded model's header against this before accepting it.
    """
    if spec.dataset is Dataset.ds4:
        height, width = image_size_of(spec.images)
        return {
            "conv1.weight": (8, 1, 3, 3),
            "conv1.bias": (8,),
            "conv2.weight": (16, 8, 3, 3),
            "conv2.bias": (16,),
            "fc1.weight": (32, 16 * (height // 4) * (width // 4)),
            "fc1.bias": (32,),
            "fc2.weight": (DIGITS_CLASSES, 32),
            "fc2.bias": (DIGITS_CLASSES,),
        }
    shape = spec.shape or DEFAULT_SHAPE
    h = shape.hidden
    out: dict[str, tuple[int, ...]] = {}
    for k in range(shape.gru_layers):
        out[f"gru.weight_ih_l{k}"] = (3 * h, GRU_INPUTS if k == 0 else h)
        out[f"gru.weight_hh_l{k}"] = (3 * h, h)
        out[f"gru.bias_ih_l{k}"] = (3 * h,)
        out[f"gru.bias_hh_l{k}"] = (3 * h,)
    for i in range(shape.linear_layers):
        out[f"linear.{i}.weight"] = (h, h)
        out[f"linear.{i}.bias"] = (h,)
    out["out.weight"] = (GRU_OUTPUTS, h)
    out["out.bias"] = (GRU_OUTPUTS,)
    return out


def _finite(value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


#: A loss, accuracy or rate as a worker reports it: finite and within a generous bound, or null (diverged).
_Figure = Annotated[float | None, Field(ge=-1e12, le=1e12), AfterValidator(_finite)]
_Text = Annotated[str | None, StringConstraints(max_length=200)]


def _timestamp(value: str | None) -> str | None:
    """An RFC 3339 time as the worker writes it (``2026-01-01T00:00:00.000Z``); kept as text."""
    if value is None:
        return None
    if len(value) > 40:
        raise ValueError("is not an RFC 3339 time")
    try:
        datetime.fromisoformat(value)
    except ValueError as exc:
        raise ValueError("is not an RFC 3339 time") from exc
    return value


class Measured(BaseModel):
    """What the server takes from a worker's ``meta.json``: what the worker measured, nothing it was told.

    Parsed strictly (``strict=True``: ``1.0`` is not an epoch count, ``"true"`` not a boolean) with
    bounds on every field. Other keys of meta.json are checked against the plan where they name the
    unit (``unit``, ``attempt``, ``target``, ``sha256``) and otherwise ignored: the manifest row's plan
    fields come from the server.
    """

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)

    epochs: int = Field(ge=0, le=1_000_000, description="Epochs run (at most the unit's max_epochs).")
    converged: bool = Field(description="True when the convergence criterion was met before the epoch cap.")
    train_loss: _Figure = None
    eval_loss: _Figure = None
    accuracy: _Figure = None
    attack_success_rate: _Figure = None
    seconds: float = Field(ge=0, le=1e9, description="Training wall time, the sum of the epochs.")
    mlds_version: _Text = None
    torch_version: _Text = None
    device_type: Annotated[str | None, StringConstraints(max_length=16, pattern=r"^[a-z0-9]+$")] = None
    device_name: _Text = None
    data_generator: _Text = None
    automaton_states: int | None = Field(None, ge=0, le=1 << 16)
    automaton_sha256: Annotated[str | None, StringConstraints(pattern=r"^[0-9a-f]{64}$")] = None
    started: Annotated[str | None, AfterValidator(_timestamp)] = None
    ended: Annotated[str | None, AfterValidator(_timestamp)] = None
