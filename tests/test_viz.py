"""Heatmap rendering: colours, scaling, PNG round trip."""

import numpy as np
import pytest
import torch
from PIL import Image

from fastlrp import viz


def is_red(px):
    return px[0] >= 250 and px[1] <= 5 and px[2] <= 5


def is_blue(px):
    return px[2] >= 250 and px[0] <= 5 and px[1] <= 5


def is_white(px):
    # bwr's middle entry is (255, 254, 254): the lookup table has an even length.
    return min(px) >= 250


def test_bwr_red_positive_blue_negative_white_zero():
    r = torch.tensor([[1.0, 0.0, -1.0]])
    h = viz.heatmap(r)
    assert h.shape == (1, 3, 3) and h.dtype == np.uint8
    assert is_red(h[0, 0]) and is_white(h[0, 1]) and is_blue(h[0, 2])


def test_symmetric_scaling_uses_max_abs():
    # -1 is half of max |R| = 2: a half-strength blue, not full blue.
    h = viz.heatmap(np.array([[2.0, -1.0, 0.0]]))
    assert is_red(h[0, 0]) and is_white(h[0, 2])
    half_blue = h[0, 1].astype(int)
    assert half_blue[2] >= 250 and 100 <= half_blue[0] <= 160 and 100 <= half_blue[1] <= 160


def test_channels_are_summed():
    r = torch.zeros(3, 2, 2)
    r[0, 0, 0], r[1, 0, 0] = 1.0, -1.0  # cancels: white
    r[:, 1, 1] = 1.0  # adds up: the maximum, red
    h = viz.heatmap(r)
    assert is_white(h[0, 0]) and is_red(h[1, 1])


def test_all_zero_is_white_and_finite():
    h = viz.heatmap(torch.zeros(4, 5))
    assert all(is_white(px) for px in h.reshape(-1, 3))


def test_percentile_clips_outliers():
    r = np.ones((10, 10))
    r[0, 0] = 1000.0  # without clipping everything else would be near-white
    assert is_white(viz.heatmap(r)[5, 5])
    assert is_red(viz.heatmap(r, percentile=50)[5, 5])


def test_non_symmetric_stretches_min_to_max():
    h = viz.heatmap(np.array([[5.0, 7.0, 9.0]]), symmetric=False)
    assert is_blue(h[0, 0]) and is_red(h[0, 2]) and is_white(h[0, 1])


def test_other_colormap():
    h = viz.heatmap(np.array([[0.0, 1.0]]), cmap="gray", symmetric=False)
    assert tuple(h[0, 0]) == (0, 0, 0) and tuple(h[0, 1]) == (255, 255, 255)


def test_bad_shape_raises():
    with pytest.raises(ValueError, match="shape"):
        viz.heatmap(torch.zeros(1, 3, 4, 4))


def test_image_to_uint8_channels_first():
    img = torch.zeros(3, 2, 4)
    img[0] = 1.0
    a = viz.image_to_uint8(img)
    assert a.shape == (2, 4, 3) and a.dtype == np.uint8
    assert tuple(a[0, 0]) == (255, 0, 0)


def test_overlay_blends():
    image = np.zeros((2, 2, 3), np.uint8)
    heat = np.full((2, 2, 3), 200, np.uint8)
    assert (viz.overlay(image, heat, alpha=0.0) == 0).all()
    assert (viz.overlay(image, heat, alpha=1.0) == 200).all()
    assert (viz.overlay(image, heat, alpha=0.5) == 100).all()
    with pytest.raises(ValueError):
        viz.overlay(image, heat[:1])


def test_upscale_nearest():
    a = np.arange(4, dtype=np.uint8).reshape(2, 2)
    assert viz.upscale(a, 2).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]


def test_save_png_round_trip(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    path = viz.save_png(tmp_path / "x.png", a)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (7, 5)
        assert (np.asarray(im.convert("RGB")) == a).all()
    with pytest.raises(TypeError):
        viz.save_png(tmp_path / "y.png", a.astype(np.float32))
