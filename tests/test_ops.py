"""The fused kernels (torch.ops.fastlrp.*) against plain-PyTorch formulas and the reference.

Every output is poisoned (NaN) before the kernel writes it, shapes are odd, both memory
layouts and every accepted dtype are covered. CUDA variants carry the gpu marker."""

import pytest
import torch
import torch.nn.functional as F

from fastlrp import ops, reference
from fastlrp.ops import lrp_ops
from fastlrp.reference import stabilize

native = pytest.mark.skipif(not ops.native_supports(torch.device("cpu"), torch.float32),
                            reason="fastlrp._C is not built (source checkout)")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6),
       torch.float16: dict(rtol=2e-2, atol=2e-3), torch.bfloat16: dict(rtol=5e-2, atol=2e-2)}


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Kernel outputs start as NaN, so an element the kernel forgets to write shows."""
    def poisoned(shape, like, **options):
        out = original(shape, like, **options)
        return out.fill_(float("nan"))
    original = lrp_ops._new_output
    monkeypatch.setattr(lrp_ops, "_new_output", poisoned)


def dtypes_for(device):
    return [torch.float32, torch.float64] + ([torch.float16, torch.bfloat16] if device == "cuda" else [])


def layout(t, channels_last):
    if channels_last and t.ndim == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if channels_last and t.ndim == 5:
        return t.contiguous(memory_format=torch.channels_last_3d)
    return t


# (7, 13) and the size-1 spatial shapes: token rows, walked along channels (csrc/cpu channels_inner)
SHAPES = [(1, 1, 1), (3, 7, 13), (2, 5, 3, 7), (1, 3, 2, 5, 3), (7, 13), (6, 11, 1), (4, 9, 1, 1)]


@native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_stabilize_divide(device, shape, channels_last):
    for dtype in dtypes_for(device):
        make = lambda: layout(torch.randn(shape, dtype=dtype, device=device), channels_last)  # noqa: E731
        R, y, z0, z1, z2 = (make() for _ in range(5))
        z1[..., 0] = 0  # sign(0) = +1
        got = ops.stabilize_divide(R, [z0, z1, z2], [2.0, -1.0, 1.0], [ops.MASK_NONE, ops.MASK_POSITIVE,
                                                                         ops.MASK_NEGATIVE], y=y, epsilon=1e-3)
        c = shape[1]
        wide = [t.double() for t in (R, y, z0, z1, z2)]
        R64, y64 = wide[0], wide[1]
        expected = [2.0 * (R64 / stabilize(wide[2], 1e-3)), -1.0 * ((y64 > 0).double() * R64 / stabilize(wide[3], 1e-3)),
                    (y64 < 0).double() * R64 / stabilize(wide[4], 1e-3)]
        for g in range(3):
            torch.testing.assert_close(got.narrow(1, g * c, c).double(), expected[g], **TOL[dtype])


@native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_combine(device, shape, channels_last):
    for dtype in dtypes_for(device):
        x = layout(torch.randn(shape, dtype=dtype, device=device), channels_last)
        k = 5
        g = layout(torch.randn((shape[0], shape[1] * k) + shape[2:], dtype=dtype, device=device), channels_last)
        low = torch.randn((1, shape[1]) + (1,) * (len(shape) - 2), dtype=dtype, device=device)
        high = torch.randn(shape[1:], dtype=dtype, device=device)
        got = ops.combine(x, g, [ops.IDENTITY, ops.POSITIVE, ops.NEGATIVE, ops.TENSOR, ops.TENSOR], [low, high])
        c = shape[1]
        x64, g64 = x.double(), g.double()
        parts = [g64.narrow(1, i * c, c) for i in range(k)]
        expected = (x64 * parts[0] + x64.clamp(min=0) * parts[1] + x64.clamp(max=0) * parts[2]
                    + low.double() * parts[3] + high.double() * parts[4])
        torch.testing.assert_close(got.double(), expected, **TOL[dtype])
        ones = ops.combine(x, g[:, :c], [ops.ONE])
        torch.testing.assert_close(ones.double(), parts[0], **TOL[dtype])


@native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
def test_combine_sign_pair_and_part_list(device, shape):
    """x+ g0 + x- g1 (the one-sweep path of the CPU kernel), and g given as a list of parts in mixed
    layouts (the strided path), against the same formula in float64."""
    for dtype in dtypes_for(device):
        x = torch.randn(shape, dtype=dtype, device=device)
        x.view(-1)[::7] = 0  # zeros take neither part
        g0, g1 = (torch.randn(shape, dtype=dtype, device=device) for _ in range(2))
        expected = x.double().clamp(min=0) * g0.double() + x.double().clamp(max=0) * g1.double()
        stacked = ops.combine(x, torch.cat([g0, g1], 1), [ops.POSITIVE, ops.NEGATIVE])
        torch.testing.assert_close(stacked.double(), expected, **TOL[dtype])
        mixed = [g0, layout(g1, True) if len(shape) in (4, 5) else g1.transpose(0, 1).contiguous().transpose(0, 1)]
        listed = ops.combine(x, mixed, [ops.POSITIVE, ops.NEGATIVE])
        torch.testing.assert_close(listed, stacked, rtol=0, atol=0)
    with pytest.raises(ValueError, match="2 parts for 3 modifiers"):
        ops.combine(x, [g0, g1], [0, 1, 2])
    with pytest.raises(ValueError, match=r"g\[1\] has shape"):
        ops.combine(x, [g0, torch.randn(2, 3, dtype=x.dtype, device=x.device)], [1, 2])


POOL_CASES = [  # (input shape, kernel, stride, padding, ceil_mode, count_include_pad)
    ((2, 3, 13), 3, 2, 1, False, True),
    ((1, 2, 7, 9), 3, 2, 1, True, False),
    ((3, 1, 7, 7), 2, None, 0, False, True),
    ((1, 3, 5, 6, 7), (3, 2, 3), (1, 2, 2), (1, 0, 1), True, True),
    ((2, 2, 1, 13), (1, 3), (1, 3), 0, True, False),
]


@native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", POOL_CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_pooling_against_reference(device, case, channels_last):
    shape, kernel, stride, padding, ceil_mode, include_pad = case
    dims = len(shape) - 2
    avg = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[dims]
    mx = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[dims]
    for dtype in dtypes_for(device):
        x = layout(torch.rand(shape, dtype=dtype, device=device) + 0.1, channels_last)
        x64 = x.double()
        y = avg(x, kernel, stride, padding, ceil_mode, include_pad)
        R = layout(torch.randn_like(y), channels_last)
        got = ops.pool_relevance(x, R, "avg", kernel, stride, padding, ceil_mode, include_pad, y=y)
        window = lambda t: avg(t, kernel, stride, padding, ceil_mode, include_pad)  # noqa: E731
        expected = reference.norm(window, [x64], R.double())[0]
        torch.testing.assert_close(got.double(), expected, **TOL[dtype])

        ym = mx(x, kernel, stride, padding, ceil_mode=ceil_mode)
        Rm = torch.randn_like(ym)
        got = ops.pool_relevance(x, Rm, "max_proportional", kernel, stride, padding, ceil_mode)
        expected = reference.maxpool_proportional(x64, Rm.double(), kernel, kernel if stride is None else stride,
                                                  padding, ceil_mode)
        torch.testing.assert_close(got.double(), expected, **TOL[dtype])


@native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,out", [((2, 3, 13), (5,)), ((1, 2, 7, 9), (3, 4)), ((1, 2, 5, 6, 7), (2, 3, 1)),
                                       ((2, 3, 5, 5), (1, 1))])
def test_adaptive_and_divisor_override(device, shape, out):
    dims = len(shape) - 2
    pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[dims]
    for dtype in dtypes_for(device):
        x = torch.rand(shape, dtype=dtype, device=device)
        y = pool(x, out)
        R = torch.randn_like(y)
        got = ops.pool_relevance(x, R, "adaptive_avg", y=y)
        expected = reference.norm(lambda t: pool(t, out), [x.double()], R.double())[0]
        torch.testing.assert_close(got.double(), expected, **TOL[dtype])
    if dims == 2:
        x = torch.rand(shape, dtype=torch.float64, device=device)
        y = F.avg_pool2d(x, 2, 1, 0, False, True, divisor_override=3)
        R = torch.randn_like(y)
        got = ops.pool_relevance(x, R, "avg", 2, 1, 0, False, True, 3, y=y)
        window = lambda t: F.avg_pool2d(t, 2, 1, 0, False, True, divisor_override=3)  # noqa: E731
        torch.testing.assert_close(got, reference.norm(window, [x], R)[0], **TOL[torch.float64])


@native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [1, 2, 3])
def test_sum_relevance(device, shape, n):
    for dtype in dtypes_for(device):
        xs = [torch.randn(shape, dtype=dtype, device=device) for _ in range(n)]
        alpha = [1.0] * (n - 1) + [0.5]
        y = sum(a * t for a, t in zip(alpha, xs))
        R = torch.randn_like(y)
        got = ops.sum_relevance(xs, R, y, alpha)
        ratio = R.double() / stabilize(y.double())
        for g, t, a in zip(got, xs, alpha):
            torch.testing.assert_close(g.double(), t.double() * (a * ratio), **TOL[dtype])


SOFTMAX_SHAPES = [(1,), (3, 1), (2, 7, 13), (1, 3, 5, 257), (4, 2, 3, 2)]


@native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SOFTMAX_SHAPES)
@pytest.mark.parametrize("given", ["relevance", "gradient", "both"])
def test_softmax_relevance(device, shape, given):
    """The softmax rule's one-pass kernel (rows along the last dim) and its PyTorch path (other dims, and
    transposed inputs along the last) against the reference, with the relevance at s given as relevance,
    as a gradient (standing for s * g), or both; a masked logit (-inf) gets 0."""
    for dtype in dtypes_for(device):
        for dim in {-1, 0, len(shape) - 1}:
            x = torch.randn(shape, dtype=dtype, device=device) * 3
            if x.shape[dim] > 1:  # mask the first logit of every row (a row keeps one finite logit)
                x.select(dim, 0).fill_(float("-inf"))
            s = torch.softmax(x, dim)
            R = torch.randn_like(x) if given != "gradient" else None
            g = torch.randn_like(x) if given != "relevance" else None
            total = (0 if R is None else R.double()) + (0 if g is None else s.double() * g.double())
            expected = reference.softmax_relevance(x.double(), s.double(), total, dim)
            got = ops.softmax_relevance(x, s, R, g, dim)
            assert got.is_contiguous() and got.dtype == dtype
            torch.testing.assert_close(got.double(), expected, **TOL[dtype])
            if x.ndim >= 2:  # non-contiguous inputs, rows still along the last dim
                xt, st = x.transpose(0, 1).contiguous().transpose(0, 1), s.transpose(0, 1).contiguous().transpose(0, 1)
                torch.testing.assert_close(ops.softmax_relevance(xt, st, R, g, dim), got, rtol=0, atol=0)


@native
def test_opcheck_every_op():
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    z = [torch.randn_like(x), torch.randn_like(x)]
    y = torch.randn_like(x)
    torch.library.opcheck(torch.ops.fastlrp.stabilize_divide, (x, z, y, [1.0, 2.0], [1, 2], 1e-6))
    g = list(torch.randn(2, 9, 5, 4, dtype=torch.float64).chunk(3, dim=1))
    torch.library.opcheck(torch.ops.fastlrp.combine, (x, g, [0, 3, 4], [torch.randn(1, 3, 1, 1).expand_as(x).double()]))
    torch.library.opcheck(torch.ops.fastlrp.sum_relevance, ([x, y], [1.0, 1.0], x + y, z[0], 1e-6))
    xp = torch.rand(1, 2, 6, 6, dtype=torch.float64)
    yp = F.avg_pool2d(xp, 2)
    index, scale = lrp_ops._window_tables((1, 6, 6), (1, 3, 3), (1, 2, 2), (1, 2, 2), (0, 0, 0), False, True, "cpu")
    torch.library.opcheck(torch.ops.fastlrp.pool_relevance, (xp, torch.randn_like(yp), yp, False, index, scale, 1.0,
                                                             1e-6))
    s = torch.softmax(x, -1)
    torch.library.opcheck(torch.ops.fastlrp.softmax_relevance, (x, s, y, None, -1))
    torch.library.opcheck(torch.ops.fastlrp.softmax_relevance, (x, s, None, y, 1))


@native
def test_bad_arguments_are_clear_errors():
    x = torch.randn(2, 3, 4)
    with pytest.raises(TypeError, match="relevance must be a floating-point"):
        ops.stabilize_divide(torch.ones(2, 3, 4, dtype=torch.int64), [x])
    with pytest.raises(ValueError, match=r"z\[0\] has shape \(2, 3, 5\)"):
        ops.stabilize_divide(x, [torch.randn(2, 3, 5)])
    with pytest.raises(TypeError, match=r"z\[0\] is torch.float64"):
        ops.stabilize_divide(x, [x.double()])
    with pytest.raises(ValueError, match="a mask needs y"):
        ops.stabilize_divide(x, [x], masks=[1])
    with pytest.raises(ValueError, match="is on meta"):
        ops.stabilize_divide(x, [x.to("meta")])
    with pytest.raises(ValueError, match="g must have shape"):
        ops.combine(x, torch.randn(2, 5, 4), [0, 1])
    with pytest.raises(ValueError, match="1 bound tensors needed"):
        ops.combine(x, torch.randn(2, 3, 4), [4])
    # a layout the kernels cannot read in place is copied, not refused (issue 16, D1)
    xt, g = torch.randn(2, 3, 4, 5).transpose(2, 3), torch.randn(2, 3, 5, 4)
    torch.testing.assert_close(ops.combine(xt, g, [0]), ops.combine(xt.contiguous(), g, [0]))
    with pytest.raises(ValueError, match="kind must be"):
        ops.pool_relevance(x, x, "median", 2)
    with pytest.raises(ValueError, match="needs y"):
        ops.pool_relevance(x, x[..., :2], "avg", 2)
    with pytest.raises(ValueError, match=r"inputs\[1\] has shape"):
        ops.sum_relevance([x, torch.randn(2, 3, 1)], x, x)
    with pytest.raises(ValueError, match="give the relevance at s, its gradient form, or both"):
        ops.softmax_relevance(x, x.softmax(-1))
    with pytest.raises(ValueError, match="dim 3 is out of range"):
        ops.softmax_relevance(x, x.softmax(-1), x, dim=3)
    with pytest.raises(ValueError, match=r"gradient has shape \(2, 3, 5\)"):
        ops.softmax_relevance(x, x.softmax(-1), gradient=torch.randn(2, 3, 5))


@native
def test_native_entry_points_validate_views():
    """_C itself rejects inconsistent views with Python exceptions instead of crashing."""
    from fastlrp._native import _C
    from fastlrp.ops._views import view
    a, b = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="has shape"):
        _C.stabilize_divide(view(a, "relevance"), [view(b, "z[0]")], None, [1.0], [0], [view(a, "out[0]")], 1e-6, 0)
    with pytest.raises(TypeError, match="float32"):
        _C.combine(view(a, "x"), [view(a.double(), "g[0]")], [0], [None], view(a, "out"), 0)
    with pytest.raises(TypeError, match="float32 or float64"):
        h = a.half()
        _C.sum([view(h, "x")], [1.0], view(h, "y"), view(h, "relevance"), [view(h, "out")], 1e-6, 0)
    with pytest.raises(ValueError, match="one entry per group"):
        _C.stabilize_divide(view(a, "relevance"), [], None, [], [], [], 1e-6, 0)
    rows = a.reshape(6, 4)
    with pytest.raises(ValueError, match="needs the relevance at s"):
        _C.softmax_rule(view(rows, "x"), view(rows, "s"), None, None, view(rows, "out"), 0)
    with pytest.raises(ValueError, match="s must have unit stride"):
        _C.softmax_rule(view(rows, "x"), view(a.reshape(4, 6).t(), "s"), view(rows, "r"), None, view(rows, "out"), 0)


def test_fallback_without_kernels_matches(monkeypatch):
    """Where _C has no kernel (here: forced off), the ops compute the same formulas in PyTorch."""
    x, R = torch.randn(2, 3, 5, dtype=torch.float64), torch.randn(2, 3, 5, dtype=torch.float64)
    z = torch.randn_like(x)
    expected = R / stabilize(z)
    monkeypatch.setattr(lrp_ops, "native_supports", lambda device, dtype: False)
    torch.testing.assert_close(ops.stabilize_divide(R, [z]), expected)
    g = torch.randn(2, 6, 5, dtype=torch.float64)
    torch.testing.assert_close(ops.combine(x, g, [1, 2]), x.clamp(min=0) * g[:, :3] + x.clamp(max=0) * g[:, 3:])
    s = x.softmax(-1)
    torch.testing.assert_close(ops.softmax_relevance(x, s, R), reference.softmax_relevance(x, s, R, -1))


@native
def test_plain_eager_calls_skip_the_dispatcher_and_watched_calls_do_not(monkeypatch):
    """Plain eager calls run the op's implementation directly (torch's Python custom-op dispatch cost
    more than the kernel); the profiler, fake tensors and inputs that need a gradient go through the
    registered op, with the same result."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from fastlrp.ops import lrp_ops
    calls = []
    registered = lrp_ops._combine
    monkeypatch.setattr(lrp_ops, "_combine", lambda *a: calls.append(1) or registered(*a))
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    g = torch.randn(2, 6, 4, 5, dtype=torch.float64)
    plain = ops.combine(x, g, [ops.POSITIVE, ops.NEGATIVE])
    assert calls == []
    with torch.profiler.profile() as prof:
        profiled = ops.combine(x, g, [ops.POSITIVE, ops.NEGATIVE])
    assert calls == [1] and any(e.name == "fastlrp::combine" for e in prof.events())
    torch.testing.assert_close(profiled, plain, rtol=0, atol=0)
    with FakeTensorMode() as mode:
        fake = ops.combine(mode.from_tensor(x), mode.from_tensor(g), [ops.POSITIVE, ops.NEGATIVE])
    assert calls == [1, 1] and fake.shape == x.shape
    with torch.no_grad():
        ops.combine(x.requires_grad_(), g, [ops.POSITIVE, ops.NEGATIVE])
    assert calls == [1, 1]  # no gradient can flow: still plain
