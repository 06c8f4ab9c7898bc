"""K networks of one shape as one model: stacked parameters and their forward passes (issue 7).

Called by the batched trainer (:mod:`mlds_worker.batched`) and by `mlds bench train`. Every parameter
of the plain module (:mod:`mlds_worker.nets`) becomes one tensor with a leading member dimension ``K``:
``gru.weight_hh_l0`` of shape ``(36, 12)`` becomes ``(K, 36, 12)``, and member ``k``'s weights are
``p[k]`` for every stacked ``p``, under the plain module's parameter names and in its order. Each member
sees its own inputs (``x[k]``), so K networks with different data train as one model.

Why the GRU is written out op for op: the forward and backward here repeat, per member, exactly the
floating-point operations PyTorch performs for ``nn.GRU`` on the CPU (``aten/src/ATen/native/RNN.cpp``:
the input projection of all time steps at once in time-major row order, then per step
``r = (h_r + i_r).sigmoid_()``, ``z = (h_z + i_z).sigmoid_()``, ``n = (i_n + h_n * r).tanh_()``,
``h = (h - n) * z + n``, in place on the same strided chunks, so the same kernels run on the same
memory layouts). The matrix products go through :class:`_StackedLinear`, whose backward arranges its
products as ``addmm``'s backward does (``grad_w = grad^T @ x``, not ``x^T @ grad``, which rounds
differently); the recurrence of a layer is one :class:`_GRULayer`, whose hand-written backward repeats
autograd's arithmetic and summation order without autograd's per-operation bookkeeping. The result: on
the CPU, a member of a stack gets bit-identical gradients to the same network trained alone with
``nn.GRU`` (tests/unit/test_batched.py checks it, every ds5 grid shape included), so a unit's
weights do not depend on which other units shared its lease. The one caveat: PyTorch's vectorised
kernels leave the last few elements of a contiguous tensor (fewer than 32 with AVX-512) to a scalar
path that rounds sigmoid and tanh differently, so bit-identity needs each member's block of a
contiguous tensor (batch x hidden, batch x steps x hidden) to be a multiple of that, as it is for every
spec shape and batch size; otherwise members agree to rounding. ``torch.vmap`` cannot batch
``nn.GRU`` (torch 2.13), and a GRU written with per-step indexing of a precomputed tensor makes backward
~8x slower: the time loop ``unbind``s instead.

The ds4 CNN stacks its convolutions as grouped convolutions (member ``k``'s images are channel ``k``):
equal to the plain network up to float rounding (the grouped kernel sums in another order), not bit
for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from mlds_contract.campaign import Shape
from torch import Tensor, nn

from .nets import DigitsCNN, GRUNet

__all__ = ["StackedCNN", "StackedGRUNet", "StackedNet", "stacked_gru_layer", "stacked_linear"]

#: Every member (the default of :meth:`StackedNet.forward`).
_ALL = slice(None)


class _StackedLinear(torch.autograd.Function):
    """``y[k] = x[k] @ w[k]^T + b[k]`` for K members at once, with ``addmm``'s backward arithmetic.

    ``x (K, M, in)``, ``w (K, out, in)``, ``b (K, out)`` -> ``(K, M, out)``. The forward is
    ``baddbmm``, which per member runs the same gemm as ``F.linear`` on a 2-D input. Autograd's own
    backward of ``baddbmm`` would compute the weight gradient as ``x^T @ grad``; ``addmm`` (what
    ``F.linear`` records) computes ``grad^T @ x`` for a transposed weight. Both are exact in theory and
    round differently in practice, so this backward does what ``addmm``'s does.
    """

    @staticmethod
    def forward(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor, Tensor], output: Tensor) -> None:
        x, w, _ = inputs
        ctx.save_for_backward(x, w)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, w = ctx.saved_tensors
        grad_x = torch.bmm(grad, w) if ctx.needs_input_grad[0] else None
        grad_w = torch.bmm(grad.transpose(1, 2), x) if ctx.needs_input_grad[1] else None
        grad_b = grad.sum(1) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def stacked_linear(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """K linear layers at once: ``(K, M, in)`` -> ``(K, M, out)``; see :class:`_StackedLinear`."""
    out: Tensor = _StackedLinear.apply(x, w, b)  # type: ignore[no-untyped-call]  # torch leaves apply untyped
    return out


class StackedNet:
    """K plain networks of one shape as stacked leaf tensors; subclasses define :meth:`forward`.

    ``params`` are leaf tensors (``requires_grad``) of shape ``(K, *plain shape)``, in the plain module's
    ``named_parameters()`` order and named by ``names``. :meth:`keep` drops members by re-packing
    every tensor, so a member that stops leaves the others' arithmetic untouched.
    """

    def __init__(self, template: nn.Module, params: list[Tensor]) -> None:
        self.template = template  # one plain module: names, shapes, and what a member loads into
        self.names = [name for name, _ in template.named_parameters()]
        self.params = params

    @classmethod
    def from_modules(cls, modules: Sequence[nn.Module], device: torch.device) -> StackedNet:
        """Stack the parameters of ``modules`` (same class and shape) into one model on ``device``."""
        if not modules:
            raise ValueError("no networks to stack")
        per_module = [list(m.parameters()) for m in modules]
        params = [
            torch.stack([p[i].detach() for p in per_module]).to(device).requires_grad_(True)
            for i in range(len(per_module[0]))
        ]
        return cls(modules[0], params)

    @property
    def size(self) -> int:
        """Number of members K."""
        return int(self.params[0].shape[0])

    def forward(self, x: Tensor, members: slice = _ALL) -> Tensor:
        """The outputs of the members ``members`` (all by default) for their inputs ``x`` (one row each)."""
        raise NotImplementedError

    def keep(self, rows: Tensor) -> None:
        """Keep only the members at ``rows`` (a long tensor of member positions), as new leaf tensors."""
        self.params = [p.detach()[rows].clone().requires_grad_(True) for p in self.params]

    def member_state(self, k: int) -> dict[str, Tensor]:
        """Member ``k``'s weights as a plain module's state dict: CPU, float32, contiguous copies."""
        return {
            name: p.detach()[k].to("cpu").contiguous().clone() for name, p in zip(self.names, self.params, strict=True)
        }

    def flat(self) -> Tensor:
        """Every member's parameters flattened, ``(K, parameters)``, in ``named_parameters()`` order."""
        k = self.size
        return torch.cat([p.detach().reshape(k, -1) for p in self.params], dim=1)

    def member_parameters(self) -> int:
        """Trainable scalars of one member (the plain module's count)."""
        return sum(int(p[0].numel()) for p in self.params)


