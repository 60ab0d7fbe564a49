"""LIME and KernelSHAP: recovery of a linear model's weights, exact Shapley values by
enumeration, feature groups and superpixels."""

import itertools
import math
import sys

import pytest
import torch
from torch import nn

import fastlrp
from fastlrp.methods import LIME, KernelSHAP
from fastlrp.methods.surrogates import grid_segments
from methods_models import linear_model


def test_lime_recovers_a_linear_models_weights():
    model = linear_model(n_features=6)
    x = torch.ones(2, 6, dtype=torch.float64)          # contributions w * x = w
    result = LIME(model, n_samples=300, ridge=1e-9, seed=0).explain(x, 1)
    w = model.weight[1].detach()
    for weights in result.feature_weights:
        torch.testing.assert_close(weights, w)
    torch.testing.assert_close(result.relevance, w.expand(2, 6))
    torch.testing.assert_close(result.intercept, model.bias[1].detach().expand(2))


def test_kernel_shap_recovers_a_linear_models_contributions_when_sampling():
    model = linear_model(n_features=12)               # 2^12 - 2 coalitions > budget: sampled
    x = torch.randn(3, 12, dtype=torch.float64)
    baseline = torch.randn(12, dtype=torch.float64)
    method = KernelSHAP(model, n_samples=200, baseline=baseline, seed=0, batch_size=50)
    assert not method._enumerates(12)
    result = method.explain(x, 0)
    torch.testing.assert_close(result.relevance, model.weight[0].detach() * (x - baseline))


def _exact_shapley(value, n_features):
    phi = torch.zeros(n_features, dtype=torch.float64)
    for i in range(n_features):
        others = [j for j in range(n_features) if j != i]
        for size in range(n_features):
            for subset in itertools.combinations(others, size):
                weight = math.factorial(size) * math.factorial(n_features - size - 1) / math.factorial(n_features)
                phi[i] += weight * (value(set(subset) | {i}) - value(set(subset)))
    return phi


def test_kernel_shap_equals_exact_shapley_values_by_enumeration():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2)).double().eval()
    x = torch.randn(2, 5, dtype=torch.float64)
    baseline = 0.25
    result = KernelSHAP(model, n_samples=64, baseline=baseline).explain(x, 1)   # 2^5 - 2 = 30 <= 64
    for i in range(2):
        def value(coalition):
            point = torch.full((1, 5), baseline, dtype=torch.float64)
            for j in coalition:
                point[0, j] = x[i, j]
            return model(point)[0, 1].item()
        torch.testing.assert_close(result.feature_weights[i], _exact_shapley(value, 5), rtol=1e-9, atol=1e-9)


def test_feature_groups_share_one_weight():
    model = linear_model(n_features=6)
    x = torch.randn(2, 6, dtype=torch.float64)
    groups = torch.tensor([0, 0, 1, 1, 1, 2])
    contributions = model.weight[2].detach() * x
    expected = torch.stack([contributions[:, :2].sum(1), contributions[:, 2:5].sum(1), contributions[:, 5]], 1)
    shap = KernelSHAP(model, segments=groups).explain(x, 2)
    torch.testing.assert_close(torch.stack(shap.feature_weights), expected)
    torch.testing.assert_close(shap.relevance, expected[:, groups])
    lime = fastlrp.attribute(model, x, 2, method="lime", segments=groups, ridge=1e-9, n_samples=100, seed=1)
    torch.testing.assert_close(lime, expected[:, groups])


class _PixelSum(nn.Module):
    def forward(self, x):
        return torch.stack([x.sum((1, 2, 3)), -x.sum((1, 2, 3))], 1)


def test_superpixels_on_images():
    pytest.importorskip("skimage")
    x = torch.zeros(2, 3, 16, 16)
    x[:, 0, :8] = 1.0                                  # two flat regions: SLIC separates them
    x[:, 2, 8:] = 1.0
    result = KernelSHAP(_PixelSum().eval(), n_segments=4, compactness=1.0).explain(x, 0)
    labels = result.segments[0]
    assert labels.shape == (16, 16) and int(labels.max()) >= 1
    # constant within a superpixel and across channels; Shapley values of a sum add up exactly
    for label in labels.unique():
        values = result.relevance[0][:, labels == label]
        assert torch.allclose(values, values.flatten()[0])
    totals = torch.stack([weights.sum() for weights in result.feature_weights])
    torch.testing.assert_close(totals, x.sum((1, 2, 3)))
    lime = LIME(_PixelSum().eval(), n_segments=4, compactness=1.0, n_samples=64, seed=0)(x, 0)
    assert lime.shape == x.shape


