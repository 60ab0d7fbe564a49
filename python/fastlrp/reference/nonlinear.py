"""LRP for the parameter-free layers: sums, pooling, gated products."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .stabilize import stabilize


def norm(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], relevance: torch.Tensor,
         stabilizer: float = 1e-6) -> list:
    """Norm rule (Epsilon without parameters) for a linear, parameter-free op ``fn``:
    R_i = x_i * (d fn / d x_i)^T (R / stab(fn(x))).

    Used for residual sums (R splits in proportion to each summand), average pooling and
    means (R goes back to the window in proportion to each input).
    """
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    with torch.enable_grad():
        z = fn(*leaves)
        grads = torch.autograd.grad(z, leaves, relevance / stabilize(z.detach(), stabilizer))
    return [x * g for x, g in zip(inputs, grads)]


def maxpool_proportional(x: torch.Tensor, relevance: torch.Tensor, kernel_size, stride, padding,
                         ceil_mode: bool = False, stabilizer: float = 1e-6) -> torch.Tensor:
    """Max pooling treated as a sum over each window: R goes to every input in proportion to
    its value, instead of all to the winner (the gradient's winner-take-all)."""
    dims = x.ndim - 2
    if dims == 1:  # avg_pool1d has no divisor_override; pool a 1 x L image instead
        out = maxpool_proportional(x.unsqueeze(2), relevance.unsqueeze(2), (1, _one(kernel_size)),
                                   (1, _one(stride)), (0, _one(padding)), ceil_mode, stabilizer)
        return out.squeeze(2)
    pool = {2: F.avg_pool2d, 3: F.avg_pool3d}[dims]

    def window_sum(t):
        return pool(t, kernel_size, stride, padding, ceil_mode, count_include_pad=True, divisor_override=1)

    return norm(window_sum, [x], relevance, stabilizer)[0]


def _one(v):
    return v[0] if isinstance(v, (tuple, list)) else v


def gated_product(value_shape: torch.Size, relevance: torch.Tensor) -> torch.Tensor:
    """y = gate * value with the gate held constant (squeeze-and-excitation): the product is a
    diagonal linear layer of the value, whose Epsilon rule passes R through unchanged (up to
    the stabilizer). The gate receives no relevance."""
    return relevance.sum_to_size(value_shape)
