"""Every rule's one home: each linear rule x each backend x each layer kind against a dense-matrix
derivation from the layer's Jacobian, and a rule declared here, in one place, run on every backend.

A linear layer is y = A x + b with A its Jacobian (independent of x). Each rule is written here
in matrix form, contribution by contribution: R_in_i = sum_j c_ij / stab(sum_i' c_i'j (+ bias terms)) * R_j.
This is independent of the rule declarations (fastlrp.rules) and of every backend that runs them.
"""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import fastlrp
from fastlrp import linear_form as lf
from fastlrp import ops, reference
from fastlrp.ops import triton_ops
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
    if kind == "conv2d_groups_1x1":  # ShuffleNet v1, RegNet, ResNeXt: 3 groups, 2 in and 3 out channels each
        return nn.Conv2d(6, 9, 1, groups=3, bias=bias), (2, 6, 4, 3)
    if kind == "conv2d_depthwise":  # MobileNet, EfficientNet: one filter per channel, padded, strided
        return nn.Conv2d(5, 5, 3, stride=2, padding=1, groups=5, bias=bias), (2, 5, 6, 7)
    if kind == "conv1d_depthwise_multiplier":  # two filters per input channel
        return nn.Conv1d(3, 6, 3, padding=1, groups=3, bias=bias), (2, 3, 8)
    if kind == "conv3d":
        return nn.Conv3d(2, 3, 2, stride=(1, 2, 1), bias=bias), (1, 2, 3, 4, 3)
    if kind == "convT1d":
        return nn.ConvTranspose1d(3, 2, 3, stride=2, output_padding=1, bias=bias), (2, 3, 5)
    if kind == "convT2d":
        return nn.ConvTranspose2d(2, 3, (3, 2), stride=(2, 1), padding=1, bias=bias), (2, 2, 4, 5)
    if kind == "convT3d":
        return nn.ConvTranspose3d(2, 2, 2, stride=2, groups=2, bias=bias), (1, 2, 2, 3, 2)
    raise ValueError(kind)


KINDS = ["linear", "conv1d", "conv2d", "conv2d_groups", "conv2d_groups_1x1", "conv2d_depthwise",
         "conv1d_depthwise_multiplier", "conv3d", "convT1d", "convT2d", "convT3d"]
# the kinds the native backend runs in block form; the transposed convolutions run the reference rule
NATIVE_KINDS = ["linear", "conv1d", "conv2d", "conv2d_groups", "conv2d_groups_1x1", "conv2d_depthwise",
                "conv1d_depthwise_multiplier", "conv3d"]


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
    if rule in ("alpha_beta", "free_alpha_beta"):
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


@dataclass(repr=False)
class FreeAlphaBeta(fastlrp.rules.LinearRule):
    """A rule added in one declaration (as a user would): alpha-beta without alpha - beta = 1."""

    alpha: float = 1.5
    beta: float = 0.25
    stabilizer: float = 1e-6

    def form(self):
        return lf.LinearForm(
            [lf.Part("x+", lf.POSITIVE, lf.POSITIVE, 0), lf.Part("x-", lf.NEGATIVE, lf.NOTHING, 0),
             lf.Part("x+", lf.NEGATIVE, lf.NEGATIVE, 1), lf.Part("x-", lf.POSITIVE, lf.NOTHING, 1)],
            [lf.Group(self.alpha), lf.Group(-self.beta)], self.stabilizer)


def make_rule(rule, low=None, high=None):
    """The rule object and the keywords of its dense derivation."""
    return {
        "epsilon": (fastlrp.Epsilon(), {}),
        "zplus": (fastlrp.ZPlus(), {}),
        "alpha_beta": (fastlrp.AlphaBeta(2.0, 1.0), {"alpha": 2.0, "beta": 1.0}),
        "free_alpha_beta": (FreeAlphaBeta(1.5, 0.25), {"alpha": 1.5, "beta": 0.25}),
        "gamma": (fastlrp.Gamma(0.25), {"gamma": 0.25}),
        "wsquare": (fastlrp.WSquare(), {}),
        "flat": (fastlrp.Flat(), {}),
        "zbox": (fastlrp.ZBox(low, high), {}),
    }[rule]


