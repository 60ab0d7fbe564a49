"""Rule objects: what a composite assigns to a layer. The arithmetic lives in ``reference``.

Linear-layer rules (Epsilon, ZPlus, AlphaBeta, Gamma, ZBox, Flat, WSquare) follow Zennit's
definitions and defaults (docs/rules.md); Pass, Norm and Gradient cover the parameter-free
layers; Proportional, GuidedBackprop and DeconvNet are named alternatives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from . import reference


def _use_bias(zero_params) -> bool:
    """Zennit's ``zero_params``: only "bias" can be zeroed (a zero weight explains nothing)."""
    if zero_params is None:
        return True
    names = [zero_params] if isinstance(zero_params, str) else list(zero_params)
    unknown = [n for n in names if n != "bias"]
    if unknown:
        raise ValueError(f"zero_params may only name 'bias', got {unknown}")
    return "bias" not in names


class Rule:
    """Base class. ``kind`` says which layers a rule can apply to."""

    kind = "any"

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class LinearRule(Rule):
    """A rule for Linear, ConvNd and ConvTransposeNd layers."""

    kind = "linear"

    def relevance(self, op: reference.AffineOp, x: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None, relevance: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@dataclass(repr=False)
class Epsilon(LinearRule):
    """LRP-epsilon (Bach et al. 2015): R_in = x * W^T (R / stab(z))."""

    epsilon: float = 1e-6
    zero_params: Any = None

    def relevance(self, op, x, weight, bias, relevance):
        return reference.epsilon(op, x, weight, bias, relevance, self.epsilon, _use_bias(self.zero_params))


@dataclass(repr=False)
class ZPlus(LinearRule):
    """LRP-z+ (Montavon et al. 2017): only positive contributions, signs of inputs respected."""

    stabilizer: float = 1e-6
    zero_params: Any = None

    def relevance(self, op, x, weight, bias, relevance):
        return reference.zplus(op, x, weight, bias, relevance, self.stabilizer, _use_bias(self.zero_params))


@dataclass(repr=False)
class AlphaBeta(LinearRule):
    """LRP-alpha-beta (Bach et al. 2015); alpha - beta = 1 is enforced."""

    alpha: float = 2.0
    beta: float = 1.0
    stabilizer: float = 1e-6
    zero_params: Any = None

    def __post_init__(self):
        reference.linear_rules.check_alpha_beta(self.alpha, self.beta)

    def relevance(self, op, x, weight, bias, relevance):
        return reference.alpha_beta(op, x, weight, bias, relevance, self.alpha, self.beta, self.stabilizer,
                                    _use_bias(self.zero_params))


@dataclass(repr=False)
class Gamma(LinearRule):
    """LRP-gamma (Montavon et al. 2019), generalized to negative inputs and outputs."""

    gamma: float = 0.25
    stabilizer: float = 1e-6
    zero_params: Any = None

    def __post_init__(self):
        if self.gamma < 0:
            raise ValueError(f"Gamma needs gamma >= 0, got {self.gamma}")

    def relevance(self, op, x, weight, bias, relevance):
        return reference.gamma(op, x, weight, bias, relevance, self.gamma, self.stabilizer,
                               _use_bias(self.zero_params))


@dataclass(repr=False)
class ZBox(LinearRule):
    """LRP-z^B for inputs bounded by [low, high] (Montavon et al. 2017); for the first layer.

    ``low`` and ``high`` are scalars, per-channel vectors of length C, or tensors that broadcast
    to one input sample (e.g. shape (1, C, 1, 1) or (C, H, W)).
    """

    low: Any = None
    high: Any = None
    stabilizer: float = 1e-6
    zero_params: Any = None

    def __post_init__(self):
        if self.low is None or self.high is None:
            raise ValueError("ZBox needs both bounds: ZBox(low=..., high=...), e.g. the smallest and largest "
                             "possible input value (per channel after normalization)")

    def relevance(self, op, x, weight, bias, relevance):
        low, high = broadcast_bound(self.low, x, "low"), broadcast_bound(self.high, x, "high")
        return reference.zbox(op, x, weight, bias, relevance, low, high, self.stabilizer,
                              _use_bias(self.zero_params))


def broadcast_bound(bound, x: torch.Tensor, what: str) -> torch.Tensor:
    """Broadcast a ZBox bound (scalar, per-channel vector, or per-sample tensor) to x's shape."""
    t = torch.as_tensor(bound, dtype=x.dtype, device=x.device)
    if t.ndim == 1 and x.ndim > 2 and t.shape[0] == x.shape[1]:
        t = t.reshape((1, -1) + (1,) * (x.ndim - 2))  # per-channel vector
    elif 0 < t.ndim < x.ndim:
        t = t.reshape((1,) * (x.ndim - t.ndim) + tuple(t.shape))
    try:
        return t.expand(x.shape)
    except RuntimeError:
        raise ValueError(f"ZBox {what} of shape {tuple(torch.as_tensor(bound).shape)} does not broadcast to "
                         f"the layer input of shape {tuple(x.shape)}") from None


@dataclass(repr=False)
class WSquare(LinearRule):
    """LRP-w^2 (Montavon et al. 2017): relevance by squared weights, independent of the input."""

    stabilizer: float = 1e-6
    zero_params: Any = None

    def relevance(self, op, x, weight, bias, relevance):
        return reference.wsquare(op, x, weight, bias, relevance, self.stabilizer, _use_bias(self.zero_params))


@dataclass(repr=False)
class Flat(LinearRule):
    """LRP-flat (Lapuschkin et al. 2019): uniform over the receptive field."""

    stabilizer: float = 1e-6
    zero_params: Any = None

    def relevance(self, op, x, weight, bias, relevance):
        return reference.flat(op, x, weight, bias, relevance, self.stabilizer)


@dataclass(repr=False)
class Pass(Rule):
    """Relevance passes unchanged (activations, batch norm that could not be folded)."""

    kind = "elementwise"


@dataclass(repr=False)
class Norm(Rule):
    """Epsilon without parameters for sums, average pooling and means: R splits in proportion
    to each input's share of the output."""

    kind = "parameter_free"
    stabilizer: float = 1e-6


@dataclass(repr=False)
class Gradient(Rule):
    """The plain gradient: what a layer without a rule gets (max pooling's winner-take-all)."""


@dataclass(repr=False)
class Proportional(Rule):
    """For max pooling: R of a window goes to its inputs in proportion to their values."""

    kind = "maxpool"
    stabilizer: float = 1e-6


@dataclass(repr=False)
class GuidedBackprop(Rule):
    """Guided backpropagation at a ReLU (Springenberg et al. 2015): grad_in * (grad_out > 0)."""

    kind = "relu"


@dataclass(repr=False)
class DeconvNet(Rule):
    """DeconvNet at a ReLU (Zeiler and Fergus 2014): the output gradient clamped at zero."""

    kind = "relu"


__all__ = ["Rule", "LinearRule", "Epsilon", "ZPlus", "AlphaBeta", "Gamma", "ZBox", "WSquare", "Flat",
           "Pass", "Norm", "Gradient", "Proportional", "GuidedBackprop", "DeconvNet", "broadcast_bound"]
