"""The fused linear-layer kernels (forward: output + every z; relevance: the transposed pass with
the division and the combination fused in) against fastlrp.reference, rule by rule."""

import pytest
import torch

from kernel_testing import DEVICE, FLOAT32_RTOL, channels_last, needs_kernels, poisoned, relative_error  # noqa: F401

from fastlrp import reference, rules
from fastlrp.ops import triton_ops
from fastlrp.reference.affine import AffineOp
from fastlrp.backends.triton import TritonLinearRule

pytestmark = needs_kernels

CONV2D = AffineOp("conv", 2, (2, 1), (1, 2), (2, 1), 2)  # stride, padding, dilation, groups all non-trivial


def _bounds(x):
    low = -1 - torch.rand((1, x.shape[1]) + (1,) * (x.ndim - 2), dtype=x.dtype, device=x.device)
    return low, low.neg()


def _oracle(rule, op, x, w, b, R):
    """The reference: the rule's declaration executed by fastlrp.reference, in x's dtype."""
    return reference.linear_relevance(op, rule.form(), x, w, b, R)


def _run(op, rule, x, w, b, nonnegative=False):
    kernel_rule = TritonLinearRule(op, rule.form(), w, b, nonnegative)
    y, z = kernel_rule.forward(x)
    R = torch.randn_like(y)
    return y, kernel_rule.relevance(x, z, y, R), R


def _check(op, rule, x, w, b, nonnegative=False, rtol=FLOAT32_RTOL):
    y, got, R = _run(op, rule, x, w, b, nonnegative)
    wide = [None if t is None else t.double() for t in (x, w, b, R)]
    torch.testing.assert_close(y.double(), op(*wide[:3]), rtol=rtol, atol=rtol)
    assert relative_error(got, _oracle(rule, op, *wide)) < rtol * 10
    return y, got


RULES = [rules.Epsilon(0.25), rules.ZPlus(), rules.AlphaBeta(2, 1), rules.Gamma(0.25), rules.WSquare(), rules.Flat(),
         "zbox"]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r if isinstance(r, str) else type(r).__name__)
def test_every_rule_on_a_strided_dilated_grouped_conv2d(rule, poisoned):
    x = torch.randn(1, 4, 7, 5, device=DEVICE)
    w, b = torch.randn(6, 2, 3, 3, device=DEVICE), torch.randn(6, device=DEVICE)
    if rule == "zbox":
        rule = rules.ZBox(*_bounds(x))
    _check(CONV2D, rule, x, w, b)


@pytest.mark.parametrize("rule", [rules.ZPlus(), rules.AlphaBeta(1, 0), rules.Gamma(0.5)],
                         ids=lambda r: type(r).__name__)
def test_nonnegative_input_drops_the_x_minus_products(rule, poisoned):
    x = torch.randn(1, 4, 7, 5, device=DEVICE).clamp(min=0)
    w, b = torch.randn(6, 2, 3, 3, device=DEVICE), torch.randn(6, device=DEVICE)
    _check(CONV2D, rule, x, w, b, nonnegative=True)


LAYERS = {
    "linear": (AffineOp("linear"), (3, 11), (5, 11)),
    "conv1d": (AffineOp("conv", 1, (2,), (1,), (2,), 1), (2, 3, 13), (5, 3, 3)),
    "conv3d": (AffineOp("conv", 3, (1, 2, 1), (1, 0, 1), (1, 1, 2), 1), (1, 3, 3, 5, 4), (4, 3, 2, 3, 2)),
    "conv3d_channels_last": (AffineOp("conv", 3, (2, 1, 1), (0, 1, 1), (1, 1, 1), 3), (2, 3, 3, 3, 2),
                             (6, 1, 1, 3, 3)),
    "conv2d_channels_last": (AffineOp("conv", 2, (1, 1), (1, 1), (1, 1), 1), (2, 3, 5, 6), (4, 3, 3, 3)),
}


@pytest.mark.parametrize("layer", list(LAYERS))
def test_layer_kinds_and_layouts(layer, poisoned):
    op, x_shape, w_shape = LAYERS[layer]
    x = torch.randn(x_shape, device=DEVICE)
    if layer.endswith("channels_last"):
        x = channels_last(x)
    w, b = torch.randn(w_shape, device=DEVICE), torch.randn(w_shape[0], device=DEVICE)
    y, got = _check(op, rules.Gamma(0.25), x, w, b)
    if layer.endswith("channels_last"):  # outputs keep the input's layout
        assert not y.is_contiguous() and not got.is_contiguous()


