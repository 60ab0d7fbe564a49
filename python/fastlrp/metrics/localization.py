"""How much of an explanation falls on a ground-truth region (Arras et al. 2022, CLEVR-XAI).

Both measures use the positive relevance only, summed over channels, as in that paper:
relevance mass accuracy = (positive relevance inside the mask) / (positive relevance overall);
relevance rank accuracy = fraction of the K highest-relevance pixels that lie inside the mask,
K being the mask's size.
"""

from __future__ import annotations

import torch

from .._common.validate import check_tensor
from ._common import pixel_map


def _heat_and_masks(relevance: torch.Tensor, masks) -> tuple[torch.Tensor, torch.Tensor]:
    heat = pixel_map(relevance).detach().double()
    if not isinstance(masks, torch.Tensor):
        raise TypeError(f"masks must be a torch.Tensor, got {type(masks).__name__}")
    masks = masks.to(heat.device).bool()
    spatial = heat.shape[1:]
    if masks.shape == spatial:
        masks = masks.expand(heat.shape)
    if masks.ndim == heat.ndim + 1 and masks.shape[1] == 1:  # [N, 1, H, W]
        masks = masks[:, 0]
    if masks.shape != heat.shape:
        raise ValueError(f"masks must have shape {tuple(spatial)} (one for all) or {tuple(heat.shape)} "
                         f"(one per sample) to fit relevance {tuple(relevance.shape)}, got {tuple(masks.shape)}")
    if not masks.flatten(1).any(1).all():
        empty = (~masks.flatten(1).any(1)).nonzero().flatten().tolist()
        raise ValueError(f"masks of samples {empty} are empty; a ground-truth region needs at least one pixel")
    return heat.flatten(1), masks.flatten(1)


def relevance_mass_accuracy(relevance: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """[N] share of each sample's positive relevance that lies inside its mask (0 where there is none).

    relevance: [N, C, H, W] or [N, H, W]; masks: bool [H, W] for all samples or [N, H, W]."""
    check_tensor("relevance", relevance, ndim_min=2)
    heat, masks = _heat_and_masks(relevance, masks)
    positive = heat.clamp(min=0)
    total = positive.sum(1)
    inside = (positive * masks).sum(1)
    return torch.where(total > 0, inside / total.clamp_min(1e-300), torch.zeros_like(total)).cpu()


def relevance_rank_accuracy(relevance: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """[N] fraction of the K most relevant pixels that lie inside the mask (K = mask size).

    Only pixels with positive relevance count as hits, so an all-zero heatmap scores 0."""
    check_tensor("relevance", relevance, ndim_min=2)
    heat, masks = _heat_and_masks(relevance, masks)
    sizes = masks.sum(1)
    order = heat.argsort(dim=1, descending=True)
    position = torch.empty_like(order).scatter_(1, order, torch.arange(heat.shape[1], device=heat.device)
                                                .expand_as(order).contiguous())
    top = position < sizes[:, None]
    hits = (top & masks & (heat > 0)).sum(1)
    return (hits.double() / sizes.double()).cpu()
