"""Layer types that composites map to rules, and the modules that stand for functional ops.

Groups follow Zennit's vocabulary (Convolution, Linear-type, AvgPool, ...). Functional calls in
a model (``a + b``, ``F.relu``, ``x.mean(...)``) are represented by the small modules below so
that one type-based composite covers both spellings.
"""

from __future__ import annotations

import torch
from torch import nn

Convolution = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
"""ConvNd and ConvTransposeNd."""

Linear = Convolution + (nn.Linear,)
"""Every layer with a weight that an LRP linear rule applies to ("Linear-type")."""

BatchNorm = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

MaxPool = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
           nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)

Activation = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Softplus,
    nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softsign, nn.CELU, nn.SELU, nn.PReLU, nn.Mish,
    nn.LogSigmoid, nn.Tanhshrink, nn.Softshrink, nn.Hardshrink, nn.Threshold,
)
"""Elementwise activations: relevance passes through them unchanged under the base map."""

NonNegative = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid, nn.Softplus)
"""Activations whose output is never negative: the linear layer after one can drop its x- parts."""

Structural = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
              nn.Flatten, nn.Unflatten, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)
"""Layers whose gradient already is the right relevance flow (copies, reshapes, eval-mode
dropout, nearest/bilinear upsampling whose weights sum to one): they keep the plain gradient."""


class Sum(nn.Module):
    """A residual sum ``a + b (+ ...)`` found in the graph (``+``, ``torch.add``, in-place adds)."""

    def __init__(self, alpha: float = 1.0):
        super().__init__()
        self.alpha = alpha

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.alpha != 1.0:
            return torch.add(inputs[0], inputs[1], alpha=self.alpha)
        out = inputs[0]
        for t in inputs[1:]:
            out = out + t
        return out


class Mean(nn.Module):
    """``x.mean(dim)`` / ``x.sum(dim)`` as a pooling layer (``scale`` is 1 for sums)."""

    def __init__(self, dim, keepdim: bool = False, reduce_sum: bool = False):
        super().__init__()
        self.dim, self.keepdim, self.reduce_sum = dim, keepdim, reduce_sum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reduce_sum:
            return x.sum(self.dim, keepdim=self.keepdim)
        return x.mean(self.dim, keepdim=self.keepdim)


class GatedProduct(nn.Module):
    """``gate * value`` where the gate is broadcast over the value (squeeze-and-excitation)."""

    def __init__(self, value_index: int):
        super().__init__()
        self.value_index = value_index

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * b


class Scale(nn.Module):
    """``x * c`` or ``x / c`` by a Python number (attention's 1/sqrt(d), a residual's 0.5)."""

    def __init__(self, factor: float = 1.0):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


class Product(nn.Module):
    """A product of two relevance-carrying tensors: ``a * b`` of the same shape, ``a @ b``, ``bmm``,
    ``einsum`` of two operands (attention scores and their values)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b


class Function(nn.Module):
    """A function the trace keeps whole and explains as one block: ``F.scaled_dot_product_attention``
    and helpers wrapped for torch.fx (torchvision's ``shifted_window_attention``, MViT's
    ``_add_rel_pos``). ``name`` is the function's name."""

    def __init__(self, name: str = ""):
        super().__init__()
        self.name = name


Normalization = (nn.LayerNorm, nn.RMSNorm)
"""Layer norms (torchvision's LayerNorm2d is an nn.LayerNorm)."""

Attention = (nn.MultiheadAttention, Function)
"""Attention blocks and functions the trace keeps whole."""

Softmax = (nn.Softmax,)

AvgPool = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
           nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, Mean)
"""Average pooling, adaptive average pooling and means over dimensions."""

_TORCH_FORWARDS = {cls.forward for cls in Linear + BatchNorm}


def overrides_forward(module: nn.Module) -> bool:
    """A linear layer or batch norm whose class changes torch's ``forward`` (timm's BatchNormAct2d,
    StdConv2d). The engine computes these layers from their parameters, so it would not run that code."""
    return isinstance(module, Linear + BatchNorm) and type(module).forward not in _TORCH_FORWARDS


SUPPORTED = (Linear + BatchNorm + MaxPool + Activation + Structural + AvgPool + Normalization + Attention + Softmax
             + (Sum, GatedProduct))
