"""The ``triton`` backend: fully fused Triton kernels (docs/triton.md), per layer and shape the faster of
them and the native path, with native (then the reference) where they do not apply.

The kernels read a rule as numbers, derived here from its declaration (``Rule.form()``): per
denominator group g, the coefficients of the five products Y = f(x; W), PP = f(x+; W+), PN = f(x+; W-),
NP = f(x-; W+), NN = f(x-; W-); up to two sample-free bound products f(b_j; a W+ + b W- + c W^2 + d)
(group 0 only); the group's factor c_g and sign mask; and the z bias of each group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..linear_form import LinearForm, broadcast_bound
from ..ops import triton_ops
from ..reference.affine import AffineOp
from . import timing
from .base import Backend
from .native import BlockFunction, block_form_fits

_PRODUCT = {"y": 0, "pp": 1, "pn": 2, "np": 3, "nn": 4}
_MASKS = {"none": ops.MASK_NONE, "positive": ops.MASK_POSITIVE, "negative": ops.MASK_NEGATIVE}
_MAX_GROUPS, _MAX_BOUNDS = 2, 2
# Layers with fewer input channels per group than this run natively on CUDA: the implicit GEMM's
# reduction is C_in x taps, and with 3 channels (an RGB stem) most of each K step is the index and
# mask arithmetic of the gather, not tensor-core work (docs/gpu.md, "Static performance model").
MIN_INPUT_CHANNELS = 16


@dataclass(frozen=True)
class RuleCoefficients:
    coefficients: tuple          # 10: group 0 then group 1, each (y, pp, pn, np, nn)
    bound_modifiers: tuple       # 8: (a, b, c, d) of the bound products 0 and 1
    bounds: tuple                # names of the bound inputs: "ones", "low", "high"
    group_coefficients: tuple    # c_g
    group_masks: tuple           # ops.MASK_* per group
    z_bias: torch.Tensor | None  # (G * C_out,) or None
    z_is_output: bool            # z_0 is the layer output itself (Epsilon with its bias)
    epsilon: float


def rule_coefficients(form: LinearForm, bias, nonnegative_input: bool) -> RuleCoefficients | None:
    """The declared rule in the kernels' terms; None where the kernels have no form for it."""
    if nonnegative_input:
        form = form.for_nonnegative_input(merge_positive=False)
    if len(form.groups) > _MAX_GROUPS:
        return None
    coefficients = [[0.0] * 5 for _ in range(_MAX_GROUPS)]
    bounds: dict[str, tuple] = {}
    for p in form.parts:
        a, b, square, const = p.weight.normalized()
        row = coefficients[p.group]
        if p.input in ("ones", "low", "high"):
            if p.group != 0:
                return None  # the kernels add bound products to group 0 only
            previous = bounds.get(p.input, (0.0, 0.0, 0.0, 0.0))
            bounds[p.input] = tuple(u + v for u, v in zip(previous, (a, b, square, const)))
            continue
        if square or const:
            return None  # sample products take W+ and W- only
        if p.input == "x" and a == b:
            row[_PRODUCT["y"]] += a
        else:
            positive, negative = p.input in ("x", "x+"), p.input in ("x", "x-") and not nonnegative_input
            if positive:
                row[_PRODUCT["pp"]] += a
                row[_PRODUCT["pn"]] += b
            if negative:
                row[_PRODUCT["np"]] += a
                row[_PRODUCT["nn"]] += b
    if len(bounds) > _MAX_BOUNDS:
        return None
    bound_modifiers = [m for name in bounds for m in bounds[name]]
    bound_modifiers += [0.0] * (4 * _MAX_BOUNDS - len(bound_modifiers))
    biases = [form.group_bias(g, bias) for g in range(len(form.groups))]
    z_bias = None if all(b is None for b in biases) else torch.cat(
        [torch.zeros_like(bias) if b is None else b for b in biases])
    return RuleCoefficients(tuple(c for row in coefficients for c in row), tuple(bound_modifiers), tuple(bounds),
                            tuple(float(g.coefficient) for g in form.groups),
                            tuple(_MASKS[g.mask] for g in form.groups), z_bias, form.z_is_output(bias),
                            float(form.stabilizer))


