"""Issue 16's core defects, each pinned: strided layouts and bound shapes on the native backend,
pooling arguments the kernels cannot take, vectorized pooling tables, non-finite inputs, meta tensors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastlrp
from fastlrp import ops
from fastlrp.ops import lrp_ops

needs_native = pytest.mark.skipif(not ops.native_supports(torch.device("cpu"), torch.float64),
                                  reason="fastlrp._C is not built")


class TransposingNet(nn.Module):
    """Transposes and slices inside, before a convolution and before a residual sum."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.conv1(x.transpose(2, 3)))
        h = h[:, :, ::2, :] + torch.relu(self.conv2(h))[:, :, ::2, :]
        return self.fc(self.pool(h.transpose(2, 3)).mean((2, 3)))


def both(model, x, composite="epsilon_gamma_box", **options):
    options = {"low": -3.0, "high": 3.0, **options} if composite == "epsilon_gamma_box" else options
    ref = fastlrp.LRP(model, composite, backend="reference", **options)(x, 1)
    nat = fastlrp.LRP(model, composite, backend="native", **options)(x, 1)
    return ref, nat


@needs_native
@pytest.mark.parametrize("layout", ["transposed", "strided", "channels_last", "internal"])
def test_native_takes_any_layout(layout):
    torch.manual_seed(0)
    model = TransposingNet().double().eval() if layout == "internal" else nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(4, 4, 3), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double().eval()
    base = torch.randn(2, 3, 12, 10, dtype=torch.float64)
    x = {"transposed": base.transpose(2, 3), "strided": torch.randn(2, 3, 24, 20, dtype=torch.float64)[..., ::2, ::2],
         "channels_last": base.contiguous(memory_format=torch.channels_last), "internal": base}[layout]
    ref, nat = both(model, x)
    torch.testing.assert_close(nat, ref, rtol=1e-10, atol=1e-12)


@needs_native
@pytest.mark.parametrize("shape", [(3, 1, 10), (1, 12, 1), (10,), (3, 12, 10), (3,)])
def test_zbox_bounds_of_every_documented_shape(shape):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2)).double().eval()
    x = torch.randn(2, 3, 12, 10, dtype=torch.float64)
    low = -2.0 - torch.rand(shape, dtype=torch.float64)
    ref, nat = both(model, x, low=low, high=-low)
    torch.testing.assert_close(nat, ref, rtol=1e-10, atol=1e-12)


def _window_tables_loop(in_sizes, out_sizes, kernel, stride, padding, adaptive, count_include_pad):
    """The tables written out one window and one input at a time (the original formulation)."""
    longest = max(max(in_sizes), max(out_sizes))
    index = torch.zeros(3, 4, longest, dtype=torch.int64)
    scale = torch.ones(3, longest, dtype=torch.float64)
    for d in range(3):
        n_in, n_out = in_sizes[d], out_sizes[d]
        for o in range(n_out):
            if adaptive:
                lo, hi = (o * n_in) // n_out, -((-(o + 1) * n_in) // n_out)
                padded = hi - lo
            else:
                lo = o * stride[d] - padding[d]
                hi = lo + kernel[d]
                padded = min(hi, n_in + padding[d]) - lo
                lo, hi = max(lo, 0), min(hi, n_in)
            index[d, 0, o], index[d, 1, o] = lo, hi
            scale[d, o] = 1.0 / (padded if count_include_pad else max(hi - lo, 1))
        for i in range(n_in):
            covering = [o for o in range(n_out) if index[d, 0, o] <= i < index[d, 1, o]]
            index[d, 2, i], index[d, 3, i] = (covering[0], covering[-1] + 1) if covering else (0, 0)
    return index, scale


