"""``fastlrp video``: decode with PyAV, explain frames in batches, encode relevance overlays.

Streaming: frames are decoded, explained and encoded a batch (2D models) or a clip (3D
models) at a time, so memory stays flat however long the video is. A 2D model explains
each frame on its own; a 3D model (first layer Conv3d, e.g. torchvision's r3d_18) explains
consecutive clips of ``clip_length`` frames, the last one padded by repeating its final
frame (the padding's relevance is dropped).
"""

from __future__ import annotations

import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from .. import models
from ...extras import require
from .common import check_input_file, convert_fix, make_explainer, preprocessing, progress
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


def _even(array: np.ndarray) -> np.ndarray:
    # 4:2:0 chroma needs even width and height; repeat the last row/column where odd.
    h, w = array.shape[:2]
    return np.pad(array, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def explain_video(in_path, out_path, model_spec: str, weights=None, num_classes=None, composite="epsilon_plus",
                  target="pred", size=None, normalize="auto", convert=None, batch_size=8, clip_length=16,
                  cmap="bwr", alpha=0.6, percentile=None, device="auto", codec=None) -> dict:
    """Write a video of relevance overlays of ``in_path`` to ``out_path``; return counts and speed."""
    av = require("av", "video")
    in_path, out_path = Path(in_path), Path(out_path)
    model = models.load_model(model_spec, weights, num_classes)
    spec = models.input_spec(model)
    models.check_spatial_dims(spec, (2, 3), "video", "use a per-frame image model or a clip model such as r3d_18")
    clips = spec is not None and spec.spatial_dims == 3
    channels = 1 if convert == "L" else 3
    models.check_channels(spec, channels, f"video {in_path.name} ({'grey' if channels == 1 else 'RGB'} frames)",
                          convert_fix(spec.channels if spec else channels))
    prep = preprocessing(size, normalize, model_spec, channels)
    dev = models.resolve_device(device)
    model = model.to(dev)
    explainer = make_explainer(model, composite, prep, channels)
    codec = _pick_codec(av, out_path, codec)
    if out_path.parent and not out_path.parent.exists():
        raise FileNotFoundError(f"folder {out_path.parent} for --out does not exist")

    source = _open_input(av, in_path)
    in_stream = source.streams.video[0]
    in_stream.thread_type = "AUTO"
    rate = in_stream.average_rate or Fraction(25)
    sink = av.open(str(out_path), "w")
    out_stream = None
    frames_done, explain_s = 0, 0.0
    start = time.perf_counter()
    bar = progress(total=in_stream.frames or None, desc="video", unit="frame")
    try:
        per_step = clip_length if clips else batch_size
        for batch in _batches(_frames(source, in_stream, channels), per_step):
            pixels = torch.stack(batch)  # [B, C, H, W]
            if clips:
                padded = batch + [batch[-1]] * (clip_length - len(batch))
                x = prep(torch.stack(padded, 1))[None]  # [1, C, T, H, W]
            else:
                x = prep(pixels)
            t0 = time.perf_counter()
            x = x.to(dev)
            idx = None if target == "pred" else target
            relevance = explainer(x, idx)
            relevance = relevance[0].transpose(0, 1)[: len(batch)] if clips else relevance  # [B, C, h, w]
            relevance = relevance.detach().cpu()
            explain_s += time.perf_counter() - t0
            for frame_pixels, frame_rel in zip(pixels, relevance):
                _, over = render(frame_pixels, frame_rel, cmap, alpha, percentile)
                over = _even(over)
                if out_stream is None:
                    out_stream = sink.add_stream(codec, rate=rate)
                    out_stream.width, out_stream.height = over.shape[1], over.shape[0]
                    out_stream.pix_fmt = "yuv420p"
                for packet in out_stream.encode(av.VideoFrame.from_ndarray(over, format="rgb24")):
                    sink.mux(packet)
            frames_done += len(batch)
            bar.update(len(batch))
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
        out_path.unlink(missing_ok=True)  # a half-written video is worse than none
        raise
    bar.close()
    sink.close()
    source.close()
    seconds = time.perf_counter() - start
    height, width = in_stream.codec_context.height, in_stream.codec_context.width
    return {"out": str(out_path), "frames": frames_done, "width": width, "height": height,
            "mode": f"3D clips of {clip_length} frames" if clips else f"2D, batches of {batch_size} frames",
            "codec": codec, "seconds": seconds, "fps": frames_done / seconds,
            "explain_fps": frames_done / explain_s if explain_s > 0 else float("inf")}
