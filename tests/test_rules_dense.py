"""Every linear rule on small layers against a dense-matrix derivation from the layer's Jacobian.

A linear layer is y = A x + b with A its Jacobian (independent of x). Each rule is written here
in matrix form, contribution by contribution: R_in_i = sum_j c_ij / stab(sum_i' c_i'j (+ bias terms)) * R_j.
This is independent of the autograd-based transcription in fastlrp.reference.
"""

import pytest
import torch
from torch import nn

from fastlrp import reference
from fastlrp.reference import AffineOp


def make_layer(kind, bias):
    torch.manual_seed(torch.randint(0, 10_000, ()).item())
    if kind == "linear":
        return nn.Linear(7, 5, bias=bias), (3, 7)
    if kind == "conv1d":
        return nn.Conv1d(2, 3, 3, stride=2, padding=1, bias=bias), (2, 2, 7)
    if kind == "conv2d":
        return nn.Conv2d(3, 4, (2, 3), padding=(1, 0), dilation=(1, 2), groups=1, bias=bias), (2, 3, 5, 6)
    if kind == "conv2d_groups":
        return nn.Conv2d(4, 6, 3, stride=2, groups=2, bias=bias), (2, 4, 7, 5)
    if kind == "conv3d":
        return nn.Conv3d(2, 3, 2, stride=(1, 2, 1), bias=bias), (1, 2, 3, 4, 3)
    if kind == "convT1d":
        return nn.ConvTranspose1d(3, 2, 3, stride=2, output_padding=1, bias=bias), (2, 3, 5)
    if kind == "convT2d":
        return nn.ConvTranspose2d(2, 3, (3, 2), stride=(2, 1), padding=1, bias=bias), (2, 2, 4, 5)
    if kind == "convT3d":
        return nn.ConvTranspose3d(2, 2, 2, stride=2, groups=2, bias=bias), (1, 2, 2, 3, 2)
    raise ValueError(kind)


KINDS = ["linear", "conv1d", "conv2d", "conv2d_groups", "conv3d", "convT1d", "convT2d", "convT3d"]


def jacobian(op, weight, sample_shape):
    """A[j, i] = d y_j / d x_i of the bias-free layer, for one sample."""
    n_in = int(torch.tensor(sample_shape).prod())
    eye = torch.eye(n_in, dtype=weight.dtype).reshape((n_in,) + tuple(sample_shape))
    return op(eye, weight, None).reshape(n_in, -1).T


def stab(z, eps):
    return z + eps * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


def dense_rule(rule, A, bias_vec, x, R, **kw):
    """Relevance of one flattened sample x under ``rule``; A is the Jacobian, bias_vec per output."""
    eps = kw.get("eps", 1e-6)
    pos, neg = (lambda t: t.clamp(min=0)), (lambda t: t.clamp(max=0))
    b = bias_vec
    if rule == "epsilon":
        c = A * x
        return (c / stab(c.sum(1) + b, eps)[:, None]).T @ R
    if rule == "zplus":
        c = pos(A) * pos(x) + neg(A) * neg(x)
        return (c / stab(c.sum(1) + pos(b), eps)[:, None]).T @ R
    if rule == "alpha_beta":
        a_, b_ = kw["alpha"], kw["beta"]
        cp = pos(A) * pos(x) + neg(A) * neg(x)
        cn = neg(A) * pos(x) + pos(A) * neg(x)
        return a_ * (cp / stab(cp.sum(1) + pos(b), eps)[:, None]).T @ R - \
            b_ * (cn / stab(cn.sum(1) + neg(b), eps)[:, None]).T @ R
    if rule == "gamma":
        g = kw["gamma"]
        up, dn = A + g * pos(A), A + g * neg(A)
        b_up, b_dn = b + g * pos(b), b + g * neg(b)
        out = A @ x + b
        c_up = up * pos(x) + dn * neg(x)
        c_dn = dn * pos(x) + up * neg(x)
        r_up = (out > 0).to(x.dtype) * R / stab(c_up.sum(1) + b_up, eps)
        r_dn = (out < 0).to(x.dtype) * R / stab(c_dn.sum(1) + b_dn, eps)
        return c_up.T @ r_up + c_dn.T @ r_dn
    if rule == "zbox":
        low, high = kw["low"], kw["high"]
        c = A * x - pos(A) * low - neg(A) * high
        return (c / stab(c.sum(1), eps)[:, None]).T @ R
    if rule == "wsquare":
        c = A ** 2
        return (c / stab(c.sum(1) + b ** 2, eps)[:, None]).T @ R
    if rule == "flat":
        c = (A != 0).to(A.dtype)
        return (c / stab(c.sum(1), eps)[:, None]).T @ R
    raise ValueError(rule)


