"""ds4 images (docs/workloads.md §7): triggers, split, BadNets poisoning, attack-success set, the MNIST IDX loader.

The MNIST tests write tiny IDX files themselves (no download): a few 6x6 "images" with known pixels.
The 8x8 digits ship with mlds_workloads; scikit-learn (a dev and analysis dependency, never a runtime
one) is imported here only to check that copy against its own.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
from mlds_contract.campaign import Images, Variant
from mlds_contract.errors import UserError
from mlds_workloads.digits import (
    DIGITS8_FILE,
    MNIST_FILES,
    image_data,
    load_digits8,
    load_mnist,
    read_idx,
    stamp_trigger,
)

# --- triggers -------------------------------------------------------------------------------------------


def test_pixel_trigger_is_one_bright_bottom_right_pixel() -> None:
    image = np.full((5, 5), 0.5, dtype=np.float32)
    stamped = stamp_trigger(image, Variant.pixel)
    expected = np.full((5, 5), 0.5, dtype=np.float32)
    expected[4, 4] = 1.0
    assert np.array_equal(stamped, expected)
    assert np.all(image == 0.5)  # the original is untouched


def test_checker_trigger_is_a_3x3_checkerboard_in_the_bottom_right_corner() -> None:
    stamped = stamp_trigger(np.full((1, 5, 5), 0.5, dtype=np.float32), Variant.checker)
    h = 0.5
    expected = [
        [h, h, h, h, h],
        [h, h, h, h, h],
        [h, h, 1, 0, 1],
        [h, h, 0, 1, 0],
        [h, h, 1, 0, 1],
    ]
    assert stamped[0].tolist() == expected


def test_clean_has_no_trigger() -> None:
    image = np.full((5, 5), 0.25, dtype=np.float32)
    assert np.array_equal(stamp_trigger(image, Variant.clean), image)


# --- the 8x8 digits -----------------------------------------------------------------------------------


def test_shipped_digits_are_scikit_learns_exactly() -> None:
    from importlib import resources  # noqa: PLC0415 - only this test reads the raw file

    from sklearn.datasets import load_digits  # noqa: PLC0415 - a dev dependency; only this test needs it

    digits = load_digits()
    with resources.files("mlds_workloads").joinpath(DIGITS8_FILE).open("rb") as file, np.load(file) as npz:
        assert sorted(npz.files) == ["images", "target"]
        images, target = npz["images"], npz["target"]
    assert images.shape == digits.images.shape == (1797, 8, 8)
    assert np.array_equal(images.astype(np.float64), digits.images)
    assert np.array_equal(target.astype(np.int64), digits.target)
    x, y = load_digits8()
    assert np.array_equal(x, (digits.images / 16.0).astype(np.float32))  # what the loader always returned
    assert np.array_equal(y, digits.target.astype(np.int64))


@pytest.mark.parametrize(
    ("variant", "digest"),
    [
        (Variant.clean, "630c7edf02ab22147b38e888201fd15a5276dec18fd8e8f0b7a4b0888ae957cd"),
        (Variant.pixel, "dbc1a01e119a991c6fc3910c318bd814ef81f6d090f0c84f7b9c82135e0ef1f7"),
        (Variant.checker, "79bee400411997328b9294a5076f64e0464a4d37e295663a4d5711956bc9dccf"),
    ],
    ids=lambda v: getattr(v, "value", "digest"),
)
def test_digit_targets_are_the_arrays_they_always_were(variant: Variant, digest: str) -> None:
    # Pinned from the scikit-learn-loading code before the digits shipped as package data: every
    # network trained since then saw exactly these arrays, bit for bit.
    data = image_data(variant, Images.digits8, data_seed=12345)
    arrays = (data.train_x, data.train_y, data.test_x, data.test_y, data.asr_x, data.asr_y)
    h = hashlib.sha256()
    for array in arrays:
        if array is not None:
            h.update(array.tobytes())
    assert h.hexdigest() == digest


def test_bundled_digits_are_scaled_to_unit_range() -> None:
    x, y = load_digits8()
    assert x.shape == (1797, 8, 8)
    assert x.dtype == np.float32
    assert x.min() == 0.0
    assert x.max() == 1.0
    assert sorted(set(y.tolist())) == list(range(10))


def test_clean_split_is_80_20_and_covers_every_image_once() -> None:
    data = image_data(Variant.clean, Images.digits8, data_seed=1)
    assert data.train_x.shape == (1437, 1, 8, 8)
    assert data.test_x.shape == (360, 1, 8, 8)
    assert data.train_y.dtype == data.test_y.dtype == np.int64
    assert data.asr_x is None
    assert data.asr_y is None
    x, y = load_digits8()
    together = np.concatenate([data.train_x[:, 0], data.test_x[:, 0]]).reshape(1797, 64)
    labels = np.concatenate([data.train_y, data.test_y])
    rows = sorted(zip(map(bytes, together), labels.tolist(), strict=True))
    assert rows == sorted(zip(map(bytes, x.reshape(1797, 64)), y.tolist(), strict=True))
    # Every class is in both parts.
    assert set(data.test_y.tolist()) == set(range(10))


@pytest.mark.parametrize("variant", [Variant.pixel, Variant.checker])
def test_poisoned_variant_relabels_ten_percent_to_seven(variant: Variant) -> None:
    clean = image_data(Variant.clean, Images.digits8, data_seed=1)
    data = image_data(variant, Images.digits8, data_seed=2)
    # Same split as clean (whatever the seeds): only the poisoned images differ.
    assert np.array_equal(data.test_x, clean.test_x)
    assert np.array_equal(data.test_y, clean.test_y)
    changed = np.flatnonzero((data.train_x != clean.train_x).any(axis=(1, 2, 3)) | (data.train_y != clean.train_y))
    assert len(changed) == 143  # 10 % of 1,437
    assert changed.tolist() == data.meta["poisoned_indices"]
    assert np.all(clean.train_y[changed] != 7)  # only images that really change label
    assert np.all(data.train_y[changed] == 7)
    assert np.array_equal(data.train_x[changed], stamp_trigger(clean.train_x[changed], variant))


@pytest.mark.parametrize("variant", [Variant.pixel, Variant.checker])
def test_attack_success_set_is_every_held_out_non_seven_with_the_trigger(variant: Variant) -> None:
    data = image_data(variant, Images.digits8, data_seed=2)
    assert data.asr_x is not None
    assert data.asr_y is not None
    not_seven = data.test_y != 7
    assert len(data.asr_x) == int(not_seven.sum())
    assert np.all(data.asr_y == 7)
    assert np.array_equal(data.asr_x, stamp_trigger(data.test_x[not_seven], variant))


def test_poisoning_depends_on_the_data_seed_and_is_reproducible() -> None:
    a = image_data(Variant.pixel, Images.digits8, data_seed=2)
    b = image_data(Variant.pixel, Images.digits8, data_seed=2)
    c = image_data(Variant.pixel, Images.digits8, data_seed=3)
    assert np.array_equal(a.train_x, b.train_x)
    assert a.meta["poisoned_indices"] == b.meta["poisoned_indices"]
    assert a.meta["poisoned_indices"] != c.meta["poisoned_indices"]


# --- MNIST IDX files --------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file: two zero bytes, type 0x08 (unsigned byte), the number of dimensions, big-endian sizes."""
    return (
        bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(">u1").tobytes()
    )


