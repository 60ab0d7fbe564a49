"""Matplotlib figures for model analysis: prototype grids, channel bar charts, neuron-group maps
and the most helpful / harmful training points. Each function returns the ``Figure``; nothing is
shown or saved (call ``fig.savefig(path)``)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from ..viz import heatmap, image_to_uint8


def _figure(rows: int, columns: int, size: float):
    # Imported here so that importing fastlrp.analysis does not pick a matplotlib backend.
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, columns, figsize=(size * columns, size * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    return fig, axes


def _as_images(images) -> torch.Tensor:
    images = getattr(images, "images", images)  # a Prototypes result or a tensor
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError("images must be a tensor [N, 1 or 3, H, W] (or a Prototypes result)")
    return images.detach().cpu()


def _check_titles(titles, count):
    if titles is not None and len(titles) != count:
        raise ValueError(f"titles has {len(titles)} entries for {count} images")


def plot_prototypes(images, titles: Sequence[str] | None = None, columns: int = 8, value_range=(0.0, 1.0),
                    size: float = 1.6):
    """A grid of prototype images ([N, C, H, W] or a ``Prototypes``), scaled from ``value_range`` to [0, 1]."""
    images = _as_images(images)
    _check_titles(titles, len(images))
    if not isinstance(columns, int) or columns < 1:
        raise ValueError(f"columns must be an int >= 1, got {columns!r}")
    low, high = value_range
    columns = min(columns, len(images))
    fig, axes = _figure(math.ceil(len(images) / columns), columns, size)
    for k, image in enumerate(images):
        ax = axes.flat[k]
        ax.imshow(image_to_uint8((image - low) / (high - low)), interpolation="nearest")
        if titles is not None:
            ax.set_title(titles[k], fontsize=8)
    return fig


def plot_channel_bars(attribution, sample: int = 0, top: int = 10, ax=None, title: str | None = None):
    """Horizontal bars of the ``top`` channels by |attribution| for one sample, positive red, negative blue.

    ``attribution``: a ``ChannelAttribution`` (its ``per_channel`` row ``sample``) or a 1-D tensor of
    per-channel values."""
    per_channel = getattr(attribution, "per_channel", attribution)
    if not isinstance(per_channel, torch.Tensor):
        raise TypeError("attribution must be a ChannelAttribution or a tensor of per-channel values")
    values = per_channel[sample] if per_channel.ndim == 2 else per_channel
    if values.ndim != 1:
        raise ValueError(f"per-channel values must be [C] or [N, C], got shape {tuple(per_channel.shape)}")
    values = values.detach().cpu().double()
    top = min(int(top), values.numel())
    order = values.abs().argsort(descending=True)[:top].flip(0)  # largest at the top of the chart
    if ax is None:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4, 0.3 * top + 1))
    else:
        fig = ax.figure
    shown = values[order].numpy()
    ax.barh(np.arange(top), shown, color=np.where(shown >= 0, "tab:red", "tab:blue"))
    ax.set_yticks(np.arange(top), [f"ch {int(c)}" for c in order])
    ax.axvline(0, color="black", linewidth=0.5)
    ax.set_xlabel("attribution")
    layer = getattr(attribution, "layer", None)
    ax.set_title(title or (f"top channels of {layer}" if layer else "top channels"), fontsize=9)
    fig.tight_layout()
    return fig


def plot_neuron_groups(groups, image: torch.Tensor | None = None, sample: int = 0, size: float = 1.8):
    """For one sample: the input (if given), then each group's map of presence, titled with the group's
    relevance; below, each group's relevance map. ``groups`` is a ``NeuronGroups``."""
    maps = groups.maps[sample].detach().cpu()
    relevance = groups.relevance_maps[sample].detach().cpu()
    if maps.ndim != 3:
        raise ValueError(f"group maps must be 2-D per group to draw, got shape {tuple(maps.shape)}")
    k = maps.shape[0]
    offset = 0 if image is None else 1
    fig, axes = _figure(2, k + offset, size)
    if image is not None:
        axes[0, 0].imshow(image_to_uint8(image.detach().cpu()), interpolation="nearest")
        axes[0, 0].set_title("input", fontsize=8)
    per_group = groups.per_group[sample]
    for g in range(k):
        axes[0, g + offset].imshow(maps[g].numpy(), cmap="viridis", interpolation="nearest")
        axes[0, g + offset].set_title(f"group {g}: R={float(per_group[g]):.2f}", fontsize=8)
        axes[1, g + offset].imshow(heatmap(relevance[g]), interpolation="nearest")
    return fig


def plot_influential(train_images: torch.Tensor, result, test: int = 0, k: int = 5, size: float = 1.4):
    """The ``k`` most helpful (top row) and most harmful (bottom row) training images for test point
    ``test`` of an ``Influence`` result, titled with their scores."""
    images = _as_images(train_images)
    if images.shape[0] != result.scores.shape[1]:
        raise ValueError(f"train_images has {images.shape[0]} images, the influence result {result.scores.shape[1]}")
    fig, axes = _figure(2, k, size)
    for row, indices in enumerate((result.most_helpful(k, test), result.most_harmful(k, test))):
        for col, index in enumerate(indices.tolist()):
            ax = axes[row, col]
            ax.imshow(image_to_uint8(images[index]), interpolation="nearest")
            ax.set_title(f"#{index}: {float(result.scores[test, index]):+.2g}", fontsize=7)
    axes[0, 0].text(-0.1, 0.5, "helpful", transform=axes[0, 0].transAxes, rotation=90, ha="right", va="center")
    axes[1, 0].text(-0.1, 0.5, "harmful", transform=axes[1, 0].transAxes, rotation=90, ha="right", va="center")
    return fig
