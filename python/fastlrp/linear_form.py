"""The vocabulary in which a rule for a linear layer is declared, once (docs/design.md, "Rules").

Every rule of Linear/ConvNd layers in fastlrp has the same shape (docs/rules.md):

    z_g   = sum over the parts p of group g of f(input_p; weight_p(W), bias_p(b))
    s_g   = coefficient_g * mask_g * R / stab(z_g)
    R_in  = sum over all parts p of input_p * f^T(s_group(p); weight_p(W))

A rule states its parts and groups (``LinearForm``); nothing else. The reference backend executes
the form as written (``fastlrp.reference.linear_relevance``), the native backend derives its block
weights from it and the Triton backend its coefficient tables; none of them knows a rule by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

INPUTS = ("x", "x+", "x-", "ones", "low", "high")
"""What a part feeds the layer: the input, its positive or negative part, ones, or a bound
(a tensor that broadcasts to one sample, named in ``LinearForm.bounds``)."""

SAMPLE_INPUTS = ("x", "x+", "x-")
MASKS = ("none", "positive", "negative")


@dataclass(frozen=True)
class Modified:
    """How a rule modifies a weight or bias tensor t: ``base*t + pos*t+ + neg*t- + square*t^2 + const``.

    The identity is ``Modified(base=1)``; W+ is ``Modified(pos=1)``; Gamma's W + gamma W+ is
    ``Modified(base=1, pos=gamma)``; Flat's ones are ``Modified(const=1)``.
    """

    base: float = 0.0
    pos: float = 0.0
    neg: float = 0.0
    square: float = 0.0
    const: float = 0.0

    def __add__(self, other: "Modified") -> "Modified":
        return Modified(self.base + other.base, self.pos + other.pos, self.neg + other.neg,
                        self.square + other.square, self.const + other.const)

    def __neg__(self) -> "Modified":
        return Modified(-self.base, -self.pos, -self.neg, -self.square, -self.const)

    @property
    def is_zero(self) -> bool:
        return self.normalized() == (0.0, 0.0, 0.0, 0.0)

    @property
    def is_identity(self) -> bool:
        return self.normalized() == (1.0, 1.0, 0.0, 0.0)

    def normalized(self) -> tuple:
        """(a, b, c, d) with the tensor modified to a*t+ + b*t- + c*t^2 + d (t = t+ + t-)."""
        return (float(self.base + self.pos), float(self.base + self.neg), float(self.square), float(self.const))

    def scaled(self, factor: float) -> "Modified":
        return Modified(self.base * factor, self.pos * factor, self.neg * factor, self.square * factor,
                        self.const * factor)

    def apply(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """The modified tensor; None for a missing tensor or a modification that is zero."""
        if t is None or self.is_zero:
            return None
        out = None
        for coefficient, term in ((self.base, lambda: t), (self.pos, lambda: t.clamp(min=0)),
                                  (self.neg, lambda: t.clamp(max=0)), (self.square, lambda: t * t),
                                  (self.const, lambda: torch.ones_like(t))):
            if coefficient == 0:
                continue
            value = term() if coefficient == 1 else coefficient * term()
            out = value if out is None else out + value
        return out


IDENTITY = Modified(base=1.0)
POSITIVE = Modified(pos=1.0)
NEGATIVE = Modified(neg=1.0)
SQUARE = Modified(square=1.0)
ONES = Modified(const=1.0)
NOTHING = Modified()


@dataclass(frozen=True)
class Part:
    """One contribution f(input; weight(W), bias(b)) to the denominator of ``group``."""

    input: str
    weight: Modified
    bias: Modified = NOTHING
    group: int = 0


@dataclass(frozen=True)
class Group:
    """A denominator: its relevance share is ``coefficient * R / stab(z_g)``, and only where the
    layer's true output is positive (``mask="positive"``) or negative (``"negative"``) if masked."""

    coefficient: float = 1.0
    mask: str = "none"