class TritonLinearRule:
    """One declared rule on one layer for the fused kernels: built from the (folded) parameters."""

    def __init__(self, op: AffineOp, form: LinearForm, weight, bias, nonnegative_input: bool):
        self.op, self.form, self.weight, self.bias = op, form, weight.contiguous(), bias
        self.nonnegative_input = nonnegative_input
        self.spec = rule_coefficients(form, bias, nonnegative_input)
        conv = op.kind == "conv"
        self.geometry = (list(op.stride) if conv else [], list(op.padding) if conv else [],
                         list(op.dilation) if conv else [], op.groups if conv else 1)
        # the forward kernel's weights (W, W+, W-, bound weights as the rule needs them), packed once
        self.packed_weight = None if self.spec is None else triton_ops.pack_forward_weights(
            self.weight, self.spec.coefficients, self.spec.bound_modifiers, self.spec.bounds, nonnegative_input,
            self.geometry[3])

    def bounds(self, x):
        return [torch.ones(1, dtype=x.dtype, device=x.device).expand(x.shape) if name == "ones"
                else broadcast_bound(self.form.bounds[name], x, name) for name in self.spec.bounds]

    def forward(self, x):
        """(output, z); z is the output itself where the rule allows."""
        spec = self.spec
        y, z = triton_ops.affine_forward(x, self.weight, self.bias, spec.z_bias, self.bounds(x), spec.coefficients,
                                         spec.bound_modifiers, len(spec.group_coefficients),
                                         write_z=not spec.z_is_output, nonnegative_input=self.nonnegative_input,
                                         stride=self.geometry[0], padding=self.geometry[1],
                                         dilation=self.geometry[2], groups=self.geometry[3],
                                         packed_weight=self.packed_weight)
        return y, (y if spec.z_is_output else z)

    def relevance(self, x, z, y, relevance):
        spec = self.spec
        return triton_ops.affine_relevance(x, self.weight, relevance, z, y, self.bounds(x), spec.coefficients,
                                           spec.bound_modifiers, spec.group_coefficients, spec.group_masks,
                                           spec.epsilon, *self.geometry)


class TritonAffineFunction(torch.autograd.Function):
    """forward: output and z in one fused kernel; backward: the dense relevance pass (``dense``, the native
    block rule: one element-wise division kernel, the transposed convolution by cuDNN/cuBLAS, one combining
    kernel) where given, else the relevance op (the fused kernel under the interpreter; on CUDA its torch
    formulas around cuDNN's transposed convolution, never the fused kernel)."""

    @staticmethod
    def forward(ctx, kernel_rule, dense, x):
        y, z = kernel_rule.forward(x)
        ctx.kernel_rule, ctx.dense = kernel_rule, dense
        ctx.save_for_backward(x, z, y)
        return y

    @staticmethod
    def backward(ctx, relevance):
        x, z, y = ctx.saved_tensors
        if ctx.dense is not None:
            z = native_z_layout(z, ctx.kernel_rule)
            return None, None, ctx.dense.relevance(x, z, y, relevance)
        return None, None, ctx.kernel_rule.relevance(x, z, y, relevance)  # any strides, also expanded ones


def native_z_layout(z: torch.Tensor, kernel_rule: "TritonLinearRule") -> torch.Tensor:
    """The fused forward kernel's z (rule group r at channels r*O .. (r+1)*O) in the native block's channel
    order: the same for one rule group or one conv group; a grouped layer with two rule groups (Gamma,
    AlphaBeta) is ordered (conv group, rule group, channel) there, so z is regrouped (one copy of z)."""
    rule_groups, conv_groups = len(kernel_rule.spec.group_coefficients), kernel_rule.geometry[3]
    if kernel_rule.spec.z_is_output or rule_groups == 1 or conv_groups == 1:
        return z
    split = z.unflatten(1, (rule_groups, conv_groups, -1)).transpose(1, 2)
    return split.flatten(1, 3).contiguous(memory_format=_memory_format(z))


def _memory_format(t: torch.Tensor):
    if t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if t.ndim == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def shape_key(layer, x: torch.Tensor, weight: torch.Tensor) -> str:
    """What the speed choice depends on: op, declared rule, sign of input, shapes, layout, dtype."""
    op = layer.op
    layout = "cl" if x.ndim in (4, 5) and not x.is_contiguous() else "c"
    form = layer.form(merge_positive=False)
    return (f"{op.kind}{op.dims}|{form.parts}{form.groups}|nn{int(layer.nonnegative_input)}|"
            f"{tuple(x.shape)}|{layout}|{tuple(weight.shape)}|{op.stride}|{op.padding}|{op.dilation}|{op.groups}|"
            f"{x.dtype}")


