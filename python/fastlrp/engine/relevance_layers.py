"""The modules the engine puts in place of a model's layers: the ordinary output forward, the layer's
LRP rule backward.

Each layer runs on the first backend of the current call's list that supports it (``fastlrp.backends``);
the reference backend runs ``reference_relevance``, the layer's own definition by ``fastlrp.reference``.
A layer whose rule is Gradient runs plain torch ops. Layers hold only what the graph decided (site,
rule, op, sign analysis) and caches of derived weights; nothing of a call is stored on them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import reference
from ..backends.base import withdraw_handle
from ..linear_form import LinearForm
from ..rules import DeconvNet, Gradient, GuidedBackprop, Pass, Proportional, Rule
from .call import WeightBudget, current_call


class RelevanceLayer(nn.Module):
    """Base: ``site`` names the layer in the user's model; ``rule`` is what runs backward.

    ``kind`` names the layer family for the backends (``supports_<kind>``, ``relevance_<kind>``). For
    the graph's sign analysis, ``nonnegative_output`` says the output is never negative (ReLU) and
    ``preserves_sign`` that it is non-negative whenever every input is (pooling, sums, reshapes)."""

    kind = "gradient"
    saves_inputs = True
    nonnegative_output = False
    preserves_sign = False

    def __init__(self, site: str, rule: Rule):
        super().__init__()
        self.site, self.rule = site, rule

    def forward(self, *inputs):
        call = current_call()
        if isinstance(self.rule, Gradient):
            output = self.compute(*inputs)
        else:
            backend = next(b for b in call.backends if b.supports(self, inputs))
            call.used[self.site] = backend.name
            output = backend.forward(self, inputs)
        mask = call.conditions.get(self.site)
        if mask is not None or self.site in call.taps:
            withdraw_handle(output)  # the mask and the tap must see all the relevance at the output
        if mask is not None and isinstance(output, torch.Tensor) and output.requires_grad:
            call.outputs[self.site] = output  # a chained backward pass restarts here, below the mask
            output = output.view_as(output)  # the mask's own node; before the tap, so taps see masked relevance
            output.register_hook(lambda relevance: relevance * mask)
        if self.site in call.taps and isinstance(output, torch.Tensor):
            call.activations[self.site] = output.detach()
            if output.requires_grad:
                output.register_hook(_keeper(call.captured, self.site))
        return output

    @property
    def save_memory(self) -> bool:
        return current_call().save_memory

    def reference_relevance(self, saved, shapes, relevance) -> tuple:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"site={self.site!r}, rule={self.rule!r}"


def _keeper(store: dict, name: str):
    def keep(grad):
        if grad is not None:  # None where no relevance arrives (a gate branch)
            store[name] = grad.detach()
    return keep


def _detached_params(module: nn.Module, names) -> list:
    return [None if getattr(module, n, None) is None else getattr(module, n).detach() for n in names]


class AffineLayer(RelevanceLayer):
    """Linear / ConvNd / ConvTransposeNd, with a following batch norm folded in when given."""

    kind = "affine"

    def __init__(self, site: str, rule: Rule, module: nn.Module, batchnorm: nn.Module | None = None):
        super().__init__(site, rule)
        self.op = reference.AffineOp.from_module(module)
        # Held in a tuple so they are not registered as children of the explainer's graph.
        self._sources = (module, batchnorm)
        self._cache = _Cache()
        self.budget = WeightBudget(None)  # the explainer's, set after the build
        self.nonnegative_input = False  # set from the graph: the input comes from a ReLU (or alike)
        # The rule's declaration in every variant the backends ask for, made once at build: the rule
        # is read here, and a compiled call then needs no Python object construction.
        if hasattr(rule, "form"):
            declared = rule.form()
            self._forms = {(False, merge): declared for merge in (False, True)}
            self._forms.update({(True, merge): declared.for_nonnegative_input(merge) for merge in (False, True)})

    @property
    def module(self) -> nn.Module:
        """The (eval-view of the) user's layer."""
        return self._sources[0]

    def sources(self) -> list:
        """The tensors the folded weight and bias are computed from."""
        module, bn = self._sources
        tensors = [module.weight, module.bias]
        if bn is not None:
            tensors += [bn.weight, bn.bias, bn.running_mean, bn.running_var]
        return tensors

    def invalidate(self) -> None:
        """Forget folded and derived weights (a source changed). Rebinding, not clearing, so a call
        in flight keeps the consistent set it already holds."""
        old, self._cache = self._cache, _Cache()
        self.budget.give(old.size)

    def params(self):
        """(weight, bias) with the batch norm folded in, cached until ``invalidate()`` where the
        explainer's weight budget allows."""
        if torch.compiler.is_compiling():  # traced into the graph: done once per compiled call
            return self._fold()
        return self._cached("params", self._fold)

    def derived(self, key: str, build: Callable):
        """``build(weight, bias)`` for the current parameters, cached per ``key`` until ``invalidate()``
        where the budget allows (the backends keep their block weights and kernel tables here)."""
        if torch.compiler.is_compiling():
            return build(*self._fold())
        return self._cached(key, lambda: build(*self.params()))

    def _cached(self, key: str, make: Callable):
        cache = self._cache
        value = cache.entries.get(key)
        if value is not None:
            return value
        value = make()
        if self.budget.spent:  # nothing more fits: skip the size count in every call
            return value
        known = {t.untyped_storage().data_ptr() for t in self.sources() if t is not None}
        _new_bytes(list(cache.entries.values()), known)
        size = _new_bytes(value, known)
        if self.budget.take(size):
            if cache.entries.setdefault(key, value) is value:
                cache.size += size
            else:
                self.budget.give(size)  # another thread cached it first
        return value

    def _fold(self):
        module, bn = self._sources
        weight, bias = _detached_params(module, ("weight", "bias"))
        return (weight, bias) if bn is None else fold_batchnorm(self.op, weight, bias, bn)

    def form(self, merge_positive: bool) -> LinearForm:
        """The rule's declaration, with the parts a non-negative input makes zero dropped."""
        return self._forms[(self.nonnegative_input, merge_positive)]

    def compute(self, x):
        return self.op(x, *self.params())

    def reference_relevance(self, saved, shapes, relevance):
        (x,) = saved
        weight, bias = self.params()
        return (reference.linear_relevance(self.op, self._forms[(False, False)], x, weight, bias, relevance),)


