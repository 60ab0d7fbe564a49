"""Rule objects: what a composite assigns to a layer.

A rule for linear layers (Epsilon, ZPlus, AlphaBeta, Gamma, ZBox, Flat, WSquare; Zennit's definitions
and defaults, docs/rules.md) is declared once, by ``form()``: its parts and denominator groups in the
vocabulary of ``fastlrp.linear_form``. Every backend runs that declaration; to add a rule, subclass
``LinearRule`` and write ``form()`` (docs/design.md, "Adding a rule"). Pass, Norm and Gradient cover
the parameter-free layers; Proportional, GuidedBackprop and DeconvNet are named alternatives.
AttnLRP, SoftmaxRule, Uniform and LayerNormIdentity are the transformer rules of AttnLRP (Achtibat et
al., ICML 2024); ``hold_attention=True`` on AttnLRP and Uniform gives CP-LRP (Ali et al., ICML 2022).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .linear_form import (IDENTITY, NEGATIVE, NOTHING, ONES, POSITIVE, SQUARE, Group, LinearForm, Modified, Part,
                          broadcast_bound)


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
    """A rule for Linear, ConvNd and ConvTransposeNd layers, declared by ``form()``.

    Subclasses with a ``zero_params`` field get it applied by ``bias()``: use ``self.bias(m)`` for
    every part's bias modification."""

    kind = "linear"

    def form(self) -> LinearForm:
        raise NotImplementedError(f"{type(self).__name__} must declare its parts in form()")

    def bias(self, modification: Modified) -> Modified:
        """``modification`` of the bias, or nothing where ``zero_params="bias"``."""
        return modification if _use_bias(getattr(self, "zero_params", None)) else NOTHING


@dataclass(repr=False)
class Epsilon(LinearRule):
    """LRP-epsilon (Bach et al. 2015): R_in = x * W^T (R / stab(z))."""

    epsilon: float = 1e-6
    zero_params: Any = None

    def form(self):
        return LinearForm([Part("x", IDENTITY, self.bias(IDENTITY))], stabilizer=self.epsilon)


@dataclass(repr=False)
class ZPlus(LinearRule):
    """LRP-z+ (Montavon et al. 2017): only positive contributions, signs of inputs respected:
    z = f(x+; W+, b+) + f(x-; W-)."""

    stabilizer: float = 1e-6
    zero_params: Any = None

    def form(self):
        return LinearForm([Part("x+", POSITIVE, self.bias(POSITIVE)), Part("x-", NEGATIVE)],
                          stabilizer=self.stabilizer)


@dataclass(repr=False)
class AlphaBeta(LinearRule):
    """LRP-alpha-beta (Bach et al. 2015): alpha times the positive contributions minus beta times the
    negative ones; alpha - beta = 1 is enforced."""

    alpha: float = 2.0
    beta: float = 1.0
    stabilizer: float = 1e-6
    zero_params: Any = None

    def __post_init__(self):
        if self.alpha < 0 or self.beta < 0:
            raise ValueError(f"AlphaBeta needs alpha >= 0 and beta >= 0, got alpha={self.alpha}, beta={self.beta}")
        if self.alpha - self.beta != 1:
            raise ValueError(f"AlphaBeta needs alpha - beta = 1 to conserve relevance, got alpha={self.alpha}, "
                             f"beta={self.beta}")

    def form(self):
        return LinearForm(
            [Part("x+", POSITIVE, self.bias(POSITIVE), 0), Part("x-", NEGATIVE, NOTHING, 0),
             Part("x+", NEGATIVE, self.bias(NEGATIVE), 1), Part("x-", POSITIVE, NOTHING, 1)],
            [Group(float(self.alpha)), Group(-float(self.beta))], self.stabilizer)


