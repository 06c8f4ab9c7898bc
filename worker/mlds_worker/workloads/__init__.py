"""The MLDS workloads: the data every network is trained on (docs/workloads.md §2, §5–§8).

- :mod:`.machines`: ds1's five machines and ds2's Modified machines (also ds5's data);
- :mod:`.transducers`: ds3's random Mealy transducers, unique per campaign;
- :mod:`.digits`: ds4's digit images, clean or BadNets-poisoned;
- :mod:`.targets`: :func:`target_data`, the one call the trainer makes;
- :mod:`.data`: the :class:`SequenceData` / :class:`ImageData` containers and the per-target data file
  (:func:`save_data`, :func:`load_data`) that the campaign stores (docs/workloads.md §9).

NumPy only: the trainer turns the arrays into tensors.
"""

from .data import ImageData, SequenceData, load_data, save_data
from .targets import clear_cache, target_data

__all__ = ["ImageData", "SequenceData", "clear_cache", "load_data", "save_data", "target_data"]