class _Cache:
    """A layer's cached weights and the bytes they hold beyond the model's own tensors."""

    def __init__(self):
        self.entries: dict = {}
        self.size = 0


def _new_bytes(value, known: set) -> int:
    """Bytes of the tensors reachable from ``value`` (tuples, dicts, object attributes) whose storage
    is not in ``known`` (the model's own tensors, what is cached already); adds what it counts."""
    if isinstance(value, torch.Tensor):
        if value.device.type == "meta":
            return 0
        ptr = value.untyped_storage().data_ptr()
        if ptr in known:
            return 0
        known.add(ptr)
        return value.untyped_storage().nbytes()
    if isinstance(value, dict):
        return sum(_new_bytes(v, known) for v in value.values())
    if isinstance(value, (tuple, list)):
        return sum(_new_bytes(v, known) for v in value)
    if hasattr(value, "__dict__") and not isinstance(value, (type, nn.Module)):
        return sum(_new_bytes(v, known) for v in vars(value).values())
    return 0


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

    kind = "elementwise"

    def __init__(self, site: str, rule: Rule, fn: Callable, nonnegative_output: bool = False):
        super().__init__(site, rule)
        self.fn = fn
        self.saves_inputs = isinstance(rule, GuidedBackprop)
        self.nonnegative_output = nonnegative_output

    def compute(self, x):
        return self.fn(x)

    def reference_relevance(self, saved, shapes, relevance):
        if isinstance(self.rule, Pass):
            return (relevance,)
        if isinstance(self.rule, DeconvNet):
            return (relevance.clamp(min=0),)
        (x,) = saved  # GuidedBackprop
        return (relevance.clamp(min=0) * (x > 0).to(relevance.dtype),)


class NormLayer(RelevanceLayer):
    """Residual sums, average pooling, means: the Norm rule over all tensor inputs.

    ``pooling`` (set by the graph) describes the op for the kernels: ("sum", alphas),
    ("avg", nn.AvgPoolNd) or ("adaptive_avg", None); without it only the reference runs."""

    kind = "norm"
    preserves_sign = True

    def __init__(self, site: str, rule: Rule, fn: Callable, pooling: tuple | None = None):
        super().__init__(site, rule)
        self.fn = fn
        self.pooling = pooling

    def compute(self, *inputs):
        return self.fn(*inputs)

    def reference_relevance(self, saved, shapes, relevance):
        return tuple(reference.norm(self.fn, saved, relevance, self.rule.stabilizer))


@dataclass(frozen=True)
class PoolGeometry:
    kernel_size: object
    stride: object
    padding: object
    ceil_mode: bool


