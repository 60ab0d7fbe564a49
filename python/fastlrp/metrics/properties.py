"""Properties of an explanation method (Montavon et al. 2018, "Methods for interpreting and
understanding deep neural networks", Sec. 4): continuity and conservation. Selectivity is the
most-relevant-first pixel-flipping curve (``perturbation.selectivity``)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from typing import Callable

import torch
from torch import nn

from .._common.targets import class_indices, fixed_class_indices
from .._common.validate import check_callable, check_model, check_tensor, positive_int
from ._common import forward_in_batches


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
    check_callable(explainer, "explainer", "(x, target) -> relevance")
    check_tensor("x", x, ndim_min=2)
    if not noise_std > 0:
        raise ValueError(f"noise_std must be > 0, got {noise_std}")
    num_samples = positive_int("num_samples", num_samples)
    batch_size = positive_int("batch_size", batch_size)
    target = fixed_class_indices(target, x.shape[0], x.device, "continuity keeps it fixed while the input moves")

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


@dataclass
class Conservation:
    """What ``conservation`` returns: [N] tensors on the CPU, one value per sample."""

    relevance_sum: torch.Tensor
    """sum_i R_i."""
    output: torch.Tensor
    """The explained output: f_c(x), or f_c(x) - f_c(baseline) with a baseline."""
    absolute_error: torch.Tensor
    """|relevance_sum - output|."""
    relative_error: torch.Tensor
    """absolute_error / |output|."""

    def __getitem__(self, key: str) -> torch.Tensor:
        # conservation returned a dict of these four tensors before it returned this dataclass
        if key not in {f.name for f in fields(self)}:
            raise KeyError(key)
        warnings.warn(f"conservation(...)[{key!r}] is deprecated: the result is a Conservation dataclass, "
                      f"read .{key}", DeprecationWarning, stacklevel=2)
        return getattr(self, key)


def conservation(
    model: nn.Module,
    x: torch.Tensor,
    *positional,
    relevance: torch.Tensor | None = None,
    target=None,
    baseline: torch.Tensor | None = None,
    batch_size: int = 256,
) -> Conservation:
    """Does the relevance add up to the explained output? (conservation, or completeness).

    Call it as ``conservation(model, x, relevance=R, target=t)``. Compares sum_i R_i with
    f_c(x) - f_c(baseline) (just f_c(x) without a baseline), per sample. LRP with conserving rules
    and no biases gives sum R = f_c(x); integrated gradients gives f_c(x) - f_c(baseline).
    ``target``: None (the predicted class), an int, or one index per sample.

    ``relevance`` and ``target`` must be passed by keyword: the positional order used to be
    (model, relevance, x, target), and a positional call cannot tell x from the relevance (both
    have x's shape), so rather than compute with them swapped it raises a TypeError.
    """
    if positional:
        raise TypeError("conservation(model, x, relevance=..., target=...): pass relevance and target by "
                        "keyword. The old order was (model, relevance, x, target) and the new one puts x "
                        "first, as pixel_flipping does; a positional call is refused because it cannot tell "
                        "which of the two same-shaped tensors is the input")
    check_model(model)
    if relevance is None:
        raise TypeError("conservation needs relevance=: the relevance of x, a tensor of x's shape")
    check_tensor("relevance", relevance, ndim_min=1)
    check_tensor("x", x, ndim_min=1)
    if relevance.shape != x.shape:
        raise ValueError(f"relevance must have x's shape {tuple(x.shape)}, got {tuple(relevance.shape)}")
    batch_size = positive_int("batch_size", batch_size)
    logits = forward_in_batches(model, x.detach(), batch_size)
    index = class_indices(logits, target)
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
    return Conservation(total.cpu(), explained.cpu(), error.cpu(),
                        (error / explained.abs().clamp_min(1e-300)).cpu())
