"""Pixel flipping and region perturbation (Bach et al. 2015; Samek et al. 2017).

Patches of the input are replaced step by step in the order the relevance gives them
(most relevant first, least relevant first, or at random as a baseline), and the model's score
for the target is recorded after each step. All perturbed copies of all images go through the
model in shared batches, on the model's device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .._common.model_view import eval_view
from .._common.targets import class_indices
from .._common.validate import (check_callable, check_model, check_tensor, choice, fraction, model_device,
                                model_dtype, positive_int)
from ._common import forward_in_batches, pixel_map

ORDERS = ("most_relevant_first", "least_relevant_first", "random")
SCORES = ("logit", "probability", "log_probability")


# --- perturbations ---------------------------------------------------------------------
# Each is a callable (x [B, C, H, W], mask [B, 1, H, W] bool, generator) -> perturbed x.
# Those whose replacement does not depend on the mask also offer replacement(x, generator),
# which pixel_flipping computes once per image, so a flipped pixel keeps its value across steps.

class _FixedReplacement:
    def __call__(self, x, mask, generator=None):
        return torch.where(mask, self.replacement(x, generator), x)


class MeanFill(_FixedReplacement):
    """Replace the region by each image's per-channel mean."""

    name = "mean"

    def replacement(self, x, generator=None):
        return x.mean(dim=(-2, -1), keepdim=True).expand_as(x)


class BlurFill(_FixedReplacement):
    """Replace the region by a Gaussian blur of the image (standard deviation ``sigma`` pixels)."""

    name = "blur"

    def __init__(self, sigma: float = 2.0):
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.sigma = float(sigma)

    def replacement(self, x, generator=None):
        return gaussian_blur(x, self.sigma)


class NoiseFill(_FixedReplacement):
    """Replace the region by uniform noise over each image's per-channel value range
    (as the region perturbation of Samek et al. 2017 samples from a uniform distribution)."""

    name = "noise"

    def replacement(self, x, generator=None):
        low = x.amin(dim=(-2, -1), keepdim=True)
        high = x.amax(dim=(-2, -1), keepdim=True)
        # Drawn on the CPU so a seeded generator gives the same noise on every device.
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
        return low + (high - low) * noise


class InpaintFill:
    """Fill the region by diffusion from its border: masked pixels start at the mean of the
    unmasked ones and are repeatedly replaced by the mean of their four neighbours while the
    unmasked pixels stay fixed (a discrete harmonic inpainting)."""

    name = "inpaint"

    def __init__(self, iterations: int = 64):
        self.iterations = positive_int("iterations", iterations)

    def __call__(self, x, mask, generator=None):
        keep = (~mask).to(x.dtype)
        known = keep.sum(dim=(-2, -1), keepdim=True)
        # Where everything is masked there is nothing to diffuse from: fall back to the image mean.
        start = torch.where(known > 0, (x * keep).sum(dim=(-2, -1), keepdim=True) / known.clamp_min(1),
                            x.mean(dim=(-2, -1), keepdim=True))
        filled = torch.where(mask, start, x)
        kernel = x.new_tensor([[0.0, 0.25, 0.0], [0.25, 0.0, 0.25], [0.0, 0.25, 0.0]])
        kernel = kernel.expand(x.shape[1], 1, 3, 3)
        for _ in range(self.iterations):
            neighbours = F.conv2d(F.pad(filled, (1, 1, 1, 1), mode="replicate"), kernel, groups=x.shape[1])
            filled = torch.where(mask, neighbours, x)
        return filled


PERTURBATIONS = {"mean": MeanFill, "blur": BlurFill, "noise": NoiseFill, "inpaint": InpaintFill}


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [B, C, H, W] with reflect padding (truncated at 3 sigma)."""
    radius = max(1, math.ceil(3 * sigma))
    radius = min(radius, x.shape[-1] - 1, x.shape[-2] - 1)  # reflect padding needs pad < size
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    weights = weights / weights.sum()
    channels = x.shape[1]
    out = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"),
                   weights.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(F.pad(out, (0, 0, radius, radius), mode="reflect"),
                    weights.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def _perturbation(perturbation) -> Callable:
    if isinstance(perturbation, str):
        if perturbation not in PERTURBATIONS:
            raise ValueError(f"perturbation must be one of {list(PERTURBATIONS)} or a callable "
                             f"(x, mask, generator) -> x, got {perturbation!r}")
        return PERTURBATIONS[perturbation]()
    if not callable(perturbation):
        raise TypeError(f"perturbation must be a name or a callable, got {type(perturbation).__name__}")
    return perturbation


# --- the curve -------------------------------------------------------------------------

@dataclass
class PerturbationCurve:
    """The result of ``pixel_flipping``."""

    fractions: torch.Tensor
    """[steps + 1] fraction of the input's patches perturbed at each step (0 first)."""
    scores: torch.Tensor
    """[N, steps + 1] the model's score for each sample's target after each step (on the CPU)."""
    target: torch.Tensor
    """[N] the class whose score is tracked."""
    order: str
    patch_size: int
    perturbation: str

    def mean(self) -> torch.Tensor:
        """The curve averaged over samples, [steps + 1]."""
        return self.scores.mean(0)

    def aopc(self, reduction: str = "mean"):
        return aopc(self, reduction)


