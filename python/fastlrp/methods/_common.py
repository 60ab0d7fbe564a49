"""What every attribution method shares: argument checks, the explained score, the model's
state kept as the user left it, batched forward passes, blurring and progress bars."""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..engine import starting_relevance


# ---------------------------------------------------------------- argument checks

def check_model(model):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def check_input(model: nn.Module, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"x must be batched: [N, features] or [N, C, ...], got shape {tuple(x.shape)}")
    param = next(model.parameters(), None)
    if param is not None and param.device != x.device:
        raise ValueError(f"x is on {x.device} but the model's parameters are on {param.device}")


def integer(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def number(name: str, value, minimum: float = 0.0, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < minimum or (strict and value == minimum):
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def choice(name: str, value, options) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {list(options)}, got {value!r}")
    return value


def per_dim(name: str, value, ndim: int) -> tuple:
    """An int for every spatial dimension, or a tuple with one per dimension."""
    values = (value,) * ndim if isinstance(value, int) and not isinstance(value, bool) else tuple(value)
    if len(values) != ndim or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"{name} must be a positive int or {ndim} positive ints (one per spatial "
                         f"dimension), got {value!r}")
    return values


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


# ---------------------------------------------------------------- the model as the user left it

@contextlib.contextmanager
def frozen(model: nn.Module):
    """Eval mode and parameters without gradients for the duration; every flag is restored
    afterwards, also when the method raises. Parameter gradients are never needed, and not
    recording them saves the backward pass their cost."""
    training = {module: module.training for module in model.modules()}
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    if model.training:
        warnings.warn(f"{type(model).__name__} is in training mode; fastlrp explains it in eval mode "
                      "(running batch-norm statistics, no dropout). Call model.eval() to silence this.",
                      stacklevel=4)
    try:
        model.eval()
        for p, _ in requires_grad:
            p.requires_grad_(False)
        yield
    finally:
        for module, flag in training.items():
            module.training = flag
        for p, flag in requires_grad:
            p.requires_grad_(flag)


# ---------------------------------------------------------------- the explained score

def target_weights(output: torch.Tensor, target) -> torch.Tensor:
    """Per-output weights whose dot product with the output is the explained score.

    ``target`` means what it means for ``fastlrp.LRP``; it is resolved once, on the clean
    input, so perturbed inputs are scored for the same class (not their own argmax)."""
    return starting_relevance(output, target, "one")


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

    attribution: torch.Tensor
    """The explanation: the input's shape (CAM methods: the layer's spatial shape, see there)."""
    output: torch.Tensor
    """The model's output for the clean input."""
    score: torch.Tensor
    """The explained score per sample: sum(output * target weights)."""


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


def progress_bar(total: int, progress, description: str):
    """A tqdm bar over ``total`` forward passes, or None. progress=None shows one only for long
    runs (>= 50 passes) and only if tqdm is installed; True insists on it."""
    if progress is False or (progress is None and total < 50):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        if progress:
            raise ImportError("progress=True needs tqdm: pip install 'fastlrp[methods]'") from None
        return None
    return tqdm(total=total, desc=description, unit="batch")


def spatial_dims(x: torch.Tensor) -> tuple:
    """The dimensions a window, mask or segment runs over: the feature axis of [N, F],
    otherwise every dimension after the channel axis."""
    return (1,) if x.ndim == 2 else tuple(range(2, x.ndim))


def generator(seed, device) -> torch.Generator | None:
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(integer("seed", seed, minimum=0))
    return gen
