"""SpRAy: Spectral Relevance Analysis (Lapuschkin et al. 2019, "Unmasking Clever Hans predictors
and assessing what machines really learn", Nat. Commun. 10:1096).

Heatmaps of many samples of one class are pooled to a small size, linked in a k-nearest-neighbour
graph, and embedded spectrally; the eigengap of the graph Laplacian suggests how many distinct
prediction strategies there are, spectral clustering finds them, and the mean heatmap of each
cluster (its prototype) shows what that strategy looks at. Works on in-memory arrays with numpy,
torch and scipy only; a ``HeatmapStore`` is read chunk by chunk, so only the pooled heatmaps
(a few dozen numbers each) need to fit in memory. t-SNE (optional) uses scikit-learn.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .._common.optional import require
from .storage import HeatmapStore

NORMALIZATIONS = ("max_abs", "l2", "sum_abs", None)
EMBEDDINGS = ("spectral", "tsne")
DENSE_LIMIT = 2000  # up to this many samples a dense eigendecomposition is fast and exact


def _as_heat_tensor(heatmaps, name: str = "heatmaps") -> torch.Tensor:
    if isinstance(heatmaps, np.ndarray):
        heatmaps = torch.from_numpy(heatmaps)
    if not isinstance(heatmaps, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, a numpy array or a HeatmapStore, got {type(heatmaps).__name__}")
    if heatmaps.ndim == 4:  # [N, C, H, W]: relevance per pixel is the sum over channels
        heatmaps = heatmaps.sum(1)
    if heatmaps.ndim != 3:
        raise ValueError(f"{name} must be [N, H, W] or [N, C, H, W], got shape {tuple(heatmaps.shape)}")
    return heatmaps.detach().double().cpu()


def pool_heatmaps(heatmaps, size: int | tuple = 8, normalize: str | None = "max_abs") -> np.ndarray:
    """[N, h * w] pooled heatmaps: average-pooled to ``size`` (int or (h, w)), then normalized
    per sample (``"max_abs"``: divide by the largest |value|; ``"l2"``, ``"sum_abs"``; None),
    so that SpRAy compares where relevance lies rather than how much of it there is."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {list(NORMALIZATIONS)}, got {normalize!r}")
    size = (size, size) if isinstance(size, int) else tuple(size)
    if len(size) != 2 or any(not isinstance(s, int) or s < 1 for s in size):
        raise ValueError(f"pooled_size must be a positive int or a pair of them, got {size!r}")
    heat = _as_heat_tensor(heatmaps)
    if size[0] > heat.shape[1] or size[1] > heat.shape[2]:
        raise ValueError(f"pooled_size {size} is larger than the heatmaps ({heat.shape[1]}x{heat.shape[2]})")
    pooled = F.adaptive_avg_pool2d(heat[:, None], size).flatten(1)
    if normalize is not None:
        scale = {"max_abs": lambda p: p.abs().amax(1), "l2": lambda p: p.norm(dim=1),
                 "sum_abs": lambda p: p.abs().sum(1)}[normalize](pooled)
        pooled = pooled / torch.where(scale > 0, scale, torch.ones_like(scale))[:, None]
    return pooled.numpy()


def pooled_features(source, size=8, normalize="max_abs", chunk_size: int = 1024) -> np.ndarray:
    """Pool an in-memory array or a ``HeatmapStore`` chunk by chunk."""
    if isinstance(source, HeatmapStore):
        parts = [pool_heatmaps(chunk, size, normalize) for _, chunk in source.chunks(chunk_size)]
        if not parts:
            raise ValueError(f"the heatmap store {source.path} is empty")
        return np.concatenate(parts)
    heat = _as_heat_tensor(source)
    return np.concatenate([pool_heatmaps(part, size, normalize) for part in heat.split(chunk_size)])


def knn_affinity(features: np.ndarray, n_neighbors: int = 10, chunk_size: int = 1024):
    """Symmetric binary k-nearest-neighbour affinity (scipy.sparse CSR): A_ij = 1 when j is among
    the ``n_neighbors`` nearest (Euclidean) of i or i among those of j. Distances are computed in
    chunks of rows, so memory grows with N * chunk_size, not N^2."""
    from scipy import sparse

    n = features.shape[0]
    if not isinstance(n_neighbors, int) or n_neighbors < 1:
        raise ValueError(f"n_neighbors must be a positive int, got {n_neighbors!r}")
    if n_neighbors >= n:
        raise ValueError(f"n_neighbors ({n_neighbors}) must be smaller than the number of samples ({n})")
    points = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float64))
    rows, cols = [], []
    for start in range(0, n, chunk_size):
        block = torch.cdist(points[start:start + chunk_size], points)
        index = torch.arange(block.shape[0])
        block[index, index + start] = float("inf")  # no self-loops
        nearest = block.topk(n_neighbors, dim=1, largest=False).indices
        rows.append((index + start)[:, None].expand(-1, n_neighbors).reshape(-1))
        cols.append(nearest.reshape(-1))
    rows, cols = torch.cat(rows).numpy(), torch.cat(cols).numpy()
    directed = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    return directed.maximum(directed.T).tocsr()