RULE_NAMES = ["epsilon", "zplus", "alpha_beta", "free_alpha_beta", "gamma", "wsquare", "flat", "zbox"]


def _native_here():
    return ops.native_supports(torch.device("cpu"), torch.float64)


def _triton_here():
    return triton_ops.triton_supports(torch.device("cpu"), torch.float32)


BACKENDS = [
    "reference",
    pytest.param("native", marks=pytest.mark.skipif(not _native_here(), reason="fastlrp._C is not built")),
]
# Triton's CPU interpreter runs every program in Python: the matrix covers it on the layer kinds it has
# kernels for, with and without bias, on a subset small enough for CI.
TRITON_KINDS = ["linear", "conv1d", "conv2d", "conv2d_groups", "conv3d"]


def expected_backend(backend, kind):
    """Which backend must run the layer: the asked one where it has the layer's form, else a fallback."""
    if backend == "native":
        return "native" if kind in NATIVE_KINDS else "reference"
    if backend == "triton":
        return "triton" if kind in TRITON_KINDS else None
    return "reference"


def run_backend(backend, rule, layer, x, R, nonnegative):
    """Relevance at the layer's input through a whole explainer (graph, backend choice, kernels).
    ``nonnegative``: a ReLU comes first, so the layer's input is known to be >= 0 (its rule's
    x- parts are dropped by the derived forms)."""
    model = (nn.Sequential(nn.ReLU(), layer) if nonnegative else nn.Sequential(layer)).eval()
    site = "1" if nonnegative else "0"
    composite = fastlrp.Composite(layer_map=[(type(layer), rule)])
    result = fastlrp.LRP(model, composite, backend=backend).explain(x, lambda out: R, layers=["0"] if nonnegative
                                                                    else [])
    relevance = result.layers["0"] if nonnegative else result.relevance
    return relevance, result.backends[site]