class _GRULayer(torch.autograd.Function):
    """One GRU layer of K members over all time steps, with a hand-written backward.

    ``gates_in (K, T, B, 3H)`` (the input projection ``x W_ih^T + b_ih`` of every step, computed
    outside), ``w_hh (K, 3H, H)``, ``b_hh (K, 3H)`` -> hidden states ``(K, T, B, H)``, from a zero
    initial state. The forward performs RNN.cpp's GRUCell operations on the same memory layouts (the
    gate sigmoids in place on strided chunks, the new-gate tanh on a contiguous tensor). The backward
    computes what autograd would compute for those operations, with the same kernels on the same
    layouts, and sums every gradient in the order autograd sums it: into ``h[t-1]``, first the
    gradient from the layer's output, then through ``h - n`` of step t, then through ``h W_hh^T``;
    into ``w_hh`` and ``b_hh``, step by step from the last step to the first. That keeps a member
    bit-identical to ``nn.GRU``, while skipping autograd's bookkeeping, the clones its in-place
    operations need and the concatenation of the three gates' gradients at every step.
    """

    @staticmethod
    def forward(ctx: Any, gates_in: Tensor, w_hh: Tensor, b_hh: Tensor) -> Tensor:
        k, steps, batch, three = gates_in.shape
        hid = three // 3
        bias, w_t = b_hh.unsqueeze(1), w_hh.transpose(1, 2)
        out = gates_in.new_empty(k, steps, batch, hid)
        # Per step, for the backward: r and z (after the sigmoid) and h_n = h W_hn^T + b_hn; n; h - n.
        gates = gates_in.new_empty(steps, k, batch, three)
        news = gates_in.new_empty(steps, k, batch, hid)
        diffs = gates_in.new_empty(steps, k, batch, hid)
        h = gates_in.new_zeros(k, batch, hid)
        for t, gi in enumerate(gates_in.unbind(1)):  # unbind, not gates_in[:, t]: see the module docstring
            gh = torch.baddbmm(bias, h, w_t, out=gates[t])
            gh[..., : 2 * hid].add_(gi[..., : 2 * hid])  # r and z pre-activations (exact: one add per element)
            r = gh[..., :hid].sigmoid_()  # in place on a strided chunk, as RNN.cpp
            z = gh[..., hid : 2 * hid].sigmoid_()
            n = torch.add(gi[..., 2 * hid :], gh[..., 2 * hid :] * r, out=news[t]).tanh_()
            d = torch.sub(h, n, out=diffs[t])
            h = torch.mul(d, z, out=out[:, t]).add_(n)  # (h - n) * z + n
        ctx.save_for_backward(w_hh, out)
        ctx.intermediates = (gates, news, diffs)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        w_hh, out = ctx.saved_tensors
        gates, news, diffs = ctx.intermediates
        steps, k, batch, three = gates.shape
        hid = three // 3
        grad_in = grad.new_empty(k, steps, batch, three)
        grad_gh = grad.new_empty(k, batch, three)  # d loss / d (h W_hh^T + b_hh) of the current step
        zeros = grad.new_zeros(k, batch, hid)  # the initial hidden state
        grad_w = grad_b = from_sub = from_mm = None
        for t in range(steps - 1, -1, -1):
            g = grad[:, t]
            if from_sub is not None and from_mm is not None:
                g = (g + from_sub) + from_mm  # autograd's order (see the class docstring)
            gate = gates[t]
            r, z, h_n = gate[..., :hid], gate[..., hid : 2 * hid], gate[..., 2 * hid :]
            grad_d = g * z  # through (h - n) * z
            grad_z = g * diffs[t]
            grad_n = g - grad_d  # + n, and - n inside (h - n)
            grad_an = torch.ops.aten.tanh_backward(grad_n, news[t])
            torch.mul(grad_an, r, out=grad_gh[..., 2 * hid :])  # h_n
            grad_r = grad_an * h_n
            torch.ops.aten.sigmoid_backward.grad_input(grad_r, r, grad_input=grad_gh[..., :hid])
            torch.ops.aten.sigmoid_backward.grad_input(grad_z, z, grad_input=grad_gh[..., hid : 2 * hid])
            step_in = grad_in[:, t]
            step_in[..., : 2 * hid].copy_(grad_gh[..., : 2 * hid])  # r and z: the same gradient on both sides
            step_in[..., 2 * hid :].copy_(grad_an)
            h_prev = out[:, t - 1] if t > 0 else zeros
            from_sub, from_mm = grad_d, torch.bmm(grad_gh, w_hh)
            # addmm's weight gradient (grad^T @ h), accumulated from the last step to the first.
            if grad_w is None or grad_b is None:
                grad_w, grad_b = torch.bmm(grad_gh.transpose(1, 2), h_prev), grad_gh.sum(1)
            else:
                grad_w = grad_w + torch.bmm(grad_gh.transpose(1, 2), h_prev)
                grad_b = grad_b + grad_gh.sum(1)
        if grad_w is None or grad_b is None:
            raise ValueError("a GRU layer needs at least one time step")
        return grad_in, grad_w, grad_b


