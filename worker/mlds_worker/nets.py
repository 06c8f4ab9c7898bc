"""The networks MLDS trains: the GRU sequence network (docs/workloads.md §3, §8) and the ds4 digits CNN (§7).

Called by the trainer (:mod:`mlds_worker.train`), by anyone who loads a result (a ``model.safetensors``
loads into a freshly built module with ``load_state_dict(strict=True)``), and by the analysis.

Parameter names are part of the dataset format: they are the keys of every ``model.safetensors`` and
the order of the flattened weight vectors (ds3 snapshots, the analysis features). Changing them breaks
every published result, so they are listed here and tested.

GRUNet, default shape (4 GRU layers, width 12, 4 linear layers): 4,364 parameters, in this order::

    gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0, ... (l0..l3)   3,636
    linear.0.weight, linear.0.bias, ... linear.3.weight, linear.3.bias                  624
        (the hidden Linear(h, h) layers, each followed by tanh)
    out.weight, out.bias                                                               104
        (the output Linear(h, 8), no activation, applied at every time step)

DigitsCNN (8x8 digits: 3,658 parameters; 28x28 MNIST: 26,698)::

    conv1.weight, conv1.bias    Conv2d(1 -> 8, 3x3, padding 1), then ReLU, MaxPool 2
    conv2.weight, conv2.bias    Conv2d(8 -> 16, 3x3, padding 1), then ReLU, MaxPool 2
    fc1.weight, fc1.bias        Linear(16 * H/4 * W/4 -> 32), then ReLU
    fc2.weight, fc2.bias        Linear(32 -> 10): class logits

Both use PyTorch's default initialisation, float32; the GRU starts from a zero hidden state. Seeding is
the caller's business (the trainer seeds right before :func:`build_model`), so that building a model
is a pure function of the global generator's state.
"""

from __future__ import annotations

import torch
from mlds_contract.campaign import Dataset, Images, Shape
from mlds_contract.plan import DEFAULT_SHAPE, UnitSpec
from torch import nn

__all__ = [
    "DIGITS8_SIZE",
    "MNIST_SIZE",
    "DigitsCNN",
    "GRUNet",
    "build_model",
    "count_parameters",
    "image_size_for",
]

#: Input resolution of the bundled scikit-learn digits and of MNIST (height, width).
DIGITS8_SIZE: tuple[int, int] = (8, 8)
MNIST_SIZE: tuple[int, int] = (28, 28)


class GRUNet(nn.Module):
    """Stacked GRU, then ``linear_layers`` x (Linear(h, h) + tanh), then Linear(h, n_out), per time step.

    Input ``(batch, steps, n_in)``, output ``(batch, steps, n_out)``. tanh (not ReLU) between the
    linear layers: with ReLU, EightBitMachine stalls (docs/workloads.md §3).
    """

    def __init__(self, shape: Shape = DEFAULT_SHAPE, n_in: int = 9, n_out: int = 8) -> None:
        super().__init__()
        self.shape = shape
        h = shape.hidden
        # Attribute names are the parameter-name prefixes of the dataset format: do not rename.
        self.gru = nn.GRU(n_in, h, num_layers=shape.gru_layers, batch_first=True)
        self.linear = nn.ModuleList(nn.Linear(h, h) for _ in range(shape.linear_layers))
        self.out = nn.Linear(h, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # No h0 argument: nn.GRU then starts every sequence from zeros, which is what the spec asks.
        y, _ = self.gru(x)
        for layer in self.linear:
            y = torch.tanh(layer(y))
        out: torch.Tensor = self.out(y)
        return out


class DigitsCNN(nn.Module):
    """The ds4 classifier: two conv/ReLU/max-pool blocks, a 32-unit hidden layer, 10 logits.

    Input ``(batch, 1, H, W)``; ``image_size`` sizes the first linear layer (each pool floors H and W
    by 2, as ``nn.MaxPool2d(2)`` does).
    """

    def __init__(self, image_size: tuple[int, int] = DIGITS8_SIZE, n_classes: int = 10) -> None:
        super().__init__()
        height, width = image_size
        if height < 4 or width < 4:
            raise ValueError(f"images must be at least 4x4 for two 2x2 poolings, got {height}x{width}")
        self.image_size = (height, width)
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * (height // 4) * (width // 4), 32)
        self.fc2 = nn.Linear(32, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.relu(self.fc1(x.flatten(1)))
        out: torch.Tensor = self.fc2(x)
        return out


def image_size_for(unit: UnitSpec) -> tuple[int, int]:
    """The input resolution a ds4 unit's images have by default (8x8 digits or 28x28 MNIST)."""
    return MNIST_SIZE if unit.images is Images.mnist else DIGITS8_SIZE


def build_model(unit: UnitSpec, image_size: tuple[int, int] | None = None) -> nn.Module:
    """The untrained network for ``unit``, on the CPU, initialised from the current global RNG state.

    ``image_size`` (ds4 only) overrides the resolution implied by ``unit.images``; the trainer passes
    the actual size of the data.
    """
    if unit.dataset is Dataset.ds4:
        return DigitsCNN(image_size or image_size_for(unit))
    return GRUNet(unit.shape or DEFAULT_SHAPE)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars (4,364 for the default GRUNet)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
