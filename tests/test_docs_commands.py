"""Every shell command of README.md and docs/cli.md runs, on small generated inputs.

The fenced shell blocks (```bash, ```sh, ```shell, ```console) of the two documents are parsed
into commands (comments dropped, ``\\`` continuations joined, ``&&`` chains split). Each ``fastlrp``
command runs in-process through ``fastlrp.apps.cli.main`` in a temporary folder that holds the
files it names, generated small: images (32x32 PNG/JPEG), a 20-frame 32x32 MP4 (PyAV), a 12^3
NIfTI (nibabel), an ImageFolder for a folder argument, and ``--weights`` state dicts of the model
it runs. Models are replaced by small stand-ins of the same kind (``STAND_INS``), and a few
options that only shorten the run are appended (``FASTER``). A command this test cannot run fails
it, unless ``NOT_RUN`` gives the reason it is left to another test or to the user.
"""

from __future__ import annotations

import re
import shlex
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from fastlrp.apps.cli import main

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = (ROOT / "README.md", ROOT / "docs" / "cli.md")
SHELL_BLOCK = re.compile(r"^```(?:bash|sh|shell|console)\s*\n(.*?)^```", re.S | re.M)

# Models of the docs -> small stand-ins of the same kind (a torchvision classifier stays one).
STAND_INS = {
    "resnet50": "resnet18",  # same family and layer names (layer4), a quarter of the work
    "resnet18": "resnet18",
    "r3d_18": "cli_tiny_models:tiny_r3d",  # a 3D clip model, [N, 3, T, H, W], as r3d_18
    "mymodels:gn_net": "cli_tiny_models:gn_net",  # RGB images, GroupNorms, a conv at features.8
    "mymodels:unet3d_classifier": "cli_tiny_models:tiny_volume_cnn",  # one-channel volumes
}
# Options appended to keep a command to seconds on two CPU cores; they change sizes, not code paths.
# The demo's report (pixel flipping, SpRAy) is run and checked by tests/test_demo.py and
# test_cli_pipelines.py; here the command line itself is what is under test.
FASTER = {
    "demo": ["--n", "2", "--no-report"],
    "bench": ["--models", "resnet50", "--composites", "epsilon_plus", "--providers", "fastlrp:native",
              "--batch", "1", "--size", "16", "--repeats", "1", "--no-memory", "--device", "cpu"],
}
# Commands (matched by their first word, or the first two) that are not run here, and why.
NOT_RUN = {
    "python3 -m": "creates a virtual environment: the user's setup step, not fastlrp's",
    ".venv/bin/pip": "installs the package: this test runs from the installed or source tree already",
    ".venv/bin/python": "runs the whole test suite, of which this test is part",
    "torchrun": "starts several processes; tests/test_cli_pipelines.py::test_dataset_two_torchrun_processes_"
                "match_one runs the same `torchrun -m fastlrp.apps.cli dataset` with two ranks",
}


def shell_commands(path: Path) -> list[str]:
    """The commands of the fenced shell blocks of a Markdown file, one string each."""
    commands = []
    for block in SHELL_BLOCK.findall(path.read_text(encoding="utf-8")):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()  # a comment: from a '#' that starts a word
            commands += [part.strip() for part in line.split("&&") if part.strip()]
    return commands


def all_commands() -> list[tuple[str, str]]:
    return [(path.name, command) for path in DOCUMENTS for command in shell_commands(path)]


def reason_not_run(command: str) -> str | None:
    words = command.split()
    return NOT_RUN.get(" ".join(words[:2])) or NOT_RUN.get(words[0])


# --- generated inputs ------------------------------------------------------------------------

def write_image(path: Path, seed: int = 0, size: int = 32) -> None:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    pixels[size // 4: size // 2, size // 4: size // 2] = 255  # something to find
    Image.fromarray(pixels).save(path)


def write_video(path: Path, frames: int = 20, size: int = 32) -> None:
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.height = stream.width = size
        stream.pix_fmt = "yuv420p"
        for t in range(frames):
            pixels = np.full((size, size, 3), 40, np.uint8)
            pixels[:, t % size: t % size + 4] = 255  # a bar moving right
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_volume(path: Path, size: int = 12) -> None:
    nib = pytest.importorskip("nibabel")
    data = np.random.default_rng(0).normal(size=(size, size, size)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0])), str(path))


def write_image_folder(path: Path) -> None:
    for label in ("cats", "dogs"):
        (path / label).mkdir(parents=True, exist_ok=True)
        for k in range(2):
            write_image(path / label / f"{k}.png", seed=k + 10 * len(label), size=32)


def build_model(spec: str):
    from fastlrp.apps import models

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(0)
        warnings.simplefilter("ignore", models.RandomWeightsWarning)
        return models.load_model(spec)


