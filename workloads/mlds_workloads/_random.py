"""Seeded random streams for the workloads, stable across NumPy versions and platforms.

Every worker of a campaign must build bit-identical training data for a target from its data seed,
even when pods run different images (CPU, CUDA, ROCm) with different NumPy builds. NumPy's
``Generator`` methods carry no such promise (its compatibility policy allows the stream of
``integers``, ``random``, ``permutation`` ... to change between releases), but the raw output of a
named bit generator is fixed by its algorithm. So this module draws only ``PCG64.random_raw`` words,
seeded through ``SeedSequence`` (also a fixed algorithm), and derives bits, bounded integers and
permutations from them with plain integer arithmetic.

Used by machines.py, transducers.py and digits.py; nothing outside mlds_workloads.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["Stream"]


class Stream:
    """A reproducible stream of random values keyed by non-negative integers (e.g. a data seed)."""

    def __init__(self, *key: int) -> None:
        if not key or any(k < 0 for k in key):
            raise ValueError(f"a stream key is one or more non-negative integers, got {key!r}")
        self._bits = np.random.PCG64(np.random.SeedSequence(list(key)))

    def words(self, count: int) -> npt.NDArray[np.uint64]:
        """``count`` raw 64-bit words."""
        if count == 0:
            return np.zeros(0, dtype=np.uint64)
        words = self._bits.random_raw(count)
        return np.asarray(words, dtype=np.uint64).reshape(count)

    def bits(self, shape: tuple[int, ...]) -> npt.NDArray[np.uint8]:
        """Independent fair bits (0 or 1) of the given shape, 64 per raw word, low bit first."""
        size = int(np.prod(shape, dtype=np.int64))
        words = self.words(-(-size // 64))
        # Little-endian byte view then little bit order: bit j of word w is element 64*w + j on every platform.
        unpacked = np.unpackbits(words.astype("<u8").view(np.uint8), bitorder="little")
        return unpacked[:size].reshape(shape)

    def below(self, bound: int, shape: tuple[int, ...]) -> npt.NDArray[np.int64]:
        """Integers uniform in ``0 .. bound-1`` (modulo reduction of 64-bit words; bias below 2**-56)."""
        if not 0 < bound <= 2**8:
            raise ValueError(f"bound must be in 1..256, got {bound}")
        size = int(np.prod(shape, dtype=np.int64))
        return (self.words(size) % np.uint64(bound)).astype(np.int64).reshape(shape)

    def permutation(self, count: int) -> npt.NDArray[np.int64]:
        """A uniformly random permutation of ``0 .. count-1`` (sort by random 64-bit keys)."""
        # Ties between 64-bit keys are vanishingly rare and a stable sort resolves them deterministically.
        return np.argsort(self.words(count), kind="stable").astype(np.int64)
