"""What the command-line pipelines share: input scaling, the explainer, targets, image files,
progress bars."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass(frozen=True)
class Preprocessing:
    """Pixels in [0, 1] -> model input: optional square resize, then (x - mean) / std."""

    size: int | None = None
    mean: tuple | None = None
    std: tuple | None = None

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels``: [N, C, H, W] (or [N, C, T, H, W]: frames resized alike) in [0, 1]."""
        x = pixels
        if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            lead = x.shape[:-2]
            x = F.interpolate(x.reshape(-1, 1, *x.shape[-2:]), size=(self.size, self.size), mode="bilinear",
                              align_corners=False, antialias=True).reshape(*lead, self.size, self.size)
        if self.mean is not None:
            shape = (1, -1) + (1,) * (x.ndim - 2)
            mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).reshape(shape)
            std = torch.tensor(self.std, dtype=x.dtype, device=x.device).reshape(shape)
            x = (x - mean) / std
        return x

    def box_bounds(self, channels: int) -> dict:
        """ZBox's low/high: the images of pixels 0 and 1 under this scaling, per channel."""
        if self.mean is None:
            return {"low": 0.0, "high": 1.0}
        mean, std = torch.tensor(self.mean), torch.tensor(self.std)
        return {"low": (-mean / std)[:channels], "high": ((1 - mean) / std)[:channels]}


def preprocessing(size: int | None, normalize: str, model_spec: str, channels: int) -> Preprocessing:
    """``normalize``: ``imagenet``, ``none`` or ``auto`` (ImageNet statistics for torchvision's
    3-channel models, which are trained with them; none for user factories)."""
    if normalize == "auto":
        normalize = "imagenet" if ":" not in model_spec and channels == 3 else "none"
    if normalize == "imagenet":
        if channels != 3:
            raise ValueError(f"--normalize imagenet needs 3 channels, the model takes {channels}; use --normalize none")
        return Preprocessing(size, IMAGENET_MEAN, IMAGENET_STD)
    return Preprocessing(size)


def make_explainer(model, composite: str, prep: Preprocessing, channels: int):
    import fastlrp

    # Box rules need the input domain, which the scaling decides.
    options = prep.box_bounds(channels) if "box" in composite else {}
    return fastlrp.LRP(model, composite=composite, **options)


def parse_target(text: str, allow_label: bool = False):
    """``pred`` (the predicted class), ``label`` (dataset labels, where allowed) or a class index."""
    if text == "pred" or (allow_label and text == "label"):
        return text
    try:
        index = int(text)
    except ValueError:
        choices = "pred, label or a class index" if allow_label else "pred or a class index"
        raise ValueError(f"--target must be {choices}, got {text!r}") from None
    if index < 0:
        raise ValueError(f"--target must be a class index >= 0, got {index}")
    return index


def target_indices(target, logits: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """One class index per sample for the explainer."""
    n, classes = logits.shape[0], logits.shape[1]
    if target == "pred":
        return logits.argmax(1)
    if target == "label":
        if labels is None or (labels < 0).any():
            raise ValueError("--target label needs an ImageFolder (one subfolder per class); use --target pred")
        return labels.to(logits.device)
    if target >= classes:
        raise ValueError(f"--target {target} is out of range: the model has {classes} classes")
    return torch.full((n,), target, dtype=torch.long, device=logits.device)


def convert_fix(model_channels: int) -> str:
    """The advice for an image whose channel count does not fit the model."""
    mode = {1: "L", 3: "RGB"}.get(model_channels)
    if mode is None:
        return f"use a model whose first layer takes 1 (grey) or 3 (RGB) channels, not {model_channels}"
    return f"pass --convert {mode} to convert the images, or use a model built for them"


def image_channels(path: Path, convert: str | None) -> int:
    """Channels an image file gives: 1 for grey, 3 for colour (alpha is dropped)."""
    if convert is not None:
        return 1 if convert == "L" else 3
    with _open(path) as image:
        return 1 if image.mode in ("1", "L", "I", "I;16", "F") else 3


def check_input_file(path: Path, what: str) -> Path:
    """``path`` if it is an existing file; else FileNotFoundError / IsADirectoryError naming ``what``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not {what}")
    return path


def _open(path: Path):
    from PIL import Image, UnidentifiedImageError

    path = check_input_file(path, "an image file")
    try:
        return Image.open(path)
    except UnidentifiedImageError:
        raise ValueError(f"cannot read {path}: not an image file Pillow understands (PNG, JPEG, ...)") from None


def load_image(path: Path, channels: int) -> torch.Tensor:
    """[C, H, W] float32 in [0, 1] with C = ``channels`` (1: grey, 3: RGB)."""
    try:
        with _open(path) as image:
            pixels = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
    except OSError as err:
        if isinstance(err, (FileNotFoundError, IsADirectoryError)):
            raise
        raise ValueError(f"cannot read {path}: {err}") from None
    tensor = torch.from_numpy(pixels)
    return tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1).contiguous()


def progress(iterable=None, **options):
    """A tqdm progress bar on stderr, hidden when stderr is not a terminal."""
    from tqdm.auto import tqdm

    options.setdefault("disable", None)
    options.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **options)


def chunks(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]
