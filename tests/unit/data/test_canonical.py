"""Canonical weights (`mlds_data.canonical`): same function, one representative per symmetry class.

The symmetry is applied here independently of the module under test: as permutation and sign matrices
multiplied into each layer (``P``, ``D``), where the module gathers indices. The test first checks that
this transform really leaves the network's outputs unchanged, so a mistake in it cannot hide one in
the module.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch
from mlds_contract.campaign import Shape
from mlds_data.canonical import canonicalize, is_gru_layout
from mlds_data.dataset import Param
from mlds_worker.nets import DigitsCNN, GRUNet

SHAPES = [Shape(), Shape(gru_layers=2, hidden=8, linear_layers=1), Shape(gru_layers=1, hidden=5, linear_layers=3)]


def _layout(module: torch.nn.Module) -> list[Param]:
    """The dataset's column layout for ``module`` (tensors sorted by name, as in model.safetensors)."""
    out, col = [], 0
    for name, t in sorted(module.state_dict().items()):
        out.append(Param(name, tuple(t.shape), col, col + t.numel()))
        col += t.numel()
    return out


def _matrix(nets: Sequence[torch.nn.Module], layout: list[Param]) -> np.ndarray:
    return np.stack([np.concatenate([n.state_dict()[p.name].numpy().ravel() for p in layout]) for n in nets]).astype(
        np.float32
    )


def _load(module: torch.nn.Module, row: np.ndarray, layout: list[Param]) -> torch.nn.Module:
    module.load_state_dict({p.name: torch.from_numpy(row[p.start : p.stop].reshape(p.shape).copy()) for p in layout})
    return module


def _outputs(net: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    x = torch.randint(0, 2, (6, 30, 9), generator=torch.Generator().manual_seed(seed)).float()
    with torch.no_grad():
        out: torch.Tensor = net(x)
    return out


def _symmetry(sd: dict[str, np.ndarray], shape: Shape, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A random hidden-unit permutation and sign flip of every hidden layer, as matrices."""
    sd = {k: v.astype(np.float64).copy() for k, v in sd.items()}
    h = shape.hidden
    eye = np.eye(h)

    def consumer(kind: str, i: int) -> str:
        if kind == "gru" and i + 1 < shape.gru_layers:
            return f"gru.weight_ih_l{i + 1}"
        if kind == "gru":
            return "linear.0.weight"
        return f"linear.{i + 1}.weight" if i + 1 < shape.linear_layers else "out.weight"

    for i in range(shape.gru_layers):
        p = eye[rng.permutation(h)]  # new unit j = old unit perm[j]
        d = np.diag(rng.choice([-1.0, 1.0], h))
        rows = np.block([[p, 0 * p, 0 * p], [0 * p, p, 0 * p], [0 * p, 0 * p, d @ p]])  # r, z, n gates
        cols = p.T @ d  # the new state is d @ p @ h, so the old one is cols @ new
        for k in ("weight_ih", "bias_ih", "bias_hh"):
            sd[f"gru.{k}_l{i}"] = rows @ sd[f"gru.{k}_l{i}"]
        sd[f"gru.weight_hh_l{i}"] = rows @ sd[f"gru.weight_hh_l{i}"] @ cols
        nxt = consumer("gru", i)
        sd[nxt] = sd[nxt] @ cols
    for i in range(shape.linear_layers):
        p = eye[rng.permutation(h)]
        d = np.diag(rng.choice([-1.0, 1.0], h))
        sd[f"linear.{i}.weight"] = d @ p @ sd[f"linear.{i}.weight"]
        sd[f"linear.{i}.bias"] = d @ p @ sd[f"linear.{i}.bias"]
        nxt = consumer("linear", i)
        sd[nxt] = sd[nxt] @ p.T @ d
    return {k: v.astype(np.float32) for k, v in sd.items()}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.slug)
def test_every_member_of_a_symmetry_class_has_the_same_canonical_weights(shape: Shape) -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    nets = [GRUNet(shape) for _ in range(3)]
    layout = _layout(nets[0])
    twins = []
    for net in nets:
        sd = {k: v.numpy() for k, v in net.state_dict().items()}
        twin = GRUNet(shape)
        twin.load_state_dict({k: torch.from_numpy(v) for k, v in _symmetry(sd, shape, rng).items()})
        torch.testing.assert_close(_outputs(twin), _outputs(net), atol=1e-5, rtol=0)  # the helper is a symmetry
        twins.append(twin)
    raw, raw_twins = _matrix(nets, layout), _matrix(twins, layout)
    assert np.abs(raw - raw_twins).max() > 0.1  # the raw coordinates differ ...
    np.testing.assert_allclose(canonicalize(raw_twins, layout), canonicalize(raw, layout), atol=1e-6)  # ... these not


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.slug)
def test_a_canonical_network_computes_what_the_original_did_and_canonical_is_a_fixed_point(shape: Shape) -> None:
    torch.manual_seed(2)
    nets = [GRUNet(shape) for _ in range(4)]
    layout = _layout(nets[0])
    raw = _matrix(nets, layout)
    canon = canonicalize(raw, layout)
    assert canon.shape == raw.shape
    assert canon.dtype == np.float32
    assert not np.array_equal(canon, raw)
    for i, net in enumerate(nets):
        torch.testing.assert_close(_outputs(_load(GRUNet(shape), canon[i], layout)), _outputs(net), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(canonicalize(canon, layout), canon)
    # the multiset of values of every tensor is kept: only places and signs change
    for p in layout:
        np.testing.assert_allclose(
            np.sort(np.abs(canon[:, p.start : p.stop]), axis=1), np.sort(np.abs(raw[:, p.start : p.stop]), axis=1)
        )


def test_the_input_is_left_alone_and_other_networks_are_refused() -> None:
    torch.manual_seed(3)
    net = GRUNet()
    layout = _layout(net)
    raw = _matrix([net], layout)
    before = raw.copy()
    canonicalize(raw, layout)
    np.testing.assert_array_equal(raw, before)
    assert is_gru_layout(layout)
    cnn = _layout(DigitsCNN())
    assert not is_gru_layout(cnn)
    with pytest.raises(ValueError, match="GRU"):
        canonicalize(np.zeros((1, cnn[-1].stop), np.float32), cnn)
    assert not is_gru_layout(layout[:-1])  # a tensor missing
