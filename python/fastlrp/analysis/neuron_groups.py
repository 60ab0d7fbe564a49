"""Neuron groups: a non-negative matrix factorization of a layer's activations into a few groups
of channels, each with its share of the decision (Olah et al. 2018, "The Building Blocks of
Interpretability").

    groups = neuron_groups(model, x, layer="relu5", groups=4, target=1)
    groups.channel_factors   # [4, C]: which channels make up each group
    groups.maps              # [N, 4, H, W]: where each group is active
    groups.per_group         # [N, 4]: relevance of each group; sums to the layer's relevance

The activations A (positions of all samples x channels, non-negative after a ReLU) are factorized as
A ~ S G with S >= 0 (positions x groups) and G >= 0 (groups x channels), by Lee & Seung's (2001)
multiplicative updates. The relevance R of the layer is split among the groups in proportion to each
group's part of the reconstruction of every unit: R_g[p, c] = R[p, c] S[p, g] G[g, c] / sum_h S[p, h] G[h, c].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .channels import channel_attribution


def nmf(matrix: torch.Tensor, rank: int, iterations: int = 200, init: str = "nndsvd", seed: int = 0,
        eps: float = 1e-10):
    """Factorize a non-negative ``matrix`` [M, C] ~ S [M, rank] @ G [rank, C], S, G >= 0, minimizing
    the Frobenius error by multiplicative updates (Lee & Seung 2001). Returns (S, G) with the rows of
    G scaled to unit maximum, so S reads in the units of the activations.

    ``init="nndsvd"`` starts from the non-negative parts of the leading singular vectors (Boutsidis &
    Gallopoulos 2008; zeros filled with the mean of A, since multiplicative updates never move a zero),
    which is deterministic and lands nearer the truncated SVD's error than random starts;
    ``init="random"`` draws from ``seed``.
    """
    if not isinstance(matrix, torch.Tensor) or matrix.ndim != 2 or not matrix.is_floating_point():
        raise TypeError("matrix must be a 2-D floating-point tensor [M, C]")
    if (matrix < 0).any():
        raise ValueError("matrix must be non-negative for NMF (take a layer after a ReLU)")
    if not isinstance(rank, int) or not 1 <= rank <= min(matrix.shape):
        raise ValueError(f"rank must be an int between 1 and {min(matrix.shape)}, got {rank!r}")
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
    if init not in ("nndsvd", "random"):
        raise ValueError(f"init must be 'nndsvd' or 'random', got {init!r}")
    a = matrix.detach()
    s, h = _nndsvd(a, rank) if init == "nndsvd" else _random_start(a, rank, seed)
    s, h = s + eps, h + eps
    for _ in range(iterations):
        h = h * (s.T @ a) / (s.T @ s @ h + eps)
        s = s * (a @ h.T) / (s @ (h @ h.T) + eps)
    peak = h.amax(1, keepdim=True).clamp(min=eps)
    return s * peak.T, h / peak


def _random_start(a, rank, seed):
    g = torch.Generator().manual_seed(seed)
    # The scale of the data: S G then has about the mean of A everywhere.
    scale = (a.mean() / rank).sqrt()
    s = scale * torch.rand(a.shape[0], rank, generator=g, dtype=torch.float64)
    h = scale * torch.rand(rank, a.shape[1], generator=g, dtype=torch.float64)
    return s.to(a), h.to(a)


def _nndsvd(a, rank):
    u, sv, vt = torch.linalg.svd(a, full_matrices=False)
    s = torch.zeros(a.shape[0], rank, dtype=a.dtype, device=a.device)
    h = torch.zeros(rank, a.shape[1], dtype=a.dtype, device=a.device)
    for j in range(rank):
        x, y = u[:, j], vt[j]
        # Of the singular pair's (+,+) and (-,-) parts (the sign of a pair is arbitrary), keep the larger.
        xp, xn, yp, yn = x.clamp(min=0), (-x).clamp(min=0), y.clamp(min=0), (-y).clamp(min=0)
        pos, neg = xp.norm() * yp.norm(), xn.norm() * yn.norm()
        x, y, weight = (xp, yp, pos) if pos >= neg else (xn, yn, neg)
        if weight > 0:
            factor = (sv[j] * weight).sqrt()
            s[:, j] = factor * x / x.norm()
            h[j] = factor * y / y.norm()
    fill = a.mean()
    return torch.where(s > 0, s, fill), torch.where(h > 0, h, fill)


@dataclass
class NeuronGroups:
    """What ``neuron_groups`` returns. Tensors are detached."""

    layer: str
    channel_factors: torch.Tensor
    """[groups, C]: each group's channel weights (non-negative, maximum 1)."""
    maps: torch.Tensor
    """[N, groups, *positions]: how strongly each group is present at each position."""
    relevance_maps: torch.Tensor
    """[N, groups, *positions]: the layer's relevance attributed to each group at each position."""
    activation: torch.Tensor
    """[N, C, *positions]: the factorized activations."""
    reconstruction_error: float
    """|A - S G| / |A| (Frobenius norms) over all samples and positions."""

    @property
    def per_group(self) -> torch.Tensor:
        """[N, groups]: each group's relevance for the decision."""
        return self.relevance_maps.flatten(2).sum(2)

    @property
    def reconstruction(self) -> torch.Tensor:
        """S G in the activations' shape [N, C, *positions]."""
        maps = self.maps.movedim(1, -1)  # [N, *positions, groups]
        return (maps @ self.channel_factors).movedim(-1, 1)