def test_zbox_with_per_pixel_bounds_and_no_bias(poisoned):
    x = torch.randn(2, 3, 5, 4, device=DEVICE)
    low = -torch.rand(3, 5, 4, device=DEVICE) - 0.5
    _check(AffineOp("conv", 2, (1, 1), (1, 1), (1, 1), 1), rules.ZBox(low, low.neg() + 0.1), x,
           torch.randn(4, 3, 3, 3, device=DEVICE), None)


def test_epsilon_without_bias_in_z(poisoned):
    # zero_params="bias": y keeps the bias, z does not, so z is written separately
    x = torch.randn(3, 7, device=DEVICE)
    w, b = torch.randn(4, 7, device=DEVICE), torch.randn(4, device=DEVICE)
    op = AffineOp("linear")
    rule = rules.Epsilon(0.1, zero_params="bias")
    y, got, R = _run(op, rule, x, w, b)
    expected = _oracle(rule, op, x.double(), w.double(), b.double(), R.double())
    assert relative_error(got, expected) < 1e-4


def _low_precision_error(rule, op, x, w, b, R, dtype):
    """PyTorch's own error: the reference rule run in ``dtype``, against float64."""
    exact = _oracle(rule, op, *(None if t is None else t.double() for t in (x, w, b, R)))
    low = _oracle(rule, op, *(None if t is None else t.to(dtype) for t in (x, w, b, R)))
    return relative_error(low, exact), exact


@pytest.mark.parametrize("rule", [rules.Epsilon(0.25), rules.Gamma(0.25)], ids=lambda r: type(r).__name__)
def test_float16_error_at_most_twice_pytorchs(rule, poisoned):
    op = AffineOp("conv", 2, (1, 1), (1, 1), (1, 1), 1)
    x, w, b = torch.randn(2, 3, 6, 5, device=DEVICE), torch.randn(4, 3, 3, 3, device=DEVICE), torch.randn(4, device=DEVICE)
    kernel_rule = TritonLinearRule(op, rule.form(), w.half(), b.half(), False)
    y, z = kernel_rule.forward(x.half())
    R = torch.randn_like(y, dtype=torch.float32)
    got = kernel_rule.relevance(x.half(), z, y, R.half())
    assert got.dtype == torch.float16
    torch_error, exact = _low_precision_error(rule, op, x, w, b, R, torch.float16)
    assert relative_error(got, exact) <= 2 * torch_error


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rule", RULES[:4], ids=lambda r: type(r).__name__)
def test_real_sizes_on_gpu(rule, dtype):
    """A VGG-like layer at batch 16 (channels-last), error within twice PyTorch's own."""
    op = AffineOp("conv", 2, (1, 1), (1, 1), (1, 1), 1)
    x = channels_last(torch.randn(16, 64, 56, 56, device="cuda"))
    w, b = torch.randn(128, 64, 3, 3, device="cuda") / 24, torch.randn(128, device="cuda")
    kernel_rule = TritonLinearRule(op, rule.form(), w.to(dtype), b.to(dtype), False)
    y, z = kernel_rule.forward(x.to(dtype))
    R = torch.randn(y.shape, device="cuda")
    got = kernel_rule.relevance(x.to(dtype), z, y, R.to(dtype))
    torch_error, exact = _low_precision_error(rule, op, x, w, b, R, dtype)
    if dtype == torch.float32:
        assert relative_error(got, exact) < 1e-4
    else:
        assert relative_error(got, exact) <= 2 * torch_error


def test_without_kernels_the_op_runs_the_torch_formulas(monkeypatch):
    """float64 (no Triton kernel) goes through the plain-torch body of the same op."""
    x, w, b = torch.randn(2, 4, 7, 5, dtype=torch.float64), torch.randn(6, 2, 3, 3, dtype=torch.float64), None
    _check(CONV2D, rules.AlphaBeta(2, 1), x, w, b, rtol=1e-10)
    assert not triton_ops.triton_supports(x.device, torch.float64)


