"""Canonical weights: each GRU network rewritten as one fixed member of its symmetry class.

A network's hidden units can be reordered, and (for tanh units) negated, without changing what the
network computes. Two networks that compute the same function can therefore have unrelated raw
coordinates, and independently initialised networks land on arbitrary members of that class. This
module maps every network of the MLDS GRU shape (docs/workloads.md §3: ``gru`` layers, then ``linear`` layers
with tanh, then ``out``) to one fixed member, layer by layer from the input up:

- **Sign** of each hidden unit: flipped so that the sum of its incoming weights and biases is
  non-negative (for a GRU unit, those of its candidate gate ``n``: row ``i`` of ``W_in`` plus ``b_in``
  and ``b_hn``). The incoming side is used because, going up, a layer's rows are final once it is
  done, which makes the map idempotent. For a GRU unit, negating its state ``h_i`` means negating
  the candidate gate's row ``i`` (``W_in``, ``b_in``, ``b_hn``), row and column ``i`` of ``W_hn`` and
  column ``i`` of ``W_hr`` and ``W_hz``; the reset and update gates' rows do not change (their
  sigmoid is not odd, and nothing in them depends on the sign of ``h_i`` except those columns). This is
  exact because the initial state is zero and tanh is odd.
- **Order** of the hidden units: GRU units sorted by their update-gate bias ``b_iz + b_hz`` (how much
  a unit holds its state), linear units by their bias after the sign is fixed.

The output layer's units (the machine's output bits) and the input features are not permutable and
are left in place. The result is a matrix in the same layout as the input: load any row into the
module and it computes the same outputs as the original, to float32 rounding (a permutation reorders
sums; a sign flip is exact). ``canonicalize(canonicalize(w))`` equals ``canonicalize(w)``.

This is a deterministic sort, not an alignment to a reference network: it needs no choice of
reference and treats every network alike, but two units whose keys are close can still swap between
otherwise similar networks.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from mlds_data.dataset import Param  # types only: this module needs nothing but numpy at run time

__all__ = ["canonicalize", "is_gru_layout"]

F32 = npt.NDArray[np.float32]


def _depths(names: set[str]) -> tuple[int, int]:
    gru = sum(1 for n in names if re.fullmatch(r"gru\.weight_ih_l\d+", n))
    linear = sum(1 for n in names if re.fullmatch(r"linear\.\d+\.weight", n))
    return gru, linear


def is_gru_layout(layout: Sequence[Param]) -> bool:
    """Whether ``layout`` is the MLDS GRU network's (ds1, ds2, ds3, ds5), which :func:`canonicalize` handles."""
    names = {p.name for p in layout}
    gru, linear = _depths(names)
    want = {"out.weight", "out.bias"}
    for layer in range(gru):
        want |= {f"gru.{k}_l{layer}" for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
    want |= {f"linear.{i}.{k}" for i in range(linear) for k in ("weight", "bias")}
    return gru > 0 and names == want


def _rows(a: F32, perm: npt.NDArray[np.intp]) -> F32:
    """``a[n, perm[n], ...]`` for every network ``n``."""
    index = perm.reshape(perm.shape + (1,) * (a.ndim - 2))
    return np.take_along_axis(a, index, axis=1)


def _cols(a: F32, perm: npt.NDArray[np.intp], sign: F32) -> F32:
    """``a[n, :, perm[n]] * sign[n]`` for every network ``n`` (the next layer's inputs)."""
    return np.take_along_axis(a, perm[:, None, :], axis=2) * sign[:, None, :]


def _sign(lean: F32) -> F32:
    return np.where(lean >= 0, 1.0, -1.0).astype(np.float32)


def canonicalize(weights: F32, layout: Sequence[Param]) -> F32:
    """The canonical form of every row of ``weights`` (networks x parameters, in ``layout``'s columns).

    Returns a new float32 matrix with the same shape and layout. Raises ValueError for a layout that is
    not the MLDS GRU network's (the ds4 CNN, say).
    """
    if not is_gru_layout(layout):
        raise ValueError("canonical weights need the MLDS GRU network (gru.*, linear.*, out.*); this layout is not")
    n = weights.shape[0]
    sd: dict[str, F32] = {
        p.name: np.array(weights[:, p.start : p.stop], dtype=np.float32).reshape((n, *p.shape)) for p in layout
    }
    gru, linear = _depths(set(sd))
    h = sd["gru.weight_hh_l0"].shape[2]

    def consumer(name: str) -> str:
        """The weight matrix whose columns read the layer ``name`` writes."""
        if m := re.fullmatch(r"gru\.(\d+)", name):
            nxt = int(m[1]) + 1
            if nxt < gru:
                return f"gru.weight_ih_l{nxt}"
            return "linear.0.weight" if linear else "out.weight"
        i = int(name.split(".")[1]) + 1
        return f"linear.{i}.weight" if i < linear else "out.weight"

    for layer in range(gru):
        nxt = consumer(f"gru.{layer}")
        bih, bhh = sd[f"gru.bias_ih_l{layer}"], sd[f"gru.bias_hh_l{layer}"]
        lean = sd[f"gru.weight_ih_l{layer}"][:, 2 * h :].sum(axis=2) + bih[:, 2 * h :] + bhh[:, 2 * h :]
        sign = _sign(lean)
        perm = np.argsort(bih[:, h : 2 * h] + bhh[:, h : 2 * h], axis=1, kind="stable")
        s = np.take_along_axis(sign, perm, axis=1)
        gates = np.concatenate([perm, perm + h, perm + 2 * h], axis=1)  # r, z, n blocks (PyTorch order)
        row_sign = np.concatenate([np.ones((n, 2 * h), np.float32), s], axis=1)  # only n's rows flip
        for key in ("weight_ih", "bias_ih", "bias_hh"):
            name = f"gru.{key}_l{layer}"
            a = _rows(sd[name], gates)
            sd[name] = a * (row_sign[:, :, None] if a.ndim == 3 else row_sign)
        whh = f"gru.weight_hh_l{layer}"
        sd[whh] = _cols(_rows(sd[whh], gates), perm, s) * row_sign[:, :, None]
        sd[nxt] = _cols(sd[nxt], perm, s)
    for i in range(linear):
        w, b = f"linear.{i}.weight", f"linear.{i}.bias"
        nxt = consumer(w)
        sign = _sign(sd[w].sum(axis=2) + sd[b])
        perm = np.argsort(sd[b] * sign, axis=1, kind="stable")
        s = np.take_along_axis(sign, perm, axis=1)
        sd[w] = _rows(sd[w], perm) * s[:, :, None]
        sd[b] = _rows(sd[b], perm) * s
        sd[nxt] = _cols(sd[nxt], perm, s)
    out = np.empty(weights.shape, dtype=np.float32)
    for p in layout:
        out[:, p.start : p.stop] = sd[p.name].reshape(n, -1)
    return out
