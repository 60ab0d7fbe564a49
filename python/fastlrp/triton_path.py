"""The ``triton`` backend's linear layers: a rule as the coefficients the fused kernels read,
the autograd Function that runs them, and the per-shape choice between Triton and the native path.

A rule is told to the kernels as numbers (docs/triton.md): per denominator group g, the
coefficients of the five products Y = f(x; W), PP = f(x+; W+), PN = f(x+; W-), NP = f(x-; W+),
NN = f(x-; W-); up to two sample-free bound products f(b_j; a W+ + b W- + c W^2 + d); the
group's factor c_g and sign mask; and the z bias of each group (a short vector).
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from . import fastpath, ops
from .benchmark import time_fn
from .ops import triton_ops
from .reference.affine import AffineOp
from .rules import AlphaBeta, Epsilon, Flat, Gamma, Rule, WSquare, ZBox, ZPlus, _use_bias, broadcast_bound

_NO_BOUND = (0.0, 0.0, 0.0, 0.0)


@dataclass(frozen=True)
class RuleCoefficients:
    coefficients: tuple          # 10: group 0 then group 1, each (y, pp, pn, np, nn)
    bound_modifiers: tuple       # 8: (a, b, c, d) of the bound products 0 and 1
    bounds: tuple                # names of the bound inputs: "one", "low", "high"
    group_coefficients: tuple    # c_g
    group_masks: tuple           # ops.MASK_* per group
    z_bias: torch.Tensor | None  # (G * C_out,) or None
    z_is_output: bool            # z_0 is the layer output itself (Epsilon with its bias)
    epsilon: float


def _group(y=0.0, pp=0.0, pn=0.0, np_=0.0, nn=0.0):
    return (float(y), float(pp), float(pn), float(np_), float(nn))


def rule_coefficients(rule: Rule, bias, nonnegative_input: bool) -> RuleCoefficients | None:
    """The rule in the kernels' terms; None where the kernels have no form for it."""
    b = bias if (bias is not None and _use_bias(getattr(rule, "zero_params", None))) else None
    eps = fastpath.stabilizer_of(rule) if isinstance(rule, (Epsilon, ZPlus, AlphaBeta, Gamma, ZBox, WSquare,
                                                             Flat)) else None
    none = ops.MASK_NONE
    if isinstance(rule, Epsilon):
        return RuleCoefficients(_group(y=1) + _group(), _NO_BOUND * 2, (), (1.0,), (none,), b, b is bias, eps)
    if isinstance(rule, ZPlus):
        g0 = _group(pp=1, nn=0 if nonnegative_input else 1)
        zb = None if b is None else b.clamp(min=0)
        return RuleCoefficients(g0 + _group(), _NO_BOUND * 2, (), (1.0,), (none,), zb, False, eps)
    if isinstance(rule, AlphaBeta):
        keep = 0.0 if nonnegative_input else 1.0  # x- = 0: the x- products vanish
        g0, g1 = _group(pp=1, nn=keep), _group(pn=1, np_=keep)
        zb = None if b is None else torch.cat([b.clamp(min=0), b.clamp(max=0)])
        return RuleCoefficients(g0 + g1, _NO_BOUND * 2, (), (float(rule.alpha), -float(rule.beta)), (none, none),
                                zb, False, eps)
    if isinstance(rule, Gamma):
        up, keep = 1.0 + rule.gamma, 0.0 if nonnegative_input else 1.0
        # W_up = (1 + gamma) W+ + W-, W_dn = W+ + (1 + gamma) W-
        g0 = _group(pp=up, pn=1, np_=keep, nn=keep * up)
        g1 = _group(pp=1, pn=up, np_=keep * up, nn=keep)
        zb = None if b is None else torch.cat([b + rule.gamma * b.clamp(min=0), b + rule.gamma * b.clamp(max=0)])
        return RuleCoefficients(g0 + g1, _NO_BOUND * 2, (), (1.0, 1.0), (ops.MASK_POSITIVE, ops.MASK_NEGATIVE),
                                zb, False, eps)
    if isinstance(rule, ZBox):
        # z = f(x; W) + f(low; -W+) + f(high; -W-); the biases cancel (b - b+ - b- = 0)
        return RuleCoefficients(_group(y=1) + _group(), (-1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0), ("low", "high"),
                                (1.0,), (none,), None, False, eps)
    if isinstance(rule, WSquare):
        zb = None if b is None else b * b
        return RuleCoefficients(_group() * 2, (0.0, 0.0, 1.0, 0.0) + _NO_BOUND, ("one",), (1.0,), (none,), zb,
                                False, eps)
    if isinstance(rule, Flat):
        return RuleCoefficients(_group() * 2, (0.0, 0.0, 0.0, 1.0) + _NO_BOUND, ("one",), (1.0,), (none,), None,
                                False, eps)
    return None


