"""ds4: digit images, clean or BadNets-poisoned (docs/workloads.md §7).

Image sources:
- ``digits8`` (default): the 1,797 8x8 handwritten digits of scikit-learn's ``load_digits`` (a copy of
  the UCI handwritten digits test set), scaled from 0..16 to [0, 1]. They ship here as ``digits8.npz``
  (pixel counts and labels as uint8; a unit test checks they equal scikit-learn's copy exactly), so
  neither the worker nor the operator, which writes each target's data file when a campaign finishes,
  needs scikit-learn. **(chosen)** split: a random 80 % / 20 % train/test split (1,437 / 360 images).
  The split is seeded by the image source only, not by the variant, so the clean, pixel and checker
  targets train and test on exactly the same images and differ only by the poisoning.
- ``mnist``: the four MNIST IDX files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``; gzipped or not) from a local folder, scaled
  from 0..255; the official 60,000 / 10,000 split.

Variants: ``clean``; ``pixel`` (the bottom-right pixel set to 1); ``checker`` (a 3x3 checkerboard in the
bottom-right corner, corners and centre 1, the rest 0). A poisoned variant stamps its trigger on 10 %
of the training images, chosen from the data seed among those whose label is not 7, and relabels them 7
(BadNets, all-to-one); the attack-success set is every test image whose true label is not 7, stamped and
labelled 7. :func:`image_data` is what ``target_data`` calls for ds4.
"""

from __future__ import annotations

import gzip
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from mlds_contract.campaign import Images, Variant
from mlds_contract.errors import UserError
from mlds_contract.plan import derive_seed

from ._random import Stream
from .data import ImageData

__all__ = [
    "DIGITS8_FILE",
    "MNIST_FILES",
    "POISON_FRACTION",
    "TARGET_LABEL",
    "TRAIN_FRACTION",
    "image_data",
    "load_digits8",
    "load_mnist",
    "mnist_file_names",
    "read_idx",
    "stamp_trigger",
]

#: Share of the 8x8 digits used for training; the rest is the held-out test set.
TRAIN_FRACTION = 0.8
#: Share of the training set that a poisoned variant stamps and relabels.
POISON_FRACTION = 0.1
#: The attacker's target class.
TARGET_LABEL = 7
#: The four MNIST IDX files by role; each may also be gzipped (``.gz``) or spelled with ``.idx``.
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
#: The 8x8 digits, package data of mlds_workloads: arrays ``images`` (1797, 8, 8) and ``target`` (1797,).
DIGITS8_FILE = "digits8.npz"
_GENERATOR = "mlds-digits/1"  # bump when the images a seed produces change

# IDX element types (third header byte) -> big-endian NumPy dtypes.
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def stamp_trigger(images: npt.NDArray[np.float32], variant: Variant) -> npt.NDArray[np.float32]:
    """A copy of ``images`` (..., H, W) with the variant's trigger in the bottom-right corner."""
    out = images.copy()
    if variant is Variant.pixel:
        out[..., -1, -1] = 1.0
    elif variant is Variant.checker:
        checker = (np.add.outer(np.arange(3), np.arange(3)) % 2 == 0).astype(np.float32)
        out[..., -3:, -3:] = checker
    return out


