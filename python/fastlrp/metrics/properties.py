"""Properties of an explanation method (Montavon et al. 2018, "Methods for interpreting and
understanding deep neural networks", Sec. 4): continuity and conservation. Selectivity is the
most-relevant-first pixel-flipping curve (``perturbation.selectivity``)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ._common import (check_model, check_positive_int, check_tensor, forward_in_batches, resolve_target)


def _check_explainer(explainer) -> Callable:
    if not callable(explainer):
        raise TypeError(f"explainer must be a callable (x, target) -> relevance, got {type(explainer).__name__}")
    return explainer


def explain_in_batches(explainer: Callable, x: torch.Tensor, target: torch.Tensor, batch_size: int) -> torch.Tensor:
    """explainer(x, target) chunk by chunk, detached."""
    parts = [explainer(xs, ts).detach() for xs, ts in zip(x.split(batch_size), target.split(batch_size))]
    return torch.cat(parts)


def continuity(
    explainer: Callable,
    x: torch.Tensor,
    target: torch.Tensor,
    *,
    noise_std: float = 0.01,
    num_samples: int = 8,
    normalize: bool = True,
    batch_size: int = 64,
    seed: int = 0,
) -> torch.Tensor:
    """[N] how far the explanation moves under a small input change (smaller is more continuous).

    Montavon et al. (2018) measure continuity by  max_{x != x'} ||R(x) - R(x')||_1 / ||x - x'||_2;
    here x' = x + delta with delta ~ N(0, noise_std^2) drawn ``num_samples`` times per input, and
    the largest ratio is returned. With ``normalize`` (default) both norms are relative,
    (||R(x) - R(x')||_1 / ||R(x)||_1) / (||delta||_2 / ||x||_2), so methods whose relevance lives on
    different scales (LRP vs. gradients) can be compared. ``target`` (one class per sample) stays
    fixed, so the same output is explained before and after the change."""
    _check_explainer(explainer)
    check_tensor("x", x, ndim_min=2)
    if not noise_std > 0:
        raise ValueError(f"noise_std must be > 0, got {noise_std}")
    num_samples = check_positive_int("num_samples", num_samples)
    batch_size = check_positive_int("batch_size", batch_size)
    if target is None or isinstance(target, bool) or (isinstance(target, torch.Tensor) and target.is_floating_point()):
        raise TypeError("target must be a class index or one index per sample (continuity keeps it fixed while "
                        f"the input moves), got {target!r}")
    target = torch.as_tensor(target, device=x.device).long()
    if target.ndim == 0:
        target = target.expand(x.shape[0])
    if target.shape != (x.shape[0],):
        raise ValueError(f"target must be one class index per sample ({x.shape[0]}), got shape {tuple(target.shape)}")

    generator = torch.Generator().manual_seed(seed)
    noise = noise_std * torch.randn((num_samples,) + tuple(x.shape), generator=generator, dtype=x.dtype)
    noise = noise.to(x.device)
    base = explain_in_batches(explainer, x, target, batch_size).flatten(1).double()
    moved = x.unsqueeze(0) + noise  # [S, N, ...]
    shifted = explain_in_batches(explainer, moved.flatten(0, 1), target.repeat(num_samples), batch_size)
    shifted = shifted.view(num_samples, x.shape[0], -1).double()
    change = (shifted - base).abs().sum(-1)  # [S, N]
    step = noise.flatten(2).double().norm(dim=-1)
    if normalize:
        change = change / base.abs().sum(-1).clamp_min(1e-300)
        step = step / x.flatten(1).double().norm(dim=-1).clamp_min(1e-300)
    return (change / step).amax(0).cpu()


def conservation(
    model: nn.Module,
    relevance: torch.Tensor,
    x: torch.Tensor,
    target=None,
    *,
    baseline: torch.Tensor | None = None,
    batch_size: int = 256,
) -> dict:
    """Does the relevance add up to the explained output? (conservation, or completeness).

    Compares sum_i R_i with f_c(x) - f_c(baseline) (just f_c(x) without a baseline), per sample.
    LRP with conserving rules and no biases gives sum R = f_c(x); integrated gradients gives
    f_c(x) - f_c(baseline). Returns a dict of [N] tensors: ``relevance_sum``, ``output``,
    ``absolute_error`` and ``relative_error`` (absolute error / |output|)."""
    check_model(model)
    check_tensor("relevance", relevance, ndim_min=1)
    check_tensor("x", x, ndim_min=1)
    if relevance.shape != x.shape:
        raise ValueError(f"relevance must have x's shape {tuple(x.shape)}, got {tuple(relevance.shape)}")
    batch_size = check_positive_int("batch_size", batch_size)
    logits = forward_in_batches(model, x.detach(), batch_size)
    index = resolve_target(target, logits)
    explained = logits.gather(1, index[:, None]).squeeze(1).double()
    if baseline is not None:
        check_tensor("baseline", baseline)
        try:
            baseline = baseline.to(x).expand_as(x)
        except RuntimeError:
            raise ValueError(f"baseline of shape {tuple(baseline.shape)} does not broadcast to x "
                             f"{tuple(x.shape)}") from None
        explained = explained - forward_in_batches(model, baseline, batch_size).gather(
            1, index[:, None]).squeeze(1).double()
    total = relevance.detach().flatten(1).double().sum(1).to(explained.device)
    error = (total - explained).abs()
    return {
        "relevance_sum": total.cpu(),
        "output": explained.cpu(),
        "absolute_error": error.cpu(),
        "relative_error": (error / explained.abs().clamp_min(1e-300)).cpu(),
    }
