"""Writing a backward's result into the gradient it received (backends/base.reusable, the ops'
``overwrite``): only where nothing else holds that gradient, with the same values as a fresh output."""

import pytest
import torch
from torch import nn

import fastlrp
from fastlrp import ops
from fastlrp.backends import attnlrp, base, native
from fastlrp.ops import lrp_ops
from test_transformers import rand_, tiny_vit

needs_kernels = pytest.mark.skipif(not ops.native_supports(torch.device("cpu"), torch.float32),
                                   reason="fastlrp._C is not built (source checkout)")


class Probe(torch.autograd.Function):
    """Identity; its backward records whether the gradient it gets is reusable."""

    seen: list = []

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        Probe.seen.append(base.reusable(grad))
        return grad


def verdict(build_loss):
    Probe.seen.clear()
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    build_loss(x).backward()
    return Probe.seen


def test_only_a_gradient_nothing_else_holds_is_reusable():
    kept = []
    v = torch.randn(2, 3, 5, 6)
    own = lambda x: (Probe.apply(x * 1.0) * torch.randn(2, 3, 4, 5)).sum()  # noqa: E731
    assert verdict(own) == [True]
    # a view covering all of a gradient of its own: a batched matmul's, a reshape's
    assert verdict(lambda x: (Probe.apply(x * 1.0) @ v).sum()) == [True]
    assert verdict(lambda x: (Probe.apply(x * 1.0).reshape(6, 20) * torch.randn(6, 20)).sum()) == [True]

    def hooked(keep):
        def loss(x):
            y = Probe.apply(x * 1.0)
            y.register_hook(lambda g: kept.append(keep(g)))
            return (y * torch.randn(2, 3, 4, 5)).sum()
        return loss
    assert verdict(hooked(lambda g: g)) == [False]  # a hook kept the tensor object
    assert verdict(hooked(lambda g: g.detach())) == [False]  # a tap kept its memory

    def base_hooked(keep):
        def loss(x):
            r = Probe.apply(x * 1.0).reshape(6, 20)
            r.register_hook(lambda g: kept.append(keep(g)))
            return (r * torch.randn(6, 20)).sum()
        return loss
    assert verdict(base_hooked(lambda g: g)) == [False]  # the view's base kept
    assert verdict(base_hooked(lambda g: g.detach())) == [False]
    assert verdict(lambda x: Probe.apply(x * 1.0).sum()) == [False]  # expanded: memory of one element
    # the caller's own grad_outputs
    Probe.seen.clear()
    x = torch.randn(3, requires_grad=True)
    given = torch.randn(3)
    torch.autograd.grad(Probe.apply(x * 1.0), x, given)
    assert Probe.seen == [False]


def test_shared_gradient_of_an_addition_is_not_reusable():
    def loss(x):
        y = x * 1.0
        return (Probe.apply(y) + Probe.apply(y * 2.0)).sum() * 3.0
    assert verdict(loss) == [False, False]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,channels_last", [((3, 7, 13), False), ((2, 5, 3, 7), False), ((2, 5, 3, 7), True),
                                                 ((7, 13), False)])
def test_ops_write_into_what_is_given_up(dtype, shape, channels_last):
    torch.manual_seed(0)
    fmt = dict(memory_format=torch.channels_last) if channels_last else {}

    def fresh(*s):
        return torch.randn(*s, dtype=dtype).contiguous(**fmt) if len(s) == 4 else torch.randn(*s, dtype=dtype)

    relevance, z, x, y = (fresh(*shape) for _ in range(4))
    cases = [
        (lambda r, **o: ops.stabilize_divide(r, [z], [0.5], y=y, epsilon=0.1, **o), relevance),
        (lambda r, **o: ops.sum_relevance([x], r, y, [0.5], epsilon=0.1, **o)[0], relevance),
        (lambda g, **o: ops.combine(x, g, [ops.POSITIVE], **o), relevance),
        (lambda g, **o: ops.combine(x, [g, z], [ops.POSITIVE, ops.NEGATIVE], **o), relevance),
    ]
    if not channels_last:  # the softmax rule's rows are contiguous
        s = torch.softmax(x, -1)
        cases += [(lambda g, **o: ops.softmax_relevance(x, s, None, g, **o), relevance),
                  (lambda r, **o: ops.softmax_relevance(x, s, r, z, **o), relevance)]
    for op, given in cases:
        expected = op(given.clone())
        target = given.clone()
        got = op(target, overwrite=target)
        assert got is target  # written in place ...
        assert torch.equal(got, expected)  # ... with every element the fresh output has


@needs_kernels
def test_ops_refuse_to_overwrite_other_tensors_and_keep_layouts():
    r, z, x = (torch.randn(2, 3, 4, 5) for _ in range(3))
    with pytest.raises(ValueError, match="overwrite"):
        ops.stabilize_divide(r, [z], overwrite=z)
    with pytest.raises(ValueError, match="overwrite"):
        ops.combine(x, [r, z], [ops.POSITIVE, ops.NEGATIVE], overwrite=z)  # read after the first sweep
    # another layout than the result's, or two groups: a new tensor, the given one untouched
    strided = torch.randn(2, 5, 4, 3).transpose(1, 3)
    kept = strided.clone()
    out = ops.stabilize_divide(strided, [z], overwrite=strided)
    assert out is not strided and torch.equal(strided, kept)
    out = ops.stabilize_divide(r, [z, z], overwrite=r)
    assert out is not r and out.shape[1] == 6
    # the result would alias x, which every sweep reads
    assert ops.combine(x, [x, z], [ops.POSITIVE, ops.NEGATIVE], overwrite=x) is not x


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


@needs_kernels
@pytest.mark.parametrize("name", ["cnn", "vit"])
def test_reuse_changes_no_bit_of_the_relevance(name, monkeypatch):
    """The same relevance, bit for bit, with every backward writing into fresh tensors; and some
    backward did reuse its gradient."""
    torch.manual_seed(1)
    model, x, composite = ((_cnn(), torch.randn(2, 3, 9, 11), "epsilon_plus") if name == "cnn" else
                           (rand_(tiny_vit()), torch.randn(2, 3, 16, 16, dtype=torch.float64), "attnlrp"))
    explainer = fastlrp.LRP(model, composite, backend="native")
    written = []
    overwritable = lrp_ops._overwritable
    monkeypatch.setattr(lrp_ops, "_overwritable", lambda *a, **k: written.append(overwritable(*a, **k)) or written[-1])
    reused = explainer(x, 1)
    assert any(t is not None for t in written)
    tapped = explainer.explain(x, 1, layers=explainer.layer_names)  # taps keep their tensors
    for module in (attnlrp, native):
        monkeypatch.setattr(module, "reusable", lambda grad: False)
    fresh = explainer(x, 1)
    assert torch.equal(reused, fresh)
    for site, r in explainer.explain(x, 1, layers=explainer.layer_names).layers.items():
        assert torch.equal(tapped.layers[site], r), site
