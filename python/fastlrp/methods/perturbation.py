"""Perturbation methods: occlusion (sliding window) and meaningful perturbation (an optimized
mask). Formulas and citations in docs/methods.md."""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._common.validate import choice, number, per_dim, positive_int, tri_state
from ._common import (Attribution, gaussian_blur, generator, per_sample_range, progress_bar, sample_shape_tensor,
                      score, spatial_dims, target_weights)
from .base import AttributionMethod


def window_starts(size: int, window: int, stride: int) -> list:
    """Start offsets of a window sliding over ``size``; the last one sits flush with the end,
    so every position is covered even when the stride does not divide the size."""
    last = size - window
    starts = list(range(0, last + 1, stride))
    if starts[-1] != last:
        starts.append(last)
    return starts


@dataclass
class OcclusionAttribution(Attribution):
    window_scores: torch.Tensor = None
    """f(x) - f(x occluded at the window) per sample and window position: [N, *positions]."""


class Occlusion(AttributionMethod):
    """Occlusion (Zeiler and Fergus 2014): slide a window over the input, replace what it covers
    by a baseline, and record how much the score drops. A position's attribution is the mean drop
    over the windows that cover it.

    window: size per spatial dimension (int or tuple); for [N, features] inputs, in features.
        Windows span all channels. Default: 8 for spatial inputs, 1 for features.
    stride: step per dimension (default: the window, non-overlapping).
    baseline: the value (or tensor broadcast to the input) put in the window.
    batch_size: occluded inputs per forward pass.
    progress: tqdm bar; None shows it for runs of 50 forward passes or more.
    """

    name = "occlusion"

    def __init__(self, model, window=None, stride=None, baseline=0.0, batch_size: int = 64, progress=None):
        super().__init__(model)
        self.window, self.stride = window, stride
        if not isinstance(baseline, (int, float, torch.Tensor)) or isinstance(baseline, bool):
            raise TypeError(f"baseline must be a number or a tensor, got {type(baseline).__name__}")
        self.baseline = baseline
        self.batch_size = positive_int("batch_size", batch_size)
        self.progress = tri_state("progress", progress)

    def _geometry(self, x):
        dims = spatial_dims(x)
        sizes = [x.shape[d] for d in dims]
        window = per_dim("window", self.window if self.window is not None else (1 if x.ndim == 2 else 8),
                         len(dims))
        window = tuple(min(w, s) for w, s in zip(window, sizes))
        stride = per_dim("stride", self.stride if self.stride is not None else window, len(dims))
        starts = [window_starts(s, w, st) for s, w, st in zip(sizes, window, stride)]
        return dims, window, starts

    def _explain(self, model, x, target):
        with torch.no_grad():
            output = model(x)
        weights = target_weights(output, target)
        explained = score(output, weights)
        baseline = sample_shape_tensor("baseline", self.baseline, x)
        dims, window, starts = self._geometry(x)
        positions = list(itertools.product(*starts))
        # one boolean mask per window over the spatial (or feature) dimensions
        masks = torch.zeros((len(positions),) + tuple(x.shape[d] for d in dims), dtype=torch.bool, device=x.device)
        for p, corner in enumerate(positions):
            masks[(p,) + tuple(slice(c, c + w) for c, w in zip(corner, window))] = True
        # a window covers every channel: [P, 1, *spatial] broadcasts over them
        window_masks = masks if x.ndim == 2 else masks.unsqueeze(1)
        batches = -(-len(positions) // self.batch_size) * x.shape[0]
        bar = progress_bar(batches, self.progress, "occlusion")
        drops = []
        try:
            with torch.no_grad():
                for i in range(x.shape[0]):
                    sample_drops = []
                    # occluded copies are built a batch at a time, never all positions at once
                    for start in range(0, len(positions), self.batch_size):
                        chunk = window_masks[start:start + self.batch_size]
                        occluded = torch.where(chunk, baseline[i:i + 1], x[i:i + 1])
                        sample_drops.append(explained[i] - score(model(occluded), weights[i:i + 1]))
                        if bar is not None:
                            bar.update(1)
                    drops.append(torch.cat(sample_drops))
        finally:
            if bar is not None:
                bar.close()
        drops = torch.stack(drops) if drops else x.new_zeros((0, len(positions)))  # [N, P]
        coverage = masks.flatten(1).sum(0).to(x.dtype)
        per_position = (drops @ masks.flatten(1).to(x.dtype)) / coverage  # mean drop of covering windows
        relevance = per_position.reshape((x.shape[0],) + masks.shape[1:])
        if x.ndim > 2:
            relevance = relevance.unsqueeze(1).expand_as(x).clone()
        window_scores = drops.reshape((x.shape[0],) + tuple(len(s) for s in starts))
        return OcclusionAttribution(relevance, output, explained, window_scores)


@dataclass
class MaskAttribution(Attribution):
    mask: torch.Tensor = None
    """The optimized mask at the input's resolution, [N, 1, *spatial] ([N, features] for
    tabular inputs): 1 keeps the input, 0 perturbs it."""
    score_curve: torch.Tensor = None
    """The target score of the perturbed input at every optimization step, [steps, N]."""


def total_variation(mask: torch.Tensor, beta: float, dims: tuple) -> torch.Tensor:
    """Mean of |finite difference|^beta along each of ``dims``, per sample."""
    total = mask.new_zeros(mask.shape[0])
    for d in dims:
        if mask.shape[d] > 1:
            total = total + mask.diff(dim=d).abs().pow(beta).flatten(1).mean(1)
    return total


class MeaningfulPerturbation(AttributionMethod):
    """Meaningful perturbation (Fong and Vedaldi 2017): optimize a smooth mask m in [0, 1]
    (1 keeps the input, 0 perturbs it) so that

    deletion (default): minimize  l1 * mean(1 - m) + tv * TV_beta(m) + s(x perturbed where m = 0)
    preservation:       minimize  l1 * mean(m)     + tv * TV_beta(m) - s(x perturbed where m = 0)

    The mask lives at low resolution (1/mask_scale of the input: 28 x 28 for 224 x 224 with the
    default 8) and is upsampled (bi/trilinear), which keeps it smooth. s is the class score:

    - "probability" (default, the paper's softmax probability) *relative to the clean input*,
      p_c(perturbed) / p_c(x): deleting everything that supports the class gains about 1 however
      confident the model is, so the area and smoothness coefficients mean the same for a class
      at p = 0.9 and one at p = 0.001 (with the raw probability a low-probability class gains at
      most p from any deletion, less than any area cost, and the mask never moves);
    - "log_probability": log p_c (already relative: a constant offset changes no gradient);
    - "logit": the raw class logit (coefficients then depend on the logit's scale).

    Regularizers are means over the low-resolution mask, so the coefficients do not depend on
    the resolution: deleting the whole image costs ``l1_coeff``.

    perturbation: "blur" (Gaussian, ``blur_sigma`` pixels; the paper's choice), "noise" (Gaussian,
        ``noise_std`` times the sample's value range, fresh each step) or "constant" (``constant``).
    jitter: each step shifts the composed input by up to this many positions (paper: 4 px), so
        the mask cannot exploit single pixels.
    steps, lr: Adam iterations and step size (default 100 at 0.1; the paper runs 300; each step
        is one forward and one backward pass of the model).
    progress: tqdm bar over the steps (None: shown from 50 steps on).
    The attribution is the evidence map, broadcast to the input: 1 - m for deletion, m for
    preservation. A warning is given for a sample whose map is all zero. ``explain`` returns the
    mask and the score curve (the raw score s of the composed input per step) as well.
    """

    name = "meaningful_perturbation"

    def __init__(self, model, mode: str = "deletion", perturbation: str = "blur", steps: int = 100,
                 lr: float = 0.1, l1_coeff: float = 1.0, tv_coeff: float = 1.0, tv_beta: float = 3.0,
                 mask_scale: int = 8, jitter: int = 4, blur_sigma: float = 10.0, noise_std: float = 0.2,
                 constant: float = 0.0, score: str = "probability", seed: int | None = None, progress=None):
        super().__init__(model)
        self.mode = choice("mode", mode, ("deletion", "preservation"))
        self.perturbation = choice("perturbation", perturbation, ("blur", "noise", "constant"))
        self.steps = positive_int("steps", steps)
        self.lr = number("lr", lr, strict=True)
        self.l1_coeff = number("l1_coeff", l1_coeff)
        self.tv_coeff = number("tv_coeff", tv_coeff)
        self.tv_beta = number("tv_beta", tv_beta, minimum=1.0)
        self.mask_scale = positive_int("mask_scale", mask_scale)
        self.jitter = positive_int("jitter", jitter, minimum=0)
        self.blur_sigma = number("blur_sigma", blur_sigma, strict=True)
        self.noise_std = number("noise_std", noise_std)
        self.constant = number("constant", constant, minimum=-float("inf"))
        self.score = choice("score", score, ("probability", "log_probability", "logit"))
        self.seed = None if seed is None else positive_int("seed", seed, minimum=0)
        self.progress = tri_state("progress", progress)

    def _class_score(self, output, weights, log_space: bool):
        """(the raw score, what the objective normalises) per sample. With ``log_space`` the second
        is log sum_c w_c p_c, exact even where the probability underflows."""
        if self.score == "logit":
            raw = score(output, weights)
            return raw, raw
        if output.ndim != 2:
            raise ValueError(f"score={self.score!r} needs a classifier output [N, classes], got "
                             f"{tuple(output.shape)}; use score='logit'")
        log_p = output.log_softmax(1)
        if self.score == "log_probability":
            raw = score(log_p, weights)
            return raw, raw
        if log_space:
            log_score = torch.logsumexp(log_p + weights.log(), 1)
            return log_score.exp(), log_score
        raw = score(log_p.exp(), weights)
        return raw, raw

    def _objective_score(self, used, clean_used, log_space: bool):
        """The class term of the loss: for the probability, relative to the clean input."""
        if self.score != "probability":
            return used
        if log_space:
            return (used - clean_used).exp()                       # p(perturbed) / p(x)
        return used / clean_used.abs().clamp(min=1e-30)

    def _explain(self, model, x, target):
        tabular = x.ndim == 2
        if tabular and self.perturbation == "blur":
            raise ValueError("perturbation='blur' needs spatial inputs [N, C, *spatial]; "
                             "use 'noise' or 'constant' for [N, features]")
        with torch.no_grad():
            output = model(x)
        weights = target_weights(output, target)
        # non-negative weights (a class index, one-hot): the probability ratio is taken in log space
        log_space = self.score == "probability" and bool((weights >= 0).all() and (weights.sum(1) > 0).all())
        with torch.no_grad():
            clean_raw, clean_used = self._class_score(output, weights, log_space)
        gen = generator(self.seed, x.device)
        full = x.shape[1:] if tabular else x.shape[2:]
        low_res = full if tabular else tuple(max(1, -(-s // self.mask_scale)) for s in full)
        mask_shape = (x.shape[0],) + tuple(low_res) if tabular else (x.shape[0], 1) + tuple(low_res)
        mask = torch.ones(mask_shape, dtype=x.dtype, device=x.device, requires_grad=True)
        perturbed = {"blur": lambda: gaussian_blur(x, self.blur_sigma) if not tabular else None,
                     "constant": lambda: torch.full_like(x, self.constant)}.get(self.perturbation, lambda: None)()
        value_range = per_sample_range(x)
        mask_dims = tuple(range(1, mask.ndim)) if tabular else tuple(range(2, mask.ndim))
        optimizer = torch.optim.Adam([mask], lr=self.lr)
        sign = 1.0 if self.mode == "deletion" else -1.0
        curve = []
        # an empty batch has no mask to optimize: skip the steps (its curve is [steps, 0])
        steps = self.steps if x.shape[0] else 0
        bar = progress_bar(steps, self.progress, "meaningful perturbation", unit="step")
        try:
            with torch.enable_grad():
                for _ in range(steps):
                    upsampled = self._upsample(mask, full, tabular)
                    if self.perturbation == "noise":
                        noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
                        perturbed = x + self.noise_std * value_range * noise
                    composed = x * upsampled + perturbed * (1 - upsampled)
                    composed = self._jitter(composed, gen, tabular)
                    raw, used = self._class_score(model(composed), weights, log_space)
                    area = (1 - mask) if self.mode == "deletion" else mask
                    loss = (self.l1_coeff * area.flatten(1).mean(1)
                            + self.tv_coeff * total_variation(mask, self.tv_beta, mask_dims)
                            + sign * self._objective_score(used, clean_used, log_space))
                    # samples are independent: their losses just add. Only the mask is differentiated,
                    # so no gradient reaches (or is written to) the model's parameters.
                    (mask.grad,) = torch.autograd.grad(loss.sum(), mask)
                    optimizer.step()
                    with torch.no_grad():
                        mask.clamp_(0, 1)
                    curve.append(raw.detach())
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(score=f"{float(raw.detach().mean()):.4g}", refresh=False)
        finally:
            if bar is not None:
                bar.close()
        with torch.no_grad():
            final = self._upsample(mask.detach(), full, tabular)
        evidence = 1 - final if self.mode == "deletion" else final
        self._warn_if_empty(evidence, clean_raw)
        relevance = evidence.expand_as(x).clone()
        curve = torch.stack(curve) if curve else x.new_zeros((self.steps, 0))
        return MaskAttribution(relevance, output, score(output, weights), final, curve)

    def _warn_if_empty(self, evidence, clean_raw):
        empty = (evidence.flatten(1).amax(1) <= 1e-6).nonzero().flatten().tolist()
        if not empty:
            return
        what = ("no deletion lowered the class score by more than its area and smoothness cost"
                if self.mode == "deletion" else "no region kept enough of the class score to pay for its area")
        scores = ", ".join(f"{float(clean_raw[i]):.3g}" for i in empty[:5])
        warnings.warn(f"meaningful perturbation: the map of sample(s) {empty[:5]}{'...' if len(empty) > 5 else ''} "
                      f"is all zero: {what} (clean {self.score}: {scores}); try a smaller l1_coeff or tv_coeff, "
                      "more steps or a larger lr", stacklevel=3)

    @staticmethod
    def _upsample(mask, full, tabular):
        if tabular or tuple(mask.shape[2:]) == tuple(full):
            return mask
        mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(full)]
        return F.interpolate(mask, size=full, mode=mode, align_corners=False)

    def _jitter(self, composed, gen, tabular):
        if self.jitter == 0 or tabular:
            return composed
        dims = tuple(range(2, composed.ndim))
        shifts = torch.randint(-self.jitter, self.jitter + 1, (len(dims),), generator=gen,
                               device=composed.device if gen is not None else "cpu")
        return torch.roll(composed, shifts=tuple(int(s) for s in shifts), dims=dims)