RULES = {
    "epsilon": (reference.epsilon, {}),
    "zplus": (reference.zplus, {}),
    "alpha_beta": (reference.alpha_beta, {"alpha": 2.0, "beta": 1.0}),
    "gamma": (reference.gamma, {"gamma": 0.25}),
    "wsquare": (reference.wsquare, {}),
    "flat": (reference.flat, {}),
    "zbox": (reference.zbox, {}),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rule", list(RULES))
def test_rule_matches_dense_derivation(kind, bias, rule):
    layer, shape = make_layer(kind, bias)
    layer = layer.double()
    op = AffineOp.from_module(layer)
    weight = layer.weight.detach()
    bias_t = None if layer.bias is None else layer.bias.detach()
    x = torch.randn(shape, dtype=torch.float64)
    out = op(x, weight, bias_t)
    R = torch.randn_like(out)
    fn, kw = RULES[rule]
    sample = shape[1:]
    A = jacobian(op, weight, sample)
    # the bias as seen by each output element (a conv's bias repeats over positions)
    bias_vec = op(torch.zeros((1,) + tuple(sample), dtype=torch.float64), weight, bias_t).reshape(-1)
    extra = dict(kw)
    if rule == "zbox":
        low = torch.full_like(x, -1.5) - torch.rand_like(x)
        high = torch.full_like(x, 1.5) + torch.rand_like(x)
        extra.update(low=low, high=high)
    ours = fn(op, x, weight, bias_t, R, **extra)
    assert ours.shape == x.shape
    for n in range(shape[0]):
        dense_kw = dict(kw)
        if rule == "zbox":
            dense_kw.update(low=low[n].reshape(-1), high=high[n].reshape(-1))
        expected = dense_rule(rule, A, bias_vec, x[n].reshape(-1), R[n].reshape(-1), **dense_kw)
        torch.testing.assert_close(ours[n].reshape(-1), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rule", ["epsilon", "zplus", "alpha_beta", "wsquare", "flat", "zbox"])
def test_conservation_without_bias(kind, rule):
    """Without bias these rules conserve relevance up to what the stabilizer absorbs; with a
    tiny stabilizer, sum R_in = sum R_out."""
    layer, shape = make_layer(kind, bias=False)
    layer = layer.double()
    op = AffineOp.from_module(layer)
    x = torch.randn(shape, dtype=torch.float64)
    out = op(x, layer.weight.detach(), None)
    R = out.clone()  # relevance = output, like the starting relevance f(x)
    fn, kw = RULES[rule]
    extra = dict(kw)
    extra["epsilon" if rule == "epsilon" else "stabilizer"] = 1e-12
    if rule == "zbox":
        extra.update(low=torch.full_like(x, -4.0), high=torch.full_like(x, 4.0))
    r_in = fn(op, x, layer.weight.detach(), None, R, **extra)
    expected = conserved_relevance(rule, op, x, layer.weight.detach(), R)
    dims = tuple(range(1, x.ndim))
    torch.testing.assert_close(r_in.sum(dims), expected.sum(tuple(range(1, R.ndim))), rtol=1e-6, atol=1e-7)
    assert expected.abs().sum() > 0


def conserved_relevance(rule, op, x, w, R):
    """The output relevance a rule must pass on: all of it, except where a rule's denominator
    is exactly zero (an output with no positive contribution under z+ has nowhere to send R)."""
    if rule not in ("zplus", "alpha_beta"):
        return R
    xp, xn, wp, wn = x.clamp(min=0), x.clamp(max=0), w.clamp(min=0), w.clamp(max=0)
    has_pos = (op(xp, wp) + op(xn, wn)) != 0
    if rule == "zplus":
        return R * has_pos
    has_neg = (op(xp, wn) + op(xn, wp)) != 0
    return 2 * R * has_pos - R * has_neg


def test_alpha_beta_rejects_non_conserving_parameters():
    from fastlrp import AlphaBeta
    with pytest.raises(ValueError, match="alpha - beta = 1"):
        AlphaBeta(alpha=2.0, beta=2.0)
    with pytest.raises(ValueError, match="alpha >= 0"):
        AlphaBeta(alpha=-1.0, beta=-2.0)


def test_stabilizer_zero_counts_as_positive():
    z = torch.tensor([-2.0, 0.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(reference.stabilize(z, 0.5), torch.tensor([-2.5, 0.5, 3.5], dtype=torch.float64))


def test_zbox_bounds_broadcast_per_channel_and_scalar():
    from fastlrp.rules import broadcast_bound
    x = torch.zeros(2, 3, 4, 5)
    per_channel = broadcast_bound(torch.tensor([1.0, 2.0, 3.0]), x, "low")
    assert per_channel.shape == x.shape and per_channel[1, 2, 3, 4] == 3.0
    assert broadcast_bound(-1.0, x, "low").unique().item() == -1.0
    with pytest.raises(ValueError, match="does not broadcast"):
        broadcast_bound(torch.ones(4), x, "high")