def _disc_image(size=96, radius=26, seed=0):
    """A bright disc on a dark background with Gaussian noise, in ImageNet-like normalised units
    (not [0, 1]: the segmentation must work on the image's own value range)."""
    gen = torch.Generator().manual_seed(seed)
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    inside = (rows - 0.45 * size) ** 2 + (cols - 0.55 * size) ** 2 <= radius ** 2
    image = torch.where(inside, 0.85, 0.15).expand(3, size, size).clone()
    image = image + 0.05 * torch.randn(3, size, size, generator=gen)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return ((image - mean[:, None, None]) / std[:, None, None]).unsqueeze(0), inside


def _straddling(labels, inside):
    """Per superpixel, the fraction of it on the smaller side of the disc's boundary."""
    fractions = []
    for label in labels.unique():
        members = labels == label
        share = inside[members].double().mean().item()
        fractions.append(min(share, 1 - share))
    return torch.tensor(fractions)


@pytest.mark.parametrize("method", ["lime", "kernel_shap"])
def test_default_superpixels_follow_an_object_boundary(method):
    pytest.importorskip("skimage")
    x, inside = _disc_image()
    options = {"n_samples": 16, "seed": 0}
    result = fastlrp.methods.get(method, _PixelSum().eval(), **options).explain(x, 0)
    labels = result.segments[0].cpu()
    assert 30 <= int(labels.max()) + 1 <= 80                     # about n_segments = 50
    straddling = _straddling(labels, inside)
    assert straddling.max() < 0.1, f"a superpixel straddles the disc's edge: {straddling.max():.2f}"
    # the regular grid of the same size does straddle it (what the test tells apart)
    grid = _straddling(grid_segments((96, 96), 50), inside)
    assert grid.max() > 0.25


def test_quickshift_superpixels_follow_an_object_boundary():
    pytest.importorskip("skimage")
    x, inside = _disc_image()
    result = LIME(_PixelSum().eval(), segments="quickshift", n_samples=16, seed=0).explain(x, 0)
    labels = result.segments[0].cpu()
    assert int(labels.max()) >= 2
    assert _straddling(labels, inside).max() < 0.1


def test_slic_that_merges_everything_is_run_again_with_more_compactness(monkeypatch):
    pytest.importorskip("skimage")
    from fastlrp.methods import surrogates
    calls = []
    real = surrogates.slic_segments

    def merging_slic(image, n_segments, compactness):
        calls.append(compactness)   # as SLIC may do on a small noisy image at low compactness
        labels = real(image, n_segments, compactness)
        return torch.zeros_like(labels) if compactness < 1 else labels

    monkeypatch.setattr(surrogates, "slic_segments", merging_slic)
    result = KernelSHAP(_PixelSum().eval(), n_samples=8, n_segments=4, seed=0).explain(torch.randn(1, 3, 8, 8), 0)
    assert calls == [0.3, 3.0] and int(result.segments[0].max()) >= 1


def test_grid_segments():
    labels = grid_segments((6, 9), 6)
    assert int(labels.max()) + 1 == 6
    assert torch.equal(labels[:3, :3], torch.zeros(3, 3, dtype=labels.dtype))
    assert set(torch.bincount(labels.flatten()).tolist()) == {9}
    assert int(grid_segments((10, 10, 10), 8).max()) + 1 == 8
    assert int(grid_segments((40,), 5).max()) + 1 == 5


def test_without_scikit_image_superpixels_fall_back_to_a_grid(monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage", None)
    monkeypatch.setitem(sys.modules, "skimage.segmentation", None)
    x = torch.rand(1, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"regular grid.*pip install 'fastlrp\[methods\]'"):
        result = LIME(_PixelSum().eval(), n_samples=4, n_segments=4).explain(x, 0)
    assert torch.equal(result.segments[0], grid_segments((8, 8), 4))
    # asked for by name, quickshift needs scikit-image and says how to get it
    with pytest.raises(ImportError, match=r"fastlrp\[methods\]"):
        LIME(_PixelSum().eval(), segments="quickshift", n_samples=4)(x, 0)


def test_segments_by_name_are_checked():
    with pytest.raises(ValueError, match="segments must be one of"):
        LIME(_PixelSum().eval(), segments="felzenszwalb")
    with pytest.raises(ValueError, match="needs spatial inputs"):
        LIME(linear_model(), segments="grid", n_samples=4)(torch.randn(1, 6, dtype=torch.float64), 0)