def stacked_gru_layer(gates_in: Tensor, w_hh: Tensor, b_hh: Tensor) -> Tensor:
    """K GRU layers at once: input projections ``(K, T, B, 3H)`` -> hidden states ``(K, T, B, H)``."""
    out: Tensor = _GRULayer.apply(gates_in, w_hh, b_hh)  # type: ignore[no-untyped-call]  # torch leaves apply untyped
    return out


class StackedGRUNet(StackedNet):
    """K :class:`~mlds_worker.nets.GRUNet` of one shape: ``(K, B, T, n_in)`` -> ``(K, B, T, n_out)``."""

    def __init__(self, template: nn.Module, params: list[Tensor]) -> None:
        super().__init__(template, params)
        if not isinstance(template, GRUNet):
            raise TypeError(f"StackedGRUNet stacks GRUNet, not {type(template).__name__}")
        self.shape: Shape = template.shape

    def forward(self, x: Tensor, members: slice = _ALL) -> Tensor:
        k, batch, steps, _ = x.shape
        layers = self.shape.gru_layers
        p = [q[members] for q in self.params]
        # nn.GRU on the CPU projects the inputs of all steps at once, rows in (step, sequence) order;
        # the same order here makes the weight gradient sum its rows in the same order.
        inputs = x.transpose(1, 2).contiguous()  # (K, T, B, n_in)
        for layer in range(layers):
            w_ih, w_hh, b_ih, b_hh = p[4 * layer : 4 * layer + 4]
            hidden = w_hh.shape[-1]
            gates_in = stacked_linear(inputs.view(k, steps * batch, -1), w_ih, b_ih)
            inputs = stacked_gru_layer(gates_in.view(k, steps, batch, 3 * hidden), w_hh, b_hh)  # (K, T, B, H)
        # GRUNet's linear layers see (sequence, step) rows: transpose back before them.
        y = inputs.transpose(1, 2).contiguous().view(k, batch * steps, -1)
        rest = p[4 * layers :]
        for i in range(0, len(rest) - 2, 2):
            y = torch.tanh(stacked_linear(y, rest[i], rest[i + 1]))
        out = stacked_linear(y, rest[-2], rest[-1])
        return out.view(k, batch, steps, -1)


