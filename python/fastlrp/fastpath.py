"""The native backend's linear layers: every rule as one block-structured layer (DESIGN.md section 4).

A rule for a linear layer has parts f(m_p(x); W_p, b_p), each feeding one denominator group g
(with coefficient c_g and an optional sign mask). Arrange the modified weights as a block
matrix: group g's output channels by modifier m's input channels, block (g, m) = W_p. Then

    Z    = f(cat_m m(x); W_block) + b_block              one conv/GEMM: every z_g at once
    S    = stabilize_divide(R, z_g, c_g, masks)          one native kernel, reads R once
    G    = f^T(S; W_block)                               one transposed conv/GEMM
    R_in = combine(x, G, modifiers)                      one native kernel

Parts that vanish because the layer's input is known to be non-negative (after a ReLU,
decided from the graph) are dropped before the blocks are formed: x- = 0 and x+ = x.
Modifiers that do not depend on the sample (ones for Flat/WSquare, the ZBox bounds) enter the
forward pass through a batch-1 convolution that is broadcast over the batch.
The block weights are built once per explainer and rebuilt only when a parameter changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import ops
from .reference.affine import AffineOp
from .rules import (AlphaBeta, Epsilon, Flat, Gamma, Rule, WSquare, ZBox, ZPlus, _use_bias, broadcast_bound)

# modifier names -> ops codes; "low"/"high" are the ZBox bounds
_CODES = {"x": ops.IDENTITY, "pos": ops.POSITIVE, "neg": ops.NEGATIVE, "one": ops.ONE, "low": ops.TENSOR,
          "high": ops.TENSOR}
_SAMPLE_FREE = ("one", "low", "high")


@dataclass
class Part:
    modifier: str
    group: int
    weight: torch.Tensor
    bias: torch.Tensor | None


def _pos(t):
    return None if t is None else t.clamp(min=0)


def _neg(t):
    return None if t is None else t.clamp(max=0)


def rule_parts(rule: Rule, weight, bias, nonnegative_input: bool):
    """(parts, groups) of a rule; groups are (coefficient, mask). None if the rule has no block form."""
    if isinstance(rule, Epsilon):
        b = bias if _use_bias(rule.zero_params) else None
        return [Part("x", 0, weight, b)], [(1.0, ops.MASK_NONE)]
    if isinstance(rule, ZPlus):
        b = bias if _use_bias(rule.zero_params) else None
        parts = [Part("pos", 0, weight.clamp(min=0), _pos(b)), Part("neg", 0, weight.clamp(max=0), None)]
        groups = [(1.0, ops.MASK_NONE)]
    elif isinstance(rule, AlphaBeta):
        b = bias if _use_bias(rule.zero_params) else None
        wp, wn = weight.clamp(min=0), weight.clamp(max=0)
        parts = [Part("pos", 0, wp, _pos(b)), Part("neg", 0, wn, None), Part("pos", 1, wn, _neg(b)),
                 Part("neg", 1, wp, None)]
        groups = [(float(rule.alpha), ops.MASK_NONE), (-float(rule.beta), ops.MASK_NONE)]
    elif isinstance(rule, Gamma):
        b = bias if _use_bias(rule.zero_params) else None
        up, dn = weight + rule.gamma * weight.clamp(min=0), weight + rule.gamma * weight.clamp(max=0)
        b_up = None if b is None else b + rule.gamma * b.clamp(min=0)
        b_dn = None if b is None else b + rule.gamma * b.clamp(max=0)
        parts = [Part("pos", 0, up, b_up), Part("neg", 0, dn, None), Part("pos", 1, dn, b_dn), Part("neg", 1, up, None)]
        groups = [(1.0, ops.MASK_POSITIVE), (1.0, ops.MASK_NEGATIVE)]
    elif isinstance(rule, ZBox):
        b = bias if _use_bias(rule.zero_params) else None
        # z = f(x) - f(low; W+) - f(high; W-): the minus signs live in the weights
        parts = [Part("x", 0, weight, b), Part("low", 0, -weight.clamp(min=0), None if b is None else -_pos(b)),
                 Part("high", 0, -weight.clamp(max=0), None if b is None else -_neg(b))]
        return parts, [(1.0, ops.MASK_NONE)]
    elif isinstance(rule, WSquare):
        b = bias ** 2 if (_use_bias(rule.zero_params) and bias is not None) else None
        return [Part("one", 0, weight ** 2, b)], [(1.0, ops.MASK_NONE)]
    elif isinstance(rule, Flat):
        return [Part("one", 0, torch.ones_like(weight), None)], [(1.0, ops.MASK_NONE)]
    else:
        return None
    if nonnegative_input:  # x- = 0: its parts contribute exactly nothing
        parts = [Part("x", p.group, p.weight, p.bias) for p in parts if p.modifier == "pos"]
    return parts, groups


def stabilizer_of(rule: Rule) -> float:
    return float(rule.epsilon if isinstance(rule, Epsilon) else rule.stabilizer)


class BlockRule:
    """One rule on one linear layer in block form: build with the (folded) weight and bias."""

    def __init__(self, op: AffineOp, rule: Rule, weight, bias, nonnegative_input: bool):
        parts, groups = rule_parts(rule, weight, bias, nonnegative_input)
        self.op, self.rule, self.groups = op, rule, groups
        self.epsilon = stabilizer_of(rule)
        self.modifiers = list(dict.fromkeys(p.modifier for p in parts))
        self.uses_mask = any(m != ops.MASK_NONE for _, m in groups)
        n_groups, n_mods = len(groups), len(self.modifiers)
        blocks = {(p.group, p.modifier): p for p in parts}
        if len(blocks) != len(parts):
            raise AssertionError("a rule has two parts for one (group, modifier) block")
        zero = torch.zeros_like(weight)
        # Linear/conv weights are (out, in, ...): groups stack along dim 0, modifiers along dim 1.
        rows = [torch.cat([blocks[(g, m)].weight if (g, m) in blocks else zero for m in self.modifiers], dim=1)
                for g in range(n_groups)]
        self.weight = torch.cat(rows, dim=0).contiguous()
        self.sample_modifiers = [m for m in self.modifiers if m not in _SAMPLE_FREE]
        self.free_modifiers = [m for m in self.modifiers if m in _SAMPLE_FREE]
        c_in = weight.shape[1]
        self.weight_sample = self._columns(self.sample_modifiers, c_in)
        self.weight_free = self._columns(self.free_modifiers, c_in)
        biases = [[p.bias for p in parts if p.group == g and p.bias is not None] for g in range(n_groups)]
        if any(biases):
            self.bias = torch.cat([sum(bs) if bs else torch.zeros(weight.shape[0], dtype=weight.dtype,
                                                                  device=weight.device) for bs in biases])
        else:
            self.bias = None
        # Epsilon with its bias: z is the layer output itself, no second forward pass.
        self.z_is_output = (isinstance(rule, Epsilon) and len(parts) == 1 and parts[0].modifier == "x"
                            and parts[0].bias is bias)
        self._free_cache = {}
        # The parts of AlphaBeta and Gamma add up to a multiple of the layer itself
        # (W+ + W- = W; W_up + W_dn = (2 + gamma) W, biases alike), so their z already hold the
        # output: one convolution fewer per call. It equals f(x; W, b) up to rounding.
        self.output_divisor = {AlphaBeta: 1.0, Gamma: 2.0 + getattr(rule, "gamma", 0.0)}.get(type(rule))
        if self.output_divisor is not None and not _use_bias(rule.zero_params) and bias is not None:
            self.output_divisor = None  # the parts lack the bias the output has

    def _columns(self, modifiers, c_in):
        if not modifiers:
            return None
        cols = [self.weight.narrow(1, self.modifiers.index(m) * c_in, c_in) for m in modifiers]
        return torch.cat(cols, dim=1).contiguous()

    def _modified(self, name: str, x):
        if name == "x":
            return x
        if name == "pos":
            return x.clamp(min=0)
        if name == "neg":
            return x.clamp(max=0)
        if name == "one":
            return torch.ones_like(x[:1])
        bound = self.rule.low if name == "low" else self.rule.high
        return broadcast_bound(bound, x[:1], name)

    def output_from(self, z):
        """The layer's output from the stacked z (only where ``output_divisor`` is set)."""
        c_out = z.shape[1] // 2
        total = z.narrow(1, 0, c_out) + z.narrow(1, c_out, c_out)
        return total if self.output_divisor == 1.0 else total.div_(self.output_divisor)

    def z(self, x, output):
        """Every z_g, stacked along channels (N, G*C_out, ...)."""
        if self.z_is_output:
            return output
        z = None
        if self.weight_sample is not None:
            inputs = [self._modified(m, x) for m in self.sample_modifiers]
            z = self.op(inputs[0] if len(inputs) == 1 else torch.cat(inputs, dim=1), self.weight_sample, self.bias)
        if self.weight_free is not None:
            free = self._free_z(x)
            z = free.expand((x.shape[0],) + tuple(free.shape[1:])) if z is None else z + free
        return z

    def _free_z(self, x):
        """The sample-independent part of z, computed at batch size 1 and cached per input shape."""
        key = (tuple(x.shape[1:]), x.dtype, x.device)
        if key not in self._free_cache:
            inputs = [self._modified(m, x) for m in self.free_modifiers]
            bias = self.bias if self.weight_sample is None else None
            self._free_cache[key] = self.op(torch.cat(inputs, dim=1), self.weight_free, bias)
        return self._free_cache[key]

    def relevance(self, x, z, output, relevance):
        c_out = relevance.shape[1]
        zs = [z.narrow(1, g * c_out, c_out) for g in range(len(self.groups))]
        s = ops.stabilize_divide(relevance, zs, [c for c, _ in self.groups], [m for _, m in self.groups],
                                 y=output if self.uses_mask else None, epsilon=self.epsilon)
        g = transposed(self.op, s, self.weight, (x.shape[0], x.shape[1] * len(self.modifiers)) + tuple(x.shape[2:]))
        bounds = [broadcast_bound(self.rule.low if m == "low" else self.rule.high, x, m)
                  for m in self.modifiers if m in ("low", "high")]
        return ops.combine(x, g, [_CODES[m] for m in self.modifiers], bounds)


