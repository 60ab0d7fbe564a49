"""The transformer layers on the native backend (kinds "block", "bilinear", "softmax"): AttnLRP and
CP-LRP in gradient form, recorded in the forward pass.

The reference (``reference.block_relevance``) reruns a block inside its rule: a second forward pass
with the rules' gradient forms, then autograd through it. Here the block runs once, in the forward
pass, already in those forms, between two autograd nodes:

    at its output        R  ->  g = R / stab(y)
    inside               autograd's own backward of the forms (the gradient of the block, with
                         the softmax, product and normalization rules in gradient form)
    at each carrying input   g  ->  x * g

which is the same arithmetic as the reference, at the cost of the block's gradient. The forms keep
torch's fused kernels, so the forward values are the model's own: ``F.layer_norm`` / ``F.rms_norm``
with a backward that holds the scale constant, and ``F.scaled_dot_product_attention`` itself, whose
AttnLRP gradient is its ordinary gradient with the query and key gradients divided by 4 and the
value's by 2 (the uniform rule's halves on q k^T and on A v; the softmax rule's gradient form is the
softmax's gradient), or under CP-LRP the value's gradient alone.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .. import ops
from ..reference.attention import AttnLRPMode, _carrying, _DivideGradient
from ..reference.stabilize import stabilize
from .base import handle_of, offer_handle, reusable


class _RelevanceToGradient(torch.autograd.Function):
    """Two views of y: the output, whose backward is R -> c R / stab(y) (the relevance at the output as a
    gradient, times the layer's share c), and its handle (base.offer_handle: a gradient g there is the
    relevance y * g)."""

    @staticmethod
    def forward(ctx, y, stabilizer, share):
        ctx.save_for_backward(y)
        ctx.stabilizer, ctx.share = stabilizer, share
        ctx.set_materialize_grads(False)
        return y.view_as(y), y.view_as(y)

    @staticmethod
    def backward(ctx, relevance, gradient):
        (y,) = ctx.saved_tensors
        eps, share = ctx.stabilizer, ctx.share
        fused = y.ndim >= 2 and ops.native_supports(y.device, y.dtype)
        if gradient is not None:  # y * g: the handle's relevance
            if relevance is None and fused:  # c g y / stab(y), one pass
                given_up = gradient if reusable(gradient) else None
                return ops.sum_relevance([y], gradient, y, [share], epsilon=eps, overwrite=given_up)[0], None, None
            relevance = y * gradient if relevance is None else torch.addcmul(relevance, y, gradient)
        if relevance is None:
            return None, None, None
        if fused:  # one pass
            given_up = relevance if reusable(relevance) else None
            return ops.stabilize_divide(relevance, [y], [share], epsilon=eps, overwrite=given_up), None, None
        return relevance * share / stabilize(y, eps), None, None


def _as_gradient_form(output: torch.Tensor, stabilizer: float, share: float = 1.0) -> torch.Tensor:
    return offer_handle(*_RelevanceToGradient.apply(output, stabilizer, share))


class _GradientToRelevance(torch.autograd.Function):
    """Identity forward (a copy where the block may write into it); backward g -> x * g."""

    @staticmethod
    def forward(ctx, x, copy):
        ctx.save_for_backward(x)
        return x.clone() if copy else x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return (grad.mul_(x) if reusable(grad) else grad * x), None


class _LayerNormHeldScale(torch.autograd.Function):
    """F.layer_norm; backward with 1 / std held constant (the identity rule):
    g_x = (g w - mean(g w)) / std over the normalized dims."""

    @staticmethod
    def forward(ctx, x, normalized_shape, weight, bias, eps):
        y, _, rstd = torch.native_layer_norm(x, normalized_shape, weight, bias, eps)
        ctx.save_for_backward(rstd, weight)
        ctx.dims = tuple(range(-len(normalized_shape), 0))
        return y

    @staticmethod
    def backward(ctx, grad):
        rstd, weight = ctx.saved_tensors
        own = reusable(grad)  # then every step below writes into grad
        if weight is not None:
            grad, own = (grad.mul_(weight) if own else grad * weight), True
        mean = grad.mean(ctx.dims, keepdim=True)
        centred = grad.sub_(mean) if own else grad - mean
        return centred.mul_(rstd.to(grad.dtype)), None, None, None, None


class _RMSNormHeldScale(torch.autograd.Function):
    """F.rms_norm; backward with 1 / rms held constant: g_x = g w / rms."""

    @staticmethod
    def forward(ctx, x, normalized_shape, weight, eps):
        ctx.save_for_backward(x, weight)
        ctx.dims, ctx.eps = tuple(range(-len(normalized_shape), 0)), eps
        return F.rms_norm(x, normalized_shape, weight, eps)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        eps = torch.finfo(x.dtype).eps if ctx.eps is None else ctx.eps
        if weight is not None:
            grad = grad * weight
        return grad * torch.rsqrt(x.pow(2).mean(ctx.dims, keepdim=True) + eps), None, None, None


def _layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    return _LayerNormHeldScale.apply(x, tuple(normalized_shape), weight, bias, eps)


def _rms_norm(x, normalized_shape, weight=None, eps=None):
    return _RMSNormHeldScale.apply(x, tuple(normalized_shape), weight, eps)


class FusedAttnLRPMode(AttnLRPMode):
    """AttnLRPMode with torch's fused attention and normalization kernels in place of the written-out
    reference forms (same gradient forms, the model's own forward values)."""

    _FUSED_NORMS = {F.layer_norm: _layer_norm, F.rms_norm: _rms_norm}

    def normalization(self, func, *args, **kwargs):
        fused = self._FUSED_NORMS.get(func)
        return fused(*args, **kwargs) if fused is not None else super().normalization(func, *args, **kwargs)

    def sdpa(self, query, key, value, *args, **kwargs):
        if self.hold_attention:  # the attention weights held constant: only the value's gradient
            query, key = query.detach(), key.detach()
        scores_split = 2 if _carrying(query) and _carrying(key) else 1  # the uniform rule on q k^T
        output_split = 2 if (_carrying(query) or _carrying(key)) and _carrying(value) else 1  # on A v
        if _carrying(query) and scores_split * output_split > 1:
            query = _DivideGradient.apply(query, scores_split * output_split)
        if _carrying(key) and scores_split * output_split > 1:
            key = _DivideGradient.apply(key, scores_split * output_split)
        if _carrying(value) and output_split > 1:
            value = _DivideGradient.apply(value, output_split)
        return F.scaled_dot_product_attention(query, key, value, *args, **kwargs)


def explain_in_forward(fn, inputs: tuple, receives: tuple, stabilizer: float, hold_attention: bool | None = None,
                       copy_inputs: bool = False, share: float = 1.0) -> torch.Tensor:
    """``fn(*inputs)`` with the AttnLRP rule recorded for the backward pass: the inputs that
    ``receive`` relevance enter through x * g, the others detached; the output leaves through
    share * R / stab(y). ``hold_attention`` None: no mode (a product, whose uniform split is
    ``share``); ``copy_inputs``: the block may write into its inputs."""
    leaves = [_entry(t, copy_inputs) if r and t.requires_grad
              else (t.detach() if isinstance(t, torch.Tensor) else t) for t, r in zip(inputs, receives)]
    mode = contextlib.nullcontext() if hold_attention is None else FusedAttnLRPMode(hold_attention)
    with torch.enable_grad(), mode:
        output = fn(*leaves)
    return _as_gradient_form(output, stabilizer, share) if output.requires_grad else output


def _entry(t: torch.Tensor, copy: bool) -> torch.Tensor:
    """Where an input enters a gradient-form layer: its producer's handle where it has one (the
    gradient passes as it is), else through g -> x * g."""
    handle = handle_of(t)
    if handle is None:
        return _GradientToRelevance.apply(t, copy)
    return handle.clone() if copy else handle


class _SoftmaxRelevance(torch.autograd.Function):
    """The softmax rule (reference.softmax_relevance) with the output kept from the forward pass. Its
    output comes with a handle: a gradient g there is the relevance s * g, which the rule then takes
    in the same pass (x * s * (g - sum(s g)) is x times the softmax's own gradient)."""

    @staticmethod
    def forward(ctx, fn, x, dim):
        s = fn(x)
        ctx.save_for_backward(x, s)
        ctx.dim = dim
        ctx.set_materialize_grads(False)
        # views, not s itself: an output that is saved and carries its handle would hold its own node
        # through the handle, a cycle through autograd's C++ side that Python's collector cannot free
        return s.view_as(s), s.view_as(s)

    @staticmethod
    def backward(ctx, relevance, gradient):
        x, s = ctx.saved_tensors
        if relevance is None and gradient is None:
            return None, None, None
        given_up = gradient if reusable(gradient) else relevance if reusable(relevance) else None
        return None, ops.softmax_relevance(x, s, relevance, gradient, ctx.dim, overwrite=given_up), None


def softmax(layer, x: torch.Tensor) -> torch.Tensor:
    return offer_handle(*_SoftmaxRelevance.apply(layer.fn, x, layer.dim))


def bilinear(layer, inputs: tuple) -> torch.Tensor:
    """The uniform rule: Epsilon on the product, divided among the operands that receive relevance."""
    carrying = sum(bool(r) for r in layer.receives)  # as the reference: the operands the graph says carry
    # the split is a factor on the gradient at the output, taken in the conversion's own pass
    return explain_in_forward(layer.fn, inputs, layer.receives, layer.rule.stabilizer,
                              share=1.0 / max(1, carrying))


def block(layer, inputs: tuple) -> torch.Tensor:
    """A layer norm, attention module or kept-whole function under AttnLRP (CP-LRP)."""
    fn = layer.lighter_fn or layer.fn  # backends/helpers.py: the same values, a cheaper gradient

    def run(*operands):
        output = fn(*operands)
        return output[0] if layer.returns_pair else output

    return explain_in_forward(run, inputs, layer.carrying, layer.rule.stabilizer,
                              hold_attention=bool(getattr(layer.rule, "hold_attention", False)),
                              copy_inputs=layer.writes_inputs and layer.lighter_fn is None)
