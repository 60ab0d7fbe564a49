"""The reference for transformer layers: AttnLRP (Achtibat et al., ICML 2024) and CP-LRP (Ali et al.,
ICML 2022), formulas in docs/rules.md.

Two forms, which agree where both apply:

- closed forms for single ops in the graph: ``softmax_relevance`` (Prop. 3.1) and
  ``uniform_relevance`` (Prop. 3.3, products of relevance-carrying tensors);
- ``block_relevance`` for a whole block the graph keeps as one node (a layer norm, an
  ``nn.MultiheadAttention``, ``F.scaled_dot_product_attention``, torchvision's window attention):
  R_in = x * g, where g is the gradient of the block at x, taken backwards from R / stab(y) with the
  rules' gradient forms switched in by ``AttnLRPMode``. The gradient times the input of an LRP-0 chain
  is its relevance, so inside a block the linear ops get LRP-0 and the stabilizer acts once, at the
  block's output. This is how LXT 2 computes AttnLRP; here it runs inside one layer's rule.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .nonlinear import norm
from .stabilize import stabilize


def softmax_relevance(x: torch.Tensor, s: torch.Tensor, relevance: torch.Tensor, dim: int) -> torch.Tensor:
    """AttnLRP's softmax rule: R_in = x * (R - s * sum_dim(R)); masked logits (-inf) count as 0."""
    x = torch.where(torch.isneginf(x), torch.zeros_like(x), x)
    return x * (relevance - s * relevance.sum(dim, keepdim=True))


def uniform_relevance(fn: Callable, inputs: Sequence[torch.Tensor], receives: Sequence[bool],
                      relevance: torch.Tensor, stabilizer: float = 1e-6) -> list:
    """The uniform rule on a product ``fn(*inputs)`` (multi-linear in its inputs): Epsilon on the
    product, R_i = x_i * (d fn / d x_i)^T (R / stab(z)), split equally among the inputs that
    ``receive`` relevance; the others (constants, or attention held constant by CP-LRP) get None."""
    share = 1.0 / max(1, sum(bool(r) for r in receives))
    parts = norm(fn, inputs, relevance, stabilizer)
    return [p * share if r else None for p, r in zip(parts, receives)]


def block_relevance(fn: Callable, inputs: Sequence, carrying: Sequence[bool], relevance: torch.Tensor,
                    stabilizer: float = 1e-6, hold_attention: bool = False) -> list:
    """Relevance at each input of the block ``fn`` (None for those that do not carry relevance:
    weights, masks, shapes) under AttnLRP, or CP-LRP with ``hold_attention``."""
    leaves = [t.detach().requires_grad_(True) if c else (t.detach() if isinstance(t, torch.Tensor) else t)
              for t, c in zip(inputs, carrying)]
    with torch.enable_grad(), AttnLRPMode(hold_attention):
        # copies of the leaves, as a block may write into its inputs
        output = fn(*(t.clone() if c else t for t, c in zip(leaves, carrying)))
    wanted = [t for t, c in zip(leaves, carrying) if c]
    if not output.requires_grad:  # the output does not depend on the carrying inputs (a mask from a shape)
        return [None] * len(inputs)
    grads = iter(torch.autograd.grad(output, wanted, relevance / stabilize(output.detach(), stabilizer),
                                     allow_unused=True))
    out = []
    for t, c in zip(leaves, carrying):
        g = next(grads) if c else None
        out.append(None if g is None else t.detach() * g)
    return out


class _DivideGradient(torch.autograd.Function):
    """Identity forward; the gradient divided by ``k`` (the uniform rule's split in gradient form)."""

    @staticmethod
    def forward(ctx, x, k):
        ctx.k = k
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad / ctx.k, None


class _IdentityRule(torch.autograd.Function):
    """An element-wise activation whose relevance passes unchanged (AttnLRP's identity rule): in
    gradient form, grad_in = grad_out * f(x) / x."""

    @staticmethod
    def forward(ctx, fn, x):
        y = fn(x)
        ctx.save_for_backward(y / stabilize(x, 1e-10))
        return y

    @staticmethod
    def backward(ctx, grad):
        (ratio,) = ctx.saved_tensors
        return None, grad * ratio