def neuron_groups(model, x: torch.Tensor, layer: str, groups: int = 4, target=None, *,
                  method: str = "lrp", iterations: int = 200, init: str = "nndsvd", seed: int = 0,
                  **attribution_options) -> NeuronGroups:
    """Factorize ``layer``'s activations for ``x`` into ``groups`` neuron groups and attribute the
    decision for ``target`` to them. ``model``, ``layer``, ``target``, ``method`` and
    ``attribution_options`` (composite, rule options) are those of ``channel_attribution``;
    ``iterations``, ``init`` and ``seed`` those of ``nmf``."""
    attribution = channel_attribution(model, x, layer, target, method=method, **attribution_options)
    activation, relevance = attribution.activation, attribution.relevance
    if activation.ndim < 2:
        raise ValueError(f"layer {layer!r} gives activations of shape {tuple(activation.shape)}; need [N, C, ...]")
    if (activation < 0).any():
        raise ValueError(f"layer {layer!r} has negative activations; neuron groups need a non-negative layer "
                         "(the output of a ReLU)")
    channels = activation.shape[1]
    if not isinstance(groups, int) or not 1 <= groups <= channels:
        raise ValueError(f"groups must be an int between 1 and the layer's {channels} channels, got {groups!r}")
    flat = activation.movedim(1, -1).reshape(-1, channels)  # [samples x positions, C]
    spatial, factors = nmf(flat, groups, iterations=iterations, init=init, seed=seed)
    reconstruction = spatial @ factors
    error = ((flat - reconstruction).norm() / flat.norm().clamp(min=1e-30)).item()

    # Each group takes the fraction of every unit's relevance that its term contributes to the unit's
    # reconstruction, so the groups' relevance adds up to the layer's.
    parts = spatial[:, :, None] * factors[None]  # [M, groups, C]
    total = reconstruction[:, None, :]
    # Where the reconstruction vanishes (underflow), no group explains the unit better than another.
    share = torch.where(total > 1e-30, parts / total.clamp(min=1e-30), torch.full_like(parts, 1.0 / groups))
    flat_relevance = relevance.movedim(1, -1).reshape(-1, channels)
    group_relevance = (share * flat_relevance[:, None, :]).sum(2)  # [M, groups]

    positions = activation.shape[2:]
    n = activation.shape[0]

    def as_maps(t):
        return t.reshape(n, *positions, groups).movedim(-1, 1).contiguous()

    return NeuronGroups(layer, factors, as_maps(spatial), as_maps(group_relevance), activation, error)