def supports(op: AffineOp, rule: Rule) -> bool:
    """Whether a layer and rule have the block form; others (transposed and grouped convolutions,
    string padding) run the reference rule."""
    if not isinstance(rule, (Epsilon, ZPlus, AlphaBeta, Gamma, ZBox, WSquare, Flat)):
        return False
    if op.kind == "linear":
        return True
    return op.kind == "conv" and op.groups == 1 and not isinstance(op.padding, str)


def transposed(op: AffineOp, s: torch.Tensor, weight: torch.Tensor, input_shape: tuple) -> torch.Tensor:
    """f^T(s; W): the gradient of f(x; W) with respect to x, applied to s.

    A transposed convolution, with the output padding that restores the input's size. Not
    aten.convolution_backward: it makes its (unused) input argument contiguous, a full-size
    copy per call, and on the CPU it was 2-3.6x slower for strided layers (measured with oneDNN)."""
    if op.kind == "linear":
        return s.matmul(weight)
    kernel = weight.shape[2:]
    output_padding = [input_shape[2 + i] - ((s.shape[2 + i] - 1) * op.stride[i] - 2 * op.padding[i]
                                            + op.dilation[i] * (kernel[i] - 1) + 1) for i in range(op.dims)]
    return torch.ops.aten.convolution(s, weight, None, list(op.stride), list(op.padding), list(op.dilation),
                                      True, output_padding, op.groups)