@dataclass(repr=False)
class Gamma(LinearRule):
    """LRP-gamma (Montavon et al. 2019), generalized to negative inputs and outputs: with
    W_up = W + gamma W+ and W_dn = W + gamma W- (biases alike), where the layer's output is positive
    z = f(x+; W_up, b_up) + f(x-; W_dn); where it is negative z = f(x+; W_dn, b_dn) + f(x-; W_up)."""

    gamma: float = 0.25
    stabilizer: float = 1e-6
    zero_params: Any = None

    def __post_init__(self):
        if self.gamma < 0:
            raise ValueError(f"Gamma needs gamma >= 0, got {self.gamma}")

    def form(self):
        up, dn = Modified(base=1.0, pos=self.gamma), Modified(base=1.0, neg=self.gamma)
        return LinearForm(
            [Part("x+", up, self.bias(up), 0), Part("x-", dn, NOTHING, 0),
             Part("x+", dn, self.bias(dn), 1), Part("x-", up, NOTHING, 1)],
            [Group(1.0, "positive"), Group(1.0, "negative")], self.stabilizer)


@dataclass(repr=False)
class ZBox(LinearRule):
    """LRP-z^B for inputs bounded by [low, high] (Montavon et al. 2017); for the first layer:
    z = f(x; W, b) - f(low; W+, b+) - f(high; W-, b-).

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

    def form(self):
        return LinearForm([Part("x", IDENTITY, self.bias(IDENTITY)), Part("low", -POSITIVE, self.bias(-POSITIVE)),
                           Part("high", -NEGATIVE, self.bias(-NEGATIVE))],
                          stabilizer=self.stabilizer, bounds={"low": self.low, "high": self.high})


@dataclass(repr=False)
class WSquare(LinearRule):
    """LRP-w^2 (Montavon et al. 2017): relevance by squared weights, independent of the input."""

    stabilizer: float = 1e-6
    zero_params: Any = None

    def form(self):
        return LinearForm([Part("ones", SQUARE, self.bias(SQUARE))], stabilizer=self.stabilizer)


@dataclass(repr=False)
class Flat(LinearRule):
    """LRP-flat (Lapuschkin et al. 2019): uniform over the receptive field (every weight one, no bias)."""

    stabilizer: float = 1e-6
    zero_params: Any = None

    def form(self):
        return LinearForm([Part("ones", ONES)], stabilizer=self.stabilizer)


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


@dataclass(repr=False)
class SoftmaxRule(Rule):
    """AttnLRP's softmax rule (Achtibat et al. 2024, Prop. 3.1): R_in = x * (R - s * sum(R)) over the
    softmax dimension, s the softmax output; masked logits (-inf) count as 0."""

    kind = "softmax"


@dataclass(repr=False)
class Uniform(Rule):
    """A product of two relevance-carrying tensors (``a * b``, ``a @ b``, ``einsum``): Epsilon on the
    product, split equally between the two factors (AttnLRP's uniform rule, Prop. 3.3).
    ``hold_attention=True`` (CP-LRP): where one factor comes from a softmax it is held constant and
    the other factor receives all of the relevance."""

    kind = "bilinear"
    stabilizer: float = 1e-6
    hold_attention: bool = False


@dataclass(repr=False)
class LayerNormIdentity(Rule):
    """LayerNorm, RMSNorm, LayerNorm2d: the identity rule on the division by the standard deviation
    (held constant, AttnLRP Prop. 3.4), Epsilon on the rest, which is then affine (centering, scale,
    bias)."""

    kind = "normalization"
    stabilizer: float = 1e-6


@dataclass(repr=False)
class AttnLRP(Rule):
    """AttnLRP inside an attention block or a function the trace keeps whole (``nn.MultiheadAttention``,
    ``F.scaled_dot_product_attention``, torchvision's window attention): the softmax rule, the uniform
    rule on products of two relevance-carrying tensors, the identity rule on normalizations and
    element-wise activations, LRP-0 on the linear ops between them, stabilized at the block's output.
    ``hold_attention=True``: CP-LRP (Ali et al. 2022), the attention weights held constant."""

    kind = "attention"
    stabilizer: float = 1e-6
    hold_attention: bool = False


__all__ = ["Rule", "LinearRule", "Epsilon", "ZPlus", "AlphaBeta", "Gamma", "ZBox", "WSquare", "Flat",
           "Pass", "Norm", "Gradient", "Proportional", "GuidedBackprop", "DeconvNet",
           "SoftmaxRule", "Uniform", "LayerNormIdentity", "AttnLRP", "broadcast_bound"]
