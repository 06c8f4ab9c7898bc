"""From a unit to the data its network trains on: the one entry point the trainer and the CLI call.

:func:`target_data` dispatches on the unit's dataset (docs/workloads.md §2, §5–§8) and caches the result in
the process: a worker trains many units of the same target, and every one of them must see the same
arrays. The data depends only on what identifies the target's data (machine, automaton, variant, image
source) and its data seed, never on the replica, attempt or network shape, so ds5 shares ds1/ds2's data
of the same machine.
"""

from __future__ import annotations

import functools
from pathlib import Path

from mlds_contract.campaign import DS1_MACHINES, DS2_MACHINES, Dataset, Images, Variant
from mlds_contract.errors import UserError
from mlds_contract.plan import UnitSpec

from .data import ImageData, SequenceData
from .digits import MNIST_FILES, image_data, mnist_file_names
from .machines import machine_data
from .transducers import transducer_data

__all__ = ["clear_cache", "input_files", "target_data"]

# A GRU target's data is about 1-4 MB; an MNIST target's about 250 MB, so fewer of those are kept.
_SEQUENCE_CACHE = 64
_IMAGE_CACHE = 3


@functools.lru_cache(maxsize=_SEQUENCE_CACHE)
def _machine(machine: str, data_seed: int) -> SequenceData:
    return machine_data(machine, data_seed)


@functools.lru_cache(maxsize=_SEQUENCE_CACHE)
def _transducer(campaign_seed: int, automaton: int, data_seed: int) -> SequenceData:
    return transducer_data(campaign_seed, automaton, data_seed)


@functools.lru_cache(maxsize=_IMAGE_CACHE)
def _images(variant: Variant, images: Images, data_seed: int, mnist_dir: Path | None) -> ImageData:
    return image_data(variant, images, data_seed, mnist_dir)


def clear_cache() -> None:
    """Forget cached data (tests; a long-lived worker moving to another campaign)."""
    _machine.cache_clear()
    _transducer.cache_clear()
    _images.cache_clear()


def _machine_name(unit: UnitSpec) -> str:
    allowed = {
        Dataset.ds1: DS1_MACHINES,
        Dataset.ds2: DS2_MACHINES,
        Dataset.ds5: DS1_MACHINES + DS2_MACHINES,
    }[unit.dataset]
    name = unit.machine
    # ds2 also accepts the ds1 spelling, as campaign specs do ("ParityMachine" means "ParityModified").
    if unit.dataset is Dataset.ds2 and name in DS1_MACHINES:
        name = name.removesuffix("Machine") + "Modified"
    if name not in allowed:
        raise UserError(
            f"unknown machine {unit.machine!r} for {unit.dataset.value}; expected one of {', '.join(allowed)}"
        )
    return name


def input_files(dataset: Dataset, images: Images) -> dict[str, tuple[str, ...]]:
    """The files a campaign's data is read from that no generator can make: name -> the names it may have.

    Only ds4 on MNIST has any: the four IDX files, which the campaign's owner places under its storage
    prefix. Workers hold no storage credentials, so the lease server hands them out (its ``input`` route),
    and a worker fetches each once into a folder of its own (the ``mnist_dir`` of :func:`target_data`).
    """
    if dataset is not Dataset.ds4 or images is not Images.mnist:
        return {}
    return {stem: mnist_file_names(stem) for stem in MNIST_FILES.values()}


def target_data(unit: UnitSpec, *, mnist_dir: Path | None = None) -> SequenceData | ImageData:
    """The training and evaluation data of ``unit``'s target (cached; arrays are read-only).

    ``mnist_dir`` is the folder holding the MNIST IDX files, needed only for ds4 with ``images: mnist``.
    Raises :class:`UserError` for an unknown machine, a missing automaton index or variant, or missing
    MNIST files.
    """
    if unit.dataset in (Dataset.ds1, Dataset.ds2, Dataset.ds5):
        return _machine(_machine_name(unit), unit.data_seed)
    if unit.dataset is Dataset.ds3:
        if unit.automaton is None or unit.automaton < 0:
            raise UserError(f"ds3 target {unit.target!r} has no automaton index (expected an integer >= 0)")
        return _transducer(unit.campaign_seed, unit.automaton, unit.data_seed)
    if unit.variant is None:
        raise UserError(
            f"ds4 target {unit.target!r} has no variant; expected one of {', '.join(v.value for v in Variant)}"
        )
    folder = mnist_dir.resolve() if (mnist_dir is not None and unit.images is Images.mnist) else None
    return _images(unit.variant, unit.images, unit.data_seed, folder)
