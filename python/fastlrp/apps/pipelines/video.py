"""``fastlrp video``: decode with PyAV, explain frames or clips, encode relevance overlays.

Streaming: frames are decoded, explained and encoded a few at a time, so memory stays flat
however long the video is.

- A 2D model (first weighted layer Conv2d) explains each frame on its own, ``batch_size``
  frames per pass.
- A 3D model (first layer Conv3d, e.g. torchvision's r3d_18, input [N, C, T, H, W]) explains
  sliding clips of ``clip_length`` frames that start every ``clip_stride`` frames (0, s, 2s, ...),
  ``batch_size`` clips per pass. Where the last of these clips ends before the video does, one
  more clip ending on the last frame is added, so every frame lies in at least one clip. A frame's
  relevance is the mean of its relevance in every clip that contains it. A video shorter than one
  clip is padded by repeating its last frame; the padding's relevance is dropped.
"""

from __future__ import annotations

import os
import time
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from .. import models
from ... import viz
from ...extras import require
from .common import (check_cmap, check_input_file, check_method, convert_fix, make_explainer, preprocessing,
                     progress, refuse_input_as_output, temporary_name)
from .images import render

# Output container suffix -> codecs to try, best first.
CODECS = {".mp4": ("libx264", "h264", "mpeg4"), ".mkv": ("libx264", "h264", "mpeg4"),
          ".mov": ("libx264", "h264", "mpeg4"), ".avi": ("mpeg4",), ".webm": ("libvpx-vp9", "libvpx")}


def _open_input(av, path: Path):
    check_input_file(path, "a video file")
    try:
        container = av.open(str(path))
    except av.FFmpegError as err:
        raise ValueError(f"cannot read video {path}: {err}; is it a video file FFmpeg can decode?") from None
    if not container.streams.video:
        container.close()
        raise ValueError(f"{path} has no video stream")
    return container


def _container_format(av, out_path: Path):
    """The muxer for OUT's suffix (the temporary name has the same suffix; named here anyway so the
    format never depends on it)."""
    return {".mp4": "mp4", ".mkv": "matroska", ".mov": "mov", ".avi": "avi", ".webm": "webm"}.get(
        out_path.suffix.lower())


def _pick_codec(av, out_path: Path, requested: str | None) -> str:
    candidates = (requested,) if requested else CODECS.get(out_path.suffix.lower())
    if candidates is None:
        raise ValueError(f"cannot tell the container from {out_path.name!r}; end --out with one of {sorted(CODECS)}")
    for name in candidates:
        try:
            av.codec.Codec(name, "w")
            return name
        except (av.FFmpegError, ValueError):
            continue
    raise ValueError(f"this PyAV build has no encoder among {list(candidates)}; pick another --out suffix or --codec")


def _frames(container, stream, channels: int):
    """Decoded frames as float [C, H, W] tensors in [0, 1], one at a time."""
    for frame in container.decode(stream):
        rgb = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1).float() / 255.0
        yield rgb.mean(0, keepdim=True) if channels == 1 else rgb