def _carrying(t) -> bool:
    return isinstance(t, torch.Tensor) and t.requires_grad


def _bilinear(out: torch.Tensor, operands: Sequence) -> torch.Tensor:
    k = sum(_carrying(t) for t in operands)
    return _DivideGradient.apply(out, k) if k > 1 else out


def _layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    dims = tuple(range(-len(normalized_shape), 0))
    mean = x.mean(dims, keepdim=True)
    std = ((x - mean) ** 2).mean(dims, keepdim=True).add(eps).sqrt()
    y = (x - mean) / std.detach()  # the identity rule: the scale held constant
    if weight is not None:
        y = y * weight
    return y if bias is None else y + bias


def _rms_norm(x, normalized_shape, weight=None, eps=None):
    dims = tuple(range(-len(normalized_shape), 0))
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    y = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps).detach()
    return y if weight is None else y * weight


def _normalize(x, p=2.0, dim=1, eps=1e-12, out=None):
    return x / x.norm(p, dim, keepdim=True).clamp_min(eps).detach()


def _sdpa(mode, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """scaled_dot_product_attention written out, so its softmax and products take their rules."""
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    scores = _bilinear(torch.matmul(query, key.transpose(-2, -1)), (query, key)) * scale
    if is_causal:
        keep = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    weights = mode.softmax(scores, -1)
    return _bilinear(torch.matmul(weights, value), (weights, value))


def _multi_head_attention(mode, query, key, value, embed_dim, num_heads, in_proj_weight, in_proj_bias, bias_k, bias_v,
                          add_zero_attn, dropout_p, out_proj_weight, out_proj_bias, training=True,
                          key_padding_mask=None, need_weights=True, attn_mask=None, use_separate_proj_weight=False,
                          q_proj_weight=None, k_proj_weight=None, v_proj_weight=None, static_k=None, static_v=None,
                          average_attn_weights=True, is_causal=False):
    """F.multi_head_attention_forward (sequence first) written out: projections, then ``_sdpa``.
    Returns (output, None): the rule gives no relevance to attention weights."""
    if bias_k is not None or bias_v is not None or add_zero_attn or static_k is not None or static_v is not None:
        raise NotImplementedError("AttnLRP for nn.MultiheadAttention supports neither bias_k/bias_v, "
                                  "add_zero_attn nor static keys/values")
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
    (length, batch, width), source, heads = query.shape, key.shape[0], num_heads
    if use_separate_proj_weight:
        w_q, w_k, w_v = q_proj_weight, k_proj_weight, v_proj_weight
    else:
        w_q, w_k, w_v = in_proj_weight.chunk(3)
    b_q, b_k, b_v = (None, None, None) if in_proj_bias is None else in_proj_bias.chunk(3)

    def project(t, w, b, n):  # (n, N, E) -> (N, heads, n, E / heads)
        # One GEMM over all rows in the layout the input has: a batch-first model's input arrives
        # transposed, and F.linear on that strided view runs as n small batched products (4-5x slower)
        if t.transpose(0, 1).is_contiguous():
            return F.linear(t.transpose(0, 1), w, b).reshape(batch, n, heads, width // heads).transpose(1, 2)
        return F.linear(t.contiguous(), w, b).reshape(n, batch, heads, width // heads).permute(1, 2, 0, 3)

    q = project(query, w_q, b_q, length)
    k = project(key, w_k, b_k, source)
    v = project(value, w_v, b_v, source)
    mask = None  # additive, (N, heads, L, S); None where nothing is masked (no zero mask to add)

    def masked(mask, extra):  # extra: True means "may not attend", or a float added to the scores
        mask = torch.zeros(batch, heads, length, source, dtype=q.dtype, device=q.device) if mask is None else mask
        return mask.masked_fill(extra, float("-inf")) if extra.dtype == torch.bool else mask + extra

    if attn_mask is not None:  # (L, S) or (N * heads, L, S)
        mask = masked(mask, attn_mask.reshape(-1, heads, length, source) if attn_mask.dim() == 3 else attn_mask)
    elif is_causal:
        mask = masked(mask, torch.ones(length, source, dtype=torch.bool, device=q.device).triu(1))
    if key_padding_mask is not None:
        mask = masked(mask, key_padding_mask.reshape(batch, 1, 1, source))
    out = mode.sdpa(q, k, v, attn_mask=mask)
    out = F.linear(out.permute(2, 0, 1, 3).reshape(length, batch, width), out_proj_weight, out_proj_bias)
    return (out.squeeze(1) if unbatched else out), None


_BILINEAR = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__, torch.bmm,
             torch.Tensor.bmm, torch.einsum, torch.mul, torch.Tensor.mul, torch.Tensor.__mul__,
             torch.Tensor.__rmul__}
_SOFTMAX = {F.softmax, torch.softmax, torch.Tensor.softmax}
_ACTIVATIONS = {F.gelu, F.silu, F.relu, torch.relu, torch.Tensor.relu, F.mish, F.hardswish, F.elu, F.leaky_relu}
_INPLACE_POSITION = {F.relu: 1, F.silu: 1, F.mish: 1, F.hardswish: 1, F.elu: 2, F.leaky_relu: 2}
_NORMS = {F.layer_norm: _layer_norm, F.rms_norm: _rms_norm, F.normalize: _normalize}


class AttnLRPMode(TorchFunctionMode):
    """Inside a block's rule, turns each op into its AttnLRP gradient form: softmax keeps its gradient
    (times the input that is the softmax rule) or, with ``hold_attention``, is held constant; products of
    k relevance-carrying tensors divide the gradient by k; layer norms and F.normalize hold their scale
    constant; element-wise activations pass relevance (identity rule). Parameters are read detached, so
    only the block's carrying inputs require grad and 'carrying' means ``requires_grad``."""

    def __init__(self, hold_attention: bool = False):
        super().__init__()
        self.hold_attention = hold_attention

    def softmax(self, x, dim=None, _stacklevel=3, dtype=None):
        s = torch.softmax(x, dim, dtype=dtype)
        return s.detach() if self.hold_attention else s

    # The forms below are the ones a faster mode (backends/attnlrp.py) replaces by fused ones.
    def sdpa(self, *args, **kwargs):
        return _sdpa(self, *args, **kwargs)

    def normalization(self, func, *args, **kwargs):
        return _NORMS[func](*args, **kwargs)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        args = tuple(a.detach() if isinstance(a, nn.Parameter) else a for a in args)
        kwargs = {k: v.detach() if isinstance(v, nn.Parameter) else v for k, v in kwargs.items()}
        if func in _SOFTMAX:
            return self.softmax(*args, **kwargs)
        if func in _BILINEAR:
            operands = args[1:] if func is torch.einsum else args[:2]
            if func is torch.einsum and len(args) == 2 and isinstance(args[1], (list, tuple)):
                operands = args[1]
            return _bilinear(func(*args, **kwargs), operands)
        if func is torch.baddbmm:  # bias + alpha * (b1 @ b2), the bias a constant mask
            bias, b1, b2 = args[:3]
            beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
            return beta * bias + alpha * _bilinear(torch.bmm(b1, b2), (b1, b2))
        if func in _NORMS:
            return self.normalization(func, *args, **kwargs)
        if func is F.scaled_dot_product_attention:
            return self.sdpa(*args, **kwargs)
        if func is F.multi_head_attention_forward:  # its inner ops would run without this mode
            return _multi_head_attention(self, *args, **kwargs)
        if func in _ACTIVATIONS and _carrying(args[0]):
            kwargs.pop("inplace", None)  # the rule needs the input as it was, also where given by position:
            args = args[:_INPLACE_POSITION.get(func, len(args))]
            return _IdentityRule.apply(lambda t: func(t, *args[1:], **kwargs), args[0])
        return func(*args, **kwargs)
