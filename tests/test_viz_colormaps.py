"""Colour maps defined from their stops, normalization options, grids, colour bars."""

import numpy as np
import pytest
import torch

import fastlrp
from fastlrp import viz


def colour(cmap, value):
    return tuple(int(c) for c in viz.colormap(cmap)(value, bytes=True)[:3])


@pytest.mark.parametrize("name, low, middle, high", [
    ("bwr", (0, 0, 255), (255, 255, 255), (255, 0, 0)),
    ("coldnhot", (0, 255, 255), (0, 0, 0), (255, 255, 255)),
    ("seismic", (0, 0, 208), (208, 208, 208), (208, 0, 0)),
    ("gray", (0, 0, 0), (128, 128, 128), (255, 255, 255)),
    ("wred", (255, 255, 255), (255, 128, 128), (255, 0, 0)),
    ("wblue", (255, 255, 255), (128, 128, 255), (0, 0, 255)),
    ("cold", (0, 0, 0), (0, 0, 255), (0, 255, 255)),
    ("red", (0, 0, 0), (128, 0, 0), (255, 0, 0)),
])
def test_colormap_stops(name, low, middle, high):
    assert colour(name, 0.0) == low and colour(name, 1.0) == high
    assert np.abs(np.subtract(colour(name, 0.5), middle)).max() <= 4  # 256 entries: 0.5 is between two


def test_hot_passes_red_and_yellow():
    assert colour("hot", 1 / 3) == (255, 0, 0) and colour("hot", 2 / 3) == (255, 255, 0)


def test_every_named_map_builds_and_diverging_maps_are_symmetric_in_brightness():
    for name in viz.COLORMAPS:
        assert viz.colorbar(name, 64, 2).shape == (2, 64, 3)
    for name in viz.DIVERGING:
        bar = viz.colorbar(name, 257, 1)[0].astype(int)
        assert abs(bar[0].sum() - bar[-1].sum()) <= 255, name  # neither side of zero looks stronger


def test_unknown_colormap_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown colour map 'nope'"):
        viz.heatmap(np.zeros((2, 2)), cmap="nope")
    assert viz.heatmap(np.eye(3), cmap="viridis").shape == (3, 3, 3)  # matplotlib's names still work


def test_fastlrp_heatmap_is_exported_and_returns_uint8_hw3():
    h = fastlrp.heatmap(torch.randn(3, 7, 5), cmap="coldnhot", percentile=99)
    assert h.shape == (7, 5, 3) and h.dtype == np.uint8


def test_normalize_ranges():
    r = np.array([[-2.0, 0.0, 1.0]])
    assert viz.normalize(r).tolist() == [[0.0, 0.5, 0.75]]
    assert viz.normalize(r, symmetric=False).tolist() == [[0.0, 2 / 3, 1.0]]
    assert viz.normalize(r, scale=1.0).tolist() == [[0.0, 0.5, 1.0]]  # clipped at the shared scale
    assert viz.normalize(np.full((2, 2), 3.0), symmetric=False).tolist() == [[0.5, 0.5], [0.5, 0.5]]
    values = viz.normalize(np.linspace(-100, 100, 1001), symmetric=False, percentile=90)
    assert values.min() == 0.0 and values.max() == 1.0 and (values == 1.0).sum() > 50
    with pytest.raises(ValueError, match="percentile"):
        viz.normalize(r, percentile=0)


def test_overlay_alpha_range():
    with pytest.raises(ValueError, match="alpha"):
        viz.overlay(np.zeros((2, 2, 3), np.uint8), np.zeros((2, 2, 3), np.uint8), alpha=1.5)


def test_grid_places_tiles_and_captions():
    red = np.zeros((10, 8, 3), np.uint8)
    red[..., 0] = 255
    blue = np.zeros((6, 8, 3), np.uint8)
    blue[..., 2] = 255
    plain = viz.grid([red, blue, red], columns=2, gap=2)
    assert plain.shape == (10 + 2 + 10, 8 + 2 + 8, 3)
    assert (plain[:10, :8] == red).all() and (plain[:6, 10:] == blue).all()
    assert (plain[6:10, 10:] == 255).all()  # the smaller tile's cell is padded white
    labelled = viz.grid([red, blue], labels=["a", "b"], columns=2, gap=2)
    caption = labelled.shape[0] - 10
    assert caption > 5 and (labelled[:caption] < 128).any()  # dark text above the tiles
    assert (labelled[caption:, :8] == red).all()
    with pytest.raises(ValueError):
        viz.grid([red], labels=["a", "b"])