def spectral_decomposition(affinity, n_components: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``n_components`` smallest eigenvalues (ascending) of the symmetric normalized Laplacian
    L = I - D^{-1/2} A D^{-1/2} and their eigenvectors [N, n_components]."""
    from scipy import sparse

    n = affinity.shape[0]
    degree = np.asarray(affinity.sum(1)).ravel()
    inv_sqrt = 1.0 / np.sqrt(np.maximum(degree, 1e-12))
    scaled = sparse.diags(inv_sqrt) @ affinity @ sparse.diags(inv_sqrt)
    # The smallest eigenvalues of L are the largest of D^-1/2 A D^-1/2, which iterative solvers
    # find reliably (no shift-invert needed).
    if n <= DENSE_LIMIT:
        values, vectors = np.linalg.eigh(scaled.toarray())
        values, vectors = values[::-1][:n_components], vectors[:, ::-1][:, :n_components]
    else:
        from scipy.sparse.linalg import eigsh

        values, vectors = eigsh(scaled, k=n_components, which="LA", v0=np.ones(n))
        order = np.argsort(values)[::-1]
        values, vectors = values[order], vectors[:, order]
    return np.clip(1.0 - values, 0.0, 2.0), np.ascontiguousarray(vectors)


def suggest_clusters(eigenvalues: np.ndarray, max_clusters: int) -> int:
    """The eigengap heuristic: k = argmax_k (lambda_{k+1} - lambda_k) over 1 <= k <= max_clusters,
    with the Laplacian's eigenvalues lambda_1 <= lambda_2 <= ... (von Luxburg 2007)."""
    gaps = np.diff(np.asarray(eigenvalues)[:max_clusters + 1])
    if len(gaps) == 0:
        return 1
    return int(np.argmax(gaps)) + 1


def kmeans(points: np.ndarray, k: int, seed: int = 0, restarts: int = 10) -> np.ndarray:
    """Labels of k-means (k-means++ starts, ``restarts`` runs, the lowest inertia kept)."""
    from scipy.cluster.vq import kmeans2

    if k == 1:
        return np.zeros(len(points), dtype=np.int64)
    rng = np.random.default_rng(seed)
    best, best_inertia = None, np.inf
    for _ in range(restarts):
        centroids, labels = kmeans2(points, k, minit="++", seed=rng)
        inertia = ((points - centroids[labels]) ** 2).sum()
        if inertia < best_inertia:
            best, best_inertia = labels, inertia
    return _relabel_by_size(best)


def _relabel_by_size(labels: np.ndarray) -> np.ndarray:
    """Cluster 0 is the largest, then 1, ...: stable names for the same partition."""
    ids, counts = np.unique(labels, return_counts=True)
    order = ids[np.argsort(-counts, kind="stable")]
    mapping = np.empty(labels.max() + 1, dtype=np.int64)
    mapping[order] = np.arange(len(order))
    return mapping[labels]


@dataclass
class SpRAyResult:
    """The result of ``spray``."""

    labels: np.ndarray
    """[N] cluster of each sample (0 = largest cluster)."""
    n_clusters: int
    suggested_clusters: int
    """The number of clusters the eigengap suggests."""
    eigenvalues: np.ndarray
    """Smallest eigenvalues of the normalized Laplacian, ascending."""
    spectral_embedding: np.ndarray
    """[N, len(eigenvalues)] the corresponding eigenvectors."""
    embedding_2d: np.ndarray
    """[N, 2] coordinates for a scatter plot."""
    features: np.ndarray
    """[N, h * w] the pooled, normalized heatmaps that were clustered."""
    pooled_size: tuple
    prototypes: np.ndarray
    """[n_clusters, H, W] mean heatmap of each cluster at full resolution."""

    @property
    def eigengaps(self) -> np.ndarray:
        return np.diff(self.eigenvalues)

    def cluster_sizes(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.n_clusters)

    def plot(self, figure=None):
        """Eigenvalues, the 2-D embedding coloured by cluster, and the prototypes; returns the figure."""
        import matplotlib.pyplot as plt

        figure = figure or plt.figure(figsize=(4 * (2 + self.n_clusters) / 1.5, 3.2))
        columns = 2 + self.n_clusters
        ax = figure.add_subplot(1, columns, 1)
        ax.plot(np.arange(1, len(self.eigenvalues) + 1), self.eigenvalues, "o-")
        ax.axvline(self.suggested_clusters + 0.5, color="grey", linestyle="--")
        ax.set_title("eigenvalues (eigengap)")
        ax = figure.add_subplot(1, columns, 2)
        ax.scatter(self.embedding_2d[:, 0], self.embedding_2d[:, 1], c=self.labels, cmap="tab10", s=8)
        ax.set_title("embedding")
        for k in range(self.n_clusters):
            ax = figure.add_subplot(1, columns, 3 + k)
            limit = np.abs(self.prototypes[k]).max() or 1.0
            ax.imshow(self.prototypes[k], cmap="bwr", vmin=-limit, vmax=limit)
            ax.set_title(f"cluster {k} ({self.cluster_sizes()[k]})")
            ax.axis("off")
        figure.tight_layout()
        return figure


def _full_prototypes(source, labels: np.ndarray, n_clusters: int, chunk_size: int) -> np.ndarray:
    """Mean heatmap per cluster, accumulated chunk by chunk."""
    totals, counts = None, np.bincount(labels, minlength=n_clusters).astype(np.float64)
    chunks = source.chunks(chunk_size) if isinstance(source, HeatmapStore) else \
        ((start, part) for start, part in zip(range(0, len(labels), chunk_size),
                                              _as_heat_tensor(source).split(chunk_size)))
    for start, chunk in chunks:
        heat = _as_heat_tensor(chunk).numpy()
        if totals is None:
            totals = np.zeros((n_clusters,) + heat.shape[1:])
        np.add.at(totals, labels[start:start + len(heat)], heat)
    return totals / np.maximum(counts, 1)[:, None, None]


def spray(
    heatmaps,
    *,
    n_clusters: int | None = None,
    max_clusters: int = 8,
    pooled_size: int | tuple = 8,
    n_neighbors: int = 10,
    normalize: str | None = "max_abs",
    embedding: str = "spectral",
    seed: int = 0,
    chunk_size: int = 1024,
) -> SpRAyResult:
    """Spectral relevance analysis of many heatmaps (usually of one class).

    heatmaps: [N, H, W] or [N, C, H, W] (tensor or numpy; channels summed), or a ``HeatmapStore``.
    n_clusters: how many clusters to form; None takes the eigengap's suggestion.
    max_clusters: the largest number of clusters the eigengap considers.
    pooled_size: heatmaps are average-pooled to this size (int or (h, w)) before comparison.
    n_neighbors: k of the k-nearest-neighbour affinity graph.
    normalize: per-heatmap scaling before comparison: "max_abs", "l2", "sum_abs" or None.
    embedding: "spectral" (the 2nd and 3rd Laplacian eigenvectors) or "tsne" (scikit-learn's
        t-SNE of the spectral coordinates, from the ``analysis`` extra) for ``embedding_2d``.
    """
    if not isinstance(max_clusters, int) or max_clusters < 1:
        raise ValueError(f"max_clusters must be a positive int, got {max_clusters!r}")
    if n_clusters is not None and (not isinstance(n_clusters, int) or n_clusters < 1):
        raise ValueError(f"n_clusters must be a positive int or None, got {n_clusters!r}")
    if embedding not in EMBEDDINGS:
        raise ValueError(f"embedding must be one of {list(EMBEDDINGS)}, got {embedding!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")

    features = pooled_features(heatmaps, pooled_size, normalize, chunk_size)
    n = features.shape[0]
    if n < 3:
        raise ValueError(f"heatmaps must hold at least 3 samples for SpRAy, got {n}")
    affinity = knn_affinity(features, n_neighbors, chunk_size)
    n_components = min(n - 1, max(max_clusters, n_clusters or 0, 2) + 1)
    eigenvalues, vectors = spectral_decomposition(affinity, n_components)
    suggested = suggest_clusters(eigenvalues, min(max_clusters, n_components - 1))
    k = n_clusters or suggested
    if k > n_components:
        raise ValueError(f"n_clusters ({k}) must be at most {n_components} for {n} samples")

    # Ng, Jordan & Weiss (2002): k-means on the row-normalized first k eigenvectors.
    coordinates = vectors[:, :k]
    coordinates = coordinates / np.maximum(np.linalg.norm(coordinates, axis=1, keepdims=True), 1e-12)
    labels = kmeans(coordinates, k, seed)
    k = int(labels.max()) + 1  # k-means may leave a cluster empty on degenerate data

    if embedding == "tsne":
        manifold = require("sklearn.manifold", "analysis", "the t-SNE embedding of SpRAy")
        perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))
        # Barnes-Hut's overhead outweighs its O(N log N) below about a thousand points.
        method = "exact" if n <= 1000 else "barnes_hut"
        embedding_2d = manifold.TSNE(n_components=2, perplexity=perplexity, init="pca", method=method,
                                     random_state=seed).fit_transform(vectors)
    else:
        embedding_2d = vectors[:, 1:3] if vectors.shape[1] >= 3 else np.pad(vectors[:, 1:], ((0, 0), (0, 1)))

    size = (pooled_size, pooled_size) if isinstance(pooled_size, int) else tuple(pooled_size)
    prototypes = _full_prototypes(heatmaps, labels, k, chunk_size)
    return SpRAyResult(labels, k, suggested, eigenvalues, vectors, np.asarray(embedding_2d), features, size,
                       prototypes)