def aopc(curve, reduction: str = "mean"):
    """Area over the perturbation curve (Samek et al. 2017):

        AOPC = 1 / (L + 1) * sum_{k=0}^{L} (f(x^(0)) - f(x^(k)))

    for a curve of L + 1 scores f(x^(0)), ..., f(x^(L)). ``curve`` is a ``PerturbationCurve``, a
    tensor [N, L + 1] or [L + 1], or a sequence of numbers. ``reduction="mean"`` gives the
    average over samples as a float, ``"none"`` one value per sample (a tensor [N])."""
    choice("reduction", reduction, ("mean", "none"))
    scores = curve.scores if isinstance(curve, PerturbationCurve) else curve
    if not isinstance(scores, torch.Tensor):
        try:
            scores = torch.as_tensor(scores, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"curve must be a PerturbationCurve, a tensor or a sequence of numbers, "
                            f"got {type(curve).__name__}") from None
    if scores.ndim not in (1, 2) or scores.shape[-1] < 1:
        raise ValueError(f"curve must have shape [N, L + 1] or [L + 1], got {tuple(scores.shape)}")
    rows = scores.reshape(-1, scores.shape[-1]).double()
    per_sample = (rows[:, :1] - rows).mean(1)
    if reduction == "none":
        return per_sample if scores.ndim == 2 else per_sample[0]
    return per_sample.mean().item()


def abpc(least_relevant_first, most_relevant_first, reduction: str = "mean"):
    """Area between the least- and the most-relevant-first curves (mean of LeRF - MoRF over steps):
    large when removing the relevant patches hurts and removing the irrelevant ones does not."""
    return aopc(most_relevant_first, "none") - aopc(least_relevant_first, "none") if reduction == "none" \
        else aopc(most_relevant_first) - aopc(least_relevant_first)


def _score(output: torch.Tensor, target: torch.Tensor, score) -> torch.Tensor:
    if callable(score):
        values = score(output, target)
        if not isinstance(values, torch.Tensor) or values.shape != target.shape:
            raise ValueError(f"score callable must return one value per sample (shape {tuple(target.shape)})")
        return values
    if score == "probability":
        output = output.softmax(1)
    elif score == "log_probability":
        output = output.log_softmax(1)
    return output.gather(1, target[:, None]).squeeze(1)


