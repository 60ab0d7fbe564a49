"""Small helpers shared by the metrics. Argument checks, targets and the model view are the
package's (``fastlrp._common``)."""

from __future__ import annotations

import torch
from torch import nn

from .._common.model_view import eval_view
from .._common.validate import check_tensor, model_device, model_dtype


@torch.no_grad()
def forward_in_batches(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """model(x) chunk by chunk on the model's device, through an eval-mode view of it (a
    training-mode batch norm would update its running statistics); the output comes back on x's
    device. The model itself is not touched."""
    device = model_device(model, x.device)
    dtype = model_dtype(model, x.dtype)
    view = eval_view(model)
    return torch.cat([view(chunk.to(device, dtype)).to(x.device) for chunk in x.split(batch_size)])


def pixel_map(relevance: torch.Tensor, name: str = "relevance") -> torch.Tensor:
    """[N, H, W] (or [N, *spatial]) relevance per pixel: channels summed for [N, C, H, W] inputs.

    A tensor with one more dimension than the spatial map is read as [N, C, ...]; 3-D tensors
    are taken to be [N, H, W] already."""
    check_tensor(name, relevance, ndim_min=2)
    return relevance.sum(1) if relevance.ndim >= 4 else relevance


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of each row of a with the same row of b (ties get average ranks)."""
    from scipy.stats import rankdata

    ranks_a = torch.from_numpy(rankdata(a.detach().double().cpu().numpy(), axis=1))
    ranks_b = torch.from_numpy(rankdata(b.detach().double().cpu().numpy(), axis=1))
    ranks_a = ranks_a - ranks_a.mean(1, keepdim=True)
    ranks_b = ranks_b - ranks_b.mean(1, keepdim=True)
    denominator = (ranks_a.norm(dim=1) * ranks_b.norm(dim=1))
    # A constant row has no ranking; report 0 correlation rather than NaN.
    return torch.where(denominator > 0, (ranks_a * ranks_b).sum(1) / denominator.clamp_min(1e-300),
                       torch.zeros_like(denominator))