def _batches(frames, size: int):
    batch = []
    for frame in frames:
        batch.append(frame)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def frame_relevance(frames: Iterable[torch.Tensor], run: Callable[[torch.Tensor], torch.Tensor], batch_size: int
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(frame, relevance [C, h, w]) for a 2D model: ``run`` maps a batch of frames [B, C, H, W]
    to its relevance [B, C, h, w]."""
    for batch in _batches(frames, batch_size):
        relevance = run(torch.stack(batch))
        yield from zip(batch, relevance)


def clip_relevance(frames: Iterable, run: Callable[[torch.Tensor], torch.Tensor], clip_length: int,
                   clip_stride: int, batch_size: int = 1) -> Iterator[tuple]:
    """(frame, relevance [C, h, w]) for a 3D model, in frame order, each frame's relevance averaged
    over the sliding clips that contain it (schedule in the module docstring).

    ``frames`` yields (frame, model input [C, h, w]) pairs; ``run`` maps a batch of clips
    [B, C, T, h, w] (T = ``clip_length``) to their relevance of the same shape. At most about
    ``clip_length + batch_size * clip_stride`` frames are held at a time."""
    length, stride = clip_length, clip_stride
    if not 1 <= stride <= length:
        raise ValueError(f"--clip-stride {stride} must lie between 1 and --clip-length {length}: a larger stride "
                         "leaves frames between clips unexplained")
    held: dict = {}  # frame index -> (frame, model input)
    sums: dict = {}  # frame index -> summed relevance over the clips run so far
    counts: dict = {}
    pending: list = []  # start frames of clips waiting for a batch
    seen = next_start = emitted = covered = 0  # covered: end (exclusive) of the last clip scheduled

    def run_pending():
        if not pending:
            return
        clips = torch.stack([torch.stack([held[min(start + t, seen - 1)][1] for t in range(length)], 1)
                             for start in pending])
        relevance = run(clips)
        for start, clip in zip(pending, relevance):
            for t in range(min(length, seen - start)):  # frames past the end are padding: dropped
                index = start + t
                sums[index] = clip[:, t] if index not in sums else sums[index] + clip[:, t]
                counts[index] = counts.get(index, 0) + 1
        pending.clear()

    def emit(index):
        frame, _ = held.pop(index)
        return frame, sums.pop(index) / counts.pop(index)

    for item in frames:
        held[seen] = item
        seen += 1
        while seen >= next_start + length:
            pending.append(next_start)
            covered = next_start + length
            next_start += stride
            if len(pending) >= batch_size:
                run_pending()
        # A frame is final once no later clip can hold it: the next regular clip starts at
        # next_start, and a closing clip (ending on the last frame) starts at seen - length or later.
        final = min(next_start, seen - length, pending[0] if pending else seen)
        while emitted < final:
            yield emit(emitted)
            emitted += 1
    if seen == 0:
        return
    if covered < seen:
        pending.append(max(seen - length, 0))
    run_pending()
    while emitted < seen:
        yield emit(emitted)
        emitted += 1


def _even(array: np.ndarray) -> np.ndarray:
    # 4:2:0 chroma needs even width and height; repeat the last row/column where odd.
    h, w = array.shape[:2]
    return np.pad(array, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def explain_video(in_path, out_path, model_spec: str, weights=None, num_classes=None, composite=None,
                  target="pred", size=None, normalize="auto", convert=None, batch_size=None, clip_length=16,
                  clip_stride=None, cmap="bwr", alpha=0.6, percentile=viz.DEFAULT_PERCENTILE, device="auto", codec=None,
                  method="lrp", layer=None, passthrough=(), method_options=None, nonfinite="warn") -> dict:
    """Write a video of relevance overlays of ``in_path`` to ``out_path``; return counts and speed.

    ``batch_size``: frames (2D model, default 8) or clips (3D model, default 1) per pass.
    ``clip_stride``: frames between the starts of consecutive clips (default ``clip_length``: clips
    side by side). ``method``, ``layer``, ``passthrough``, ``method_options``, ``nonfinite``: as
    ``explain_images``. OUT is encoded under a temporary name and renamed when complete: a failed
    run leaves an earlier OUT as it was, and OUT may not be IN."""
    av = require("av", "video")
    in_path, out_path = Path(in_path), Path(out_path)
    clip_stride = clip_length if clip_stride is None else clip_stride
    # Everything that can be checked without the model comes first.
    check_method(method, composite, layer, passthrough, method_options, nonfinite)
    check_cmap(cmap)
    check_input_file(in_path, "a video file")
    refuse_input_as_output(out_path, [in_path], "--out")
    if not 1 <= clip_stride <= clip_length:
        raise ValueError(f"--clip-stride {clip_stride} must lie between 1 and --clip-length {clip_length}: a "
                         "larger stride leaves frames between clips unexplained")
    codec = _pick_codec(av, out_path, codec)
    if not out_path.parent.exists():
        raise FileNotFoundError(f"folder {out_path.parent} for --out does not exist")
    model = models.load_model(model_spec, weights, num_classes)
    spec = models.input_spec(model)
    models.check_spatial_dims(spec, (2, 3), "video", "use a per-frame image model or a clip model such as r3d_18")
    clips = spec is not None and spec.spatial_dims == 3
    batch_size = batch_size or (1 if clips else 8)
    channels = 1 if convert == "L" else 3
    models.check_channels(spec, channels, f"video {in_path.name} ({'grey' if channels == 1 else 'RGB'} frames)",
                          convert_fix(spec.channels if spec else channels))
    prep = preprocessing(size, normalize, model_spec, channels)
    dev = models.resolve_device(device)
    model = model.to(dev)
    hint = ("pass a smaller --size" + (" or --clip-length" if clips else "") +
            ", or --method-option save_memory=True for LRP")
    explainer = make_explainer(model, composite, prep, channels, method, layer, passthrough, method_options,
                               nonfinite, hint)
    wanted = None if target == "pred" else target
    timing = {"explain_s": 0.0}

    def run(x):  # a batch of model inputs -> its relevance on the CPU
        t0 = time.perf_counter()
        relevance = explainer(x.to(dev), wanted).float().cpu()
        timing["explain_s"] += time.perf_counter() - t0
        return relevance

    source = _open_input(av, in_path)
    in_stream = source.streams.video[0]
    in_stream.thread_type = "AUTO"
    rate = in_stream.average_rate or Fraction(25)
    decoded = _frames(source, in_stream, channels)
    if clips:
        # each frame scaled once, then shared by the clips that hold it; prep needs a batch axis
        pairs = ((frame, prep(frame[None])[0]) for frame in decoded)
        explained = clip_relevance(pairs, run, clip_length, clip_stride, batch_size)
    else:
        explained = frame_relevance(decoded, lambda batch: run(prep(batch)), batch_size)

    partial = temporary_name(out_path)
    sink = av.open(str(partial), "w", format=_container_format(av, out_path))
    out_stream = None
    frames_done = 0
    start = time.perf_counter()
    bar = progress(total=in_stream.frames or None, desc="video", unit="frame")  # the rate is frames/s
    try:
        for frame_pixels, frame_rel in explained:
            _, over, _ = render(frame_pixels, frame_rel, cmap, alpha, percentile)
            over = _even(over)
            if out_stream is None:
                out_stream = sink.add_stream(codec, rate=rate)
                out_stream.width, out_stream.height = over.shape[1], over.shape[0]
                out_stream.pix_fmt = "yuv420p"
            for packet in out_stream.encode(av.VideoFrame.from_ndarray(over, format="rgb24")):
                sink.mux(packet)
            frames_done += 1
            bar.update(1)
        if out_stream is None:
            raise ValueError(f"video {in_path} has no frames to explain")
        for packet in out_stream.encode():  # flush the encoder's delayed frames
            sink.mux(packet)
    except BaseException:
        bar.close()
        source.close()
        try:
            sink.close()
        except av.FFmpegError:
            pass  # nothing was written to close cleanly
        partial.unlink(missing_ok=True)  # a half-written video is worse than none; an earlier OUT stays
        raise
    bar.close()
    try:
        sink.close()
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    source.close()
    os.replace(partial, out_path)  # OUT appears complete, or not at all
    seconds = time.perf_counter() - start
    height, width = in_stream.codec_context.height, in_stream.codec_context.width
    explain_s = timing["explain_s"]
    if clips:
        mode = f"3D clips of {clip_length} frames every {clip_stride}, {batch_size} per pass"
    else:
        mode = f"2D, batches of {batch_size} frames"
    return {"out": str(out_path), "frames": frames_done, "width": width, "height": height, "mode": mode,
            "codec": codec, "method": method, "seconds": seconds, "fps": frames_done / seconds,
            "explain_fps": frames_done / explain_s if explain_s > 0 else float("inf")}
