"""NEON: neuralization-propagation, explaining models that are not neural networks by first
rewriting them as one and then applying LRP.

- Neuralized k-means (Kauffmann, Esders, Ruff, Montavon, Samek, Müller, "From clustering to
  cluster explanations via neural networks", IEEE TNNLS 2022). The evidence that x belongs to
  cluster c is f_c(x) = min_{k != c} h_k(x), with the linear logits
  h_k(x) = (||x - mu_k||^2 - ||x - mu_c||^2) / 2 = w_k^T x + b_k, w_k = mu_c - mu_k,
  b_k = (||mu_k||^2 - ||mu_c||^2) / 2. The hard min is replaced by the soft-min
  f_c(x) = -1/beta log sum_{k != c} exp(-beta h_k(x)). Relevance: the pooling layer hands
  R_k = p_k f_c(x) to competitor k, p_k = softmin weights; the linear layer redistributes it with
  the midpoint rule R_ik = (x_i - m_ik) w_ik / h_k(x) * R_k, m_k = (mu_c + mu_k) / 2, which
  conserves exactly because h_k(x) = w_k^T (x - m_k).
- Neuralized one-class SVM (Kauffmann, Müller, Montavon, "Towards explaining anomalies: a deep
  Taylor decomposition of one-class models", Pattern Recognition 2020). For a Gaussian-kernel
  OC-SVM with support vectors u_j and weights alpha_j the outlier score is
  o(x) = -1/gamma log sum_j alpha_j exp(-gamma ||x - u_j||^2), a soft-min over j of
  d_j(x) = ||x - u_j||^2 - log(alpha_j) / gamma. The soft-min hands R_j = p_j o(x) to support
  vector j, which redistributes it in proportion to the squared differences:
  R_ij = (x_i - u_ij)^2 / ||x - u_j||^2 * R_j.

Both explanations are batched over samples, conserve (sum_i R_i equals the explained score; see
``conservation_error``), and return relevance on the model's input features. When those features
come from a network, the feature relevance can be propagated further with ``fastlrp.LRP(...,
start="one")`` and the feature relevance as the target weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

STABILIZER = 1e-12  # only guards exact zeros; both rules divide by quantities that sum exactly


def _check_points(name: str, value, dims: int | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(value, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{name} must be a tensor or an array of shape [n, d], got {type(value).__name__}") from None
    if not value.is_floating_point():
        value = value.double()
    if value.ndim != 2:
        raise ValueError(f"{name} must have shape [n, d], got {tuple(value.shape)}")
    if dims is not None and value.shape[1] != dims:
        raise ValueError(f"{name} has {value.shape[1]} features, the model expects {dims}")
    return value


def _softmin(values: torch.Tensor, beta: float, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """(-1/beta log sum exp(-beta v), the weights softmax(-beta v)); +inf entries take no part."""
    pooled = -torch.logsumexp(-beta * values, dim=dim) / beta
    return pooled, torch.softmax(-beta * values, dim=dim)


@dataclass
class NeonExplanation:
    relevance: torch.Tensor
    """[N, d] relevance of each input feature."""
    score: torch.Tensor
    """[N] the explained score (cluster evidence f_c(x), or outlier score o(x))."""
    intermediate: torch.Tensor
    """[N, K] relevance of the hidden units (competitor clusters, or support vectors)."""

    def conservation_error(self) -> torch.Tensor:
        """[N] |sum_i R_i - score| / max(|score|, tiny)."""
        return (self.relevance.sum(1) - self.score).abs() / self.score.abs().clamp_min(STABILIZER)


class NeuralizedKMeans:
    """k-means as a two-layer network whose output explains cluster membership.

    ``NeuralizedKMeans(centroids, beta=None)``; centroids [K, d] (e.g. ``KMeans().cluster_centers_``).
    beta: stiffness of the soft-min; large values approach the hard min. The soft-min lies at
    most log(K - 1) / beta below the hard min. None picks beta = 10 max(log(K - 1), 1) / t with
    t = mean_{c != k} ||mu_c - mu_k||^2 / 2, the typical logit at a centroid, so that gap is at
    most a tenth of t whatever the scale of the data (our choice; the paper leaves beta open).
    """

    def __init__(self, centroids, beta: float | None = None):
        self.centroids = _check_points("centroids", centroids)
        k = self.centroids.shape[0]
        if k < 2:
            raise ValueError(f"centroids must hold at least 2 clusters to compare, got {k}")
        if beta is None:
            gaps = torch.cdist(self.centroids, self.centroids).pow(2) / 2
            typical = gaps[~torch.eye(k, dtype=torch.bool)].mean()
            if not typical > 0:
                raise ValueError("centroids must not all coincide")
            beta = 10.0 * max(math.log(k - 1), 1.0) / typical.item()
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        self.beta = float(beta)

    @property
    def num_clusters(self) -> int:
        return self.centroids.shape[0]

    def assign(self, x) -> torch.Tensor:
        """[N] index of the nearest centroid."""
        x = _check_points("x", x, self.centroids.shape[1])
        return torch.cdist(x.to(self.centroids), self.centroids).argmin(1)

    def logits(self, x, cluster) -> torch.Tensor:
        """[N, K] h_k(x) for the target cluster c of each sample; the column k = c is +inf."""
        x = _check_points("x", x, self.centroids.shape[1]).to(self.centroids)
        cluster = self._clusters(cluster, x.shape[0], x.device)
        mu_c = self.centroids[cluster]  # [N, d]
        weights = mu_c[:, None, :] - self.centroids[None]  # [N, K, d]
        midpoints = (mu_c[:, None, :] + self.centroids[None]) / 2
        h = (weights * (x[:, None, :] - midpoints)).sum(-1)
        return h.masked_fill(torch.nn.functional.one_hot(cluster, self.num_clusters).bool(), float("inf"))

    def evidence(self, x, cluster=None) -> torch.Tensor:
        """[N] soft-min cluster evidence f_c(x) (positive where x lies in cluster c)."""
        x = _check_points("x", x, self.centroids.shape[1])
        cluster = self.assign(x) if cluster is None else cluster
        return _softmin(self.logits(x, cluster), self.beta)[0]

    def explain(self, x, cluster=None) -> NeonExplanation:
        """Relevance of each feature of x [N, d] for membership in ``cluster`` (an int, one index
        per sample, or None: each sample's assigned cluster)."""
        x = _check_points("x", x, self.centroids.shape[1]).to(self.centroids)
        cluster = self.assign(x) if cluster is None else self._clusters(cluster, x.shape[0], x.device)
        h = self.logits(x, cluster)
        score, weights = _softmin(h, self.beta)
        competitor_relevance = weights * score[:, None]  # [N, K], zero for k = c
        mu_c = self.centroids[cluster]
        contributions = (mu_c[:, None, :] - self.centroids[None]) * (x[:, None, :] - (mu_c[:, None, :]
                                                                                      + self.centroids[None]) / 2)
        finite_h = torch.where(torch.isinf(h), torch.ones_like(h), h)
        denominator = finite_h + STABILIZER * torch.where(finite_h >= 0, 1.0, -1.0)
        relevance = (contributions * (competitor_relevance / denominator)[..., None]).sum(1)
        return NeonExplanation(relevance, score, competitor_relevance)

    def _clusters(self, cluster, n: int, device) -> torch.Tensor:
        index = torch.as_tensor(cluster, device=device)
        if index.is_floating_point() or index.dtype == torch.bool:
            raise TypeError(f"cluster must be an int or integer indices, got dtype {index.dtype}")
        index = index.long()
        index = index.expand(n) if index.ndim == 0 else index
        if index.shape != (n,):
            raise ValueError(f"cluster must be an int or one index per sample ({n}), got shape {tuple(index.shape)}")
        if (index < 0).any() or (index >= self.num_clusters).any():
            raise ValueError(f"cluster index out of range for {self.num_clusters} clusters")
        return index


class NeuralizedOneClassSVM:
    """A Gaussian-kernel one-class SVM as a two-layer network whose output is the outlier score.

    ``NeuralizedOneClassSVM(support_vectors [M, d], alphas [M], gamma, threshold=None)``, where
    the model's decision function is sum_j alpha_j exp(-gamma ||x - u_j||^2) - rho; or
    ``NeuralizedOneClassSVM.from_sklearn(OneClassSVM(kernel="rbf").fit(X))``.

    The alphas are normalized to sum to 1, as in the paper: that shifts o(x) by a constant,
    keeps the ranking of samples, and makes o(x) >= 0 (so relevance is non-negative).
    threshold: the outlier score above which a sample is an outlier (``from_sklearn`` derives it
    from rho: o(x) > -log(rho / sum_j alpha_j) / gamma exactly where scikit-learn predicts -1).
    """

    def __init__(self, support_vectors, alphas, gamma: float, threshold: float | None = None):
        self.support_vectors = _check_points("support_vectors", support_vectors)
        alphas = torch.as_tensor(alphas, dtype=self.support_vectors.dtype).reshape(-1)
        if alphas.shape[0] != self.support_vectors.shape[0]:
            raise ValueError(f"alphas must hold one weight per support vector ({self.support_vectors.shape[0]}), "
                             f"got {alphas.shape[0]}")
        if not (alphas > 0).all():
            raise ValueError("alphas must all be > 0 (drop support vectors with zero weight)")
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        self.alphas = alphas / alphas.sum()
        self.gamma = float(gamma)
        self.threshold = threshold

    @classmethod
    def from_sklearn(cls, model) -> "NeuralizedOneClassSVM":
        """From a fitted ``sklearn.svm.OneClassSVM`` with an RBF kernel."""
        if getattr(model, "kernel", None) != "rbf":
            raise ValueError(f"model must be a fitted OneClassSVM with kernel='rbf', got kernel="
                             f"{getattr(model, 'kernel', None)!r}")
        if not hasattr(model, "support_vectors_"):
            raise ValueError("model must be fitted before it is neuralized")
        alphas = model.dual_coef_.ravel()
        gamma = float(model._gamma)
        rho = -float(model.intercept_[0])
        threshold = -math.log(rho / alphas.sum()) / gamma if rho > 0 else None
        return cls(model.support_vectors_, alphas, gamma, threshold)

    def distances(self, x) -> torch.Tensor:
        """[N, M] d_j(x) = ||x - u_j||^2 - log(alpha_j) / gamma."""
        x = _check_points("x", x, self.support_vectors.shape[1]).to(self.support_vectors)
        return torch.cdist(x, self.support_vectors).pow(2) - torch.log(self.alphas)[None] / self.gamma

    def outlier_score(self, x) -> torch.Tensor:
        """[N] o(x) = -1/gamma log sum_j alpha_j exp(-gamma ||x - u_j||^2): large far from the data."""
        return _softmin(self.distances(x), self.gamma)[0]

    def is_outlier(self, x) -> torch.Tensor:
        """[N] bool: outlier score above ``threshold``."""
        if self.threshold is None:
            raise ValueError("threshold is not set; pass threshold= or build the model with from_sklearn")
        return self.outlier_score(x) > self.threshold

    def explain(self, x) -> NeonExplanation:
        """Relevance of each feature of x [N, d] for its outlier score."""
        x = _check_points("x", x, self.support_vectors.shape[1]).to(self.support_vectors)
        score, weights = _softmin(self.distances(x), self.gamma)
        support_relevance = weights * score[:, None]  # [N, M]
        squared = (x[:, None, :] - self.support_vectors[None]).pow(2)  # [N, M, d]
        share = squared / squared.sum(-1, keepdim=True).clamp_min(STABILIZER)
        # A point on top of a support vector has no differences to share out: split evenly.
        share = torch.where(squared.sum(-1, keepdim=True) > 0, share, torch.full_like(share, 1 / x.shape[1]))
        relevance = (share * support_relevance[..., None]).sum(1)
        return NeonExplanation(relevance, score, support_relevance)