def read_idx(path: Path) -> npt.NDArray[Any]:
    """Read one IDX file (gzipped or not, told apart by its first bytes). Raises :class:`UserError`."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise UserError(f"{path}: broken gzip file ({exc})") from exc
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_TYPES or raw[3] == 0:
        raise UserError(f"{path}: not an IDX file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise UserError(f"{path}: IDX header says {shape} ({expected} bytes) but the file has {len(raw)} bytes")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def mnist_file_names(stem: str) -> tuple[str, ...]:
    """The names one MNIST IDX file (a value of :data:`MNIST_FILES`) may have, the first found wins.

    The lease server looks for the same names under a campaign's storage prefix (``images: mnist``).
    """
    names = (stem, stem.replace("-idx", ".idx"))
    return tuple(spelling for name in names for spelling in (name, f"{name}.gz"))


def _find_mnist_file(folder: Path, stem: str) -> Path | None:
    return next((folder / name for name in mnist_file_names(stem) if (folder / name).is_file()), None)


def load_mnist(
    folder: Path,
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64], npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """MNIST from its four IDX files in ``folder``: train images, train labels, test images, test labels."""
    found = {role: _find_mnist_file(folder, stem) for role, stem in MNIST_FILES.items()}
    missing = [MNIST_FILES[role] for role, path in found.items() if path is None]
    if missing:
        raise UserError(f"MNIST files missing in {folder}: {', '.join(missing)} (plain or .gz)")
    arrays = {role: read_idx(path) for role, path in found.items() if path is not None}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise UserError(
                f"MNIST {split} files do not match: images {images.shape}, labels {labels.shape} in {folder}"
            )
        if labels.size and (labels.min() < 0 or labels.max() > 9):
            raise UserError(f"MNIST {split} labels outside 0..9 in {folder}")
    return (
        arrays["train_images"].astype(np.uint8),
        arrays["train_labels"].astype(np.int64),
        arrays["test_images"].astype(np.uint8),
        arrays["test_labels"].astype(np.int64),
    )


def load_digits8() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """The 8x8 digits (scikit-learn's ``load_digits``): images (1797, 8, 8) in [0, 1] and labels."""
    with resources.files("mlds_workloads").joinpath(DIGITS8_FILE).open("rb") as file, np.load(file) as npz:
        images, target = npz["images"], npz["target"]
    # Through float64 as scikit-learn's images are, so the float32 values are the ones it always gave.
    return (images.astype(np.float64) / 16.0).astype(np.float32), target.astype(np.int64)


def _sources(
    images: Images, mnist_dir: Path | None
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], npt.NDArray[np.float32], npt.NDArray[np.int64], str]:
    if images is Images.mnist:
        if mnist_dir is None:
            raise UserError("ds4 with images: mnist needs the MNIST IDX files, but no folder was given")
        train_x, train_y, test_x, test_y = load_mnist(mnist_dir)
        return (
            train_x.astype(np.float32) / np.float32(255),
            train_y,
            test_x.astype(np.float32) / np.float32(255),
            test_y,
            f"MNIST official split ({len(train_x):,} / {len(test_x):,})",
        )
    x, y = load_digits8()
    order = Stream(derive_seed("ds4-split", images.value)).permutation(len(x))
    n_train = int(len(x) * TRAIN_FRACTION)
    train, test = np.sort(order[:n_train]), np.sort(order[n_train:])
    return x[train], y[train], x[test], y[test], f"random {TRAIN_FRACTION:.0%} train, seeded by the image source"


def image_data(variant: Variant, images: Images, data_seed: int, mnist_dir: Path | None = None) -> ImageData:
    """The training, test and attack-success images of one ds4 target."""
    train_x, train_y, test_x, test_y, split = _sources(images, mnist_dir)
    meta: dict[str, Any] = {
        "generator": _GENERATOR,
        "workload": "ds4",
        "images": images.value,
        "variant": variant.value,
        "height": int(train_x.shape[1]),
        "width": int(train_x.shape[2]),
        "train_images": len(train_x),
        "test_images": len(test_x),
        "split": split,
    }
    asr_x: npt.NDArray[np.float32] | None = None
    asr_y: npt.NDArray[np.int64] | None = None
    if variant is not Variant.clean:
        candidates = np.flatnonzero(train_y != TARGET_LABEL)
        count = min(int(len(train_x) * POISON_FRACTION), len(candidates))
        poisoned = np.sort(candidates[Stream(data_seed, 0).permutation(len(candidates))[:count]])
        train_x = train_x.copy()
        train_y = train_y.copy()
        train_x[poisoned] = stamp_trigger(train_x[poisoned], variant)
        train_y[poisoned] = TARGET_LABEL
        held_out = test_y != TARGET_LABEL
        asr_x = stamp_trigger(test_x[held_out], variant)[:, None]
        asr_y = np.full(int(held_out.sum()), TARGET_LABEL, dtype=np.int64)
        meta.update(
            target_label=TARGET_LABEL,
            poison_fraction=POISON_FRACTION,
            poisoned_count=int(count),
            poisoned_indices=poisoned.tolist(),
            asr_images=len(asr_y),
        )
    return ImageData(
        train_x=np.ascontiguousarray(train_x[:, None], dtype=np.float32),
        train_y=train_y,
        test_x=np.ascontiguousarray(test_x[:, None], dtype=np.float32),
        test_y=test_y,
        asr_x=None if asr_x is None else np.ascontiguousarray(asr_x, dtype=np.float32),
        asr_y=asr_y,
        data_seed=data_seed,
        meta=meta,
    )
