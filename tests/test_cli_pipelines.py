"""The command line end to end on small generated inputs: explain, video, volume, dataset
(one process, two torchrun processes, resumed after a kill), demo report, bench, and the
one-line errors. Models are the tiny factories of cli_tiny_models.py."""

import base64
import html
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastlrp.apps.cli import main

TESTS = Path(__file__).resolve().parent
PYTHON_DIR = TESTS.parent / "python"
TINY = "cli_tiny_models:tiny_cnn"


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, out, err, *fragments):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastlrp: error:"), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def write_image(path, size=(20, 24), mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    shape = size if mode == "L" else (*size, 3)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    return path


def subprocess_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PYTHON_DIR), str(TESTS), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


# --- explain ---------------------------------------------------------------------------

def test_explain_writes_heatmaps_overlays_and_predictions(tmp_path, capsys):
    images = [write_image(tmp_path / "a.png", seed=1), write_image(tmp_path / "b.png", size=(18, 18), seed=2)]
    sub = tmp_path / "sub"
    sub.mkdir()
    images.append(write_image(sub / "a.png", seed=3))  # same name, other folder
    out = tmp_path / "out"
    code, printed, err = run_cli(capsys, "explain", *images, "--model", TINY, "--out", out, "--target", "2",
                                 "--plain")
    assert code == 0, err
    report = json.loads((out / "predictions.json").read_text())
    assert [r["path"] for r in report["images"]] == [str(p) for p in images]
    model = __import__("cli_tiny_models").tiny_cnn()
    for record, path in zip(report["images"], images):
        with Image.open(path) as im:
            pixels = torch.from_numpy(np.asarray(im.convert("RGB"), np.float32) / 255).permute(2, 0, 1)[None]
            size = im.size
        with torch.no_grad():
            logits = model(pixels)[0]
        assert record["prediction"] == int(logits.argmax()) and record["target"] == 2
        assert record["target_logit"] == pytest.approx(float(logits[2]), rel=1e-5)
        for key in ("heatmap", "overlay"):
            with Image.open(out / record[key]) as im:
                assert im.size == size and im.mode == "RGB"
                assert np.asarray(im).std() > 0
    assert {r["heatmap"] for r in report["images"]} == {"a_heatmap.png", "b_heatmap.png", "a-1_heatmap.png"}
    assert str(out / "predictions.json") in printed


