"""A linear layer (Linear, ConvNd, ConvTransposeNd) as a function of input and parameters."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@dataclass(frozen=True)
class AffineOp:
    """The hyper-parameters of a linear layer, so rules can call it with modified weights.

    ``kind`` is "linear", "conv" or "conv_transpose"; ``dims`` the number of spatial dims.
    """

    kind: str
    dims: int = 0
    stride: tuple = ()
    padding: tuple | str = ()
    dilation: tuple = ()
    groups: int = 1
    output_padding: tuple = ()

    @classmethod
    def from_module(cls, module: torch.nn.Module) -> "AffineOp":
        if isinstance(module, torch.nn.Linear):
            return cls("linear")
        if isinstance(module, torch.nn.modules.conv._ConvTransposeNd):
            return cls("conv_transpose", len(module.kernel_size), module.stride, module.padding,
                       module.dilation, module.groups, module.output_padding)
        if isinstance(module, torch.nn.modules.conv._ConvNd):
            if module.padding_mode != "zeros":
                raise ValueError(
                    f"{type(module).__name__} with padding_mode={module.padding_mode!r} is not supported; "
                    "only zero padding has an LRP rule here")
            return cls("conv", len(module.kernel_size), module.stride, module.padding,
                       module.dilation, module.groups)
        raise TypeError(f"{type(module).__name__} is not a linear layer (Linear, ConvNd, ConvTransposeNd)")

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's output f(x; weight, bias)."""
        if self.kind == "linear":
            return F.linear(x, weight, bias)
        if self.kind == "conv":
            return _CONV[self.dims](x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        return _CONV_T[self.dims](x, weight, bias, self.stride, self.padding, self.output_padding,
                                  self.groups, self.dilation)

    def bias_shape(self, ndim: int) -> tuple:
        """Shape that broadcasts a per-output-channel vector against an output of ``ndim`` dims."""
        return (-1,) if self.kind == "linear" else (-1,) + (1,) * self.dims