class StackedCNN(StackedNet):
    """K :class:`~mlds_worker.nets.DigitsCNN` for one image size: ``(K, B, 1, H, W)`` -> ``(K, B, 10)``.

    The convolutions are grouped convolutions with one group per member: member ``k``'s images are
    input channel ``k``; its 8 (then 16) feature maps are output channels ``8k..8k+7``.
    """

    def __init__(self, template: nn.Module, params: list[Tensor]) -> None:
        super().__init__(template, params)
        if not isinstance(template, DigitsCNN):
            raise TypeError(f"StackedCNN stacks DigitsCNN, not {type(template).__name__}")

    def forward(self, x: Tensor, members: slice = _ALL) -> Tensor:
        k, batch = x.shape[:2]
        c1w, c1b, c2w, c2b, f1w, f1b, f2w, f2b = (q[members] for q in self.params)
        images = x.view(k, batch, *x.shape[-2:]).transpose(0, 1)  # (B, K, H, W): member k is channel k
        y = nn.functional.conv2d(images, c1w.flatten(0, 1), c1b.flatten(), padding=1, groups=k)
        y = nn.functional.max_pool2d(torch.relu(y), 2)
        y = nn.functional.conv2d(y, c2w.flatten(0, 1), c2b.flatten(), padding=1, groups=k)
        y = nn.functional.max_pool2d(torch.relu(y), 2)  # (B, K*16, H/4, W/4)
        # Back to (K, B, features), features in the plain network's flatten order (channel, row, column).
        y = y.view(batch, k, -1).transpose(0, 1)
        y = torch.relu(stacked_linear(y, f1w, f1b))
        return stacked_linear(y, f2w, f2b)