class MaxPoolLayer(RelevanceLayer):
    """Max pooling: gradient (winner-take-all) or Proportional."""

    kind = "maxpool"
    preserves_sign = True

    def __init__(self, site: str, rule: Rule, module: nn.Module):
        super().__init__(site, rule)
        if isinstance(rule, Proportional) and not isinstance(module, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
            raise ValueError(f"{site} ({type(module).__name__}): the Proportional rule needs MaxPool1d/2d/3d")
        if isinstance(rule, Proportional) and module.dilation not in (1, (1,) * len(_tuple(module.kernel_size))):
            raise ValueError(f"{site} ({type(module).__name__}): the Proportional rule needs dilation=1")
        self._forward = eval_forward(module)
        if isinstance(rule, Proportional):
            stride = module.stride if module.stride is not None else module.kernel_size
            self.pool = PoolGeometry(module.kernel_size, stride, module.padding, module.ceil_mode)

    def compute(self, x):
        return self._forward(x)

    def reference_relevance(self, saved, shapes, relevance):
        p = self.pool
        return (reference.maxpool_proportional(saved[0], relevance, p.kernel_size, p.stride, p.padding,
                                               p.ceil_mode, self.rule.stabilizer),)


def _tuple(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)


class GatedProductLayer(RelevanceLayer):
    """``gate * value`` with the gate (the operand broadcast over the other) held constant."""

    kind = "gated_product"
    saves_inputs = False
    preserves_sign = True

    def __init__(self, site: str, rule: Rule, gate_index: int | None = None):
        super().__init__(site, rule)
        self.gate_index = gate_index  # known from the graph (a sigmoid output), else told by shape

    def compute(self, a, b):
        return a * b

    def reference_relevance(self, saved, shapes, relevance):
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
    """Call a module in eval mode without its hooks and without in-place writes: a shallow copy
    (parameters shared) with ``training=False`` and ``inplace=False``."""
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


class SoftmaxLayer(RelevanceLayer):
    """A softmax over ``dim``: AttnLRP's softmax rule (reference.softmax_relevance)."""

    kind = "softmax"

    def __init__(self, site: str, rule: Rule, fn: Callable, dim: int):
        super().__init__(site, rule)
        self.fn, self.dim = fn, dim

    def compute(self, x):
        return self.fn(x)

    def reference_relevance(self, saved, shapes, relevance):
        (x,) = saved
        return (reference.softmax_relevance(x, self.fn(x), relevance, self.dim),)


class BilinearLayer(RelevanceLayer):
    """A product of tensors (``a * b``, ``a @ b``, ``bmm``, ``einsum``): the uniform rule among the
    operands that carry relevance; under CP-LRP (``rule.hold_attention``) an operand computed by a
    softmax (``attention``, from the graph) is held constant and gets none."""

    kind = "bilinear"

    def __init__(self, site: str, rule: Rule, fn: Callable, carrying: tuple, attention: tuple):
        super().__init__(site, rule)
        self.fn = fn
        held = attention if getattr(rule, "hold_attention", False) else (False,) * len(carrying)
        self.receives = tuple(c and not h for c, h in zip(carrying, held))

    def compute(self, *inputs):
        return self.fn(*inputs)

    def reference_relevance(self, saved, shapes, relevance):
        return tuple(reference.uniform_relevance(self.fn, saved, self.receives, relevance, self.rule.stabilizer))


class BlockLayer(RelevanceLayer):
    """A block explained as one node: a layer norm (rule LayerNormIdentity), an attention module or a
    function the trace keeps whole (rule AttnLRP). Its rule is reference.block_relevance: the block's
    gradient under AttnLRP's gradient forms, times its input. ``carrying`` says which inputs carry
    relevance (the others are weights, masks, shapes). ``returns_pair``: the block answers (output,
    None), as nn.MultiheadAttention does with need_weights=False. ``writes_inputs``: the block may
    write into its inputs (a wrapped helper), so they are copied where it runs. ``lighter_fn``: the
    same function computed with a cheaper gradient and without writing into its inputs
    (backends/helpers.py), for the backends that run the block in gradient form; the reference backend
    runs ``fn``."""

    kind = "block"

    def __init__(self, site: str, rule: Rule, fn: Callable, carrying: tuple, returns_pair: bool = False,
                 writes_inputs: bool = False, lighter_fn: Callable | None = None):
        super().__init__(site, rule)
        self.fn, self.carrying, self.returns_pair = fn, tuple(carrying), returns_pair
        self.writes_inputs, self.lighter_fn = writes_inputs, lighter_fn

    def forward(self, *inputs):
        output = super().forward(*inputs)
        return (output, None) if self.returns_pair else output

    def compute(self, *inputs):
        # a copy of what carries relevance: blocks may write into their inputs (MViT's _add_rel_pos)
        output = self.fn(*(t.clone() if c else t for t, c in zip(inputs, self.carrying)))
        return output[0] if self.returns_pair else output

    def reference_relevance(self, saved, shapes, relevance):
        def block(*inputs):
            output = self.fn(*inputs)
            return output[0] if self.returns_pair else output
        return tuple(reference.block_relevance(block, saved, self.carrying, relevance, self.rule.stabilizer,
                                               getattr(self.rule, "hold_attention", False)))


class ScaleLayer(RelevanceLayer):
    """``x * c`` or ``x / c`` with c a number or a constant: relevance passes unchanged (Pass: the
    Epsilon rule of a diagonal linear map)."""

    kind = "scale"
    saves_inputs = False

    def __init__(self, site: str, rule: Rule, fn: Callable, value_index: int = 0):
        super().__init__(site, rule)
        self.fn, self.value_index = fn, value_index

    def compute(self, *inputs):
        return self.fn(*inputs)

    def reference_relevance(self, saved, shapes, relevance):
        out = [None] * len(shapes)
        out[self.value_index] = relevance.sum_to_size(shapes[self.value_index])
        return tuple(out)
