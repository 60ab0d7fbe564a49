"""Render relevance as RGB heatmaps and write them as PNG files.

Small on purpose: a heatmap is relevance summed over channels, scaled into [-1, 1] (or
[0, 1]) and looked up in a matplotlib colour map. With the default ``bwr`` map and
symmetric scaling, zero relevance is white, positive relevance red and negative blue, and
equal magnitudes get equal colour strength whatever their sign.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import torch
from PIL import Image


def _to_numpy(array) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().to("cpu", torch.float64).numpy()
    return np.asarray(array)


def heatmap(
    relevance,
    cmap: str = "bwr",
    symmetric: bool = True,
    percentile: float | None = None,
) -> np.ndarray:
    """Colour a relevance map; returns a uint8 array of shape [H, W, 3].

    ``relevance`` is a tensor or array of shape [H, W] or [C, H, W] (channels first, as
    torch lays out images); channels are summed, since relevance is additive.

    symmetric: scale by the largest |R| so that 0 sits at the colour map's middle (white
    for ``bwr``). Otherwise stretch [min R, max R] over the whole map.
    percentile: with symmetric scaling, divide by this percentile of |R| instead of its
    maximum and clip, so that a few extreme pixels do not wash out the rest.
    """
    r = _to_numpy(relevance).astype(np.float64)
    if r.ndim == 3:
        r = r.sum(axis=0)
    if r.ndim != 2:
        raise ValueError(f"relevance must have shape [H, W] or [C, H, W], got {r.shape}")

    if symmetric:
        magnitude = np.abs(r)
        scale = np.percentile(magnitude, percentile) if percentile is not None else magnitude.max()
        # An all-zero map (or a zero percentile) stays zero: white, not NaN.
        unit = np.clip(r / scale, -1.0, 1.0) if scale > 0 else np.zeros_like(r)
        values = (unit + 1.0) / 2.0
    else:
        low, span = r.min(), np.ptp(r)
        values = (r - low) / span if span > 0 else np.full_like(r, 0.5)

    rgba = matplotlib.colormaps[cmap](values, bytes=True)
    return np.ascontiguousarray(rgba[..., :3])


def image_to_uint8(image) -> np.ndarray:
    """An image in [0, 1] ([3, H, W] tensor/array, or [H, W, 3]) as uint8 [H, W, 3]."""
    a = _to_numpy(image)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    if a.dtype != np.uint8:
        a = np.round(np.clip(a, 0.0, 1.0) * 255).astype(np.uint8)
    return a


def overlay(image, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a heatmap over an image: ``(1 - alpha) * image + alpha * heat``, uint8 [H, W, 3]."""
    base = image_to_uint8(image).astype(np.float64)
    top = np.asarray(heat, dtype=np.float64)
    if base.shape != top.shape:
        raise ValueError(f"image {base.shape} and heatmap {top.shape} differ in shape")
    return np.round((1.0 - alpha) * base + alpha * top).astype(np.uint8)


def upscale(array: np.ndarray, factor: int) -> np.ndarray:
    """Enlarge [H, W, ...] by an integer factor, nearest neighbour (pixels stay crisp)."""
    return np.repeat(np.repeat(array, factor, axis=0), factor, axis=1)


def save_png(path: str | Path, array: np.ndarray) -> Path:
    """Write a uint8 [H, W, 3] (or [H, W]) array as a PNG file and return its path."""
    a = np.asarray(array)
    if a.dtype != np.uint8:
        raise TypeError(f"save_png expects uint8 pixels, got {a.dtype}")
    path = Path(path)
    Image.fromarray(a).save(path, format="PNG")
    return path
