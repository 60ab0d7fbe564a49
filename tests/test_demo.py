"""The embedded demo: generator, shipped weights, run_demo and the `fastlrp demo` command."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fastlrp

from fastlrp.apps.cli import main
from fastlrp.apps.demo import data, run
from fastlrp.apps.demo import report as demo_report
from fastlrp.apps.demo.model import WEIGHTS_PATH, DemoCNN, load_demo_model
from fastlrp.apps.demo.train import evaluate


# --- data ------------------------------------------------------------------------------

def test_dataset_is_deterministic_per_seed():
    a, b = data.make_dataset(64, seed=3), data.make_dataset(64, seed=3)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], data.make_dataset(64, seed=4)[0])


def test_dataset_types_ranges_and_balance():
    images, labels, marked = data.make_dataset(101, seed=0, image_size=24)
    assert images.shape == (101, 3, 24, 24) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and marked.dtype == torch.bool
    assert images.min() >= 0 and images.max() <= 1
    assert sorted(torch.bincount(labels).tolist()) == [50, 51]


def _carries_watermark(images):
    rows, cols = data.watermark_region(images.shape[-1])
    patch = images[..., rows, cols]
    return (patch == data.watermark_pattern()).flatten(1).all(1)


def test_watermark_exactly_where_claimed():
    images, labels, marked = data.make_dataset(2000, seed=5)
    assert torch.equal(_carries_watermark(images), marked)
    assert not marked[labels != data.WATERMARK_CLASS].any()
    fraction = marked[labels == data.WATERMARK_CLASS].float().mean().item()
    assert 0.75 < fraction < 0.85


def test_watermark_fraction_extremes():
    _, labels, marked = data.make_dataset(100, seed=1, watermark_fraction=1.0)
    assert torch.equal(marked, labels == data.WATERMARK_CLASS)
    images, _, marked = data.make_dataset(100, seed=1, watermark_fraction=0.0)
    assert not marked.any() and not _carries_watermark(images).any()


def test_watermark_mask_matches_region():
    mask = data.watermark_mask(32)
    assert mask.sum().item() == data.WATERMARK_SIZE**2
    assert mask[data.watermark_region(32)].all()


# --- shipped model ---------------------------------------------------------------------

def test_shipped_weights_are_small_and_load_weights_only():
    assert WEIGHTS_PATH.stat().st_size < 500 * 1024
    state = torch.load(WEIGHTS_PATH, weights_only=True)
    assert set(state) == set(DemoCNN().state_dict())


def test_shipped_model_is_accurate_and_clever_hans():
    model = load_demo_model()
    assert not model.training
    # Seed 77 is none of train.py's: these images are new to the model.
    metrics = evaluate(model, seed=77, n=1000)
    assert metrics["accuracy"] >= 0.95
    # The artefact matters: stamped into disk images it turns most into "cross". The
    # demo's point is that LRP shows this; if retraining loses it, the demo loses it.
    assert metrics["watermark_flip_rate"] >= 0.5


# --- run_demo --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "nested" / "out"
    return run.run_demo(out, n=4, seed=0)


def test_run_demo_writes_pngs(demo):
    paths = [r["png"] for r in demo["images"]] + [demo["grid_png"]]
    assert [Path(p).name for p in paths] == [f"image_0{i}.png" for i in range(4)] + ["grid.png"]
    width = 2 * 32 * run.SCALE + run.GAP
    tiles = []
    for path in paths:
        with Image.open(path) as im:
            assert im.format == "PNG" and im.mode == "RGB"
            pixels = np.asarray(im)
        if path != demo["grid_png"]:
            assert pixels.shape[1] == width and pixels.shape[0] > 32 * run.SCALE + 40  # title and colour bar
            tiles.append(pixels)
        assert pixels.std() > 1  # not a blank picture
        assert (pixels == 255).all(-1).any()  # the heatmap's white (near-zero relevance)
    with Image.open(demo["grid_png"]) as im:  # the grid is the labelled tiles, side by side
        grid = np.asarray(im)
    assert (grid[:tiles[0].shape[0], :width] == tiles[0]).all()
    assert (grid[:tiles[1].shape[0], width + run.GRID_GAP:2 * width + run.GRID_GAP] == tiles[1]).all()


def test_run_demo_pictures_show_the_pair_under_a_title_above_a_colour_bar(demo):
    images, labels, _ = data.make_dataset(4, seed=0)
    relevance = fastlrp.LRP(load_demo_model(), composite="epsilon_plus")(images, labels)
    for record in demo["images"]:
        i = record["index"]
        pair, scale = run._pair(images[i], relevance[i])
        assert scale == pytest.approx(np.percentile(relevance[i].sum(0).abs().numpy(), 99.5), rel=1e-5)
        with Image.open(record["png"]) as im:
            tile = np.asarray(im)
        rows = [y for y in range(tile.shape[0] - pair.shape[0]) if (tile[y:y + pair.shape[0]] == pair).all()]
        assert len(rows) == 1 and (tile[:rows[0]] < 100).any()  # the pair, below dark title text
        below = tile[rows[0] + pair.shape[0]:]
        assert ((below[..., 2] > 200) & (below[..., 0] < 60)).any() and ((below[..., 0] > 200) & (below[..., 2] < 60)).any()
        assert 0 < record["probability"] <= 1


def test_summary_explains_the_conservation_figure(demo):
    # The bias-free figure comes with every run: the same rules without biases conserve the logit.
    assert demo["bias_free_max_conservation_error"] < 1e-4
    text = run.format_summary(demo)
    worst = max(demo["images"], key=lambda r: r["conservation_error"])
    assert f"max conservation error: {demo['max_conservation_error']:.2e} on image #{worst['index']}" in text
    assert "biases" in text and 'zero_params="bias"' in text
    assert f"max error {demo['bias_free_max_conservation_error']:.2e}" in text


def test_report_comments_on_heatmaps_that_contradict_the_summary():
    records = [{"index": k, "true": "disk", "pred": "disk", "target_logit": logit, "relevance_sum": 0.5,
                "probability": 0.9} for k, logit in enumerate((3.0, 0.4, 2.0))]
    relevance = torch.zeros(3, 3, 8, 8)
    relevance[:, 0, 2:4, 2:4] = 1.0  # positive evidence on an "object"
    relevance[1, 0, 2:4, 2:4] = -1.0  # image 1: its strongest pixels are negative...
    relevance[1, 0, 6:, :] = 0.01  # ...and its positive relevance is weak and scattered
    negative, outside = demo_report.strongest_evidence(relevance, k=4)
    assert negative == pytest.approx([0.0, 1.0, 0.0]) and outside[1] == pytest.approx(1.0)
    text = demo_report.exceptions_html(records, relevance, "LRP epsilon_plus", k=4)
    assert "Not every image fits" in text and "<b>#1</b>" in text and "<b>#0</b>" not in text
    assert "against</em> disk" in text and "the lowest of the batch" in text and "weak and scattered" in text
    relevance[1] = relevance[0]
    assert demo_report.exceptions_html(records, relevance, "LRP epsilon_plus", k=4) == ""


def test_run_demo_summary_is_consistent(demo):
    model = load_demo_model()
    images, labels, marked = data.make_dataset(4, seed=0)
    with torch.no_grad():
        logits = model(images)
    for r in demo["images"]:
        i = r["index"]
        assert r["true"] == data.CLASS_NAMES[labels[i]]
        assert r["pred"] == data.CLASS_NAMES[logits[i].argmax()]
        assert r["has_watermark"] == bool(marked[i])
        assert r["target_logit"] == pytest.approx(logits[i, labels[i]].item(), rel=1e-5)
        expected = abs(r["relevance_sum"] - r["target_logit"]) / abs(r["target_logit"])
        assert r["conservation_error"] == pytest.approx(expected, rel=1e-6)
    assert demo["max_conservation_error"] == max(r["conservation_error"] for r in demo["images"])
    assert demo["seconds_per_image"] > 0


def test_run_demo_conservation(demo, tmp_path):
    # With biases the epsilon_plus relevance falls short of the logit by the biases' share
    # (0.16-0.85 of it on the demo images); the bound only catches gross breakage.
    assert demo["max_conservation_error"] < 0.9
    # Rules that leave the biases out conserve the logit up to float32 rounding.
    exact = run.run_demo(tmp_path, n=4, seed=0, zero_params="bias", report=False)
    assert exact["max_conservation_error"] < 1e-4


def test_run_demo_pixel_flipping_numbers(demo):
    aopc = demo["aopc"]
    assert list(aopc) == [*demo_report.FLIP_METHODS, demo_report.RANDOM]
    assert all(np.isfinite(v) for v in aopc.values())
    # Blurring the patches LRP ranks first costs the logit more than blurring random ones.
    assert aopc["LRP epsilon_plus"] > aopc[demo_report.RANDOM] + 0.5
    assert aopc["LRP epsilon_gamma_box"] > aopc[demo_report.RANDOM] + 0.5


def test_run_demo_spray_finds_the_watermark_strategy(demo):
    spray = demo["spray"]
    clusters = spray["clusters"]
    assert spray["n"] == 128 and sum(c["size"] for c in clusters) == 128
    assert spray["n_clusters"] == len(clusters) >= 2
    strategy = [c for c in clusters if c["watermark_strategy"]]
    shape = [c for c in clusters if not c["watermark_strategy"]]
    # The clusters whose mean heatmap has the hot corner are the watermarked crosses, the others are not.
    assert strategy and shape
    assert sum(c["size"] * c["watermark_fraction"] for c in strategy) / sum(c["size"] for c in strategy) > 0.9
    assert max(c["watermark_fraction"] for c in shape) < 0.2


def test_run_demo_rejects_a_small_analysis_set(tmp_path):
    with pytest.raises(ValueError, match="at least 16"):
        run.run_demo(tmp_path / "never", n=2, analysis_n=15)
    assert not (tmp_path / "never").exists()


def test_analysis_set_is_class_1_only():
    images, labels, marked = demo_report.analysis_set(20, seed=3)
    assert images.shape == (20, 3, 32, 32) and (labels == data.WATERMARK_CLASS).all()
    assert torch.equal(_carries_watermark(images), marked)


# --- command line ----------------------------------------------------------------------

def test_cli_demo(tmp_path, capsys):
    out = tmp_path / "cli-out"
    assert main(["demo", "--out", str(out), "--n", "2", "--seed", "1", "--analysis-n", "16"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "max conservation error" in printed
    assert "ms per image" in printed
    assert (out / "grid.png").is_file() and (out / "image_01.png").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--out", "{file}"], "not a folder"),
        (["--out", "{file}/sub"], "cannot create output folder"),
        (["--composite", "no_such_composite", "--out", "{dir}/never"], "unknown composite"),
        (["--n", "0"], "at least 1"),
        (["--analysis-n", "15", "--out", "{dir}/never"], "--analysis-n: must be at least 16"),
    ],
)
def test_cli_errors_are_one_line_exit_2(tmp_path, capsys, args, message):
    file = tmp_path / "a_file"
    file.write_text("not a folder")
    args = [a.format(file=file, dir=tmp_path) for a in args]
    assert main(["demo", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastlrp: error:") and message in lines[0]
    assert not (tmp_path / "never").exists()


def test_cli_needs_a_command(capsys):
    assert main([]) == 2
    assert capsys.readouterr().err.startswith("fastlrp: error:")
