"""The MLDS workloads: the data every network is trained on (docs/workloads.md §2, §5–§8).

Imported by the worker (it trains on this data) and by the operator's lease service (when a campaign
finishes it stores each target's data file, docs/workloads.md §9), and by benchmarks and tests. That is why it is
a package of its own, apart from the worker: it needs NumPy and :mod:`mlds_contract` only, never torch,
scikit-learn or the worker package (``lint-imports`` holds it to that), so the operator image, which has
none of those, can finalise every dataset.

- :mod:`.machines`: ds1's five machines and ds2's Modified machines (also ds5's data);
- :mod:`.transducers`: ds3's random Mealy transducers, unique per campaign;
- :mod:`.digits`: ds4's digit images, clean or BadNets-poisoned (the 8x8 digits ship as package data);
- :mod:`.targets`: :func:`target_data`, the one call the trainer makes;
- :mod:`.data`: the :class:`SequenceData` / :class:`ImageData` containers and the per-target data file
  (:func:`save_data`, :func:`load_data`) that the campaign stores (docs/workloads.md §9).

Public names: :class:`ImageData`, :class:`SequenceData`, :func:`target_data`, :func:`input_files`,
:func:`clear_cache`, :func:`save_data`, :func:`load_data`. The trainer turns the arrays into tensors.
"""

from .data import ImageData, SequenceData, load_data, save_data
from .targets import clear_cache, input_files, target_data

__all__ = ["ImageData", "SequenceData", "clear_cache", "input_files", "load_data", "save_data", "target_data"]
