"""LRP rules for linear layers, following Zennit's definitions (see docs/rules.md).

Each rule has the same shape: K modified forward passes z_k = f(m_k(x); W_k, b_k), a
stabilized division s_k = c_k * mask_k * R / stab(z), and R_in = sum_k m_k(x) * f^T(s_k; W_k).
The transposed passes f^T are taken by autograd on the modified forward passes, exactly
as Zennit does, so this module stays a direct transcription of the formulas.

Arguments shared by all rules: ``op`` (an AffineOp), ``x`` the layer input, ``weight`` and
``bias`` its parameters (bias may be None), ``relevance`` the relevance at the layer output.
``use_bias=False`` is Zennit's ``zero_params="bias"``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .affine import AffineOp
from .stabilize import stabilize


def _pos(t):
    return None if t is None else t.clamp(min=0)


def _neg(t):
    return None if t is None else t.clamp(max=0)


def _transposed(op: AffineOp, parts: Sequence[tuple], scaled: Sequence[torch.Tensor]) -> list:
    """f^T(s_k; W_k) for every part (input_k, weight_k, bias_k) with output-side factor s_k."""
    inputs = [inp.detach().requires_grad_(True) for inp, _, _ in parts]
    with torch.enable_grad():
        outputs = [op(inp, w, b) for inp, (_, w, b) in zip(inputs, parts)]
        return list(torch.autograd.grad(outputs, inputs, scaled))


def _forward(op: AffineOp, parts: Sequence[tuple]) -> list:
    with torch.no_grad():
        return [op(inp, w, b) for inp, w, b in parts]


def epsilon(op, x, weight, bias, relevance, epsilon=1e-6, use_bias=True):
    """Epsilon rule: R_in = x * f^T(R / stab(f(x; W, b)); W)."""
    parts = [(x, weight, bias if use_bias else None)]
    (z,) = _forward(op, parts)
    s = relevance / stabilize(z, epsilon)
    (g,) = _transposed(op, parts, [s])
    return x * g


def zplus(op, x, weight, bias, relevance, stabilizer=1e-6, use_bias=True):
    """Z+ rule: z = f(x+; W+, b+) + f(x-; W-, 0); R_in = x+ f^T(s; W+) + x- f^T(s; W-)."""
    b = bias if use_bias else None
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    parts = [(xp, weight.clamp(min=0), _pos(b)), (xn, weight.clamp(max=0), None)]
    z = sum(_forward(op, parts))
    s = relevance / stabilize(z, stabilizer)
    gp, gn = _transposed(op, parts, [s, s])
    return xp * gp + xn * gn


def alpha_beta(op, x, weight, bias, relevance, alpha=2.0, beta=1.0, stabilizer=1e-6, use_bias=True):
    """Alpha-beta rule: alpha times the positive contributions minus beta times the negative ones."""
    check_alpha_beta(alpha, beta)
    b = bias if use_bias else None
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    wp, wn = weight.clamp(min=0), weight.clamp(max=0)
    pos_parts = [(xp, wp, _pos(b)), (xn, wn, None)]
    neg_parts = [(xp, wn, _neg(b)), (xn, wp, None)]
    s_pos = relevance / stabilize(sum(_forward(op, pos_parts)), stabilizer)
    s_neg = relevance / stabilize(sum(_forward(op, neg_parts)), stabilizer)
    gpp, gpn = _transposed(op, pos_parts, [s_pos, s_pos])
    gnp, gnn = _transposed(op, neg_parts, [s_neg, s_neg])
    return alpha * (xp * gpp + xn * gpn) - beta * (xp * gnp + xn * gnn)


def check_alpha_beta(alpha: float, beta: float) -> None:
    if alpha < 0 or beta < 0:
        raise ValueError(f"AlphaBeta needs alpha >= 0 and beta >= 0, got alpha={alpha}, beta={beta}")
    if alpha - beta != 1:
        raise ValueError(f"AlphaBeta needs alpha - beta = 1 to conserve relevance, got alpha={alpha}, beta={beta}")


def gamma(op, x, weight, bias, relevance, gamma=0.25, stabilizer=1e-6, use_bias=True):
    """Generalized Gamma rule: favour contributions that agree in sign with the output.

    With W_up = W + gamma W+ and W_dn = W + gamma W- (biases alike): where f(x) > 0,
    z = f(x+; W_up, b_up) + f(x-; W_dn, 0); where f(x) < 0, z = f(x+; W_dn, b_dn) + f(x-; W_up, 0);
    where f(x) = 0 nothing passes. The sign mask uses the layer's true output (with bias).
    """
    b = bias if use_bias else None
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    w_up, w_dn = weight + gamma * weight.clamp(min=0), weight + gamma * weight.clamp(max=0)
    b_up = None if b is None else b + gamma * b.clamp(min=0)
    b_dn = None if b is None else b + gamma * b.clamp(max=0)
    with torch.no_grad():
        out = op(x, weight, bias)
    up_parts = [(xp, w_up, b_up), (xn, w_dn, None)]
    dn_parts = [(xp, w_dn, b_dn), (xn, w_up, None)]
    s_up = (out > 0).to(x.dtype) * relevance / stabilize(sum(_forward(op, up_parts)), stabilizer)
    s_dn = (out < 0).to(x.dtype) * relevance / stabilize(sum(_forward(op, dn_parts)), stabilizer)
    g1, g2 = _transposed(op, up_parts, [s_up, s_up])
    g3, g4 = _transposed(op, dn_parts, [s_dn, s_dn])
    return xp * g1 + xn * g2 + xp * g3 + xn * g4


def zbox(op, x, weight, bias, relevance, low, high, stabilizer=1e-6, use_bias=True):
    """ZB rule for inputs bounded by [low, high]:
    z = f(x; W, b) - f(low; W+, b+) - f(high; W-, b-);
    R_in = x f^T(s; W) - low f^T(s; W+) - high f^T(s; W-).
    ``low`` and ``high`` are tensors already broadcast to x's shape.
    """
    b = bias if use_bias else None
    parts = [(x, weight, b), (low, weight.clamp(min=0), _pos(b)), (high, weight.clamp(max=0), _neg(b))]
    z_x, z_low, z_high = _forward(op, parts)
    s = relevance / stabilize(z_x - z_low - z_high, stabilizer)
    g_x, g_low, g_high = _transposed(op, parts, [s, s, s])
    return x * g_x - low * g_low - high * g_high


def wsquare(op, x, weight, bias, relevance, stabilizer=1e-6, use_bias=True):
    """W^2 rule: z = f(1; W^2, b^2); R_in = f^T(s; W^2), independent of x's values."""
    b = bias ** 2 if (use_bias and bias is not None) else None
    parts = [(torch.ones_like(x), weight ** 2, b)]
    (z,) = _forward(op, parts)
    (g,) = _transposed(op, parts, [relevance / stabilize(z, stabilizer)])
    return g


def flat(op, x, weight, bias, relevance, stabilizer=1e-6):
    """Flat rule: as W^2 with every weight set to one and no bias: R spreads uniformly over the receptive field."""
    parts = [(torch.ones_like(x), torch.ones_like(weight), None)]
    (z,) = _forward(op, parts)
    (g,) = _transposed(op, parts, [relevance / stabilize(z, stabilizer)])
    return g
