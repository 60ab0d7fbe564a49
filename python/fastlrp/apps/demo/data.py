"""Synthetic images for the demo: shapes on noise, with a Clever-Hans watermark.

Class 0 ("disk") shows a filled disk, class 1 ("cross") a plus-shaped cross, each at a
random place, size and colour on a noisy grey background; some shapes are tiny or faint
and hard to classify. A small black-and-white checkerboard (the watermark) sits in the
bottom-right corner of about ``watermark_fraction`` of the class-1 images and of no
class-0 image. A classifier trained on these images learns to lean on the corner as well
as on the shape -- the spurious correlation ("Clever Hans") that LRP heatmaps are known
for exposing.

Images are float32 in [0, 1], shape [N, 3, H, W]; no normalisation is applied, so the
input domain for bounded rules (ZBox) is low=0, high=1. Everything is drawn from one
seeded ``torch.Generator``: the same arguments give the same tensors on every machine.
"""

from __future__ import annotations

import torch

CLASS_NAMES = ("disk", "cross")
NUM_CLASSES = len(CLASS_NAMES)
WATERMARK_CLASS = 1
WATERMARK_SIZE = 4
# One pixel away from the border, so zero padding of the first convolution does not
# touch the pattern and it is the same signal wherever it is seen.
WATERMARK_MARGIN = 1


def watermark_pattern() -> torch.Tensor:
    """The watermark as a [3, S, S] float tensor: a checkerboard of 1s and 0s."""
    idx = torch.arange(WATERMARK_SIZE)
    checker = ((idx[:, None] + idx[None, :]) % 2 == 0).float()
    return checker.expand(3, -1, -1).clone()


def watermark_region(image_size: int = 32) -> tuple[slice, slice]:
    """(rows, cols) slices of the watermark inside an image of side ``image_size``."""
    stop = image_size - WATERMARK_MARGIN
    start = stop - WATERMARK_SIZE
    return slice(start, stop), slice(start, stop)


def watermark_mask(image_size: int = 32) -> torch.Tensor:
    """Boolean [H, W] mask that is True on the watermark's pixels."""
    mask = torch.zeros(image_size, image_size, dtype=torch.bool)
    mask[watermark_region(image_size)] = True
    return mask


def add_watermark(images: torch.Tensor) -> torch.Tensor:
    """Return a copy of ``images`` [N, 3, H, W] with the watermark pasted into each."""
    out = images.clone()
    rows, cols = watermark_region(images.shape[-1])
    out[..., rows, cols] = watermark_pattern().to(out)
    return out


def make_dataset(
    n: int,
    seed: int,
    image_size: int = 32,
    watermark_fraction: float = 0.8,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Generate ``n`` labelled images.

    Returns ``(images, labels, has_watermark)``: float32 [n, 3, S, S] in [0, 1], int64 [n]
    and bool [n]. Classes are balanced (n // 2 or n - n // 2 of each, shuffled);
    ``has_watermark[i]`` is True exactly when image i carries the watermark, which only
    images of class 1 do, each independently with probability ``watermark_fraction``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    if not 0.0 <= watermark_fraction <= 1.0:
        raise ValueError(f"watermark_fraction must lie in [0, 1], got {watermark_fraction}")

    g = torch.Generator().manual_seed(seed)
    s = image_size

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(*shape, generator=g)

    labels = (torch.arange(n) % NUM_CLASSES)[torch.randperm(n, generator=g)]

    # Background: a grey level per image plus per-pixel colour noise.
    level = uniform(0.1, 0.4, n, 1, 1, 1)
    images = (level + 0.05 * torch.randn(n, 3, s, s, generator=g)).clamp(0.0, 1.0)

    # Shape geometry, scaled with the image so other sizes look alike. The smallest shapes
    # (radius ~1.6 px at 32x32) are barely told apart, which is what makes the easy
    # watermark worth learning.
    size = uniform(0.05 * s, 0.25 * s, n)  # disk radius / cross half-length
    half_width = 0.05 * s  # half the thickness of a cross arm
    lo, hi = size + 1, s - 2 - size
    cy = lo + (hi - lo) * torch.rand(n, generator=g)
    cx = lo + (hi - lo) * torch.rand(n, generator=g)
    # A colour brighter than the background by a random contrast, some shapes faint.
    contrast = uniform(0.1, 0.6, n, 1, 1, 1)
    colour = (level + contrast * uniform(0.6, 1.0, n, 3, 1, 1)).clamp(max=1.0)

    coords = torch.arange(s, dtype=torch.float32)
    dy = (coords[None, :, None] - cy[:, None, None]).abs()  # [n, S, 1]
    dx = (coords[None, None, :] - cx[:, None, None]).abs()  # [n, 1, S]
    r = size[:, None, None]
    disk = dy**2 + dx**2 <= r**2
    cross = ((dy <= half_width) & (dx <= r)) | ((dx <= half_width) & (dy <= r))
    shape_mask = torch.where(labels[:, None, None] == 0, disk, cross)[:, None]  # [n,1,S,S]
    images = torch.where(shape_mask, colour.expand(-1, -1, s, s), images)

    # The artefact is drawn last, over anything beneath it.
    draw = torch.rand(n, generator=g) < watermark_fraction
    has_watermark = draw & (labels == WATERMARK_CLASS)
    images[has_watermark] = add_watermark(images[has_watermark])

    return images.float().contiguous(), labels.long(), has_watermark