def test_bad_arguments_name_the_argument():
    x, w = torch.randn(2, 4, 5, 5), torch.randn(3, 4, 3, 3)
    good = dict(stride=[1, 1], padding=[0, 0], dilation=[1, 1], groups=1)
    coef = [1.0] + [0.0] * 9
    with pytest.raises(ValueError, match="stride"):
        triton_ops.affine_forward(x, w, None, None, [], coef, [0.0] * 8, 1, **{**good, "stride": [0, 1]})
    with pytest.raises(ValueError, match="groups=2"):
        triton_ops.affine_forward(x, w, None, None, [], coef, [0.0] * 8, 1, **{**good, "groups": 2})
    with pytest.raises(TypeError, match="weight is torch.float64"):
        triton_ops.affine_forward(x, w.double(), None, None, [], coef, [0.0] * 8, 1, **good)
    with pytest.raises(ValueError, match="coefficients must hold 10"):
        triton_ops.affine_forward(x, w, None, None, [], coef[:5], [0.0] * 8, 1, **good)
    with pytest.raises(ValueError, match="bias must have shape"):
        triton_ops.affine_forward(x, w, torch.randn(4), None, [], coef, [0.0] * 8, 1, **good)
    with pytest.raises(ValueError, match=r"bounds\[0\]"):
        triton_ops.affine_forward(x, w, None, None, [torch.randn(7)], coef, [0.0] * 8, 1, **good)
    y = torch.randn(2, 3, 3, 3)
    with pytest.raises(ValueError, match="z must have shape"):
        triton_ops.affine_relevance(x, w, y, y, y, [], coef, [0.0] * 8, [1.0, -1.0], [0, 0], **good)
    with pytest.raises(ValueError, match="group_masks"):
        triton_ops.affine_relevance(x, w, y, y, y, [], coef, [0.0] * 8, [1.0], [3], **good)


DENSE_RULES = [rules.Epsilon(0.25), rules.ZPlus(), rules.AlphaBeta(2, 1), rules.Gamma(0.25), rules.WSquare(),
               rules.Flat(), "zbox"]


@pytest.mark.parametrize("nonnegative", [False, True], ids=["signed", "after_relu"])
@pytest.mark.parametrize("rule", DENSE_RULES, ids=lambda r: r if isinstance(r, str) else type(r).__name__)
def test_dense_relevance_pass_takes_the_fused_forwards_z(rule, nonnegative, poisoned):
    """On CUDA the Triton backend's relevance pass is the native block rule (element-wise division, a
    transposed convolution, element-wise combination) fed with the fused forward kernel's z: the two
    must agree on z's groups and channel order for every rule, with and without the ReLU shortcut."""
    from fastlrp import ops
    from fastlrp.backends.native import BlockRule
    if not ops.native_supports(torch.device(DEVICE), torch.float32):
        pytest.skip("the native kernels are not built here")
    op = AffineOp("conv", 2, (2, 1), (1, 1), (1, 1), 1)
    x = torch.randn(2, 3, 7, 6, device=DEVICE)
    if nonnegative:
        x = x.clamp(min=0)
    w, b = torch.randn(4, 3, 3, 3, device=DEVICE), torch.randn(4, device=DEVICE)
    if rule == "zbox":
        rule = rules.ZBox(*_bounds(x))
    form = rule.form()
    kernel_rule = TritonLinearRule(op, form, w, b, nonnegative)
    y, z = kernel_rule.forward(x)
    R = torch.randn_like(y)
    block_form = form.for_nonnegative_input(merge_positive=True) if nonnegative else form
    got = BlockRule(op, block_form, w, b).relevance(x, z, y, R)
    expected = _oracle(rule, op, x.double(), w.double(), b.double(), R.double())
    assert relative_error(got, expected) < FLOAT32_RTOL * 10


@pytest.mark.parametrize("rule", [rules.Epsilon(0.25), rules.ZPlus(), rules.Gamma(0.25), rules.AlphaBeta(2, 1)],
                         ids=lambda r: type(r).__name__)
def test_dense_relevance_pass_on_grouped_convs(rule, poisoned):
    """Native orders a grouped layer's z (conv group, rule group, channel), the fused forward kernel (rule
    group, conv group, channel): the backend regroups z (native_z_layout) before the dense pass, so grouped
    Gamma and AlphaBeta layers take it too instead of a Triton relevance GEMM."""
    from fastlrp import ops
    from fastlrp.backends.native import BlockRule
    from fastlrp.backends.triton import native_z_layout
    if not ops.native_supports(torch.device(DEVICE), torch.float32):
        pytest.skip("the native kernels are not built here")
    op = AffineOp("conv", 2, (1, 1), (1, 1), (1, 1), 2)
    form = rule.form()
    x, w = channels_last(torch.randn(2, 4, 6, 5, device=DEVICE)), torch.randn(6, 2, 3, 3, device=DEVICE)
    b = torch.randn(6, device=DEVICE)
    kernel_rule = TritonLinearRule(op, form, w, b, False)
    y, z = kernel_rule.forward(x)
    R = torch.randn_like(y)
    got = BlockRule(op, form, w, b).relevance(x, native_z_layout(z, kernel_rule), y, R)
    expected = _oracle(rule, op, x.double(), w.double(), b.double(), R.double())
    assert relative_error(got, expected) < FLOAT32_RTOL * 10