def supports(op: AffineOp, rule: Rule, x: torch.Tensor) -> bool:
    """Whether the fused kernels take this layer: Linear on (N, C), ConvNd with numeric padding
    (groups, stride, dilation all fine), a rule with a coefficient form, a device/dtype with kernels."""
    if not isinstance(rule, (Epsilon, ZPlus, AlphaBeta, Gamma, ZBox, WSquare, Flat)):
        return False
    if not triton_ops.triton_supports(x.device, x.dtype):
        return False
    if op.kind == "linear":
        return x.ndim == 2
    return op.kind == "conv" and not isinstance(op.padding, str)


class TritonLinearRule:
    """One rule on one layer for the fused kernels: built from the (folded) parameters."""

    def __init__(self, op: AffineOp, rule: Rule, weight, bias, nonnegative_input: bool):
        self.op, self.rule, self.weight, self.bias = op, rule, weight.contiguous(), bias
        self.nonnegative_input = nonnegative_input
        self.spec = rule_coefficients(rule, bias, nonnegative_input)
        conv = op.kind == "conv"
        self.geometry = (list(op.stride) if conv else [], list(op.padding) if conv else [],
                         list(op.dilation) if conv else [], op.groups if conv else 1)

    def bounds(self, x):
        out = []
        for name in self.spec.bounds:
            if name == "one":
                out.append(torch.ones(1, dtype=x.dtype, device=x.device).expand(x.shape))
            else:
                out.append(broadcast_bound(self.rule.low if name == "low" else self.rule.high, x, name))
        return out

    def forward(self, x):
        """(output, z); z is the output itself where the rule allows."""
        spec = self.spec
        y, z = triton_ops.affine_forward(x, self.weight, self.bias, spec.z_bias, self.bounds(x), spec.coefficients,
                                         spec.bound_modifiers, len(spec.group_coefficients),
                                         write_z=not spec.z_is_output, nonnegative_input=self.nonnegative_input,
                                         stride=self.geometry[0], padding=self.geometry[1],
                                         dilation=self.geometry[2], groups=self.geometry[3])
        return y, (y if spec.z_is_output else z)

    def relevance(self, x, z, y, relevance):
        spec = self.spec
        return triton_ops.affine_relevance(x, self.weight, relevance, z, y, self.bounds(x), spec.coefficients,
                                           spec.bound_modifiers, spec.group_coefficients, spec.group_masks,
                                           spec.epsilon, *self.geometry)


class TritonAffineFunction(torch.autograd.Function):
    """forward: output and z in one fused kernel; backward: the fused relevance kernel."""

    @staticmethod
    def forward(ctx, kernel_rule, x):
        y, z = kernel_rule.forward(x)
        ctx.kernel_rule = kernel_rule
        ctx.save_for_backward(x, z, y)
        return y

    @staticmethod
    def backward(ctx, relevance):
        x, z, y = ctx.saved_tensors
        return None, ctx.kernel_rule.relevance(x, z, y, relevance)  # any strides, also expanded ones


# ---------------------------------------------------------------- Triton or native, by measured speed

_CHOICE_LOCK = threading.Lock()
_CHOICES: dict | None = None


