"""Pooling (average, adaptive average, proportional max) and n-ary sum kernels against the reference."""

import pytest
import torch
import torch.nn.functional as F

from kernel_testing import DEVICE, channels_last, needs_kernels, poisoned, relative_error  # noqa: F401

from fastlrp import reference
from fastlrp.ops import triton_ops

pytestmark = needs_kernels

_AVG = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_MAX = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_ADAPTIVE = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}

# (input shape, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override, channels_last)
AVG_CASES = [
    ((2, 3, 7, 5), 3, 2, 1, False, True, None, False),
    ((1, 3, 7, 5), (2, 3), (2, 1), (1, 0), True, False, None, True),
    ((2, 2, 5, 6), 2, 2, 0, False, True, 3, False),
    ((2, 3, 11), 3, 2, 1, True, False, None, False),
    ((1, 2, 3, 5, 4), (2, 3, 2), (1, 2, 2), (1, 1, 0), False, True, None, True),
]


@pytest.mark.parametrize("case", AVG_CASES)
def test_average_pooling(case, poisoned):
    shape, k, s, p, ceil, cip, div, cl = case
    x = torch.randn(shape, device=DEVICE)
    x = channels_last(x) if cl else x
    extra = {"divisor_override": div} if len(shape) > 3 else {}
    pool = lambda t: _AVG[len(shape) - 2](t, k, s, p, ceil, cip, **extra)  # noqa: E731
    y = pool(x)
    R = torch.randn_like(y)
    got = triton_ops.pool_relevance(x, R, "avg", k, s, p, cip, div, y=y)
    assert relative_error(got, reference.norm(pool, [x.double()], R.double())[0]) < 1e-5


@pytest.mark.parametrize("shape,k,s,p,ceil,cl", [((2, 3, 7, 5), 3, 2, 1, False, False),
                                                 ((1, 2, 7, 5), 2, 2, 0, True, True),
                                                 ((1, 2, 3, 5, 4), 2, 1, 1, False, True),
                                                 ((2, 3, 9), 3, 2, 1, True, False)])
def test_proportional_max_pooling(shape, k, s, p, ceil, cl, poisoned):
    x = torch.randn(shape, device=DEVICE)
    x = channels_last(x) if cl else x
    R = torch.randn_like(_MAX[len(shape) - 2](x, k, s, p, ceil_mode=ceil))
    got = triton_ops.pool_relevance(x, R, "max_proportional", k, s, p)
    assert relative_error(got, reference.maxpool_proportional(x.double(), R.double(), k, s, p, ceil)) < 1e-5


@pytest.mark.parametrize("shape,out", [((2, 3, 7, 5), (3, 2)), ((1, 2, 5, 3), (7, 4)), ((2, 3, 13), (5,)),
                                       ((1, 2, 3, 5, 4), (2, 1, 3))])
def test_adaptive_average_pooling(shape, out, poisoned):
    x = torch.randn(shape, device=DEVICE)
    pool = lambda t: _ADAPTIVE[len(shape) - 2](t, out)  # noqa: E731
    y = pool(x)
    R = torch.randn_like(y)
    got = triton_ops.pool_relevance(x, R, "adaptive_avg", y=y)
    assert relative_error(got, reference.norm(pool, [x.double()], R.double())[0]) < 1e-5


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("layouts", ["same", "mixed"])
def test_sum_relevance(n, layouts, poisoned):
    inputs = [channels_last(torch.randn(2, 3, 5, 7, device=DEVICE)) for _ in range(n)]
    if layouts == "mixed":
        inputs[0] = inputs[0].contiguous()
    alpha = [1.0, -0.5, 2.0][:n]
    y = sum(a * t for a, t in zip(alpha, inputs))
    R = torch.randn_like(y)
    got = triton_ops.sum_relevance(inputs, R, y, alpha)
    expected = reference.norm(lambda *t: sum(a * v for a, v in zip(alpha, t)), [t.double() for t in inputs],
                              R.double())
    for g, e in zip(got, expected):
        assert relative_error(g, e) < 1e-5


def test_float16_pooling_and_sum(poisoned):
    x = torch.randn(2, 3, 6, 5, device=DEVICE)
    y = F.avg_pool2d(x, 2)
    R = torch.randn_like(y)
    got = triton_ops.pool_relevance(x.half(), R.half(), "avg", 2, y=y.half())
    assert got.dtype == torch.float16
    assert relative_error(got, reference.norm(lambda t: F.avg_pool2d(t, 2), [x.double()], R.double())[0]) < 5e-3
    a, b = x.half(), x.flip(0).half()
    outs = triton_ops.sum_relevance([a, b], x.half(), a + b)
    assert all(o.dtype == torch.float16 and torch.isfinite(o).all() for o in outs)


def test_bad_arguments_name_the_argument():
    x = torch.randn(1, 2, 5, 5)
    with pytest.raises(ValueError, match="kind"):
        triton_ops.pool_relevance(x, x, "min")
    with pytest.raises(ValueError, match="needs y"):
        triton_ops.pool_relevance(x, x[..., :2, :2], "avg", 2)
    with pytest.raises(ValueError, match="kernel_size"):
        triton_ops.pool_relevance(x, x[..., :2, :2], "max_proportional", None)
    with pytest.raises(ValueError, match="stride"):
        triton_ops.pool_relevance(x, x[..., :2, :2], "max_proportional", 2, (1, 2, 3))
    with pytest.raises(ValueError, match=r"inputs\[1\]"):
        triton_ops.sum_relevance([x, x[:, :1]], x, x)
    with pytest.raises(ValueError, match="alpha"):
        triton_ops.sum_relevance([x, x], x, x, [1.0])
