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
    h = viz.heatmap(np.array([[2.0, -1.0, 0.0]]), percentile=None)
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
    assert is_white(viz.heatmap(r, percentile=None)[5, 5])
    assert is_red(viz.heatmap(r, percentile=50)[5, 5])


def test_default_scale_is_the_99_5th_percentile_not_the_maximum():
    # 1000 pixels: four outliers at 100 sit above the 99.5th percentile, the rest at 1 below it.
    r = np.ones((40, 25))
    r.flat[:4] = 100.0
    assert viz.DEFAULT_PERCENTILE == 99.5
    assert viz.relevance_scale(r) == pytest.approx(np.percentile(np.abs(r), 99.5))
    assert viz.relevance_scale(r, None) == 100.0
    assert viz.relevance_scale(np.full((3, 3), np.nan)) == 0.0
    by_default = viz.heatmap(r)[20, 10].astype(int)
    by_maximum = viz.heatmap(r, percentile=None)[20, 10].astype(int)
    assert by_maximum.min() > 245  # washed out: 1/100 of full colour
    assert by_default[1] < by_maximum[1] - 10  # visibly red under the percentile scale
    assert (viz.heatmap(r) == viz.heatmap(r, percentile=99.5)).all()


def test_annotate_keeps_the_picture_and_adds_title_and_colour_bar():
    picture = viz.heatmap(np.linspace(-1, 1, 20 * 24).reshape(20, 24), percentile=None)
    plain = viz.annotate(picture, "cat (p=0.90)", min_width=100)
    labelled = viz.annotate(picture, ["cat (p=0.90)", "logit 3.2"], scale=1.0, target="cat", min_width=100)
    assert plain.shape[1] == labelled.shape[1] == 100 and labelled.shape[0] > plain.shape[0] > 20
    # the picture itself, pixel for pixel, centred under the titles
    rows = np.nonzero((labelled == picture[0, 0]).all(-1).any(1))[0]
    top = rows[0]
    left = (100 - 24) // 2
    assert (labelled[top:top + 20, left:left + 24] == picture).all()
    assert (labelled[:top] < 100).any()  # dark title text above
    bar = labelled[top + 24:]
    strip = bar[np.nonzero((bar[..., 0] < 50) & (bar[..., 2] > 200))[0][0]]  # a row through the blue end
    assert strip[6, 2] > 200 and strip[6, 0] < 50 and strip[-7, 0] > 200 and strip[-7, 2] < 50  # blue left, red right
    assert "red: evidence for cat, blue: against" == viz.colour_meaning("bwr", "cat")
    assert "right end: evidence for" in viz.colour_meaning("viridis")


@pytest.mark.parametrize("mode", ["heatmap", "overlay", "side_by_side"])
@pytest.mark.parametrize("sign", ["all", "positive", "negative", "absolute"])
def test_visualize_modes_and_signs(mode, sign):
    rng = np.random.default_rng(0)
    relevance = torch.from_numpy(rng.normal(size=(3, 12, 10)))
    image = rng.random((3, 12, 10))
    figure = viz.visualize(relevance, image, mode=mode, sign=sign, title="cross (p=0.93)", target="cross")
    panels = [ax for ax in figure.axes if ax.images]
    assert len(panels) == (2 if mode == "side_by_side" else 1)
    shown = panels[-1].images[0].get_array()
    assert shown.shape[:2] == (12, 10)
    colour_bar = [ax for ax in figure.axes if ax not in panels]
    assert len(colour_bar) == 1
    label = colour_bar[0].get_ylabel()
    assert "cross" in label and "99.5th percentile" in label
    low, high = colour_bar[0].get_ylim()
    summed = relevance.sum(0).numpy()
    shown_values = {"all": summed, "positive": summed.clip(0), "negative": (-summed).clip(0),
                    "absolute": np.abs(summed)}[sign]
    scale = np.percentile(np.abs(shown_values), 99.5)
    assert high == pytest.approx(scale) and low == pytest.approx(-scale if sign == "all" else 0.0)
    if sign == "all":
        assert label.startswith("red: evidence for cross, blue: against")
    if sign == "positive" and mode == "heatmap":  # negative relevance is white in the positive view
        negative = summed < 0
        assert (shown[negative] >= 250).all()
    assert figure.get_suptitle() == "cross (p=0.93)"


def test_visualize_errors_name_the_argument():
    r = np.zeros((4, 4))
    with pytest.raises(ValueError, match="mode"):
        viz.visualize(r, mode="blended")
    with pytest.raises(ValueError, match="sign"):
        viz.visualize(r, mode="heatmap", sign="both")
    with pytest.raises(ValueError, match="image="):
        viz.visualize(r, mode="overlay")
    with pytest.raises(ValueError, match="differ in size"):
        viz.visualize(r, np.zeros((5, 4, 3)), mode="side_by_side")


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
