"""What the attribution methods share: the explained score, the result dataclass, baselines,
blurring, seeds and progress bars. Argument checks, targets and the model view are the package's
(``fastlrp._common``)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._common.targets import target_weights  # noqa: F401  (re-exported for the methods)
from .._common.validate import positive_int


# ---------------------------------------------------------------- baselines

def sample_shape_tensor(name: str, value, x: torch.Tensor) -> torch.Tensor:
    """A baseline given as a number or a tensor, broadcast to x's shape."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.full_like(x, float(value))
    if isinstance(value, torch.Tensor):
        try:
            return value.to(device=x.device, dtype=x.dtype).expand_as(x)
        except RuntimeError:
            raise ValueError(f"{name} of shape {tuple(value.shape)} does not broadcast to the input "
                             f"{tuple(x.shape)}") from None
    raise TypeError(f"{name} must be a number or a tensor, got {type(value).__name__}")


# ---------------------------------------------------------------- the explained score

def score(output: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One scalar per row: sum(output * weights)."""
    return (output * weights).flatten(1).sum(1)


def input_gradient(model, x: torch.Tensor, weights) -> tuple:
    """(d score / d x, model output, weights) for a batch.

    ``weights`` may also be a function of the (detached) output, e.g. ``lambda out:
    target_weights(out, target)``: the target is then resolved on the same forward pass that is
    differentiated, with no separate pass to find it."""
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        output = model(leaf)
        if callable(weights):
            weights = weights(output.detach())
        (grad,) = torch.autograd.grad(score(output, weights).sum(), leaf)
    return grad, output.detach(), weights


@dataclass
class Attribution:
    """What a method's ``explain`` returns; methods with more to report extend it."""

    relevance: torch.Tensor
    """The explanation: the input's shape (CAM methods: the layer's spatial shape, see there).
    Named as ``fastlrp.Explanation.relevance``; ``attribution`` is its deprecated old name."""
    output: torch.Tensor
    """The model's output for the clean input."""
    score: torch.Tensor
    """The explained score per sample: sum(output * target weights)."""

    @property
    def attribution(self) -> torch.Tensor:
        """Deprecated name of ``relevance``."""
        warnings.warn("Attribution.attribution is deprecated; use .relevance (the name fastlrp.Explanation "
                      "uses too)", DeprecationWarning, stacklevel=2)
        return self.relevance


# ---------------------------------------------------------------- helpers of several methods

def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur over the spatial dimensions of [N, C, *spatial]; edges are
    replicated, so a constant image stays constant."""
    if sigma <= 0:
        return x.clone()
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels, spatial = x.shape[1], x.ndim - 2
    out = x
    for d in range(spatial):
        shape = [1] * spatial
        shape[d] = kernel.numel()
        weight = kernel.reshape(1, 1, *shape).expand(channels, 1, *shape)
        pad = [0, 0] * spatial
        pad[2 * (spatial - 1 - d)] = pad[2 * (spatial - 1 - d) + 1] = radius
        out = F.pad(out, pad, mode="replicate")
        out = (F.conv1d, F.conv2d, F.conv3d)[spatial - 1](out, weight, groups=channels)
    return out


def per_sample_range(x: torch.Tensor) -> torch.Tensor:
    """max - min of each sample, shaped to broadcast over it."""
    flat = x.detach().flatten(1)
    return (flat.amax(1) - flat.amin(1)).reshape(-1, *([1] * (x.ndim - 1)))


def progress_bar(total: int, progress, description: str, unit: str = "batch"):
    """A tqdm bar over ``total`` forward passes (``unit``), or None. progress=None shows one only
    for long runs (>= 50 passes) and only if tqdm is installed; True insists on it."""
    if progress is False or (progress is None and total < 50):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        if progress:
            raise ImportError("progress=True needs tqdm: pip install 'fastlrp[methods]'") from None
        return None
    return tqdm(total=total, desc=description, unit=unit)


def spatial_dims(x: torch.Tensor) -> tuple:
    """The dimensions a window, mask or segment runs over: the feature axis of [N, F],
    otherwise every dimension after the channel axis."""
    return (1,) if x.ndim == 2 else tuple(range(2, x.ndim))


def generator(seed, device) -> torch.Generator | None:
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(positive_int("seed", seed, minimum=0))
    return gen
