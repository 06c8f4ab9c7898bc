"""The researchers' side of mlds: load a campaign's networks, pull and subset datasets, analyse them.

Install with the ``analysis`` extra. What a researcher types::

    from mlds_data import load, canonicalize
    nets = load("runs/quick")                # a folder, s3://bucket/prefix, or a subset .parquet
    X, y = nets.weights(), nets.labels       # (networks, parameters) float32, target names

Public names: :func:`load`, :class:`Networks`, :func:`canonicalize` (and the modules
:mod:`mlds_data.dataset` for `mlds dataset`, :mod:`mlds_data.analyze` for `mlds analyze`,
:mod:`mlds_data.canonical` for canonical weights).
"""

from mlds_data.canonical import canonicalize
from mlds_data.dataset import Networks, load

__all__ = ["Networks", "canonicalize", "load"]
