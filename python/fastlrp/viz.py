"""Render relevance as RGB heatmaps, overlays and labelled grids, and write PNG files.

A heatmap is relevance summed over channels (relevance is additive), scaled into [0, 1]
and looked up in a colour map. With the default ``bwr`` map and symmetric scaling, zero
relevance is white, positive relevance (evidence for the explained class) red and negative
(evidence against it) blue, and equal magnitudes get equal colour strength whatever their
sign. Colours saturate at the 99.5th percentile of |R| by default (``DEFAULT_PERCENTILE``):
LRP maps often hold a few pixels far above the rest, and scaling to the maximum would leave
everything else near white.

Pictures that explain themselves: ``annotate`` puts a title (class, score) above a picture
and a labelled colour bar (its end values and what the colours mean) below; ``visualize``
draws a matplotlib figure (heatmap, overlay, or side by side; all, positive, negative or
absolute relevance) in the manner of Captum's ``visualize_image_attr``.

Colour maps: the names LRP users know from Zennit and the LRP toolbox are defined here
from their colour stops (``COLORMAPS``); they take priority over matplotlib's maps of the
same name (``hot`` and ``seismic`` differ from matplotlib's). Any other matplotlib name,
or a ``matplotlib.colors.Colormap``, works too.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import matplotlib
import matplotlib.colors
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

# name -> colour stops, each "RRGGBB" or "RGB" hex, optionally prefixed "position:" with
# position in [0, 1]; stops without a position are spaced evenly between their neighbours.
# Diverging maps put zero relevance (value 0.5) at their middle stop.
COLORMAPS: dict[str, str] = {
    "bwr": "00f, 0.5:fff, f00",  # blue - white - red
    "coldnhot": "0ff, 00f, 0.5:000, f00, ff0, fff",  # cyan-blue below zero, black at 0, red-yellow-white above
    "seismic": "0000d0, 0.5:d0d0d0, d00000",  # dark blue - light grey - dark red
    "france": "0055a4, 0.5:fff, ef4135",  # the flag's blue - white - red
    "coolio": "00d0d0, 0.5:d0d0d0, d000d0",  # cyan - grey - magenta
    "coleus": "00d000, 0.5:d0d0d0, d000d0",  # green - grey - magenta
    "blight": "6d9eeb, 0.5:fff, f4a582",  # light blue - white - light red: a softer bwr for overlays
    "gray": "000, fff",  # black - white
    "hot": "000, f00, ff0, fff",  # black - red - yellow - white
    "cold": "000, 00f, 0ff",  # black - blue - cyan
    "wred": "fff, f00",  # white - red: positive relevance only
    "wblue": "fff, 00f",  # white - blue
    "red": "000, f00",  # black - red
}
DIVERGING = ("bwr", "coldnhot", "seismic", "france", "coolio", "coleus", "blight")
# What the two ends of a diverging map look like, for legends ("red: for, blue: against").
END_COLOURS = {"bwr": ("blue", "red"), "seismic": ("blue", "red"), "france": ("blue", "red"),
               "blight": ("blue", "red"), "coldnhot": ("blue", "red-yellow"), "coolio": ("cyan", "magenta"),
               "coleus": ("green", "magenta")}
DEFAULT_PERCENTILE = 99.5
SIGNS = ("all", "positive", "negative", "absolute")
MODES = ("heatmap", "overlay", "side_by_side")


def _hex_rgb(text: str) -> tuple[float, float, float]:
    if len(text) == 3:
        text = "".join(c * 2 for c in text)
    if len(text) != 6:
        raise ValueError(f"colour {text!r} is not RGB or RRGGBB hex")
    return tuple(int(text[i : i + 2], 16) / 255.0 for i in (0, 2, 4))


def _parse_stops(spec: str) -> list[tuple[float, tuple]]:
    entries = [part.strip() for part in spec.split(",")]
    positions: list[float | None] = []
    colours = []
    for entry in entries:
        where, _, colour = entry.rpartition(":")
        positions.append(float(where) if where else None)
        colours.append(_hex_rgb(colour))
    positions[0] = 0.0 if positions[0] is None else positions[0]
    positions[-1] = 1.0 if positions[-1] is None else positions[-1]
    # Fill the unnamed positions linearly between the named ones on either side.
    known = [i for i, p in enumerate(positions) if p is not None]
    for a, b in zip(known, known[1:]):
        for i in range(a + 1, b):
            positions[i] = positions[a] + (positions[b] - positions[a]) * (i - a) / (b - a)
    return list(zip(positions, colours))


def colormap(cmap) -> matplotlib.colors.Colormap:
    """A matplotlib colour map from a fastlrp name (``COLORMAPS``), a matplotlib name, or a map."""
    if isinstance(cmap, matplotlib.colors.Colormap):
        return cmap
    if cmap in COLORMAPS:
        return matplotlib.colors.LinearSegmentedColormap.from_list(cmap, _parse_stops(COLORMAPS[cmap]), N=256)
    try:
        return matplotlib.colormaps[cmap]
    except KeyError:
        raise ValueError(f"unknown colour map {cmap!r}; fastlrp's are {sorted(COLORMAPS)}, "
                         "or any matplotlib colour map name") from None


def _to_numpy(array) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().to("cpu", torch.float64).numpy()
    return np.asarray(array)


def reduce_channels(relevance) -> np.ndarray:
    """[H, W] float64 relevance from [H, W] or channels-first [C, H, W] (channels summed)."""
    r = _to_numpy(relevance).astype(np.float64)
    if r.ndim == 3:
        r = r.sum(axis=0)
    if r.ndim != 2:
        raise ValueError(f"relevance must have shape [H, W] or [C, H, W], got {r.shape}")
    return r


def normalize(relevance, symmetric: bool = True, percentile: float | None = None,
              scale: float | None = None) -> np.ndarray:
    """Scale relevance of any shape into [0, 1] for a colour map lookup.

    symmetric: divide by the largest |R| (or its ``percentile``-th percentile, clipping
    above) and map [-1, 1] to [0, 1], so that zero lands at 0.5 (a diverging map's middle).
    Otherwise stretch [min R, max R] (or the [100 - p, p] percentiles) over [0, 1].
    scale: with symmetric scaling, divide by this instead (one scale shared by several
    maps, so their colours compare). A constant map gives 0.5 everywhere, never NaN.
    """
    r = _to_numpy(relevance).astype(np.float64)
    if percentile is not None and not 0 < percentile <= 100:
        raise ValueError(f"percentile must lie in (0, 100], got {percentile}")
    if symmetric:
        magnitude = np.abs(r)
        if scale is None:
            scale = np.percentile(magnitude, percentile) if percentile is not None else magnitude.max(initial=0.0)
        unit = np.clip(r / scale, -1.0, 1.0) if scale > 0 else np.zeros_like(r)
        return (unit + 1.0) / 2.0
    if percentile is not None:
        low, high = np.percentile(r, 100 - percentile), np.percentile(r, percentile)
        low, high = min(low, high), max(low, high)
    else:
        low, high = r.min(initial=np.inf), r.max(initial=-np.inf)
    span = high - low
    return np.clip((r - low) / span, 0.0, 1.0) if span > 0 else np.full_like(r, 0.5)


def relevance_scale(relevance, percentile: float | None = DEFAULT_PERCENTILE) -> float:
    """The |R| at which symmetric colours saturate: the ``percentile``-th percentile of |R|
    (None: the maximum). NaN and Inf are left out; 0.0 for an all-zero map."""
    magnitude = np.abs(_to_numpy(relevance).astype(np.float64)).ravel()
    magnitude = magnitude[np.isfinite(magnitude)]
    if percentile is not None and not 0 < percentile <= 100:
        raise ValueError(f"percentile must lie in (0, 100], got {percentile}")
    if magnitude.size == 0:
        return 0.0
    return float(np.percentile(magnitude, percentile) if percentile is not None else magnitude.max())


def heatmap(relevance, cmap="bwr", symmetric: bool = True, percentile: float | None = DEFAULT_PERCENTILE,
            scale: float | None = None) -> np.ndarray:
    """Colour a relevance map; returns a uint8 array of shape [H, W, 3].

    ``relevance`` is a tensor or array of shape [H, W] or [C, H, W] (channels first, as
    torch lays out images); channels are summed. ``cmap``: see ``COLORMAPS`` (diverging
    maps suit ``symmetric=True``, one-sided maps such as ``hot`` or ``wred`` suit
    ``symmetric=False`` or positive relevance). ``symmetric``, ``percentile`` and ``scale``:
    see ``normalize``. The default percentile, 99.5, keeps a few extreme pixels from washing
    out the rest; ``percentile=None`` scales to the maximum.
    """
    values = normalize(reduce_channels(relevance), symmetric, percentile, scale)
    rgba = colormap(cmap)(values, bytes=True)
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
    """Blend a heatmap over an image: ``(1 - alpha) * image + alpha * heat``, uint8 [H, W, 3].

    The image may be grey or colour, uint8 or in [0, 1]. To see the input under a
    diverging map, a grey version of the image with alpha 0.5-0.7 reads best.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    base = image_to_uint8(image).astype(np.float64)
    top = np.asarray(heat, dtype=np.float64)
    if base.shape != top.shape:
        raise ValueError(f"image {base.shape} and heatmap {top.shape} differ in shape")
    return np.round((1.0 - alpha) * base + alpha * top).astype(np.uint8)


def upscale(array: np.ndarray, factor: int) -> np.ndarray:
    """Enlarge [H, W, ...] by an integer factor, nearest neighbour (pixels stay crisp)."""
    return np.repeat(np.repeat(array, factor, axis=0), factor, axis=1)


def grid(tiles: Sequence[np.ndarray], labels: Sequence[str] | None = None, columns: int = 4,
         gap: int = 4) -> np.ndarray:
    """Lay uint8 [H, W, 3] tiles out row by row on white, each with an optional caption above.

    Tiles may differ in size: each cell is as large as the largest tile. Captions are drawn
    with Pillow's built-in bitmap font and cut to the cell's width.
    """
    if not tiles:
        raise ValueError("grid needs at least one tile")
    if labels is not None and len(labels) != len(tiles):
        raise ValueError(f"{len(labels)} labels for {len(tiles)} tiles")
    tiles = [image_to_uint8(t) for t in tiles]
    cell_h = max(t.shape[0] for t in tiles)
    cell_w = max(t.shape[1] for t in tiles)
    font = ImageFont.load_default()
    caption_h = 0
    if labels is not None:
        caption_h = max(font.getbbox(text or " ")[3] for text in labels) + 4
    columns = max(1, min(columns, len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    step_y, step_x = caption_h + cell_h + gap, cell_w + gap
    canvas = Image.new("RGB", (columns * step_x - gap, rows * step_y - gap), "white")
    draw = ImageDraw.Draw(canvas)
    for k, tile in enumerate(tiles):
        row, col = divmod(k, columns)
        y, x = row * step_y, col * step_x
        if labels is not None:
            text = labels[k]
            while text and font.getbbox(text)[2] > cell_w:
                text = text[:-1]
            draw.text((x, y + 1), text, fill="black", font=font)
        canvas.paste(Image.fromarray(tile), (x, y + caption_h))
    return np.asarray(canvas)


def colorbar(cmap="bwr", width: int = 256, height: int = 12) -> np.ndarray:
    """The colour map as a uint8 [height, width, 3] strip, low values on the left."""
    values = np.broadcast_to(np.linspace(0.0, 1.0, width), (height, width))
    return np.ascontiguousarray(colormap(cmap)(values, bytes=True)[..., :3])


def save_png(path: str | Path, array: np.ndarray) -> Path:
    """Write a uint8 [H, W, 3] (or [H, W]) array as a PNG file and return its path."""
    a = np.asarray(array)
    if a.dtype != np.uint8:
        raise TypeError(f"save_png expects uint8 pixels, got {a.dtype}")
    path = Path(path)
    Image.fromarray(a).save(path, format="PNG")
    return path


def png_bytes(array: np.ndarray) -> bytes:
    """A uint8 image encoded as PNG in memory (for HTML reports)."""
    import io

    a = np.asarray(array)
    if a.dtype != np.uint8:
        raise TypeError(f"png_bytes expects uint8 pixels, got {a.dtype}")
    buffer = io.BytesIO()
    Image.fromarray(a).save(buffer, format="PNG")
    return buffer.getvalue()


# --- pictures that explain themselves ----------------------------------------------------

def font(size: int = 12):
    """A TrueType font for captions: matplotlib's DejaVu Sans (always installed with it), else
    Pillow's built-in one."""
    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    try:
        return ImageFont.truetype(str(path), size)
    except OSError:
        return ImageFont.load_default()


def colour_meaning(cmap="bwr", target: str | None = None) -> str:
    """What the colours of a symmetric heatmap mean, in words: "red: evidence for cat, blue:
    against" for the maps whose end colours are known, else in terms of the bar's ends."""
    what = f" {target}" if target else ""
    name = cmap if isinstance(cmap, str) else None
    if name in END_COLOURS:
        low, high = END_COLOURS[name]
        return f"{high}: evidence for{what}, {low}: against"
    return f"right end: evidence for{what}, left end: against"


def _draw_text(draw, xy, text: str, face) -> None:
    """``draw.text`` in black. Pillow checks a text's mask against its decompression-bomb limit,
    which a caller may have lowered for untrusted input files (``fastlrp explain --max-pixels``);
    a caption is not such a file, so a refusal is retried with the limit lifted for the one call."""
    try:
        draw.text(xy, text, fill="black", font=face)
    except Image.DecompressionBombError:
        limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            draw.text(xy, text, fill="black", font=face)
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def _text_width(text: str, face) -> int:
    return int(math.ceil(face.getlength(text)))


def _fit(text: str, face, width: int) -> str:
    """``text`` cut (with an ellipsis) to ``width`` pixels."""
    if _text_width(text, face) <= width:
        return text
    while text and _text_width(text + "…", face) > width:
        text = text[:-1]
    return text + "…"


def legend(scale: float, cmap="bwr", width: int = 240, target: str | None = None, note: str | None = None,
           size: int = 11) -> np.ndarray:
    """A labelled colour bar for symmetric heatmaps, uint8 [h, width, 3] on white: the strip,
    the values at its ends and middle (-scale, 0, +scale) and a line saying what the colours
    mean; ``note`` (e.g. how the scale was chosen) on a last line."""
    face = font(size)
    line = size + 4
    strip_h = max(6, size // 2 + 4)
    lines = [colour_meaning(cmap, target)] + ([note] if note else [])
    height = strip_h + line + line * len(lines) + 2
    canvas = Image.new("RGB", (width, height), "white")
    margin = 4
    bar = colorbar(cmap, width - 2 * margin, strip_h)
    canvas.paste(Image.fromarray(bar), (margin, 0))
    draw = ImageDraw.Draw(canvas)
    low, high = f"-{scale:.3g}", f"+{scale:.3g}"
    y = strip_h + 1
    _draw_text(draw, (margin, y), low, face)
    _draw_text(draw, ((width - _text_width("0", face)) // 2, y), "0", face)
    _draw_text(draw, (width - margin - _text_width(high, face), y), high, face)
    for k, text in enumerate(lines):
        _draw_text(draw, (margin, y + line * (k + 1)), _fit(text, face, width - 2 * margin), face)
    return np.asarray(canvas)


def annotate(picture: np.ndarray, title: str | Sequence[str] | None = None, scale: float | None = None,
             cmap="bwr", target: str | None = None, note: str | None = None, min_width: int = 240,
             size: int = 11) -> np.ndarray:
    """``picture`` (uint8 [H, W, 3], kept pixel for pixel) with ``title`` (a line or several)
    above and, when ``scale`` is given, a ``legend`` below; on white, at least ``min_width``
    wide so the words fit under a small picture."""
    face = font(size)
    picture = image_to_uint8(picture)
    titles = [title] if isinstance(title, str) else list(title or ())
    width = max(picture.shape[1], min_width)
    title_h = (size + 4) * len(titles) + (3 if titles else 0)
    bar = legend(scale, cmap, width, target, note, size) if scale is not None else None
    height = title_h + picture.shape[0] + (4 + bar.shape[0] if bar is not None else 0)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for k, text in enumerate(titles):
        _draw_text(draw, (2, 1 + (size + 4) * k), _fit(text, face, width - 4), face)
    canvas.paste(Image.fromarray(picture), ((width - picture.shape[1]) // 2, title_h))
    if bar is not None:
        canvas.paste(Image.fromarray(bar), (0, title_h + picture.shape[0] + 4))
    return np.asarray(canvas)


def _signed(relevance: np.ndarray, sign: str) -> np.ndarray:
    if sign == "all":
        return relevance
    if sign == "positive":
        return np.clip(relevance, 0.0, None)
    if sign == "negative":
        return np.clip(-relevance, 0.0, None)  # as magnitudes, so one colour map reads them
    if sign == "absolute":
        return np.abs(relevance)
    raise ValueError(f"sign must be one of {', '.join(SIGNS)}, got {sign!r}")


def visualize(relevance, image=None, mode: str = "side_by_side", sign: str = "all", cmap=None,
              percentile: float | None = DEFAULT_PERCENTILE, alpha: float = 0.6, title: str | None = None,
              target: str | None = None, colorbar: bool = True, figsize: tuple | None = None):
    """A matplotlib Figure of one explanation, readable without the docs.

    ``relevance``: [H, W] or [C, H, W] (channels summed); ``image``: the input ([3, H, W] or
    [H, W, 3] in [0, 1], or uint8), needed by ``mode`` ``overlay`` (the heatmap over the grey
    image) and ``side_by_side`` (the image, then the heatmap); ``heatmap`` shows the map alone.
    ``sign``: ``all`` (diverging map, default ``bwr``: red for, blue against), ``positive`` or
    ``negative`` (that part only, as magnitudes, ``wred`` / ``wblue``), ``absolute`` (|R|,
    ``hot``). Colours saturate at the ``percentile``-th percentile of the shown values (None:
    the maximum). ``target`` names the explained class in the colour bar's label. As Captum's
    ``visualize_image_attr`` (methods heat_map / blended_heat_map, signs all / positive /
    negative / absolute_value). The figure is a bare ``matplotlib.figure.Figure`` (no pyplot
    state): ``fig.savefig(path)`` writes it.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if sign not in SIGNS:
        raise ValueError(f"sign must be one of {', '.join(SIGNS)}, got {sign!r}")
    if mode != "heatmap" and image is None:
        raise ValueError(f"mode {mode!r} draws the input too: pass image=, or use mode='heatmap'")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    values = _signed(reduce_channels(relevance), sign)
    symmetric = sign == "all"
    cmap = cmap or {"all": "bwr", "positive": "wred", "negative": "wblue", "absolute": "hot"}[sign]
    scale = relevance_scale(values, percentile)
    if symmetric:
        colours = heatmap(values, cmap, scale=scale)
        norm = Normalize(-scale, scale)
    else:  # one-sided: 0 at the map's low end, the scale at its high end
        unit = np.clip(values / scale, 0.0, 1.0) if scale > 0 else np.zeros_like(values)
        colours = np.ascontiguousarray(colormap(cmap)(unit, bytes=True)[..., :3])
        norm = Normalize(0.0, scale)
    panels = []
    if image is not None:
        picture = image_to_uint8(image)
        if picture.shape[:2] != colours.shape[:2]:
            raise ValueError(f"image {picture.shape[:2]} and relevance {colours.shape[:2]} differ in size")
    if mode == "side_by_side":
        panels = [(picture, "input"), (colours, "relevance")]
    elif mode == "overlay":
        grey = picture.astype(np.float64).mean(-1) / 255.0
        panels = [(overlay(grey, colours, alpha), "relevance over the input")]
    else:
        panels = [(colours, "relevance")]
    figure = Figure(figsize=figsize or (3.0 * len(panels) + (1.1 if colorbar else 0.0), 3.4), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (pixels, name) in zip(axes, panels):
        ax.imshow(pixels, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if title:
        figure.suptitle(title, fontsize=10)
    if colorbar:
        what = f" {target}" if target else ""
        label = {"all": colour_meaning(cmap, target), "positive": f"positive relevance (evidence for{what})",
                 "negative": f"|negative relevance| (evidence against{what})",
                 "absolute": f"|relevance| (evidence for or against{what})"}[sign]
        bar = figure.colorbar(ScalarMappable(norm=norm, cmap=colormap(cmap)), ax=list(axes), shrink=0.85)
        scaled = f"saturates at the {percentile:g}th percentile" if percentile is not None else "scaled to the maximum"
        bar.set_label(f"{label}\n({scaled})", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    return figure