def patch_ranks(relevance: torch.Tensor, patch_size: int, order: str,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
    """[N, H, W] rank of each pixel's patch in the flipping order (0 goes first), and the patch count.

    Patches tile the image on a grid of ``patch_size`` (the last row and column may be smaller);
    a patch's score is the sum of its relevance over channels and pixels. Ties are broken at
    random (from ``generator``), so equal scores do not favour the top-left corner."""
    heat = pixel_map(relevance).detach().to("cpu", torch.float64)
    if heat.ndim != 3:
        raise ValueError(f"relevance must be [N, C, H, W] or [N, H, W], got shape {tuple(relevance.shape)}")
    n, height, width = heat.shape
    rows, cols = math.ceil(height / patch_size), math.ceil(width / patch_size)
    num_patches = rows * cols
    patch_of_pixel = ((torch.arange(height)[:, None] // patch_size) * cols
                      + torch.arange(width)[None, :] // patch_size).reshape(-1)
    patch_scores = torch.zeros(n, num_patches, dtype=torch.float64).index_add_(1, patch_of_pixel, heat.reshape(n, -1))
    shuffle = torch.rand(n, num_patches, generator=generator).argsort(1)  # a random permutation per image
    if order == "random":
        ordered = shuffle
    else:
        shuffled_scores = patch_scores.gather(1, shuffle)
        positions = torch.sort(shuffled_scores, dim=1, descending=order == "most_relevant_first",
                               stable=True).indices
        ordered = shuffle.gather(1, positions)
    rank = torch.empty_like(ordered).scatter_(1, ordered, torch.arange(num_patches).expand(n, -1).contiguous())
    return rank[:, patch_of_pixel].reshape(n, height, width), num_patches


@torch.no_grad()
def pixel_flipping(
    model: nn.Module,
    x: torch.Tensor,
    relevance: torch.Tensor,
    target=None,
    *,
    order: str = "most_relevant_first",
    patch_size: int = 1,
    steps: int = 16,
    max_fraction: float = 1.0,
    perturbation="mean",
    score="logit",
    batch_size: int = 256,
    seed: int = 0,
) -> PerturbationCurve:
    """Perturb ``x`` patch by patch in the order of ``relevance`` and record the model's score.

    model: the classifier; run under ``no_grad`` on its own device through an eval-mode view (the
        model itself is not modified, not even transiently).
    x: [N, C, H, W] inputs. relevance: [N, C, H, W] or [N, H, W] (channels are summed).
    target: None (the predicted class on ``x``), an int, or one index per sample.
    order: ``"most_relevant_first"`` (MoRF), ``"least_relevant_first"`` (LeRF) or ``"random"``.
    patch_size: side of the square patches (1: pixel flipping; larger: region perturbation).
    steps: number of perturbation steps; step k perturbs round(k / steps * max_fraction * P) of
        the P patches, so the curve has ``steps + 1`` points.
    perturbation: ``"mean"``, ``"blur"``, ``"noise"``, ``"inpaint"``, an instance of ``MeanFill``,
        ``BlurFill(sigma)``, ``NoiseFill``, ``InpaintFill(iterations)``, or a callable
        (x [B, C, H, W], mask [B, 1, H, W] bool, generator) -> perturbed x.
    score: ``"logit"``, ``"probability"``, ``"log_probability"`` or a callable (output, target) -> [B].
    batch_size: perturbed images per forward pass (images and steps share passes).
    seed: for tie breaking, the random order and noise.
    """
    check_model(model)
    check_tensor("x", x, ndim_min=4)
    if x.ndim != 4:
        raise ValueError(f"x must be [N, C, H, W], got shape {tuple(x.shape)}")
    check_tensor("relevance", relevance)
    if relevance.shape[0] != x.shape[0] or relevance.shape[-2:] != x.shape[-2:]:
        raise ValueError(f"relevance of shape {tuple(relevance.shape)} does not match x {tuple(x.shape)} "
                         "(need [N, C, H, W] or [N, H, W] with x's N, H and W)")
    choice("order", order, ORDERS)
    patch_size = positive_int("patch_size", patch_size)
    if patch_size > max(x.shape[-2:]):
        raise ValueError(f"patch_size {patch_size} is larger than the image ({x.shape[-2]}x{x.shape[-1]})")
    steps = positive_int("steps", steps)
    max_fraction = fraction("max_fraction", max_fraction)
    batch_size = positive_int("batch_size", batch_size)
    if not callable(score):
        choice("score", score, SCORES)
    fill = _perturbation(perturbation)

    view = eval_view(model)  # a dropout or batch-norm layer must not change between steps
    device, dtype = model_device(model, x.device), model_dtype(model, x.dtype)
    x = x.detach().to(device, dtype)
    logits = forward_in_batches(view, x, batch_size)
    target = class_indices(logits, target)

    generator = torch.Generator().manual_seed(seed)
    ranks, num_patches = patch_ranks(relevance, patch_size, order, generator)
    ranks = ranks.to(device)
    total = round(max_fraction * num_patches)
    counts = torch.tensor([round(k * total / steps) for k in range(steps + 1)], device=device)

    replaced = fill.replacement(x, generator) if hasattr(fill, "replacement") else None
    n = x.shape[0]
    pairs = torch.cartesian_prod(torch.arange(n), torch.arange(steps + 1)).to(device)  # (image, step)
    scores = torch.empty(n * (steps + 1), dtype=torch.float64)
    for start in range(0, pairs.shape[0], batch_size):
        image, step = pairs[start:start + batch_size].unbind(1)
        mask = (ranks[image] < counts[step][:, None, None])[:, None]
        if replaced is not None:
            perturbed = torch.where(mask, replaced[image], x[image])
        else:
            perturbed = fill(x[image], mask, generator)
        output = view(perturbed)
        scores[start:start + image.shape[0]] = _score(output, target[image], score).double().cpu()

    fractions = counts.cpu().double() / num_patches
    name = getattr(fill, "name", getattr(fill, "__name__", type(fill).__name__))
    return PerturbationCurve(fractions, scores.view(n, steps + 1), target.cpu(), order, patch_size, name)


def selectivity(model: nn.Module, explainer: Callable, x: torch.Tensor, target=None,
                **pixel_flipping_options) -> PerturbationCurve:
    """Explain ``x`` with ``explainer(x, target)`` and return its most-relevant-first curve.

    Selectivity (Montavon et al. 2018): a good explanation points first at the features whose
    removal makes the score drop fastest; ``curve.aopc()`` summarises it (larger is better)."""
    check_callable(explainer, "explainer", "(x, target) -> relevance")
    check_model(model)
    if target is None:
        target = forward_in_batches(model, x, pixel_flipping_options.get("batch_size", 256)).argmax(1)
    relevance = explainer(x, target)
    options = {"order": "most_relevant_first", **pixel_flipping_options}
    return pixel_flipping(model, x, relevance, target, **options)
