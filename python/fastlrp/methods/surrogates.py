"""Surrogate-model methods over interpretable features (superpixels or feature groups): LIME
and KernelSHAP. Formulas and citations in docs/methods.md."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from .._common.optional import require
from .._common.validate import choice, number, positive_int, tri_state
from ._common import (Attribution, gaussian_blur, generator, progress_bar, sample_shape_tensor, score,
                      target_weights)
from .base import AttributionMethod


SEGMENTATIONS = ("slic", "quickshift", "grid")


def _unit_range(image: torch.Tensor):
    """One image [C, *spatial] as a float64 numpy array, channels last, scaled to [0, 1] by its
    own minimum and maximum (so the segmentation does not depend on the input's normalisation)."""
    array = image.detach().to("cpu", torch.float64)
    array = (array - array.min()) / (array.max() - array.min()).clamp(min=1e-12)
    return array.movedim(0, -1).numpy()


def slic_segments(image: torch.Tensor, n_segments: int = 50, compactness: float = 0.3) -> torch.Tensor:
    """SLIC superpixels (Achanta et al. 2012, scikit-image) of one image [C, *spatial] with 1-3
    spatial dimensions. The image is scaled to [0, 1] first and segmented without a Lab
    conversion (any channel count works); ``compactness`` weighs position against value on that
    [0, 1] scale (0.3 gives superpixels about as irregular as scikit-image's default
    of 10 on Lab's 0-100 scale)."""
    slic = require("skimage.segmentation", "methods", "superpixels (LIME, KernelSHAP)").slic
    array = _unit_range(image)
    line = array.ndim == 2  # one spatial dimension: segment it as an image one pixel wide
    if line:
        array = array[:, None, :]
    labels = slic(array, n_segments=n_segments, compactness=compactness, start_label=0, channel_axis=-1,
                  convert2lab=False, enforce_connectivity=True)
    if line:
        labels = labels[:, 0]
    return torch.from_numpy(labels.astype("int64")).to(image.device)


def quickshift_segments(image: torch.Tensor, kernel_size: float = 4.0, max_dist: float = 200.0,
                        ratio: float = 0.2) -> torch.Tensor:
    """Quickshift superpixels (Vedaldi and Soatto 2008, scikit-image) of one 2D image [C, H, W],
    with LIME's settings. The image is scaled to [0, 100] (the range of Lab's lightness, for which
    these settings were made) without a Lab conversion, so any channel count works."""
    quickshift = require("skimage.segmentation", "methods", "quickshift superpixels (LIME, KernelSHAP)").quickshift
    if image.ndim != 3:
        raise ValueError(f"segments='quickshift' needs 2D images [N, C, H, W]; got a sample of shape "
                         f"{tuple(image.shape)} (use 'slic' or 'grid')")
    labels = quickshift(100.0 * _unit_range(image), kernel_size=kernel_size, max_dist=max_dist, ratio=ratio,
                        convert2lab=False, channel_axis=-1)
    _, dense = torch.unique(torch.from_numpy(labels.astype("int64")), return_inverse=True)
    return dense.to(image.device)


def grid_segments(shape, n_segments: int, device=None) -> torch.Tensor:
    """A regular grid of about ``n_segments`` boxes over the spatial ``shape`` (cells as close to
    square as the shape allows)."""
    shape = tuple(int(s) for s in shape)
    per_cell = math.prod(shape) / n_segments  # positions per cell
    side = per_cell ** (1 / len(shape))
    counts = [max(1, min(size, round(size / side))) for size in shape]
    labels = torch.zeros(shape, dtype=torch.int64, device=device)
    for axis, (size, count) in enumerate(zip(shape, counts)):
        index = torch.arange(size, device=device) * count // size  # which cell along this axis
        view = [1] * len(shape)
        view[axis] = size
        labels = labels * count + index.reshape(view)
    return labels


def _skimage_available() -> bool:
    try:
        import skimage.segmentation  # noqa: F401
    except ImportError:
        return False
    return True


class _FeatureGroups:
    """Which interpretable feature each input position belongs to, per sample.

    segments: None or "slic" (images: SLIC superpixels, or a regular grid with a warning when
        scikit-image is missing; [N, features] inputs: one group per feature), "quickshift"
        (2D images), "grid" (a regular grid of about n_segments boxes), a label tensor over the
        spatial (or feature) dimensions, shared ([*spatial]) or per sample ([N, *spatial]), or a
        callable mapping one sample to such labels.
    """

    def __init__(self, segments, n_segments: int, compactness: float):
        if isinstance(segments, str):
            choice("segments", segments, SEGMENTATIONS)
        elif segments is not None and not (isinstance(segments, torch.Tensor) or callable(segments)):
            raise TypeError(f"segments must be None, one of {list(SEGMENTATIONS)}, a label tensor or a callable, "
                            f"got {type(segments).__name__}")
        self.segments = segments
        self.n_segments = positive_int("n_segments", n_segments, minimum=2)
        self.compactness = number("compactness", compactness, strict=True)

    def _segment(self, sample: torch.Tensor) -> torch.Tensor:
        how = "slic" if self.segments is None else self.segments
        if how == "slic" and not _skimage_available():
            warnings.warn("scikit-image is not installed, so LIME/KernelSHAP use a regular grid of about "
                          f"{self.n_segments} boxes instead of SLIC superpixels; for superpixels that follow "
                          "the image: pip install 'fastlrp[methods]'", stacklevel=5)
            how = "grid"
        if how == "slic":
            # On a small, noisy image a low compactness can let SLIC's connectivity step merge
            # everything into one segment; then position gets more weight, and last the grid.
            for compactness in (self.compactness, 10 * self.compactness, 100 * self.compactness):
                labels = slic_segments(sample, self.n_segments, compactness)
                if int(labels.max()) >= 1:
                    return labels
            how = "grid"
        if how == "quickshift":
            return quickshift_segments(sample)
        return grid_segments(sample.shape[1:], self.n_segments, sample.device)

    def labels(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Labels 0..M-1 of sample i over its spatial (or feature) positions."""
        shape = x.shape[1:] if x.ndim == 2 else x.shape[2:]
        if x.ndim == 2 and self.segments is None:
            raw = torch.arange(shape[0], device=x.device)
        elif self.segments is None or isinstance(self.segments, str):
            if x.ndim == 2:
                raise ValueError(f"segments={self.segments!r} needs spatial inputs [N, C, *spatial]; for "
                                 "[N, features] pass None (one feature each) or integer labels")
            raw = self._segment(x[i])
        elif isinstance(self.segments, torch.Tensor):
            raw = self.segments[i] if self.segments.shape == (x.shape[0],) + tuple(shape) else self.segments
        else:
            raw = self.segments(x[i])
        if not isinstance(raw, torch.Tensor) or tuple(raw.shape) != tuple(shape) or raw.is_floating_point():
            raise ValueError(f"segments must be integer labels of shape {tuple(shape)} (or "
                             f"{(x.shape[0],) + tuple(shape)}), got {getattr(raw, 'shape', type(raw).__name__)}")
        _, dense = torch.unique(raw.to(x.device), return_inverse=True)
        return dense


def _check_baseline(baseline):
    if isinstance(baseline, str):
        if baseline != "blur":
            raise ValueError(f"baseline must be a number, a tensor or 'blur', got {baseline!r}")
    elif isinstance(baseline, bool) or not isinstance(baseline, (int, float, torch.Tensor)):
        raise TypeError(f"baseline must be a number, a tensor or 'blur', got {type(baseline).__name__}")


def _baseline_of(baseline, x: torch.Tensor, blur_sigma: float) -> torch.Tensor:
    if isinstance(baseline, str):
        if x.ndim < 3:
            raise ValueError("baseline='blur' needs spatial inputs [N, C, *spatial]")
        return gaussian_blur(x, blur_sigma)
    return sample_shape_tensor("baseline", baseline, x)


@dataclass
class SurrogateAttribution(Attribution):
    feature_weights: list = None
    """Per sample, one weight per interpretable feature (LIME coefficient / Shapley value)."""
    intercept: torch.Tensor = None
    """Per sample: LIME's intercept; KernelSHAP's base value f(baseline)."""
    segments: list = None
    """Per sample, the label of each spatial (or feature) position."""


class _Surrogate(AttributionMethod):
    def __init__(self, model, segments, n_segments, compactness, baseline, blur_sigma, batch_size, seed, progress):
        super().__init__(model)
        self._groups = _FeatureGroups(segments, n_segments, compactness)
        self.segments, self.n_segments, self.compactness = segments, n_segments, compactness
        _check_baseline(baseline)
        self.baseline = baseline
        self.blur_sigma = number("blur_sigma", blur_sigma, strict=True)
        self.batch_size = positive_int("batch_size", batch_size)
        self.seed = None if seed is None else positive_int("seed", seed, minimum=0)
        self.progress = tri_state("progress", progress)

    def _fit(self, coalitions, values, full_value, empty_value) -> tuple:
        raise NotImplementedError

    def _coalitions(self, n_features: int, gen, device) -> torch.Tensor:
        raise NotImplementedError

    def _explain(self, model, x, target):
        with torch.no_grad():
            output = model(x)
        weights = target_weights(output, target)
        explained = score(output, weights)
        baseline = _baseline_of(self.baseline, x, self.blur_sigma)
        gen = generator(self.seed, x.device)
        relevance = torch.empty_like(x)
        all_weights, intercepts, all_labels = [], [], []
        for i in range(x.shape[0]):
            labels = self._groups.labels(x, i)
            n_features = int(labels.max()) + 1
            coalitions = self._coalitions(n_features, gen, x.device).to(x.dtype)
            values = self._values(model, x[i:i + 1], baseline[i:i + 1], labels, coalitions, weights[i:i + 1])
            with torch.no_grad():
                empty_value = score(model(baseline[i:i + 1]), weights[i:i + 1])[0]
            coef, intercept = self._fit(coalitions, values, explained[i], empty_value)
            position_map = coef[labels]
            relevance[i] = position_map if x.ndim == 2 else position_map.unsqueeze(0).expand_as(x[i])
            all_weights.append(coef)
            intercepts.append(intercept)
            all_labels.append(labels)
        intercepts = torch.stack(intercepts) if intercepts else x.new_zeros(0)  # an empty batch: no fits
        return SurrogateAttribution(relevance, output, explained, all_weights, intercepts, all_labels)

    def _values(self, model, sample, fill, labels, coalitions, weights) -> torch.Tensor:
        """Scores of the sample with the features outside each coalition set to the baseline."""
        values = []
        bar = progress_bar(-(-coalitions.shape[0] // self.batch_size), self.progress, self.name)
        try:
            with torch.no_grad():
                for start in range(0, coalitions.shape[0], self.batch_size):
                    keep = coalitions[start:start + self.batch_size][:, labels].bool()  # [K, *spatial]
                    if sample.ndim > 2:
                        keep = keep.unsqueeze(1)  # the same for every channel
                    values.append(score(model(torch.where(keep, sample, fill)), weights))
                    if bar is not None:
                        bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return torch.cat(values)


def weighted_ridge(features, targets, sample_weights, ridge: float) -> tuple:
    """argmin_b,c sum_k w_k (y_k - c - z_k . b)^2 + ridge * |b|^2 (intercept c not penalized)."""
    total = sample_weights.sum()
    mean_z = (sample_weights[:, None] * features).sum(0) / total
    mean_y = (sample_weights * targets).sum() / total
    centered_z, centered_y = features - mean_z, targets - mean_y
    gram = centered_z.T @ (sample_weights[:, None] * centered_z)
    gram = gram + ridge * torch.eye(features.shape[1], dtype=features.dtype, device=features.device)
    coef = torch.linalg.solve(gram, centered_z.T @ (sample_weights * centered_y))
    return coef, mean_y - mean_z @ coef


class LIME(_Surrogate):
    """LIME (Ribeiro et al. 2016) for images and feature groups: sample which features to keep,
    score the perturbed inputs, and fit a weighted ridge regression around the input.

    n_samples: perturbed inputs per sample (the first keeps every feature).
    kernel_width: the proximity kernel exp(-d^2 / kernel_width^2) over the cosine distance d between
        the coalition and the full input (LIME's image default 0.25).
    ridge: the L2 penalty of the surrogate (1.0 as LIME's default regressor).
    segments: the interpretable features. Images: None or "slic" (default; SLIC superpixels of
        each image scaled to [0, 1], needs scikit-image, else a regular grid with a warning),
        "quickshift" (LIME's own segmentation, 2D), "grid" (about n_segments boxes); or integer
        labels over the spatial positions ([*spatial] shared, [N, *spatial] per sample), or a
        callable mapping one sample [C, *spatial] to such labels. [N, features]: one feature per
        column unless labels are given.
    n_segments, compactness: SLIC's number of superpixels and weight of position against value
        (on the [0, 1] scale; larger is squarer). n_segments also sizes the grid.
    baseline: what a switched-off feature becomes: a number, a tensor or "blur" (``blur_sigma``).
    batch_size, seed, progress: forward passes, reproducibility, tqdm bar.
    """

    name = "lime"

    def __init__(self, model, n_samples: int = 1000, kernel_width: float = 0.25, ridge: float = 1.0,
                 segments=None, n_segments: int = 50, compactness: float = 0.3, baseline=0.0,
                 blur_sigma: float = 5.0, batch_size: int = 64, seed: int | None = None, progress=None):
        super().__init__(model, segments, n_segments, compactness, baseline, blur_sigma, batch_size, seed, progress)
        self.n_samples = positive_int("n_samples", n_samples, minimum=2)
        self.kernel_width = number("kernel_width", kernel_width, strict=True)
        self.ridge = number("ridge", ridge)

    def _coalitions(self, n_features, gen, device):
        draws = torch.rand((self.n_samples, n_features), generator=gen, device=device) < 0.5
        draws[0] = True
        return draws

    def _fit(self, coalitions, values, full_value, empty_value):
        norms = coalitions.norm(dim=1)
        cosine = coalitions.sum(1) / (norms * math.sqrt(coalitions.shape[1])).clamp(min=1e-12)
        distance = 1 - cosine  # the empty coalition: cosine 0, distance 1
        proximity = torch.exp(-distance.square() / self.kernel_width ** 2)
        return weighted_ridge(coalitions, values, proximity, self.ridge)


def shapley_kernel_size_weights(n_features: int) -> torch.Tensor:
    """Total Shapley-kernel weight of all coalitions of each size s = 1..M-1:
    C(M, s) * (M - 1) / (C(M, s) s (M - s)) = (M - 1) / (s (M - s))."""
    sizes = torch.arange(1, n_features, dtype=torch.float64)
    return (n_features - 1) / (sizes * (n_features - sizes))


class KernelSHAP(_Surrogate):
    """KernelSHAP (Lundberg and Lee 2017): Shapley values of the interpretable features as the
    solution of a Shapley-kernel weighted regression, with the efficiency constraint
    sum(phi) = f(x) - f(baseline) imposed exactly.

    n_samples: the budget of coalitions per sample. When 2^M - 2 <= n_samples every coalition is
        enumerated with its exact kernel weight and the result is the exact Shapley value (for
        this baseline); otherwise coalition sizes are drawn from the kernel's size distribution,
        each paired with its complement, and the draws weigh equally.
    segments, n_segments, compactness, baseline, blur_sigma, batch_size, seed, progress: as LIME.
    """

    name = "kernel_shap"

    def __init__(self, model, n_samples: int = 2048, segments=None, n_segments: int = 50,
                 compactness: float = 0.3, baseline=0.0, blur_sigma: float = 5.0, batch_size: int = 64,
                 seed: int | None = None, progress=None):
        super().__init__(model, segments, n_segments, compactness, baseline, blur_sigma, batch_size, seed, progress)
        self.n_samples = positive_int("n_samples", n_samples, minimum=2)

    def _enumerates(self, n_features):
        return n_features < 62 and 2 ** n_features - 2 <= self.n_samples

    def _coalitions(self, n_features, gen, device):
        if n_features < 2:
            raise ValueError("KernelSHAP needs at least 2 features (segments); got 1")
        if self._enumerates(n_features):
            codes = torch.arange(1, 2 ** n_features - 1, device=device)
            return (codes[:, None] >> torch.arange(n_features, device=device)) & 1
        size_weights = shapley_kernel_size_weights(n_features).to(device)
        half = self.n_samples // 2
        sizes = torch.multinomial(size_weights / size_weights.sum(), half, replacement=True, generator=gen) + 1
        # a random subset of each size: the `size` features with the smallest random keys
        keys = torch.rand((half, n_features), generator=gen, device=device)
        ranks = keys.argsort(1).argsort(1)
        chosen = (ranks < sizes[:, None]).long()
        return torch.cat([chosen, 1 - chosen])  # complements halve the variance

    def _fit(self, coalitions, values, full_value, empty_value):
        n_features = coalitions.shape[1]
        sizes = coalitions.sum(1)
        if self._enumerates(n_features):
            # the kernel weight of one coalition: (M - 1) / (C(M, s) s (M - s))
            binomial = torch.exp(torch.lgamma(torch.tensor(n_features + 1.0)) - torch.lgamma(sizes + 1.0)
                                 - torch.lgamma(n_features - sizes + 1.0))
            kernel = (n_features - 1) / (binomial * sizes * (n_features - sizes))
        else:
            kernel = torch.ones_like(sizes)
        # efficiency: phi_M = total - sum_{j<M} phi_j; substitute it and solve for the rest
        total = full_value - empty_value
        last = coalitions[:, -1]
        design = coalitions[:, :-1] - last[:, None]
        response = values - empty_value - last * total
        root = kernel.to(values.dtype).sqrt()
        solution = torch.linalg.lstsq((root[:, None] * design).cpu(), (root * response).cpu()[:, None]).solution
        head = solution[:, 0].to(values.device)
        phi = torch.cat([head, (total - head.sum()).reshape(1)])
        return phi, empty_value