def check_rule(backend, kind, bias, rule_name, nonnegative, dtype, tol):
    layer, shape = make_layer(kind, bias)
    layer = layer.to(dtype)
    op = AffineOp.from_module(layer)
    weight = layer.weight.detach()
    bias_t = None if layer.bias is None else layer.bias.detach()
    x = torch.randn(shape, dtype=dtype)
    x_in = x.clamp(min=0) if nonnegative else x
    out = op(x_in, weight, bias_t)
    R = torch.randn_like(out)
    sample = shape[1:]
    low = -1.5 - torch.rand(sample, dtype=dtype)  # per-pixel bounds, one per input element of a sample
    high = 1.5 + torch.rand(sample, dtype=dtype)
    rule, kw = make_rule(rule_name, low, high)
    ours, ran_on = run_backend(backend, rule, layer, x, R, nonnegative)
    assert ran_on == expected_backend(backend, kind)
    assert ours.shape == x.shape
    wide = torch.float64
    A = jacobian(op, weight.to(wide), sample)
    # the bias as seen by each output element (a conv's bias repeats over positions)
    bias_vec = op(torch.zeros((1,) + tuple(sample), dtype=wide), weight.to(wide),
                  None if bias_t is None else bias_t.to(wide)).reshape(-1)
    if rule_name == "zbox":
        kw = dict(low=low.to(wide).reshape(-1), high=high.to(wide).reshape(-1))
    for n in range(shape[0]):
        expected = dense_rule(rule_name, A, bias_vec, x_in[n].to(wide).reshape(-1), R[n].to(wide).reshape(-1), **kw)
        got = ours[n].to(wide).reshape(-1)
        scale = expected.abs().max().clamp(min=1e-12)
        assert ((got - expected).abs().max() / scale).item() < tol, (backend, kind, rule_name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rule", RULE_NAMES)
def test_rule_on_backend_matches_dense_derivation(backend, kind, bias, rule):
    check_rule(backend, kind, bias, rule, nonnegative=False, dtype=torch.float64, tol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["linear", "conv2d", "conv2d_groups", "conv2d_depthwise", "convT2d"])
@pytest.mark.parametrize("rule", ["zplus", "alpha_beta", "free_alpha_beta", "gamma"])
def test_rule_after_a_relu_drops_the_negative_parts_exactly(backend, kind, rule):
    check_rule(backend, kind, True, rule, nonnegative=True, dtype=torch.float64, tol=1e-9)


@pytest.mark.skipif(not _triton_here(), reason="no Triton kernels here (triton missing, or no GPU and no "
                                               "TRITON_INTERPRET=1)")
@pytest.mark.parametrize("kind", TRITON_KINDS)
@pytest.mark.parametrize("rule", RULE_NAMES)
def test_rule_on_triton_matches_dense_derivation(kind, rule):
    check_rule("triton", kind, True, rule, nonnegative=(rule == "gamma"), dtype=torch.float32, tol=2e-4)


def test_a_new_rule_is_one_declaration():
    """FreeAlphaBeta above declares nothing but form(); every backend derives what it needs."""
    form = FreeAlphaBeta().form()
    block = fastlrp.backends.native.BlockRule(AffineOp("linear"), form, torch.randn(3, 4), torch.randn(3))
    assert block.coefficients == [1.5, -0.25] and block.weight.shape == (6, 8)
    from fastlrp.backends.triton import rule_coefficients
    spec = rule_coefficients(form, torch.randn(3), nonnegative_input=False)
    assert spec.coefficients == (0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0)
    assert spec.group_coefficients == (1.5, -0.25)


def test_forms_the_kernels_cannot_take_fall_back():
    """A part in group 1 that reads a bound has no Triton coefficient form: None, so the layer runs native."""
    from fastlrp.backends.triton import rule_coefficients
    form = lf.LinearForm([lf.Part("x", lf.IDENTITY), lf.Part("ones", lf.SQUARE, group=1)],
                         [lf.Group(), lf.Group()])
    assert rule_coefficients(form, None, False) is None
    with pytest.raises(ValueError, match="group 1 has no part"):
        lf.LinearForm([lf.Part("x", lf.IDENTITY)], [lf.Group(), lf.Group()])
    with pytest.raises(ValueError, match="unknown part input"):
        lf.LinearForm([lf.Part("y", lf.IDENTITY)])
    with pytest.raises(ValueError, match="bound 'low'"):
        lf.LinearForm([lf.Part("low", lf.IDENTITY)])


def test_z_is_output_is_derived():
    bias = torch.randn(3)
    assert fastlrp.Epsilon().form().z_is_output(bias)
    assert not fastlrp.Epsilon(zero_params="bias").form().z_is_output(bias)
    assert fastlrp.Epsilon(zero_params="bias").form().z_is_output(None)
    assert not fastlrp.ZPlus().form().z_is_output(bias)


def _reference(rule_name, op, x, weight, bias, R, **extra):
    rule = {"epsilon": fastlrp.Epsilon, "zplus": fastlrp.ZPlus, "alpha_beta": fastlrp.AlphaBeta,
            "wsquare": fastlrp.WSquare, "flat": fastlrp.Flat, "zbox": fastlrp.ZBox}[rule_name](**extra)
    return reference.linear_relevance(op, rule.form(), x, weight, bias, R)


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
    extra = {"epsilon" if rule == "epsilon" else "stabilizer": 1e-12}
    if rule == "zbox":
        extra.update(low=-4.0, high=4.0)
    r_in = _reference(rule, op, x, layer.weight.detach(), None, R, **extra)
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