@pytest.mark.parametrize("case", range(40))
def test_vectorized_pool_tables_equal_the_loop(case):
    g = torch.Generator().manual_seed(case)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=g))  # noqa: E731
    adaptive = case % 4 == 0
    kernel = tuple(r(1, 5) for _ in range(3))
    stride = tuple(r(1, 4) for _ in range(3))
    padding = tuple(r(0, k // 2) for k in kernel)
    in_sizes = tuple(r(max(k - 2 * p, 1), 17) for k, p in zip(kernel, padding))
    ceil = bool(case % 3 == 0)
    if adaptive:
        out_sizes = tuple(r(1, 9) for _ in range(3))
    else:
        out_sizes = tuple(lrp_ops._pooled_size(n, k, s, p, ceil) for n, k, s, p in zip(in_sizes, kernel, stride, padding))
    for count_include_pad in (True, False):
        lrp_ops._window_tables.cache_clear()
        got = lrp_ops._window_tables(in_sizes, out_sizes, kernel, stride, padding, adaptive, count_include_pad, "cpu")
        expected = _window_tables_loop(in_sizes, out_sizes, kernel, stride, padding, adaptive, count_include_pad)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@needs_native
def test_pool_arguments_the_kernels_cannot_take_are_refused():
    x = torch.randn(1, 2, 8, 8)
    r = torch.randn(1, 2, 4, 4)
    y = F.avg_pool2d(x, 2)
    with pytest.raises(ValueError, match="relevance has spatial size"):
        ops.pool_relevance(x, torch.randn(1, 2, 3, 3), "avg", 2, y=y[..., :3, :3])
    with pytest.raises(ValueError, match="must be >= 1"):
        ops.pool_relevance(x, r, "max_proportional", 2, stride=0)
    with pytest.raises(ValueError, match="must be >= 1"):
        ops.pool_relevance(x, r, "max_proportional", 0)
    with pytest.raises(ValueError, match="at most half"):
        ops.pool_relevance(x, r, "max_proportional", 2, padding=2)
    with pytest.raises(ValueError, match=r"x must be \(N, C, \.\.\.\)"):
        ops.combine(torch.randn(5), torch.randn(5), [0])
    # ceil_mode: the extra window is accepted
    xc = torch.randn(1, 2, 7, 7)
    yc = F.avg_pool2d(xc, 2, ceil_mode=True)
    out = ops.pool_relevance(xc, torch.randn_like(yc), "avg", 2, ceil_mode=True, y=yc)
    assert out.shape == xc.shape and torch.isfinite(out).all()


def test_non_finite_inputs_are_named_or_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    x = torch.randn(4, 3, 6, 6)
    x[2, 0, 1, 1] = float("nan")
    x[3, 1, 0, 0] = float("inf")
    with pytest.warns(UserWarning, match=r"input samples \[2, 3\] contain NaN or Inf"):
        fastlrp.LRP(model)(x, 0)
    with pytest.raises(ValueError, match=r"samples \[2, 3\]"):
        fastlrp.LRP(model, nonfinite="raise")(x, 0)
    with pytest.raises(ValueError, match="nonfinite must be"):
        fastlrp.LRP(model, nonfinite="ignore")


def test_meta_tensors_give_shapes_without_values():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2)).eval().to("meta")
    relevance = fastlrp.LRP(model, backend="reference")(torch.empty(2, 3, 8, 8, device="meta"), 1)
    assert relevance.shape == (2, 3, 8, 8) and relevance.device.type == "meta"


@needs_native
@pytest.mark.parametrize("composite", ["epsilon_plus", "epsilon_gamma_box"])
def test_weight_cache_is_bounded_and_changes_nothing(composite):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).double().eval()
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    options = {"low": -3.0, "high": 3.0} if composite == "epsilon_gamma_box" else {}
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    results = {}
    for multiple in (None, 0, 0.5, 1.0):
        explainer = fastlrp.LRP(model, composite, backend="native", weight_cache=multiple, **options)
        results[multiple] = [explainer(x, 1) for _ in range(2)]
        used = explainer._affine[0].budget.used
        if multiple is not None:
            assert used <= multiple * model_bytes
    assert explainer._affine[0].budget.used > 0  # 1.0 keeps something
    for multiple, runs in results.items():
        for r in runs:
            torch.testing.assert_close(r, results[None][0], rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="weight_cache"):
        fastlrp.LRP(model, weight_cache=-1)


def test_a_batch_that_runs_out_of_memory_is_split(monkeypatch):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).double().eval()
    x = torch.randn(7, 3, 8, 8, dtype=torch.float64)
    explainer = fastlrp.LRP(model)
    expected = explainer.explain(x, torch.arange(7) % 3, layers=["0"])
    whole = explainer._explain_batch
    sizes = []

    def limited(x, target, layers):
        sizes.append(x.shape[0])
        if x.shape[0] > 2:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 GB")
        return whole(x, target, layers)
    monkeypatch.setattr(explainer, "_explain_batch", limited)
    with pytest.warns(UserWarning, match="parts of 4"):
        got = explainer.explain(x, torch.arange(7) % 3, layers=["0"])
    assert sizes == [7, 4, 2, 2, 3, 2, 1]
    torch.testing.assert_close(got.relevance, expected.relevance, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.output, expected.output)
    torch.testing.assert_close(got.layers["0"], expected.layers["0"], rtol=1e-10, atol=1e-12)
    monkeypatch.setattr(explainer, "_explain_batch", lambda *a: (_ for _ in ()).throw(ValueError("other")))
    with pytest.raises(ValueError, match="other"):
        explainer.explain(x, 0)
