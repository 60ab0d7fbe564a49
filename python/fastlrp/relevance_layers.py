"""The modules the engine puts in place of a model's layers: the ordinary output forward,
the layer's LRP rule backward.

Each one runs its forward under a custom autograd Function whose backward receives the
relevance at the layer's output (autograd's "gradient") and returns the relevance at its
inputs, computed by ``fastlrp.reference``. A layer whose rule is Gradient runs plain torch ops.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import fastpath, ops, reference
from .rules import DeconvNet, Gradient, GuidedBackprop, Pass, Proportional, Rule


class _RuleFunction(torch.autograd.Function):
    """forward: ``layer.compute(*inputs)``; backward: ``layer.relevance(saved inputs, R)``."""

    @staticmethod
    def forward(ctx, layer, *inputs):
        ctx.layer = layer
        ctx.save_for_backward(*(inputs if layer.saves_inputs else ()))
        ctx.shapes = [t.shape for t in inputs]
        return layer.compute(*inputs)

    @staticmethod
    def backward(ctx, relevance):
        return (None, *ctx.layer.relevance(ctx.saved_tensors, ctx.shapes, relevance))


class _BlockFunction(torch.autograd.Function):
    """The native backend's linear layer: forward computes the output and every z part and
    keeps them; backward runs the block-form rule (``fastpath.BlockRule``) on the kernels."""

    @staticmethod
    def forward(ctx, layer, x):
        weight, bias = layer.params()
        block = layer.block()
        if block.output_divisor is not None:
            z = block.z(x, None)
            output = block.output_from(z)
        else:
            output = layer.op(x, weight, bias)
            z = block.z(x, output)
        ctx.block = block
        # Gamma's sign masks need the output; where z holds it (output_divisor), it is rebuilt in
        # backward from z instead of being kept: one activation-sized tensor less per layer.
        keep_output = block.uses_mask and block.output_divisor is None
        # save_memory: keep only x and recompute z in backward (one more forward convolution).
        # Epsilon's z is the output itself, so there is nothing to recompute or to save.
        keep_z = not layer.save_memory or block.z_is_output
        ctx.save_for_backward(x, z if keep_z else None, output if keep_output else None)
        return output

    @staticmethod
    def backward(ctx, relevance):
        x, z, output = ctx.saved_tensors
        block = ctx.block
        if z is None:
            z = block.z(x, output)
        if block.uses_mask and output is None:
            output = block.output_from(z)
        return None, block.relevance(x, z, output, relevance)


class RelevanceLayer(nn.Module):
    """Base: ``site`` names the layer in the user's model; ``rule`` is what runs backward.

    ``backend`` is set by the engine. For the graph's sign analysis, ``nonnegative_output``
    says the output is never negative (ReLU) and ``preserves_sign`` that it is non-negative
    whenever every input is (pooling, sums, reshapes)."""

    saves_inputs = True
    backend = "reference"
    save_memory = False  # set by the engine; linear layers then recompute z in backward instead of keeping it
    nonnegative_output = False
    preserves_sign = False

    def __init__(self, site: str, rule: Rule):
        super().__init__()
        self.site, self.rule = site, rule

    def forward(self, *inputs):
        if isinstance(self.rule, Gradient):
            return self.compute(*inputs)
        return _RuleFunction.apply(self, *inputs)

    def extra_repr(self) -> str:
        return f"site={self.site!r}, rule={self.rule!r}"


def _detached_params(module: nn.Module, names) -> list:
    return [None if getattr(module, n, None) is None else getattr(module, n).detach() for n in names]


class AffineLayer(RelevanceLayer):
    """Linear / ConvNd / ConvTransposeNd, with a following batch norm folded in when given."""

    def __init__(self, site: str, rule: Rule, module: nn.Module, batchnorm: nn.Module | None = None):
        super().__init__(site, rule)
        self.op = reference.AffineOp.from_module(module)
        # Held in tuples so the user's modules are not registered as children of the explainer.
        self._module = (module,)
        self._batchnorm = (batchnorm,)
        self._cache_key = None
        self._cache = None
        self._block = None
        self.nonnegative_input = False  # set from the graph: the input comes from a ReLU (or alike)

    def forward(self, x):
        if self.backend == "triton":
            from . import triton_path  # imports Triton: only for this backend
            output = triton_path.layer_forward(self, x)
            if output is not None:
                return output
        if self.backend in ("native", "triton") and self._native_ok(x):  # triton falls back per layer
            return _BlockFunction.apply(self, x)
        return super().forward(x)

    def _native_ok(self, x) -> bool:
        return (fastpath.supports(self.op, self.rule) and ops.native_supports(x.device, x.dtype)
                and (self.op.kind != "linear" or x.ndim == 2))

    def block(self) -> "fastpath.BlockRule":
        """The rule in block form for the current parameters (rebuilt when one changed)."""
        weight, bias = self.params()
        if torch.compiler.is_compiling():  # built in the graph, see params()
            return fastpath.BlockRule(self.op, self.rule, weight, bias, self.nonnegative_input)
        if self._block is None or self._block[0] is not self._cache:
            self._block = (self._cache, fastpath.BlockRule(self.op, self.rule, weight, bias, self.nonnegative_input))
        return self._block[1]

    def params(self):
        """(weight, bias) with the batch norm folded in; recomputed only when a source tensor changed."""
        module, bn = self._module[0], self._batchnorm[0]
        if torch.compiler.is_compiling():
            # Under torch.compile the cache's data-pointer key would break the graph (dynamo cannot
            # compare data pointers); the fold is traced instead and done once per compiled call.
            weight, bias = _detached_params(module, ("weight", "bias"))
            return (weight, bias) if bn is None else fold_batchnorm(self.op, weight, bias, bn)
        sources = [module.weight, module.bias]
        if bn is not None:
            sources += [bn.weight, bn.bias, bn.running_mean, bn.running_var]
        key = tuple(None if t is None else (t.data_ptr(), t._version, t.dtype, t.device) for t in sources)
        if key != self._cache_key:
            weight, bias = _detached_params(module, ("weight", "bias"))
            if bn is not None:
                weight, bias = fold_batchnorm(self.op, weight, bias, bn)
            self._cache_key, self._cache = key, (weight, bias)
        return self._cache

    def compute(self, x):
        return self.op(x, *self.params())

    def relevance(self, saved, shapes, relevance):
        (x,) = saved
        weight, bias = self.params()
        return (self.rule.relevance(self.op, x, weight, bias, relevance),)


def fold_batchnorm(op: reference.AffineOp, weight, bias, bn: nn.Module):
    """Merge an eval-mode batch norm that follows a linear layer into its weight and bias:
    W' = W * g / sqrt(var + eps), b' = (b - mean) * g / sqrt(var + eps) + beta."""
    with torch.no_grad():
        var, mean = bn.running_var.to(weight.dtype), bn.running_mean.to(weight.dtype)
        scale = torch.rsqrt(var + bn.eps)
        if bn.weight is not None:
            scale = bn.weight.detach().to(weight.dtype) * scale
        shift = torch.zeros_like(mean) if bn.bias is None else bn.bias.detach().to(weight.dtype)
        if op.kind == "conv_transpose":  # weight is (in, out, k...); groups == 1 is checked by the caller
            new_weight = weight * scale.reshape((1, -1) + (1,) * (weight.ndim - 2))
        else:
            new_weight = weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
        base = torch.zeros_like(mean) if bias is None else bias
        return new_weight, (base - mean) * scale + shift


class ElementwiseLayer(RelevanceLayer):
    """Activations and unfolded batch norm: Pass, GuidedBackprop, DeconvNet or the gradient."""

    def __init__(self, site: str, rule: Rule, fn: Callable, nonnegative_output: bool = False):
        super().__init__(site, rule)
        self.fn = fn
        self.saves_inputs = isinstance(rule, GuidedBackprop)
        self.nonnegative_output = nonnegative_output

    def compute(self, x):
        return self.fn(x)

    def relevance(self, saved, shapes, relevance):
        if isinstance(self.rule, Pass):
            return (relevance,)
        if isinstance(self.rule, DeconvNet):
            return (relevance.clamp(min=0),)
        (x,) = saved  # GuidedBackprop
        return (relevance.clamp(min=0) * (x > 0).to(relevance.dtype),)


class NormLayer(RelevanceLayer):
    """Residual sums, average pooling, means: the Norm rule over all tensor inputs.

    ``pooling`` (set by the graph) describes the op for the native kernels: ("sum", alphas),
    ("avg", nn.AvgPoolNd) or ("adaptive_avg", None); without it the reference runs."""

    preserves_sign = True

    def __init__(self, site: str, rule: Rule, fn: Callable, pooling: tuple | None = None):
        super().__init__(site, rule)
        self.fn = fn
        self.pooling = pooling

    def compute(self, *inputs):
        return self.fn(*inputs)

    def relevance(self, saved, shapes, relevance):
        if self.backend == "triton" and self.pooling is not None:
            from . import triton_path
            out = triton_path.norm_relevance(self, saved, relevance)
            if out is not None:
                return out
        if self.backend in ("native", "triton") and self._native_ok(saved, relevance):
            kind, spec = self.pooling
            with torch.no_grad():
                y = self.fn(*saved)
            if kind == "sum":
                return tuple(ops.sum_relevance(saved, relevance, y, spec, self.rule.stabilizer))
            if kind == "adaptive_avg":
                return (ops.pool_relevance(saved[0], relevance, "adaptive_avg", y=y, epsilon=self.rule.stabilizer),)
            return (ops.pool_relevance(saved[0], relevance, "avg", spec.kernel_size, spec.stride, spec.padding,
                                       spec.ceil_mode, spec.count_include_pad,
                                       getattr(spec, "divisor_override", None), y=y,
                                       epsilon=self.rule.stabilizer),)
        return tuple(reference.norm(self.fn, saved, relevance, self.rule.stabilizer))

    def _native_ok(self, saved, relevance) -> bool:
        if self.pooling is None or not ops.native_supports(relevance.device, relevance.dtype):
            return False
        if self.pooling[0] == "sum":  # the kernel needs summands of one shape, (N, C, ...)
            return relevance.ndim >= 2 and all(t.shape == relevance.shape for t in saved)
        return saved[0].ndim in (3, 4, 5)


class MaxPoolLayer(RelevanceLayer):
    """Max pooling: gradient (winner-take-all) or Proportional."""

    preserves_sign = True

    def __init__(self, site: str, rule: Rule, module: nn.Module):
        super().__init__(site, rule)
        if isinstance(rule, Proportional) and not isinstance(module, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
            raise ValueError(f"{site} ({type(module).__name__}): the Proportional rule needs MaxPool1d/2d/3d")
        if isinstance(rule, Proportional) and module.dilation not in (1, (1,) * len(_tuple(module.kernel_size))):
            raise ValueError(f"{site} ({type(module).__name__}): the Proportional rule needs dilation=1")
        self._module = (module,)

    def compute(self, x):
        return self._module[0].forward(x)

    def relevance(self, saved, shapes, relevance):
        m = self._module[0]
        stride = m.stride if m.stride is not None else m.kernel_size
        if self.backend == "triton":
            from . import triton_path
            out = triton_path.maxpool_relevance(self, saved[0], relevance, m.kernel_size, stride, m.padding)
            if out is not None:
                return (out,)
        if self.backend in ("native", "triton") and ops.native_supports(relevance.device, relevance.dtype):
            return (ops.pool_relevance(saved[0], relevance, "max_proportional", m.kernel_size, stride, m.padding,
                                       m.ceil_mode, epsilon=self.rule.stabilizer),)
        return (reference.maxpool_proportional(saved[0], relevance, m.kernel_size, stride, m.padding,
                                               m.ceil_mode, self.rule.stabilizer),)


def _tuple(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)


class GatedProductLayer(RelevanceLayer):
    """``gate * value`` with the gate (the operand broadcast over the other) held constant."""

    saves_inputs = False
    preserves_sign = True

    def __init__(self, site: str, rule: Rule, gate_index: int | None = None):
        super().__init__(site, rule)
        self.gate_index = gate_index  # known from the graph (a sigmoid output), else told by shape

    def compute(self, a, b):
        return a * b

    def relevance(self, saved, shapes, relevance):
        a_shape, b_shape = shapes
        if self.gate_index is not None:
            value_shape = shapes[1 - self.gate_index]
            passed = reference.gated_product(value_shape, relevance)
            return (None, passed) if self.gate_index == 0 else (passed, None)
        if a_shape == b_shape:
            raise ValueError(
                f"{self.site}: a product of two tensors of the same shape {tuple(a_shape)} has no LRP rule "
                "(only a gate broadcast over the other operand, as in squeeze-and-excitation, is supported)")
        value_first = a_shape.numel() >= b_shape.numel()
        value_shape = a_shape if value_first else b_shape
        passed = reference.gated_product(value_shape, relevance)
        return (passed, None) if value_first else (None, passed)


class GradientLayer(RelevanceLayer):
    """A layer that keeps its plain gradient (structural layers, user pass-through)."""

    def __init__(self, site: str, fn: Callable, preserves_sign: bool = False, nonnegative_output: bool = False):
        super().__init__(site, Gradient())
        self.fn = fn
        self.preserves_sign, self.nonnegative_output = preserves_sign, nonnegative_output

    def compute(self, *inputs):
        return self.fn(*inputs)


def eval_forward(module: nn.Module) -> Callable:
    """Call a module in eval mode without firing the user's hooks and without in-place writes:
    a shallow copy (parameters shared) with ``training=False`` and ``inplace=False``."""
    clone = copy.copy(module)  # a new __dict__; parameter and hook dicts stay shared, never written
    clone.training = False
    if hasattr(clone, "inplace"):
        clone.inplace = False
    return clone.forward


def batchnorm_forward(bn: nn.Module) -> Callable:
    """Eval-mode batch norm with the running statistics."""
    def forward(x):
        weight, bias = _detached_params(bn, ("weight", "bias"))
        return F.batch_norm(x, bn.running_mean, bn.running_var, weight, bias, False, 0.0, bn.eps)
    return forward