def choice_cache_path() -> Path:
    """Where measured choices are kept: ``FASTLRP_TRITON_CACHE`` or ~/.cache/fastlrp/triton_choices.json."""
    env = os.environ.get("FASTLRP_TRITON_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fastlrp" / "triton_choices.json"


def _load_choices() -> dict:
    global _CHOICES
    if _CHOICES is None:
        try:
            _CHOICES = json.loads(choice_cache_path().read_text())
        except (OSError, ValueError):
            _CHOICES = {}
    return _CHOICES


def _device_key(device: torch.device) -> str:
    import triton
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return f"{name}|torch {torch.__version__}|triton {triton.__version__}"


def shape_key(op: AffineOp, rule: Rule, x: torch.Tensor, weight: torch.Tensor, nonnegative_input: bool) -> str:
    layout = "cl" if x.ndim in (4, 5) and not x.is_contiguous() else "c"
    return (f"{op.kind}{op.dims}|{type(rule).__name__}|nn{int(nonnegative_input)}|{tuple(x.shape)}|{layout}|"
            f"{tuple(weight.shape)}|{op.stride}|{op.padding}|{op.dilation}|{op.groups}|{x.dtype}")


def prefers_triton(key: str, device: torch.device, run_triton, run_native) -> bool:
    """Whether the Triton kernels beat the native/cuDNN path for this layer and shape.

    ``FASTLRP_TRITON_CHOICE``: ``measure`` (default: time both once per shape and device, keep
    the answer in memory and in ``choice_cache_path()``), ``triton`` or ``native`` (always).
    Off CUDA there is nothing to measure: the Triton kernels run (the interpreter, in tests).
    While compiled or captured into a CUDA graph nothing is timed: a cached choice, else Triton."""
    mode = os.environ.get("FASTLRP_TRITON_CHOICE", "measure")
    if mode not in ("measure", "triton", "native"):
        raise ValueError(f"FASTLRP_TRITON_CHOICE must be 'measure', 'triton' or 'native', got {mode!r}")
    if mode != "measure":
        return mode == "triton"
    if device.type != "cuda" or run_native is None:
        return True
    if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():  # no timing while traced
        return _load_choices().get(_device_key(device), {}).get(key, "triton") == "triton"
    with _CHOICE_LOCK:
        table = _load_choices().setdefault(_device_key(device), {})
        if key not in table:
            table[key] = "triton" if _median_ms(run_triton, device) <= _median_ms(run_native, device) else "native"
            _save_choices()
        return table[key] == "triton"


def _median_ms(fn, device) -> float:
    # one untimed call compiles, autotunes and warms the caches; then the median of 5 by CUDA events
    return time_fn(fn, device, warmup=1, repeats=5, cuda_events=True)["median_ms"]


def _save_choices():
    path = choice_cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(_CHOICES, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home: the choice still holds for this process


# ---------------------------------------------------------------- the engine's entry points

def kernel_rule_of(layer) -> TritonLinearRule:
    """The layer's rule for the kernels, rebuilt only when a parameter changed (as ``layer.block()``)."""
    weight, bias = layer.params()
    cached = getattr(layer, "_triton_rule", None)
    if cached is None or cached[0] is not layer._cache:
        cached = (layer._cache, TritonLinearRule(layer.op, layer.rule, weight, bias, layer.nonnegative_input))
        layer._triton_rule = cached
    return cached[1]


def layer_forward(layer, x):
    """The layer's output through the fused kernels, or None where they do not apply or the native
    path measured faster for this shape (the caller then takes the native/reference path)."""
    if not supports(layer.op, layer.rule, x):
        return None
    kernel_rule = kernel_rule_of(layer)
    if x.device.type == "cuda" and layer._native_ok(x):
        key = shape_key(layer.op, layer.rule, x, kernel_rule.weight, layer.nonnegative_input)
        if not prefers_triton(key, x.device, lambda: _time_pass(TritonAffineFunction, kernel_rule, x),
                              lambda: _time_pass(_block_function(), layer, x)):
            return None
    return TritonAffineFunction.apply(kernel_rule, x)


def _block_function():
    from .relevance_layers import _BlockFunction
    return _BlockFunction


def _time_pass(function, first, x):
    """One forward and relevance pass of a layer, as the explainer runs it (timed by the caller)."""
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        out = function.apply(first, leaf)
        torch.autograd.grad(out, leaf, torch.ones_like(out))


def norm_relevance(layer, saved, relevance):
    """Sums and average pooling through the Triton kernels, or None where they do not apply."""
    kind, spec = layer.pooling
    if not triton_ops.triton_supports(relevance.device, relevance.dtype):
        return None
    eps = layer.rule.stabilizer
    if kind == "sum":
        if relevance.ndim < 2 or any(t.shape != relevance.shape for t in saved):
            return None
        with torch.no_grad():
            y = layer.fn(*saved)
        return tuple(triton_ops.sum_relevance(saved, relevance, y, spec, eps))
    if saved[0].ndim not in (3, 4, 5):
        return None
    with torch.no_grad():
        y = layer.fn(*saved)
    if kind == "adaptive_avg":
        return (triton_ops.pool_relevance(saved[0], relevance, "adaptive_avg", y=y, epsilon=eps),)
    if isinstance(spec.padding, str):
        return None
    return (triton_ops.pool_relevance(saved[0], relevance, "avg", spec.kernel_size, spec.stride, spec.padding,
                                      spec.count_include_pad, getattr(spec, "divisor_override", None), y=y,
                                      epsilon=eps),)


def maxpool_relevance(layer, x, relevance, kernel_size, stride, padding):
    """Proportional max pooling through the Triton kernels, or None where they do not apply."""
    if not triton_ops.triton_supports(relevance.device, relevance.dtype) or x.ndim not in (3, 4, 5):
        return None
    return triton_ops.pool_relevance(x, relevance, "max_proportional", kernel_size, stride, padding,
                                     epsilon=layer.rule.stabilizer)