def output_count(spec: str) -> int:
    from fastlrp.apps import models

    model = build_model(spec)
    found = models.input_spec(model)
    with torch.no_grad():
        return model(torch.zeros(1, found.channels, *(16,) * found.spatial_dims)).shape[1]


def option(words: list, name: str) -> str | None:
    return words[words.index(name) + 1] if name in words and words.index(name) + 1 < len(words) else None


def prepare(words: list, folder: Path) -> list:
    """``words`` (after ``fastlrp``) with stand-in models and faster options; writes the files they name."""
    command = words[0]
    words = list(words)
    if "--model" in words:
        at = words.index("--model") + 1
        if words[at] not in STAND_INS:
            pytest.fail(f"the docs name model {words[at]!r}: add a small stand-in to STAND_INS")
        words[at] = STAND_INS[words[at]]
    weights = option(words, "--weights")
    if weights:  # a state dict of the model the command runs
        torch.save(build_model(option(words, "--model")).state_dict(), folder / weights)
    taking_value = {"--model", "--weights", "--out", "--png", "--labels", "--layer", "--method", "--composite",
                    "--method-option", "--passthrough", "--clip-length", "--clip-stride", "--target", "--size",
                    "--cmap", "--alpha", "--clip-percentile", "--percentile", "--batch-size", "--n", "--seed",
                    "--analysis-n", "--device", "--normalize", "--convert", "--intensity", "--codec"}
    positional = [w for k, w in enumerate(words[1:], 1) if not w.startswith("--") and words[k - 1] not in taking_value]
    for name in positional:
        target = folder / name
        if target.exists():
            continue
        if name.endswith("/"):
            write_image_folder(target)
        elif name.lower().endswith((".png", ".jpg", ".jpeg")):
            write_image(target, seed=len(name))
        elif name.endswith((".mp4", ".avi", ".mkv", ".mov", ".webm")):
            write_video(target)
        elif name.endswith((".nii", ".nii.gz")):
            write_volume(target)
        else:
            pytest.fail(f"the docs give input {name!r} to `fastlrp {command}`: teach prepare() to generate it")
    labels = option(words, "--labels")
    if labels and not (folder / labels).exists():  # one name per output class of the stand-in
        (folder / labels).write_text("\n".join(f"name {k}" for k in range(output_count(option(words, "--model")))))
    if command == "bench":
        return words + FASTER["bench"] + ["--out", str(folder / "bench-results")]
    return words + FASTER.get(command, [])


def outputs(words: list) -> list:
    """The files or folders a command is documented to write."""
    command = words[0]
    named = [w for flag in ("--out", "--png") if (w := option(words, flag))]
    if command == "explain" and "--out" not in words:
        named.append("fastlrp-explain")
    if command == "demo" and "--out" not in words:
        named.append("fastlrp-demo")
    return named


# --- the test ---------------------------------------------------------------------------------

def test_the_docs_have_the_commands_this_test_expects():
    commands = [c for _, c in all_commands()]
    assert len(commands) >= 10
    fastlrp_commands = [shlex.split(c)[1] for c in commands if c.split()[0].endswith("fastlrp")]
    assert {"demo", "explain", "video", "volume", "dataset", "bench"} <= set(fastlrp_commands)
    # the video commands include a 3D (clip) model
    videos = [shlex.split(c) for c in commands if " video " in f" {c} "]
    assert any(STAND_INS.get(option(words, "--model")) == "cli_tiny_models:tiny_r3d" for words in videos)


def test_every_command_of_the_docs_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torchvision")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent))  # cli_tiny_models
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    done: dict = {}
    ran, skipped = [], []
    for document, command in all_commands():
        words = shlex.split(command)
        if not words[0].endswith("fastlrp"):
            reason = reason_not_run(command)
            assert reason, f"{document}: `{command}` is neither a fastlrp command nor listed in NOT_RUN with a reason"
            skipped.append(command)
            continue
        argv = prepare(words[1:], tmp_path)
        key = tuple(argv)
        if key in done:  # the same command in both documents: once is enough
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # random weights of the stand-ins
            code = main(argv)
        captured = capsys.readouterr()
        assert code == 0, f"{document}: `{command}` (run as fastlrp {' '.join(argv)}) failed:\n{captured.err}"
        for path in outputs(words[1:]):
            assert (tmp_path / path).exists(), f"{document}: `{command}` did not write {path}"
        done[key] = captured.out
        ran.append(command)
    assert len(ran) >= 8 and skipped
    # the 3D video ran and wrote a video
    assert any(" video " in f" {c} " and "r3d_18" in c for c in ran)