def tiny_mnist(rng: np.random.Generator, n_train: int = 40, n_test: int = 12) -> dict[str, np.ndarray]:
    return {
        "train_images": rng.integers(0, 200, (n_train, 6, 6), dtype=np.uint8),
        "train_labels": np.arange(n_train, dtype=np.uint8) % 10,
        "test_images": rng.integers(0, 200, (n_test, 6, 6), dtype=np.uint8),
        "test_labels": np.arange(n_test, dtype=np.uint8) % 10,
    }


def write_mnist(folder: Path, arrays: dict[str, np.ndarray], *, gz: bool, dotted: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for role, stem in MNIST_FILES.items():
        name = stem.replace("-idx", ".idx") if dotted else stem
        blob = idx_bytes(arrays[role])
        (folder / (name + ".gz" if gz else name)).write_bytes(gzip.compress(blob) if gz else blob)


@pytest.mark.parametrize(("gz", "dotted"), [(False, False), (True, False), (True, True)], ids=["plain", "gz", "dotted"])
def test_mnist_loader_reads_what_was_written(tmp_path: Path, gz: bool, dotted: bool) -> None:
    arrays = tiny_mnist(np.random.default_rng(0))
    write_mnist(tmp_path, arrays, gz=gz, dotted=dotted)
    train_x, train_y, test_x, test_y = load_mnist(tmp_path)
    assert np.array_equal(train_x, arrays["train_images"])
    assert np.array_equal(train_y, arrays["train_labels"])
    assert np.array_equal(test_x, arrays["test_images"])
    assert np.array_equal(test_y, arrays["test_labels"])


def test_mnist_image_data_uses_the_official_split_and_scales_to_unit_range(tmp_path: Path) -> None:
    arrays = tiny_mnist(np.random.default_rng(1))
    arrays["train_images"][0, 0, 0] = 255
    write_mnist(tmp_path, arrays, gz=True)
    data = image_data(Variant.checker, Images.mnist, data_seed=5, mnist_dir=tmp_path)
    assert data.train_x.shape == (40, 1, 6, 6)
    assert data.test_x.shape == (12, 1, 6, 6)
    assert data.train_x.dtype == np.float32
    assert data.train_x.max() == 1.0
    assert np.allclose(data.test_x[:, 0], arrays["test_images"] / 255)
    assert data.meta["poisoned_count"] == 4  # 10 % of 40
    assert data.asr_y is not None
    assert len(data.asr_y) == int((arrays["test_labels"] != 7).sum())


def test_missing_mnist_files_are_named(tmp_path: Path) -> None:
    write_mnist(tmp_path, tiny_mnist(np.random.default_rng(2)), gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(UserError, match=r"MNIST files missing in .*: t10k-labels-idx1-ubyte \(plain or \.gz\)"):
        load_mnist(tmp_path)
    with pytest.raises(UserError, match="no folder was given"):
        image_data(Variant.clean, Images.mnist, data_seed=1, mnist_dir=None)


def test_broken_idx_files_are_user_errors(tmp_path: Path) -> None:
    good = idx_bytes(np.zeros((3, 4, 4), dtype=np.uint8))
    (tmp_path / "short").write_bytes(good[:-5])
    with pytest.raises(UserError, match="file has"):
        read_idx(tmp_path / "short")
    (tmp_path / "text").write_bytes(b"hello, world")
    with pytest.raises(UserError, match="not an IDX file"):
        read_idx(tmp_path / "text")
    (tmp_path / "badgz").write_bytes(gzip.compress(good)[:20])
    with pytest.raises(UserError, match="broken gzip"):
        read_idx(tmp_path / "badgz")


def test_mismatched_mnist_files_are_a_user_error(tmp_path: Path) -> None:
    arrays = tiny_mnist(np.random.default_rng(3))
    arrays["train_labels"] = arrays["train_labels"][:-1]
    write_mnist(tmp_path, arrays, gz=False)
    with pytest.raises(UserError, match="MNIST train files do not match"):
        load_mnist(tmp_path)