def _png(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_explain_pictures_are_labelled_and_percentile_scaled(tmp_path, capsys):
    from fastlrp import viz
    from fastlrp.apps.pipelines import images as pipeline

    image = write_image(tmp_path / "a.png", size=(20, 24), seed=1)
    code, printed, err = run_cli(capsys, "explain", image, "--model", TINY, "--out", tmp_path / "plain", "--plain")
    assert code == 0, err
    code, printed, err = run_cli(capsys, "explain", image, "--model", TINY, "--out", tmp_path / "labelled")
    assert code == 0, err
    record = json.loads((tmp_path / "labelled" / "predictions.json").read_text())["images"][0]
    # the colour scale is the 99.5th percentile of |R| by default, recorded per image
    model = __import__("cli_tiny_models").tiny_cnn()
    x = torch.from_numpy(_png(image).astype(np.float32) / 255).permute(2, 0, 1)[None]
    import fastlrp

    relevance = fastlrp.LRP(model, composite="epsilon_plus")(x, record["target"])[0].sum(0)
    assert record["colour_scale"] == pytest.approx(float(np.percentile(relevance.abs().numpy(), 99.5)), rel=1e-4)
    for kind in ("heatmap", "overlay"):
        plain, labelled = _png(tmp_path / "plain" / record[kind]), _png(tmp_path / "labelled" / record[kind])
        assert plain.shape == (20, 24, 3)
        # the labelled PNG holds the plain one, enlarged for reading, with title above and colour bar below
        factor = pipeline.READABLE // 24
        enlarged = viz.upscale(plain, factor)
        h, w = enlarged.shape[:2]
        assert labelled.shape[1] >= max(w, pipeline.LABELLED_WIDTH)
        hits = [(y, x) for y in range(labelled.shape[0] - h) for x in [(labelled.shape[1] - w) // 2]
                if (labelled[y:y + h, x:x + w] == enlarged).all()]
        assert len(hits) == 1
        top = hits[0][0]
        assert (labelled[:top] < 100).any()  # title text
        below = labelled[top + h:]
        row = below[np.nonzero((below[..., 2] > 200) & (below[..., 0] < 60))[0][0]]
        assert row[8, 2] > 200 and row[-9, 0] > 200 and row[-9, 2] < 60  # the bar: blue (against) to red (for)
    # the default scale and an explicit --clip-percentile 99.5 agree; 100 is the maximum
    code, _, err = run_cli(capsys, "explain", image, "--model", TINY, "--out", tmp_path / "max",
                           "--clip-percentile", "100")
    assert code == 0, err
    maximum = json.loads((tmp_path / "max" / "predictions.json").read_text())["images"][0]["colour_scale"]
    assert maximum == pytest.approx(float(relevance.abs().max()), rel=1e-4) and maximum > record["colour_scale"]


def test_explain_names_classes_from_torchvision_or_labels_file(tmp_path, capsys):
    torchvision = pytest.importorskip("torchvision")
    image = write_image(tmp_path / "x.png", size=(32, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights
        code, printed, err = run_cli(capsys, "explain", image, "--model", "resnet18", "--out", tmp_path / "tv")
    assert code == 0, err
    summary = json.loads((tmp_path / "tv" / "predictions.json").read_text())
    categories = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    record = summary["images"][0]
    assert "ResNet18_Weights.IMAGENET1K_V1" in summary["class_names"] and "softmax" in summary["scores"]
    assert record["prediction_name"] == categories[record["prediction"]]
    assert [t["name"] for t in record["top"]] == [categories[t["class"]] for t in record["top"]]
    assert sorted((t["probability"] for t in record["top"]), reverse=True) == [t["probability"] for t in record["top"]]
    assert categories[record["prediction"]] in printed

    (tmp_path / "names.txt").write_text("cat\ndog\nbird\n")
    (tmp_path / "names.json").write_text(json.dumps({"0": "cat", "2": "bird", "1": "dog"}))
    for labels in ("names.txt", "names.json"):
        code, _, err = run_cli(capsys, "explain", image, "--model", TINY, "--labels", tmp_path / labels,
                               "--out", tmp_path / labels.replace(".", "_"), "--target", "1")
        assert code == 0, err
        summary = json.loads((tmp_path / labels.replace(".", "_") / "predictions.json").read_text())
        record = summary["images"][0]
        assert record["target_name"] == "dog" and summary["class_names"] == f"--labels {tmp_path / labels}"
        assert {t["name"] for t in record["top"]} == {"cat", "dog", "bird"}
    # without names: indices, said as such
    code, _, err = run_cli(capsys, "explain", image, "--model", TINY, "--out", tmp_path / "plain")
    summary = json.loads((tmp_path / "plain" / "predictions.json").read_text())
    assert summary["class_names"] is None and summary["images"][0]["prediction_name"].startswith("class ")
    (tmp_path / "two.txt").write_text("cat\ndog\n")
    code, out, err = run_cli(capsys, "explain", image, "--model", TINY, "--labels", tmp_path / "two.txt",
                             "--out", tmp_path / "bad")
    assert_one_line_error(code, out, err, "2 class names", "3 outputs")
    code, out, err = run_cli(capsys, "explain", image, "--model", TINY, "--labels", tmp_path / "missing.txt",
                             "--out", tmp_path / "bad")
    assert_one_line_error(code, out, err, "--labels", "does not exist")


def test_explain_torchvision_name_warns_random_weights_and_loads_weights(tmp_path, capsys):
    pytest.importorskip("torchvision")
    image = write_image(tmp_path / "x.png", size=(32, 32))
    from fastlrp.apps.models import RandomWeightsWarning

    with pytest.warns(RandomWeightsWarning, match="resnet18 has random weights"):
        code, _, err = run_cli(capsys, "explain", image, "--model", "resnet18", "--num-classes", "4",
                               "--out", tmp_path / "o1")
    assert code == 0, err
    import torchvision

    model = torchvision.models.resnet18(num_classes=4)
    torch.nn.init.normal_(model.fc.bias)  # weights that differ from any fresh random init
    torch.save(model.state_dict(), tmp_path / "w.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomWeightsWarning)  # loaded weights: no warning
        code, _, err = run_cli(capsys, "explain", image, "--model", "resnet18", "--num-classes", "4",
                               "--weights", tmp_path / "w.pt", "--out", tmp_path / "o2")
    assert code == 0, err
    record = json.loads((tmp_path / "o2" / "predictions.json").read_text())["images"][0]
    from fastlrp.apps.pipelines.common import IMAGENET_MEAN, IMAGENET_STD, load_image

    x = (load_image(image, 3)[None] - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    with torch.no_grad():
        assert record["target_logit"] == pytest.approx(float(model.eval()(x).max()), rel=1e-4)


@pytest.mark.parametrize("case, fragments", [
    ("missing image", ["does not exist"]),
    ("folder as image", ["is a folder"]),
    ("unreadable image", ["cannot read", "not an image file"]),
    ("unknown model", ["unknown model 'no_such_net'", "module:function"]),
    ("bad factory module", ["cannot import 'no_such_module'", "PYTHONPATH"]),
    ("factory not a module", ["returned str"]),
    ("grey image, RGB model", ["has 1 channel", "expects 3", "--convert RGB"]),
    ("RGB image, grey model", ["has 3 channels", "expects 1", "--convert L"]),
    ("missing weights", ["weights file", "does not exist"]),
    ("garbage weights", ["cannot read weights", "state dict"]),
    ("unknown composite", ["unknown composite 'nope'"]),
    ("bad target", ["--target must be"]),
])
def test_explain_errors_are_one_line(tmp_path, capsys, case, fragments):
    rgb = write_image(tmp_path / "rgb.png")
    grey = write_image(tmp_path / "grey.png", mode="L")
    (tmp_path / "junk.png").write_bytes(b"this is not a png")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    args = {
        "missing image": [tmp_path / "nope.png", "--model", TINY],
        "folder as image": [tmp_path, "--model", TINY],
        "unreadable image": [tmp_path / "junk.png", "--model", TINY],
        "unknown model": [rgb, "--model", "no_such_net"],
        "bad factory module": [rgb, "--model", "no_such_module:make"],
        "factory not a module": [rgb, "--model", "cli_tiny_models:not_a_model"],
        "grey image, RGB model": [grey, "--model", TINY],
        "RGB image, grey model": [rgb, "--model", "cli_tiny_models:tiny_gray_cnn"],
        "missing weights": [rgb, "--model", TINY, "--weights", tmp_path / "none.pt"],
        "garbage weights": [rgb, "--model", TINY, "--weights", tmp_path / "junk.pt"],
        "unknown composite": [rgb, "--model", TINY, "--composite", "nope"],
        "bad target": [rgb, "--model", TINY, "--target", "first"],
    }[case]
    code, out, err = run_cli(capsys, "explain", *args, "--out", tmp_path / "out")
    assert_one_line_error(code, out, err, *fragments)


def test_explain_checks_paths_and_cmap_before_building_the_model(tmp_path, capsys):
    rgb = write_image(tmp_path / "rgb.png")
    missing_factory = "no_such_module:make"  # would fail if it were imported: the checks come first
    cases = [
        ([tmp_path / "nope.png"], ["nope.png does not exist"]),
        ([rgb, "--cmap", "nope"], ["--cmap", "unknown colour map 'nope'"]),
        ([rgb, "--weights", tmp_path / "none.pt"], ["weights file", "does not exist", "--weights"]),
        ([rgb, "--method", "nope"], ["unknown --method 'nope'", "gradcam"]),
    ]
    for args, fragments in cases:
        code, out, err = run_cli(capsys, "explain", *args, "--model", missing_factory, "--out", tmp_path / "o")
        assert_one_line_error(code, out, err, *fragments)


def test_truncated_image_names_the_file(tmp_path, capsys):
    whole = write_image(tmp_path / "whole.png", size=(24, 24)).read_bytes()
    for cut in (20, len(whole) // 2):  # inside the header (Pillow: "Truncated File Read"), inside the pixels
        path = tmp_path / f"cut{cut}.png"
        path.write_bytes(whole[:cut])
        code, out, err = run_cli(capsys, "explain", path, "--model", TINY, "--out", tmp_path / "o")
        assert_one_line_error(code, out, err, f"cannot read image {path}", "cut short or damaged")


def test_weights_that_are_not_a_state_dict(tmp_path, capsys):
    rgb = write_image(tmp_path / "rgb.png")
    text = tmp_path / "notes.txt"
    text.write_text("these are not weights\n")
    pickled = tmp_path / "model.pt"
    torch.save(__import__("cli_tiny_models").tiny_cnn(), pickled)  # the whole module, not its state dict
    for path, fragments in [(text, ["cannot read weights", "not a state dict", "model.state_dict()"]),
                            (pickled, ["holds a pickled", "Sequential", "model.state_dict()"])]:
        code, out, err = run_cli(capsys, "explain", rgb, "--model", TINY, "--weights", path, "--out", tmp_path / "o")
        assert_one_line_error(code, out, err, str(path), *fragments)
        assert "weights_only" not in err and "\x1b" not in err  # no advice to run code, no colour codes


GROUPNORM = "cli_tiny_models:tiny_groupnorm_cnn"


def test_layer_without_rule_names_the_command_line_fixes(tmp_path, capsys):
    rgb = write_image(tmp_path / "rgb.png")
    code, out, err = run_cli(capsys, "explain", rgb, "--model", GROUPNORM, "--out", tmp_path / "o")
    assert_one_line_error(code, out, err, "GroupNorm", "--passthrough GroupNorm", "--passthrough 1", "--method")
    assert "passthrough=" not in err


@pytest.mark.parametrize("passthrough", ["GroupNorm", "1", "torch.nn:GroupNorm", "nope,GroupNorm"])
def test_explain_passthrough_by_type_or_name(tmp_path, capsys, passthrough):
    import fastlrp
    from cli_tiny_models import tiny_groupnorm_cnn
    from fastlrp.apps.pipelines.common import load_image

    rgb = write_image(tmp_path / "rgb.png")
    code, _, err = run_cli(capsys, "explain", rgb, "--model", GROUPNORM, "--passthrough", passthrough,
                           "--target", "1", "--out", tmp_path / "o")
    assert code == 0, err
    record = json.loads((tmp_path / "o" / "predictions.json").read_text())["images"][0]
    expected = fastlrp.LRP(tiny_groupnorm_cnn(), passthrough=[torch.nn.GroupNorm])(load_image(rgb, 3)[None], 1)
    assert record["relevance_sum"] == pytest.approx(float(expected.sum()), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("method, options", [
    ("integrated_gradients", {"steps": 4}),
    ("gradcam", {"layer": "0"}),
    ("gradient_x_input", {}),
])
def test_explain_with_another_method(tmp_path, capsys, method, options):
    import fastlrp
    from cli_tiny_models import tiny_groupnorm_cnn
    from fastlrp.apps.pipelines.common import load_image

    rgb = write_image(tmp_path / "rgb.png")
    args = ["--layer", options["layer"]] if "layer" in options else []
    args += [f"--method-option={k}={v}" for k, v in options.items() if k != "layer"]
    code, _, err = run_cli(capsys, "explain", rgb, "--model", GROUPNORM, "--method", method, *args,
                           "--target", "0", "--out", tmp_path / "o")
    assert code == 0, err
    summary = json.loads((tmp_path / "o" / "predictions.json").read_text())
    assert summary["method"] == method
    extra = {"upsample": True} if method == "gradcam" else {}
    expected = fastlrp.attribute(tiny_groupnorm_cnn(), load_image(rgb, 3)[None], 0, method=method, **options,
                                 **extra)
    assert summary["images"][0]["relevance_sum"] == pytest.approx(float(expected.sum()), rel=1e-5, abs=1e-7)


def test_method_option_errors(tmp_path, capsys):
    rgb = write_image(tmp_path / "rgb.png")
    cases = [
        (["--method", "gradcam", "--composite", "epsilon_plus"], ["--composite applies to --method lrp only"]),
        (["--layer", "0"], ["--layer applies to --method cam, gradcam, gradcam++"]),
        (["--method", "gradient", "--passthrough", "GroupNorm"], ["--passthrough applies to", "drop --passthrough"]),
        (["--method", "integrated_gradients", "--method-option", "steps"], ["KEY=VALUE"]),
        (["--method", "integrated_gradients", "--method-option", "nope=1"], ["--method-option", "'nope'"]),
        (["--method", "gradcam", "--layer", "nope"], ["layer='nope' is not a module"]),
        (["--passthrough", "no_such_module:Layer"], ["--passthrough no_such_module:Layer", "cannot find class"]),
    ]
    for args, fragments in cases:
        code, out, err = run_cli(capsys, "explain", rgb, "--model", GROUPNORM, *args, "--out", tmp_path / "o")
        assert_one_line_error(code, out, err, *fragments)


def test_convert_fixes_channel_mismatch(tmp_path, capsys):
    grey = write_image(tmp_path / "grey.png", mode="L")
    code, _, err = run_cli(capsys, "explain", grey, "--model", TINY, "--convert", "RGB", "--out", tmp_path / "o")
    assert code == 0, err


def test_traceback_flag_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError):
        main(["--traceback", "explain", str(tmp_path / "nope.png"), "--model", TINY])


def test_every_command_has_help(capsys):
    for command in ("demo", "explain", "video", "volume", "dataset", "bench"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert f"usage: fastlrp {command}" in capsys.readouterr().out


# --- video -----------------------------------------------------------------------------

def write_video(path, frames=8, size=(32, 32)):
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"
        for t in range(frames):
            pixels = np.zeros((*size, 3), np.uint8)
            pixels[:, 4 * t : 4 * t + 4] = 255  # a bar moving right
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def decode(path):
    import av

    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


@pytest.mark.parametrize("model, options", [
    (TINY, ["--batch-size", "3"]),  # 8 frames: batches of 3, 3, 2
    ("cli_tiny_models:tiny_clip_cnn", ["--clip-length", "3"]),  # 3D clips, the last one padded
])
def test_video_round_trip(tmp_path, capsys, model, options):
    source = write_video(tmp_path / "in.avi", frames=8, size=(32, 48))
    out = tmp_path / "out.mp4"
    code, printed, err = run_cli(capsys, "video", source, "--model", model, "--out", out, *options)
    assert code == 0, err
    frames = decode(out)
    assert len(frames) == 8 and all(f.shape == (32, 48, 3) for f in frames)
    assert "8 frames 48x32" in printed and re.search(r"[\d.]+ frames/s", printed)
    assert np.std(frames[0]) > 0


def test_video_3d_model_with_imagenet_scaling_on_sliding_clips(tmp_path, capsys):
    # The scaling used to be applied before the clip had its batch axis (channels met time).
    source = write_video(tmp_path / "in.avi", frames=7, size=(32, 32))
    out = tmp_path / "out.mp4"
    code, printed, err = run_cli(capsys, "video", source, "--model", "cli_tiny_models:tiny_r3d", "--out", out,
                                 "--normalize", "imagenet", "--clip-length", "4", "--clip-stride", "2",
                                 "--batch-size", "2")
    assert code == 0, err
    assert len(decode(out)) == 7
    assert "3D clips of 4 frames every 2" in printed


def test_video_torchvision_r3d_18(tmp_path, capsys):
    pytest.importorskip("torchvision")
    source = write_video(tmp_path / "in.avi", frames=3, size=(16, 16))
    out = tmp_path / "out.mp4"
    with pytest.warns(UserWarning, match="random weights"):
        code, printed, err = run_cli(capsys, "video", source, "--model", "r3d_18", "--num-classes", "2",
                                     "--out", out, "--clip-length", "2", "--clip-stride", "1")
    assert code == 0, err
    assert len(decode(out)) == 3


def test_clip_relevance_averages_each_frame_over_its_clips():
    from fastlrp.apps.pipelines.video import clip_relevance

    def clips_of(n, length, stride, batch):
        runs = []

        def run(x):  # each clip's relevance: its first frame's index, everywhere
            assert x.shape[1:] == (1, length, 2, 2)
            runs.append(x.shape[0])
            return x[:, :, :1].expand_as(x).clone()

        frames = [(torch.full((1, 4, 4), float(i)), torch.full((1, 2, 2), float(i))) for i in range(n)]
        result = list(clip_relevance(iter(frames), run, length, stride, batch))
        assert [float(frame[0, 0, 0]) for frame, _ in result] == list(range(n))  # every frame, in order
        assert all(rel.shape == (1, 2, 2) for _, rel in result)
        return [float(rel.mean()) for _, rel in result], runs

    # 8 frames, clips of 3 every 2: starts 0, 2, 4, then 5 to end on the last frame
    means, runs = clips_of(8, 3, 2, 2)
    assert means == pytest.approx([0, 0, 1, 2, 3, 4.5, 4.5, 5])
    assert runs == [2, 2]
    # overlapping by two: frame i lies in the clips starting at i-2, i-1, i
    means, _ = clips_of(5, 3, 1, 1)
    assert means == pytest.approx([0, 0.5, 1, 1.5, 2])
    # side by side, the last clip aligned to the end
    means, _ = clips_of(5, 2, 2, 3)
    assert means == pytest.approx([0, 0, 2, 2.5, 3])
    # shorter than one clip: padded, the padding dropped
    means, runs = clips_of(2, 4, 4, 1)
    assert means == [0, 0] and runs == [1]
    assert clips_of(0, 3, 1, 1)[0] == []
    with pytest.raises(ValueError, match="--clip-stride 4 must lie between 1 and --clip-length 3"):
        list(clip_relevance(iter([]), None, 3, 4))


def test_video_progress_bar_counts_frames(tmp_path, monkeypatch):
    from fastlrp.apps.pipelines import video

    bars = []

    class Bar:
        def __init__(self, **options):
            self.options, self.count = options, 0
            bars.append(self)

        def update(self, n):
            self.count += n

        def close(self):
            pass

    monkeypatch.setattr(video, "progress", lambda **options: Bar(**options))
    source = write_video(tmp_path / "in.avi", frames=5, size=(16, 16))
    video.explain_video(source, tmp_path / "out.mp4", "cli_tiny_models:tiny_clip_cnn", clip_length=2)
    (bar,) = bars
    assert bar.options["unit"] == "frame" and bar.count == 5  # tqdm shows the rate as frame/s


def test_video_errors(tmp_path, capsys):
    pytest.importorskip("av")
    (tmp_path / "junk.mp4").write_bytes(b"\x00" * 100)
    source = write_video(tmp_path / "in.avi", frames=2)
    cases = [
        ([tmp_path / "none.mp4", "--model", TINY, "--out", tmp_path / "o.mp4"], ["does not exist"]),
        ([tmp_path / "junk.mp4", "--model", TINY, "--out", tmp_path / "o.mp4"], ["cannot read video"]),
        ([source, "--model", "cli_tiny_models:tiny_gray_cnn", "--out", tmp_path / "o.mp4"], ["--convert L"]),
        ([source, "--model", "cli_tiny_models:tiny_volume_cnn", "--out", tmp_path / "o.mp4"],
         ["has 3 channels", "expects 1"]),
        ([source, "--model", TINY, "--out", tmp_path / "o.xyz"], ["end --out with one of"]),
        ([source, "--model", "cli_tiny_models:tiny_clip_cnn", "--out", tmp_path / "o.mp4", "--clip-length", "2",
          "--clip-stride", "3"], ["--clip-stride 3 must lie between 1 and --clip-length 2"]),
        # checked before the model is built: the factory does not exist, yet the error is the input's
        ([tmp_path / "none.mp4", "--model", "no_such_module:make", "--out", tmp_path / "o.mp4"], ["does not exist"]),
        ([source, "--model", "no_such_module:make", "--out", tmp_path / "o.mp4", "--cmap", "nope"],
         ["--cmap", "unknown colour map 'nope'"]),
    ]
    for args, fragments in cases:
        assert_one_line_error(*run_cli(capsys, "video", *args), *fragments)
    assert not (tmp_path / "o.mp4").exists()  # no half-written output left behind


# --- volume ----------------------------------------------------------------------------

def test_volume_keeps_affine_and_header(tmp_path, capsys):
    nib = pytest.importorskip("nibabel")
    affine = np.array([[2.0, 0, 0, -10], [0, 1.5, 0, 5], [0, 0, 3, 1], [0, 0, 0, 1]])
    data = np.random.default_rng(0).normal(size=(10, 12, 8)).astype(np.float32)
    source = nib.Nifti1Image(data, affine)
    source.header["descrip"] = b"test volume"
    source.header.set_xyzt_units("mm", "sec")
    nib.save(source, tmp_path / "in.nii.gz")
    code, printed, err = run_cli(capsys, "volume", tmp_path / "in.nii.gz", "--model", "cli_tiny_models:tiny_volume_cnn",
                                 "--out", tmp_path / "rel.nii.gz", "--target", "1")
    assert code == 0, err
    result = nib.load(tmp_path / "rel.nii.gz")
    assert result.shape == data.shape and np.allclose(result.affine, affine)
    assert result.header["descrip"].tobytes().rstrip(b"\x00") == b"test volume"
    assert result.header.get_xyzt_units() == ("mm", "sec")
    assert result.get_data_dtype() == np.float32
    # The relevance is the explainer's, on the z-scored volume, summed over the one channel.
    import fastlrp
    from cli_tiny_models import tiny_volume_cnn

    x = torch.from_numpy((data - data.mean()) / data.std())[None, None]
    expected = fastlrp.LRP(tiny_volume_cnn())(x, 1)[0, 0].numpy()
    np.testing.assert_allclose(result.get_fdata(), expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
    with Image.open(tmp_path / "rel_slices.png") as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] > 100
    assert "rel_slices.png" in printed
    assert "predicted class " in printed and "explained class 1" in printed  # indices: a factory has no names


def test_volume_slices_honour_voxel_spacing_and_carry_a_colour_bar():
    from fastlrp import viz
    from fastlrp.apps.pipelines.volume import slices_figure

    rng = np.random.default_rng(0)
    volume, relevance = rng.normal(size=(10, 12, 8)), rng.normal(size=(10, 12, 8))
    figure, voxel = slices_figure(volume, relevance, spacing=(2.0, 1.5, 3.0), title="in.nii.gz: tumour p=80.0%",
                                  target="tumour")
    assert voxel == tuple(int(i) for i in np.unravel_index(np.abs(relevance).argmax(), relevance.shape))
    panels = [ax for ax in figure.axes if ax.images]
    # each panel: columns along the first remaining axis, rows along the second; a pixel is drawn
    # spacing[second] / spacing[first] times as tall as wide
    assert [ax.get_aspect() for ax in panels] == pytest.approx([3.0 / 1.5, 3.0 / 2.0, 1.5 / 2.0])
    assert [ax.images[0].get_array().shape[:2] for ax in panels] == [(8, 12), (8, 10), (12, 10)]
    (bar,) = [ax for ax in figure.axes if not ax.images]
    assert bar.get_ylabel().startswith("red: evidence for tumour, blue: against")
    assert "99.5th percentile" in bar.get_ylabel()
    assert bar.get_ylim() == pytest.approx((-viz.relevance_scale(relevance), viz.relevance_scale(relevance)))
    assert "in.nii.gz: tumour p=80.0%" in figure.get_suptitle() and "voxel size 2 x 1.5 x 3" in figure.get_suptitle()


def test_volume_errors(tmp_path, capsys):
    nib = pytest.importorskip("nibabel")
    nib.save(nib.Nifti1Image(np.zeros((6, 6, 6, 2), np.float32), np.eye(4)), tmp_path / "two.nii.gz")
    (tmp_path / "junk.nii.gz").write_bytes(b"junk")
    volume_net = "cli_tiny_models:tiny_volume_cnn"
    cases = [
        ([tmp_path / "none.nii.gz", "--model", volume_net], ["does not exist"]),
        ([tmp_path / "junk.nii.gz", "--model", volume_net], ["cannot read", "NIfTI"]),
        ([tmp_path / "two.nii.gz", "--model", volume_net], ["has 2 channels", "expects 1"]),
        ([tmp_path / "two.nii.gz", "--model", TINY], ["Conv2d", "3D network"]),
    ]
    for args, fragments in cases:
        assert_one_line_error(*run_cli(capsys, "volume", *args, "--out", tmp_path / "o.nii.gz"), *fragments)


def test_volume_and_video_with_passthrough_or_another_method(tmp_path, capsys):
    nib = pytest.importorskip("nibabel")
    import fastlrp
    from cli_tiny_models import tiny_groupnorm_volume_cnn

    data = np.random.default_rng(1).normal(size=(6, 7, 5)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "in.nii.gz")
    x = torch.from_numpy((data - data.mean()) / data.std())[None, None]
    model = "cli_tiny_models:tiny_groupnorm_volume_cnn"
    for args, expected in [
        (["--passthrough", "GroupNorm"], fastlrp.LRP(tiny_groupnorm_volume_cnn(), passthrough=[torch.nn.GroupNorm])),
        (["--method", "integrated_gradients", "--method-option", "steps=4"],
         fastlrp.methods.get("integrated_gradients", tiny_groupnorm_volume_cnn(), steps=4)),
    ]:
        out = tmp_path / "rel.nii.gz"
        code, _, err = run_cli(capsys, "volume", tmp_path / "in.nii.gz", "--model", model, "--out", out,
                               "--target", "1", *args)
        assert code == 0, err
        want = expected(x, 1)[0, 0].numpy()
        np.testing.assert_allclose(nib.load(out).get_fdata(), want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
    code, _, err = run_cli(capsys, "volume", tmp_path / "in.nii.gz", "--model", model, "--out", tmp_path / "r.nii")
    assert_one_line_error(code, _, err, "--passthrough GroupNorm")

    source = write_video(tmp_path / "in.avi", frames=3, size=(16, 16))
    for video_model, args in [(TINY, ["--method", "gradient"]),
                              ("cli_tiny_models:tiny_clip_cnn", ["--method", "gradcam", "--clip-length", "2"])]:
        code, printed, err = run_cli(capsys, "video", source, "--model", video_model, "--out", tmp_path / "o.mp4",
                                     *args)
        assert code == 0, err
        assert len(decode(tmp_path / "o.mp4")) == 3


# --- dataset ---------------------------------------------------------------------------

def make_image_folder(root, per_class=5, size=(16, 16)):
    for k, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            write_image(root / name / f"{i}.png", size=size, seed=10 * k + i)
    return root


def read_h5(path):
    import h5py

    with h5py.File(path, "r") as f:
        return {key: f[key][()] for key in f}, dict(f.attrs)


def run_dataset(args, torchrun=False, extra_env=None):
    env = subprocess_env()
    env.update(extra_env or {})
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if torchrun
                else [sys.executable])
    return subprocess.run([*launcher, "-m", "fastlrp.apps.cli", "dataset", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    pytest.importorskip("h5py")
    return make_image_folder(tmp_path_factory.mktemp("data") / "images")


@pytest.fixture(scope="module")
def one_process_h5(image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "heatmaps.h5"
    assert main(["dataset", str(image_folder), "--model", TINY, "--out", str(out), "--batch-size", "3",
                 "--target", "label"]) == 0
    return out


def test_dataset_layout(one_process_h5, image_folder):
    data, attrs = read_h5(one_process_h5)
    assert data["relevance"].shape == (10, 16, 16) and data["relevance"].dtype == np.float32
    assert [p.decode() for p in data["paths"]] == [f"{c}/{i}.png" for c in ("cat", "dog") for i in range(5)]
    assert data["labels"].tolist() == [0] * 5 + [1] * 5 and data["targets"].tolist() == data["labels"].tolist()
    assert json.loads(attrs["classes"]) == ["cat", "dog"] and attrs["layout_version"] == 1
    import fastlrp
    from cli_tiny_models import tiny_cnn
    from fastlrp.apps.pipelines.common import load_image

    model = tiny_cnn()
    x = torch.stack([load_image(image_folder / "dog" / "2.png", 3)])
    assert data["predictions"][7] == int(model(x).argmax())
    expected = fastlrp.LRP(model)(x, 1)[0].sum(0).numpy()
    np.testing.assert_allclose(data["relevance"][7], expected, rtol=1e-4, atol=1e-7)
    assert not list(one_process_h5.parent.glob("*.part*"))  # shards merged and removed


def test_dataset_two_torchrun_processes_match_one(one_process_h5, image_folder, tmp_path):
    out = tmp_path / "two.h5"
    done = run_dataset([image_folder, "--model", TINY, "--out", out, "--batch-size", "2", "--target", "label"],
                       torchrun=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stdout
    one, _ = read_h5(one_process_h5)
    two, _ = read_h5(out)
    for key in ("paths", "labels", "predictions", "targets"):
        assert (one[key] == two[key]).all(), key
    np.testing.assert_allclose(two["relevance"], one["relevance"], rtol=1e-5, atol=1e-7)


def test_dataset_resumes_after_a_kill(one_process_h5, image_folder, tmp_path, capsys):
    out = tmp_path / "resumed.h5"
    args = [image_folder, "--model", TINY, "--out", out, "--batch-size", "3", "--target", "label"]
    killed = run_dataset(args, extra_env={"FASTLRP_TEST_CRASH_AFTER_BATCHES": "2"})
    assert killed.returncode != 0 and not out.exists()
    shard = out.with_name("resumed.h5.part0-of-1")
    partial, _ = read_h5(shard)
    assert partial["done"].sum() == 6  # two batches of three were written before the kill
    # The rerun does the other four only, and the result equals an uninterrupted run.
    code, printed, err = run_cli(capsys, "dataset", *args)
    assert code == 0, err
    assert "4 explained here, 6 already done" in printed
    resumed, _ = read_h5(out)
    one, _ = read_h5(one_process_h5)
    np.testing.assert_allclose(resumed["relevance"], one["relevance"], rtol=1e-6, atol=0)
    assert (resumed["predictions"] == one["predictions"]).all() and not shard.exists()
    # A finished file is left alone; other settings are refused rather than mixed in.
    assert run_cli(capsys, "dataset", *args)[1].count("10 already done") == 1
    assert_one_line_error(*run_cli(capsys, "dataset", *args[:-1], "pred"), "already exists with other settings")


def test_dataset_other_method_and_passthrough(image_folder, tmp_path, capsys, monkeypatch):
    import fastlrp
    from cli_tiny_models import tiny_groupnorm_cnn
    from fastlrp.apps.pipelines import dataset
    from fastlrp.apps.pipelines.common import load_image

    bars = []
    real_progress = dataset.progress
    monkeypatch.setattr(dataset, "progress", lambda **options: bars.append(options) or real_progress(**options))
    x = torch.stack([load_image(image_folder / "dog" / "2.png", 3)])
    for args, expected in [
        (["--passthrough", "GroupNorm"], fastlrp.LRP(tiny_groupnorm_cnn(), passthrough=[torch.nn.GroupNorm])(x, 1)),
        (["--method", "gradient_x_input"],
         fastlrp.attribute(tiny_groupnorm_cnn(), x, 1, method="gradient_x_input")),
    ]:
        out = tmp_path / f"{args[-1]}.h5"
        code, printed, err = run_cli(capsys, "dataset", image_folder, "--model", GROUPNORM, "--out", out,
                                     "--batch-size", "4", "--target", "label", *args)
        assert code == 0, err
        data, attrs = read_h5(out)
        np.testing.assert_allclose(data["relevance"][7], expected[0].sum(0).numpy(), rtol=1e-4, atol=1e-7)
    assert json.loads(attrs["settings"])["method"] == "gradient_x_input"
    assert [bar["desc"] for bar in bars] == ["dataset", "dataset"]  # one process: no "rank 0"


def test_dataset_errors(tmp_path, capsys, image_folder):
    pytest.importorskip("h5py")
    (tmp_path / "empty").mkdir()
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_image(mixed / "a.png", size=(16, 16))
    write_image(mixed / "b.png", size=(12, 16))
    cases = [
        ([tmp_path / "none"], ["does not exist"]),
        ([tmp_path / "empty"], ["no images"]),
        ([mixed], ["differ in size", "--size"]),
        ([mixed, "--size", "8", "--target", "label"], ["--target label needs an ImageFolder"]),
        ([image_folder, "--model", "cli_tiny_models:tiny_gray_cnn"], ["expects 1", "--convert L"]),
    ]
    for args, fragments in cases:
        model = [] if "--model" in args else ["--model", TINY]
        code, out, err = run_cli(capsys, "dataset", *args, *model, "--out", tmp_path / "o.h5")
        assert_one_line_error(code, out, err, *fragments)


# --- demo report -----------------------------------------------------------------------

def report_sections(text):
    """{h2 title: body html} of a fastlrp report."""
    return {html.unescape(title): body for title, body in
            re.findall(r'<section id="[^"]+"><h2>(.*?)</h2>(.*?)</section>', text, re.S)}


def table_rows(body):
    """The rows of the first table in ``body``, each a list of cell texts."""
    tbody = re.search(r"<tbody>(.*?)</tbody>", body, re.S).group(1)
    return [[html.unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row)]
            for row in re.findall(r"<tr>(.*?)</tr>", tbody)]


def embedded_image(body, alt):
    import io

    encoded = re.search(rf'<img alt="{re.escape(alt)}" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', body).group(1)
    with Image.open(io.BytesIO(base64.b64decode(encoded))) as im:
        return np.asarray(im.convert("RGB"))


def test_demo_report_embeds_its_images_and_names_the_artefact(tmp_path, capsys):
    code, printed, err = run_cli(capsys, "demo", "--out", tmp_path, "--n", "6", "--seed", "0", "--analysis-n", "48")
    assert code == 0, err
    assert err == ""  # quiet: no warnings, no progress bars
    report = tmp_path / "report.html"
    assert f"report: {report}" in printed
    text = report.read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(images) >= 2
    import io

    sizes = []
    for encoded in images:
        with Image.open(io.BytesIO(base64.b64decode(encoded))) as im:
            assert im.format == "PNG"
            sizes.append(im.size)
    assert max(w for w, _ in sizes) > 6 * 32  # the grid: input plus six methods per row
    for method in ("epsilon_plus", "epsilon_gamma_box", "gradient x input"):
        assert method in text
    assert "The watermark is found" in text and "Clever-Hans" in text
    assert not re.search(r'src="(?!data:)', text)  # nothing outside the file

    sections = report_sections(text)
    flipping = next(body for title, body in sections.items() if title.startswith("Pixel flipping"))
    spray = next(body for title, body in sections.items() if title.startswith("SpRAy"))
    assert "AOPC" in flipping and "most relevant" in flipping  # the curves explained in words
    plot = embedded_image(flipping, "pixel-flipping curves")
    assert plot.shape == (400, 640, 3) and plot.std() > 10  # PLOT_INCHES at PLOT_DPI, not blank
    rows = {row[0]: float(row[1]) for row in table_rows(flipping)}
    assert set(rows) == {"LRP epsilon_plus", "LRP epsilon_gamma_box", "gradient", "random order"}
    assert all(np.isfinite(v) for v in rows.values())
    assert rows["LRP epsilon_plus"] > rows["random order"]

    clusters = table_rows(spray)
    assert sum(int(row[1]) for row in clusters) == 48  # every analysed image in one cluster
    assert {row[-1] for row in clusters} <= {"watermark", "shape"}
    prototypes = embedded_image(spray, "SpRAy cluster mean heatmaps")
    assert prototypes.shape[1] >= 32 * 3 and prototypes.std() > 1


def test_report_sections_are_a_list_of_title_html(tmp_path):
    from fastlrp.apps.report import image_html, table_html, write_report

    sections = [("First", "<p>one</p>"), ("Second & more", table_html(["a", "b"], [[1, 0.5]])),
                ("Picture", image_html(np.zeros((4, 5, 3), np.uint8), "zeros"))]
    text = write_report(tmp_path / "r.html", "T", sections).read_text()
    assert text.index("<h2>First</h2>") < text.index("<h2>Second &amp; more</h2>") < text.index("<h2>Picture</h2>")
    assert '<td class="num">0.5</td>' in text


# --- bench -----------------------------------------------------------------------------

def test_bench_command_writes_a_result_file(tmp_path, capsys):
    pytest.importorskip("torchvision")
    code, printed, err = run_cli(capsys, "bench", "--models", "r3d_18", "--composites", "epsilon_plus",
                                 "--providers", "fastlrp:reference", "--video-size", "16", "--frames", "2", "--repeats", "1",
                                 "--no-memory", "--device", "cpu", "--out", tmp_path)
    assert code == 0, err
    (result,) = tmp_path.glob("lrp-cpu-*.json")
    rows = json.loads(result.read_text())["rows"]
    providers = {row["provider"]: row for row in rows}
    assert {"forward", "gradient", "fastlrp:reference"} <= set(providers)
    assert providers["fastlrp:reference"]["status"] == "ok" and providers["fastlrp:reference"]["ratio_to_grad"] > 0
    assert "wrote" in printed
    # --no-memory: neither the memory column nor its footnote
    assert "memory:" not in printed and "peak MB" not in printed


def test_bench_names_an_unknown_provider_before_any_work(tmp_path, capsys):
    pytest.importorskip("torchvision")
    code, out, err = run_cli(capsys, "bench", "--models", "r3d_18", "--providers", "zennit", "--device", "cpu",
                             "--out", tmp_path)
    assert_one_line_error(code, out, err, "unknown provider 'zennit'", "fastlrp:<backend>")
    assert not list(tmp_path.iterdir())


def test_bench_help_describes_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "torchvision models to time" in text and "LRP composites to time" in text
    assert "data type of the models and inputs" in text
    assert "NAME-<device>-<date>-<time>.json" in text


def test_bench_script_keeps_its_command_line():
    script = TESTS.parent / "bench" / "bench_lrp.py"
    done = subprocess.run([sys.executable, str(script), "--help"], env=subprocess_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "--gpu" in done.stdout and "--providers" in done.stdout


@pytest.mark.parametrize("command, module, extra", [("video", "av", "video"), ("volume", "nibabel", "volume"),
                                                    ("dataset", "h5py", "dataset")])
def test_missing_extra_names_the_pip_command(tmp_path, capsys, monkeypatch, command, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail as if not installed
    target = tmp_path / "in"
    target.mkdir()
    code, out, err = run_cli(capsys, command, target, "--model", TINY, "--out", tmp_path / "o.mp4")
    assert_one_line_error(code, out, err, f'pip install "fastlrp[{extra}]"')


# --- reliability (issue 16): file safety, resume by content, early validation, memory, NaN ---------

def test_dataset_size_resizes_mixed_sizes_before_stacking(tmp_path, capsys):
    pytest.importorskip("h5py")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_image(mixed / "a.png", size=(16, 16), seed=1)
    write_image(mixed / "b.png", size=(12, 20), seed=2)
    code, printed, err = run_cli(capsys, "dataset", mixed, "--model", TINY, "--out", tmp_path / "o.h5", "--size", "8",
                                 "--batch-size", "2")
    assert code == 0, err
    data, _ = read_h5(tmp_path / "o.h5")
    assert data["relevance"].shape == (2, 8, 8) and np.isfinite(data["relevance"]).all()


def test_video_refuses_its_input_as_output_and_keeps_an_earlier_output(tmp_path, capsys, monkeypatch):
    source = write_video(tmp_path / "in.mp4", frames=4, size=(16, 16))
    original = source.read_bytes()
    (tmp_path / "link.mp4").symlink_to(source)
    monkeypatch.chdir(tmp_path)
    for out in (source, tmp_path / "link.mp4", Path("in.mp4"), Path("sub/../in.mp4")):
        if "sub" in str(out):
            (tmp_path / "sub").mkdir(exist_ok=True)
        assert_one_line_error(*run_cli(capsys, "video", source, "--model", TINY, "--out", out), "--out",
                              "is the input file", "choose another --out")
    assert source.read_bytes() == original
    # A good output, then a run that fails midway: the good one stays, no partial file is left.
    out = tmp_path / "out.mp4"
    assert run_cli(capsys, "video", source, "--model", TINY, "--out", out, "--batch-size", "2")[0] == 0
    good = out.read_bytes()
    from fastlrp.apps.pipelines import common

    calls = []
    real = common.Explainer.explain

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("simulated failure in the second batch")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(common.Explainer, "explain", failing)
    assert_one_line_error(*run_cli(capsys, "video", source, "--model", TINY, "--out", out, "--batch-size", "2"),
                          "simulated failure")
    assert out.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4", "link.mp4", "out.mp4", "sub"]


def test_volume_refuses_its_input_as_output_and_keeps_an_earlier_output(tmp_path, capsys, monkeypatch):
    nib = pytest.importorskip("nibabel")
    data = np.random.default_rng(0).normal(size=(6, 6, 6)).astype(np.float32)
    source = tmp_path / "in.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), source)
    original = source.read_bytes()
    model = ["--model", "cli_tiny_models:tiny_volume_cnn"]
    monkeypatch.chdir(tmp_path)
    for args in (["--out", source], ["--out", "in.nii.gz"], ["--out", tmp_path / "r.nii.gz", "--png", source]):
        assert_one_line_error(*run_cli(capsys, "volume", source, *model, *args), "is the input file")
    assert source.read_bytes() == original
    out = tmp_path / "r.nii.gz"
    assert run_cli(capsys, "volume", source, *model, "--out", out)[0] == 0
    good = out.read_bytes()
    def half_written(image, path):  # a writer that fails midway
        Path(path).write_bytes(b"half")
        raise ValueError("simulated failure while writing")

    monkeypatch.setattr(nib, "save", half_written)
    assert_one_line_error(*run_cli(capsys, "volume", source, *model, "--out", out), "simulated failure")
    assert out.read_bytes() == good
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_dataset_resume_refuses_replaced_weights_of_the_same_size(tmp_path, capsys, monkeypatch):
    pytest.importorskip("h5py")
    from cli_tiny_models import tiny_cnn
    from fastlrp.apps.pipelines import dataset

    folder = make_image_folder(tmp_path / "images", per_class=2, size=(8, 8))
    weights = tmp_path / "w.pt"
    model_a = tiny_cnn()
    torch.save(model_a.state_dict(), weights)
    size_a = weights.stat().st_size
    out = tmp_path / "o.h5"
    args = ["dataset", folder, "--model", TINY, "--weights", weights, "--out", out, "--batch-size", "2"]
    real = dataset.target_indices
    calls = []

    def fail_second(*a, **k):  # the run stops after its first batch is on disk
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("simulated failure")
        return real(*a, **k)

    monkeypatch.setattr(dataset, "target_indices", fail_second)
    assert_one_line_error(*run_cli(capsys, *args), "simulated failure")
    monkeypatch.setattr(dataset, "target_indices", real)
    shard = out.with_name("o.h5.part0-of-1")
    assert read_h5(shard)[0]["done"].sum() == 2
    # Other weights written to the same path, with the same size: resuming would mix two models.
    model_b = tiny_cnn()
    with torch.no_grad():
        for p in model_b.parameters():
            p.mul_(-1)
    torch.save(model_b.state_dict(), weights)
    assert weights.stat().st_size == size_a
    assert_one_line_error(*run_cli(capsys, *args), "other weights", "delete o.h5.part0-of-1")
    assert not out.exists() and shard.exists()
    torch.save(model_a.state_dict(), weights)  # the original weights back: the run resumes
    code, printed, err = run_cli(capsys, *args)
    assert code == 0 and "2 explained here, 2 already done" in printed, err


def test_decompression_bomb_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the 20x24 image counts as a bomb (> 2 x 100)
    image = write_image(tmp_path / "big.png")
    assert_one_line_error(*run_cli(capsys, "explain", image, "--model", TINY, "--out", tmp_path / "o"),
                          str(image), "--max-pixels")
    code, _, err = run_cli(capsys, "explain", image, "--model", TINY, "--out", tmp_path / "o", "--max-pixels", "1000")
    assert code == 0, err
    assert Image.MAX_IMAGE_PIXELS == 100  # the limit is only lifted for the run
    if pytest.importorskip("h5py"):
        folder = tmp_path / "folder"
        folder.mkdir()
        write_image(folder / "big.png")
        assert_one_line_error(*run_cli(capsys, "dataset", folder, "--model", TINY, "--out", tmp_path / "o.h5"),
                              "big.png", "--max-pixels")


def test_dataset_validates_the_target_before_writing(tmp_path, capsys):
    pytest.importorskip("h5py")
    folder = make_image_folder(tmp_path / "images", per_class=2, size=(8, 8))
    out = tmp_path / "o.h5"
    assert_one_line_error(*run_cli(capsys, "dataset", folder, "--model", TINY, "--out", out, "--target", "99"),
                          "--target 99", "3 classes")
    assert list(tmp_path.iterdir()) == [tmp_path / "images"]  # no shard to block the rerun
    code, printed, err = run_cli(capsys, "dataset", folder, "--model", TINY, "--out", out, "--target", "1")
    assert code == 0, err


def test_dataset_failed_run_removes_its_empty_shard(tmp_path, capsys, monkeypatch):
    pytest.importorskip("h5py")
    from fastlrp.apps.pipelines import common

    folder = make_image_folder(tmp_path / "images", per_class=2, size=(8, 8))

    def failing(self, *args, **kwargs):
        raise ValueError("simulated failure in the first batch")

    monkeypatch.setattr(common.Explainer, "explain", failing)
    assert_one_line_error(*run_cli(capsys, "dataset", folder, "--model", TINY, "--out", tmp_path / "o.h5"),
                          "simulated failure")
    assert list(tmp_path.iterdir()) == [tmp_path / "images"]


def _oom_above(monkeypatch, limit, error):
    """fastlrp.LRP.explain raising ``error`` for batches larger than ``limit``; returns the sizes tried."""
    import fastlrp

    real = fastlrp.LRP.explain
    sizes = []

    def explain(self, x, *args, **kwargs):
        sizes.append(x.shape[0])
        if x.shape[0] > limit:
            raise error
        return real(self, x, *args, **kwargs)

    monkeypatch.setattr(fastlrp.LRP, "explain", explain)
    return sizes


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: you tried to allocate 1"),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
])
def test_explainer_halves_a_batch_that_does_not_fit(monkeypatch, error):
    from cli_tiny_models import tiny_cnn
    from fastlrp.apps.pipelines.common import Preprocessing, make_explainer

    x = torch.rand(7, 3, 8, 8)
    explainer = make_explainer(tiny_cnn(), None, Preprocessing(), 3)
    whole = explainer.explain(x, 1)
    sizes = _oom_above(monkeypatch, 2, error)
    with pytest.warns(UserWarning, match="a batch of 7 did not fit in memory.*explained 2 at a time"):
        parts = explainer.explain(x, 1)
    assert sizes == [7, 4, 2, 2, 2, 1]
    # the same samples through the same rules: equal up to float32 rounding of batch-size-dependent kernels
    torch.testing.assert_close(parts.relevance, whole.relevance, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(parts.output, whole.output, rtol=1e-6, atol=1e-7)
    sizes.clear()
    explainer.explain(x[:4], torch.tensor([0, 1, 2, 0]))  # the next batch starts at the size that fitted
    assert sizes == [2, 2]


def test_cli_splits_batches_and_names_the_flag_when_one_sample_does_not_fit(tmp_path, capsys, monkeypatch):
    pytest.importorskip("h5py")
    folder = make_image_folder(tmp_path / "images", per_class=3, size=(8, 8))
    args = ["dataset", folder, "--model", TINY, "--batch-size", "6"]
    assert run_cli(capsys, *args, "--out", tmp_path / "whole.h5")[0] == 0
    _oom_above(monkeypatch, 2, RuntimeError("CUDA out of memory. Tried to allocate 1 GiB"))
    with pytest.warns(UserWarning, match="a batch of 6 did not fit in memory.*explained 2 at a time") as caught:
        code, printed, err = run_cli(capsys, *args, "--out", tmp_path / "split.h5")
    assert code == 0, err
    assert len([w for w in caught if "did not fit" in str(w.message)]) == 1  # reported once, not per batch
    np.testing.assert_allclose(read_h5(tmp_path / "split.h5")[0]["relevance"],
                               read_h5(tmp_path / "whole.h5")[0]["relevance"], rtol=1e-5, atol=1e-9)
    _oom_above(monkeypatch, 0, RuntimeError("CUDA out of memory. Tried to allocate 1 GiB"))
    assert_one_line_error(*run_cli(capsys, *args, "--out", tmp_path / "none.h5"), "does not fit in memory",
                          "--size")


def test_volume_with_a_nan_voxel_warns_or_raises(tmp_path, capsys):
    nib = pytest.importorskip("nibabel")
    data = np.random.default_rng(0).normal(size=(6, 6, 6)).astype(np.float32)
    data[2, 3, 4] = np.nan
    source = tmp_path / "in.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), source)
    model = ["--model", "cli_tiny_models:tiny_volume_cnn"]
    code, _, err = run_cli(capsys, "volume", source, *model, "--out", tmp_path / "r.nii.gz", "--nonfinite", "raise")
    assert_one_line_error(code, _, err, str(source), "(2, 3, 4)", "NaN or Inf", "--nonfinite warn")
    assert not (tmp_path / "r.nii.gz").exists() and not (tmp_path / "r_slices.png").exists()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, err = run_cli(capsys, "volume", source, *model, "--out", tmp_path / "r.nii.gz")
    assert code == 0, err
    messages = [str(w.message) for w in caught]
    assert any(str(source) in m and "(2, 3, 4)" in m and "--nonfinite raise" in m for m in messages), messages
    assert not [m for m in messages if "contain NaN" in m]  # the engine's own repeat is filtered
    assert (tmp_path / "r_slices.png").exists()


def test_nonfinite_option_on_every_explaining_command(capsys):
    for command in ("explain", "video", "volume", "dataset"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "--nonfinite {warn,raise}" in capsys.readouterr().out, command


@pytest.mark.slow
def test_explain_and_video_with_torchvision_transformers(tmp_path, capsys):
    """Issue 14: the commands take torchvision's transformers by name (random weights): ViT-B/16 for
    images (its 224 x 224 input fixed by the position embeddings), Swin3D for video on small clips."""
    pytest.importorskip("torchvision")
    image = write_image(tmp_path / "img.png", size=(40, 40))
    code, printed, err = run_cli(capsys, "explain", image, "--model", "vit_b_16", "--size", "224",
                                 "--out", tmp_path / "vit")
    assert code == 0, err
    predictions = json.loads((tmp_path / "vit" / "predictions.json").read_text())
    assert "img.png" in json.dumps(predictions) and (tmp_path / "vit" / "img_overlay.png").exists()
    source = write_video(tmp_path / "in.avi", frames=6, size=(32, 32))
    out = tmp_path / "swin3d.mp4"
    code, printed, err = run_cli(capsys, "video", source, "--model", "swin3d_t", "--size", "32",
                                 "--clip-length", "4", "--clip-stride", "2", "--out", out)
    assert code == 0, err
    assert len(decode(out)) == 6 and "6 frames 32x32" in printed