@dataclass(frozen=True)
class LinearForm:
    """A rule for linear layers, declared: its parts, its groups, its stabilizer, its bounds."""

    parts: tuple
    groups: tuple = (Group(),)
    stabilizer: float = 1e-6
    bounds: dict = field(default_factory=dict)
    """Values of the bound inputs ("low", "high"): scalars, per-channel vectors or tensors."""

    def __post_init__(self):
        object.__setattr__(self, "parts", tuple(self.parts))
        object.__setattr__(self, "groups", tuple(self.groups))
        if not self.parts or not self.groups:
            raise ValueError("a LinearForm needs at least one part and one group")
        for p in self.parts:
            if p.input not in INPUTS:
                raise ValueError(f"unknown part input {p.input!r}; inputs are {INPUTS}")
            if p.input in ("low", "high") and p.input not in self.bounds:
                raise ValueError(f"a part reads the bound {p.input!r} but bounds has no value for it")
            if p.weight.is_zero:
                raise ValueError(f"a part with input {p.input!r} has a zero weight modification")
            if not 0 <= p.group < len(self.groups):
                raise ValueError(f"a part names group {p.group}, but there are {len(self.groups)} groups")
        for g, group in enumerate(self.groups):
            if group.mask not in MASKS:
                raise ValueError(f"unknown group mask {group.mask!r}; masks are {MASKS}")
            if not any(p.group == g for p in self.parts):
                raise ValueError(f"group {g} has no part")

    def parts_of(self, group: int) -> list:
        return [p for p in self.parts if p.group == group]

    @property
    def uses_mask(self) -> bool:
        return any(g.mask != "none" for g in self.groups)

    def group_bias(self, group: int, bias: torch.Tensor | None) -> torch.Tensor | None:
        """The bias of z_g: the sum of its parts' modified biases (None where it is zero)."""
        total = NOTHING
        for p in self.parts_of(group):
            total = total + p.bias
        return total.apply(bias)

    def for_nonnegative_input(self, merge_positive: bool) -> "LinearForm":
        """The form for an input known to be non-negative (after a ReLU): x- = 0 drops its parts.
        ``merge_positive`` also writes x+ as x (one clamp fewer); parts that then share input and
        group are merged (f is linear in the weight)."""
        parts = [p for p in self.parts if p.input != "x-"]
        if merge_positive:
            parts = [replace(p, input="x") if p.input == "x+" else p for p in parts]
        return replace(self, parts=tuple(merge_parts(parts)))

    def z_is_output(self, bias: torch.Tensor | None) -> bool:
        """Whether z is the layer's output f(x; W, b) itself (Epsilon with its bias)."""
        if len(self.groups) != 1 or len(self.parts) != 1:
            return False
        (p,) = self.parts
        return p.input == "x" and p.weight.is_identity and (bias is None or p.bias.is_identity)


def merge_parts(parts) -> list:
    """Parts with the same input and group summed into one (order of first appearance kept)."""
    merged: dict[tuple, Part] = {}
    for p in parts:
        key = (p.input, p.group)
        if key in merged:
            q = merged[key]
            merged[key] = Part(p.input, q.weight + p.weight, q.bias + p.bias, p.group)
        else:
            merged[key] = p
    return list(merged.values())


def broadcast_bound(bound: Any, x: torch.Tensor, what: str) -> torch.Tensor:
    """Broadcast a bound (scalar, per-channel vector, or per-sample tensor) to x's shape."""
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


def modified_input(name: str, x: torch.Tensor, bounds: dict) -> torch.Tensor:
    """The input a part feeds the layer, full size."""
    if name == "x":
        return x
    if name == "x+":
        return x.clamp(min=0)
    if name == "x-":
        return x.clamp(max=0)
    if name == "ones":
        return torch.ones_like(x)
    return broadcast_bound(bounds[name], x, name)
