"""What keeps a prototype natural: density models of the data (the "expert" of Montavon et al.
2018) and penalties against high frequencies and against prototypes that look alike."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# --- density models for "AM with an expert" ---------------------------------------------

class GaussianDensity:
    """A Gaussian N(mean, covariance) over flattened inputs, fitted with ``GaussianDensity.fit(data)``.

    Its log-density is the expert term log p(x) of Montavon et al. (2018), Sec. 3.2.
    """

    def __init__(self, mean: torch.Tensor, covariance: torch.Tensor):
        d = mean.numel()
        if covariance.shape != (d, d):
            raise ValueError(f"covariance must have shape [{d}, {d}] for a mean of {d} values, "
                             f"got {tuple(covariance.shape)}")
        chol, info = torch.linalg.cholesky_ex(covariance)
        if info != 0:
            raise ValueError("covariance is not positive definite; fit with shrinkage > 0")
        self.shape = tuple(mean.shape)
        self.mean = mean.reshape(-1)
        self.cholesky = chol  # solves are cheaper than forming the inverse of a d x d matrix
        self._constant = -0.5 * (d * math.log(2 * math.pi) + 2 * chol.diagonal().log().sum())

    @classmethod
    def fit(cls, data: torch.Tensor, shrinkage: float = 0.1) -> "GaussianDensity":
        """Mean and covariance of ``data`` [N, ...], the covariance shrunk toward its average variance:
        (1 - shrinkage) S + shrinkage tr(S)/d I, so it is invertible even with fewer samples than
        dimensions."""
        flat = _flatten_data(data, "data")
        if not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"shrinkage must lie in [0, 1], got {shrinkage}")
        mean = flat.mean(0)
        centred = flat - mean
        cov = centred.T @ centred / max(flat.shape[0] - 1, 1)
        d = cov.shape[0]
        cov = (1 - shrinkage) * cov + shrinkage * cov.diagonal().mean() * torch.eye(d, dtype=cov.dtype, device=cov.device)
        return cls(mean.reshape(data.shape[1:]), cov)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) for each sample of x [N, ...]."""
        diff = x.reshape(x.shape[0], -1) - self.mean.to(x)
        # (x - mu)^T S^-1 (x - mu) = |L^-1 (x - mu)|^2 with S = L L^T
        whitened = torch.linalg.solve_triangular(self.cholesky.to(x), diff.T, upper=False)
        return self._constant.to(x) - 0.5 * whitened.pow(2).sum(0)


class GaussianMixtureDensity:
    """A mixture of Gaussians with diagonal covariances over flattened inputs, fitted by EM.

    Diagonal covariances keep fitting and evaluation linear in the input size; a mixture of
    full-covariance Gaussians over images would need one d x d matrix per component.
    """

    def __init__(self, weights: torch.Tensor, means: torch.Tensor, variances: torch.Tensor):
        if not (weights.ndim == 1 and means.shape == variances.shape and means.shape[0] == weights.shape[0]):
            raise ValueError("weights [K], means [K, d] and variances [K, d] do not fit together")
        self.log_weights = weights.log()
        self.means, self.variances = means, variances

    @classmethod
    def fit(cls, data: torch.Tensor, components: int = 3, iterations: int = 50,
            min_variance: float = 1e-4, seed: int = 0) -> "GaussianMixtureDensity":
        """EM from ``components`` distinct data points as means; ``min_variance`` is added to every
        variance so a component cannot collapse onto a single point."""
        flat = _flatten_data(data, "data")
        if not isinstance(components, int) or not 1 <= components <= flat.shape[0]:
            raise ValueError(f"components must be an int between 1 and the number of samples "
                             f"({flat.shape[0]}), got {components!r}")
        if iterations < 1 or min_variance <= 0:
            raise ValueError(f"iterations must be >= 1 and min_variance > 0, got {iterations}, {min_variance}")
        g = torch.Generator().manual_seed(seed)
        means = flat[torch.randperm(flat.shape[0], generator=g)[:components]].clone()
        variances = (flat.var(0) + min_variance).expand(components, -1).clone()
        weights = torch.full((components,), 1.0 / components, dtype=flat.dtype)
        for _ in range(iterations):
            model = cls(weights, means, variances)
            log_resp = model._component_log_probs(flat)
            log_resp = log_resp - log_resp.logsumexp(1, keepdim=True)
            resp = log_resp.exp()  # [N, K]
            counts = resp.sum(0) + 1e-12
            means = resp.T @ flat / counts[:, None]
            variances = resp.T @ flat.pow(2) / counts[:, None] - means.pow(2)
            variances = variances.clamp(min=0) + min_variance
            weights = counts / counts.sum()
        return cls(weights, means, variances)

    def _component_log_probs(self, flat: torch.Tensor) -> torch.Tensor:
        """log pi_k + log N(x | mu_k, diag sigma_k^2), shape [N, K]."""
        means, variances = self.means.to(flat), self.variances.to(flat)
        quad = ((flat[:, None, :] - means[None]).pow(2) / variances[None]).sum(2)
        log_norm = -0.5 * (variances.log().sum(1) + flat.shape[1] * math.log(2 * math.pi))
        return self.log_weights.to(flat) + log_norm - 0.5 * quad

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) for each sample of x [N, ...]."""
        return self._component_log_probs(x.reshape(x.shape[0], -1)).logsumexp(1)


def _flatten_data(data, argument: str) -> torch.Tensor:
    if not isinstance(data, torch.Tensor) or not data.is_floating_point() or data.ndim < 2:
        raise TypeError(f"{argument} must be a floating-point tensor [N, ...] of samples")
    if data.shape[0] < 2:
        raise ValueError(f"{argument} needs at least 2 samples, got {data.shape[0]}")
    return data.detach().reshape(data.shape[0], -1)


# --- penalties -------------------------------------------------------------------------

def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of neighbouring pixels, per sample (Mahendran & Vedaldi 2015, beta = 2)."""
    dy = (x[..., 1:, :] - x[..., :-1, :]).pow(2).flatten(1).mean(1)
    dx = (x[..., :, 1:] - x[..., :, :-1]).pow(2).flatten(1).mean(1)
    return dy + dx


def high_frequency_energy(x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Mean squared difference between x and x blurred by a Gaussian of width ``sigma``, per sample."""
    radius = max(1, int(math.ceil(2 * sigma)))
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    padded = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    blurred = F.conv2d(padded, kernel.reshape(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    blurred = F.conv2d(blurred, kernel.reshape(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return (x - blurred).pow(2).flatten(1).mean(1)


def gram_similarity(activations: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity between the Gram matrices of different samples' activations
    [N, C, ...] (Olah et al. 2017's diversity term is its negative)."""
    a = activations.flatten(2)  # [N, C, positions]
    gram = (a @ a.transpose(1, 2)).flatten(1)
    gram = F.normalize(gram, dim=1)
    sim = gram @ gram.T
    n = sim.shape[0]
    return (sim.sum() - sim.diagonal().sum()) / (n * (n - 1))
