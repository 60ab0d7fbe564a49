"""The forward kernel (taps outer, dense channel blocks inner, packed weights) against the op's torch
formulas in float64: y and every z_g, for each product it forms, on odd and on block-aligned shapes."""

import pytest
import torch

from kernel_testing import DEVICE, needs_kernels, poisoned, relative_error  # noqa: F401

from fastlrp import rules
from fastlrp.backends.triton import rule_coefficients
from fastlrp.linear_form import broadcast_bound
from fastlrp.ops import triton_ops
from fastlrp.ops.triton_fallback import forward_torch

pytestmark = needs_kernels

# (x shape, weight shape, stride, padding, dilation, groups): channel counts that leave a partial channel
# block (5, 33) and ones that fill them exactly (32 per group: the unmasked K loop), every dimensionality
GEOMETRIES = {
    "conv2d_odd_strided_dilated_grouped": ((2, 6, 9, 7), (4, 3, 3, 2), (2, 1), (1, 2), (2, 1), 2),
    "conv2d_aligned_channels_grouped": ((1, 64, 5, 4), (6, 32, 3, 3), (1, 2), (1, 0), (1, 1), 2),
    "conv3d_strided_padded": ((1, 5, 4, 5, 3), (3, 5, 2, 3, 2), (2, 1, 2), (1, 1, 0), (1, 2, 1), 1),
    "conv1d_even_kernel": ((2, 33, 11), (5, 33, 4), (3,), (2,), (1,), 1),
    "linear": ((3, 33), (7, 33), (), (), (), 1),
}


def _rule(name, x):
    low = -1 - torch.rand((1, x.shape[1]) + (1,) * (x.ndim - 2), device=x.device)
    return {"gamma_signed": (rules.Gamma(0.25), False), "zplus_after_relu": (rules.ZPlus(), True),
            "alphabeta_signed": (rules.AlphaBeta(2, 1), False), "zbox": (rules.ZBox(low, -low), False),
            "wsquare": (rules.WSquare(), False), "epsilon_no_bias_in_z": (rules.Epsilon(0.1, zero_params="bias"),
                                                                           False)}[name]


def _forward(x, w, b, rule, nonnegative, geometry):
    stride, padding, dilation, groups = geometry
    spec = rule_coefficients(rule.form(), b, nonnegative)
    form = rule.form()
    bounds = [torch.ones(1, dtype=x.dtype, device=x.device).expand(x.shape) if name == "ones"
              else broadcast_bound(form.bounds[name], x, name).to(x.dtype) for name in spec.bounds]
    z_bias = None if spec.z_bias is None else spec.z_bias.to(x.dtype)
    groups_z = len(spec.group_coefficients)
    got = triton_ops.affine_forward(x, w, b, z_bias, bounds, spec.coefficients, spec.bound_modifiers, groups_z,
                                    nonnegative_input=nonnegative, stride=stride, padding=padding,
                                    dilation=dilation, groups=groups)
    wide = [None if t is None else t.double() for t in (x, w, b, z_bias)]
    bounds64 = ([t.double() for t in bounds] + [None, None])[:2]
    expected = forward_torch(*wide[:2], wide[2], wide[3], *bounds64, spec.coefficients, spec.bound_modifiers,
                             groups_z, stride, padding, dilation, groups)
    return got, expected


@pytest.mark.parametrize("rule_name", ["gamma_signed", "zplus_after_relu", "alphabeta_signed", "zbox", "wsquare",
                                       "epsilon_no_bias_in_z"])
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_forward_kernel_matches_the_torch_formulas(geometry, rule_name, poisoned):
    x_shape, w_shape, *conv = GEOMETRIES[geometry]
    x = torch.randn(x_shape, device=DEVICE)
    rule, nonnegative = _rule(rule_name, x)
    if nonnegative:
        x = x.clamp(min=0)
    w, b = torch.randn(w_shape, device=DEVICE), torch.randn(w_shape[0], device=DEVICE)
    (y, z), (y_ref, z_ref) = _forward(x, w, b, rule, nonnegative, conv)
    assert relative_error(y, y_ref) < 1e-6
    assert relative_error(z, z_ref) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
def test_forward_kernel_low_precision(dtype, poisoned):
    """Products of the dtype's values accumulate in float32: only the output's rounding (2^-8 relative for
    bfloat16, 2^-11 for float16) is left against float64."""
    x_shape, w_shape, *conv = GEOMETRIES["conv2d_aligned_channels_grouped"]
    x = torch.randn(x_shape, device=DEVICE).to(dtype)
    w, b = torch.randn(w_shape, device=DEVICE).to(dtype), torch.randn(w_shape[0], device=DEVICE).to(dtype)
    (y, z), (y_ref, z_ref) = _forward(x, w, b, rules.Gamma(0.25), False, conv)
    assert y.dtype == z.dtype == dtype
    limit = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    assert relative_error(y, y_ref) < limit and relative_error(z, z_ref) < limit


@pytest.mark.parametrize("geometry", ["conv2d_odd_strided_dilated_grouped", "conv1d_even_kernel"])
def test_forward_kernel_reads_only_its_channels(geometry, poisoned):
    """x is a channel slice of a NaN-filled tensor: a tile read past the group's last channel (the packed
    weights are zero there, so only a NaN shows it) would poison the output."""
    x_shape, w_shape, *conv = GEOMETRIES[geometry]
    padded = torch.full((x_shape[0], x_shape[1] + 40) + x_shape[2:], float("nan"), device=DEVICE)
    x = padded[:, :x_shape[1]]
    x.copy_(torch.randn(x_shape, device=DEVICE))
    w, b = torch.randn(w_shape, device=DEVICE), torch.randn(w_shape[0], device=DEVICE)
    # Epsilon's product reads x itself (the split products' max/min would turn a NaN into 0)
    (y, z), (y_ref, z_ref) = _forward(x, w, b, rules.Epsilon(0.1, zero_params="bias"), False, conv)
    assert relative_error(y, y_ref) < 1e-6 and relative_error(z, z_ref) < 1e-6


def test_forward_kernel_channels_last(poisoned):
    x = torch.randn(2, 32, 5, 6, device=DEVICE).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(8, 32, 3, 3, device=DEVICE), torch.randn(8, device=DEVICE)
    (y, z), (y_ref, z_ref) = _forward(x, w, b, rules.Gamma(0.25), False, ([2, 1], [1, 1], [1, 1], 1))
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(y, y_ref) < 1e-6 and relative_error(z, z_ref) < 1e-6


def test_packed_weights_are_checked():
    x, w = torch.randn(1, 4, 5, 5), torch.randn(3, 4, 3, 3)
    zplus = [0.0, 1.0, 0.0, 0.0, 1.0] + [0.0] * 5
    geometry = dict(stride=[1, 1], padding=[0, 0], dilation=[1, 1], groups=1)
    packed = triton_ops.pack_forward_weights(w, zplus, [0.0] * 8, [], False, 1)
    assert packed.shape[0] == 3  # W for y, W+ and W- for the split products of a signed input
    with pytest.raises(ValueError, match="packed_weight must be contiguous of shape"):
        triton_ops.affine_forward(x, w, None, None, [], zplus, [0.0] * 8, 1, packed_weight=packed[:2], **geometry)
