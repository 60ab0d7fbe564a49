"""Dataset-wide analysis of explanations: SpRAy (spectral relevance analysis), NEON (neuralized
k-means and one-class SVM), and HDF5 storage of heatmaps for datasets larger than memory."""

from .spray import (SpRAyResult, kmeans, knn_affinity, pool_heatmaps, pooled_features, spectral_decomposition,
                    spray, suggest_clusters)
from .storage import HeatmapStore, write_heatmaps
from .neon import NeonExplanation, NeuralizedKMeans, NeuralizedOneClassSVM

__all__ = [
    "HeatmapStore", "NeonExplanation", "NeuralizedKMeans", "NeuralizedOneClassSVM", "SpRAyResult", "kmeans",
    "knn_affinity", "pool_heatmaps", "pooled_features", "spectral_decomposition", "spray", "suggest_clusters",
    "write_heatmaps",
]