class TritonBackend(Backend):
    """Triton's fused kernels where they exist for the layer and are faster than ``fallback``'s."""

    name = "triton"

    def __init__(self, fallback: Backend):
        self.fallback = fallback  # the native backend: the speed choice times it against the kernels

    def available(self, device) -> bool:
        return triton_ops.kernels_available() and torch.device(device).type == "cuda"

    def kernel_rule(self, layer) -> TritonLinearRule:
        return layer.derived(self.name, lambda weight, bias: TritonLinearRule(
            layer.op, layer.form(merge_positive=False), weight, bias, layer.nonnegative_input))

    # ---- linear layers
    def supports_affine(self, layer, inputs) -> bool:
        (x,) = inputs
        op = layer.op
        if not triton_ops.triton_supports(x.device, x.dtype):
            return False
        if not (op.kind == "linear" and x.ndim == 2 or op.kind == "conv" and not isinstance(op.padding, str)):
            return False
        kernel_rule = self.kernel_rule(layer)
        if kernel_rule.spec is None:
            return False
        if x.device.type != "cuda" or not self.fallback.supports(layer, inputs):
            return True
        if not cuda_worthwhile(op, x, kernel_rule.weight):
            return False
        key = shape_key(layer, x, kernel_rule.weight)
        return timing.prefers_first(key, x.device, lambda: _time_pass(self.forward_affine, layer, x),
                                    lambda: _time_pass(self.fallback.forward, layer, x))

    def forward_affine(self, layer, inputs):
        return TritonAffineFunction.apply(self.kernel_rule(layer), self.dense_rule(layer, inputs), inputs[0])

    def dense_rule(self, layer, inputs):
        """The native block rule that runs the relevance pass on CUDA, or None: the relevance op then runs
        (its torch formulas on CUDA, the fused kernel under the interpreter). The fused kernel redoes the
        division and masks for every (row, tap) of every column tile inside its K loop, which bounds it by
        instruction issue, not the tensor cores (docs/gpu.md); the dense pass does that work once per element."""
        if inputs[0].device.type != "cuda" or not self.fallback.supports(layer, inputs):
            return None
        return self.fallback.block(layer)

    # ---- sums and average pooling
    def supports_norm(self, layer, inputs) -> bool:
        if layer.pooling is None or not triton_ops.triton_supports(inputs[0].device, inputs[0].dtype):
            return False
        if not triton_ops.int32_addressable(*inputs):  # native indexes with 64 bits
            return False
        kind, spec = layer.pooling
        if kind == "sum":
            return inputs[0].ndim >= 2 and all(t.shape == inputs[0].shape for t in inputs)
        return inputs[0].ndim in (3, 4, 5) and not (kind == "avg" and isinstance(spec.padding, str))

    def relevance_norm(self, layer, saved, shapes, relevance):
        kind, spec = layer.pooling
        eps = layer.rule.stabilizer
        with torch.no_grad():
            y = layer.compute(*saved)
        if kind == "sum":
            return tuple(triton_ops.sum_relevance(saved, relevance, y, spec, eps))
        if kind == "adaptive_avg":
            return (triton_ops.pool_relevance(saved[0], relevance, "adaptive_avg", y=y, epsilon=eps),)
        return (triton_ops.pool_relevance(saved[0], relevance, "avg", spec.kernel_size, spec.stride, spec.padding,
                                          spec.count_include_pad, getattr(spec, "divisor_override", None), y=y,
                                          epsilon=eps),)

    # ---- max pooling, Proportional rule
    def supports_maxpool(self, layer, inputs) -> bool:
        return (triton_ops.triton_supports(inputs[0].device, inputs[0].dtype) and inputs[0].ndim in (3, 4, 5)
                and triton_ops.int32_addressable(inputs[0]))

    def relevance_maxpool(self, layer, saved, shapes, relevance):
        p = layer.pool
        return (triton_ops.pool_relevance(saved[0], relevance, "max_proportional", p.kernel_size, p.stride,
                                          p.padding, epsilon=layer.rule.stabilizer),)


def cuda_worthwhile(op, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Where the native path is known to be the better one on CUDA, without timing: few input channels
    per group; float32 without TF32 (Triton's IEEE float32 dot runs on the FMA units and spills, cuDNN's
    does not); tensors too large for the kernels' 32-bit indices (the native kernels index with 64 bits)."""
    if weight.shape[1] < MIN_INPUT_CHANNELS:
        return False
    if x.dtype == torch.float32 and not triton_ops.allow_tf32(x.device, op.kind):
        return False
    return triton_ops.int32_addressable(x)


def _time_pass(forward, layer, x):
    """One forward and relevance pass of a layer, as the explainer runs it (timed by the caller)."""
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        out = forward(layer, (leaf,))
        torch.autograd.grad(out, leaf, torch.ones_like(out))
