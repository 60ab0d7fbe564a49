"""Analysis with fastlrp: dataset-wide (SpRAy, NEON, HDF5 heatmap storage) and model analysis
(activation maximization, Deep Dream, channel attribution, neuron groups, influence functions)."""


from .spray import (SpRAyResult, kmeans, knn_affinity, pool_heatmaps, pooled_features, spectral_decomposition,
                    spray, suggest_clusters)
from .storage import HeatmapStore, write_heatmaps
from .neon import NeonExplanation, NeuralizedKMeans, NeuralizedOneClassSVM
from .activation_max import (Channel, ClassLogit, ClassProbability, Direction, GaussianDensity,
                             GaussianMixtureDensity, LayerEnergy, Neuron, Objective, Prototypes, RandomAffine,
                             deep_dream, maximize_activation)
from .channels import (ChannelAttribution, SemanticDictionary, channel_attribution, channel_prototypes,
                       semantic_dictionary)
from .neuron_groups import NeuronGroups, neuron_groups, nmf
from .influence import Influence, influence
from .plots import plot_channel_bars, plot_influential, plot_neuron_groups, plot_prototypes

__all__ = [
    "Channel", "ChannelAttribution", "ClassLogit", "ClassProbability", "Direction", "GaussianDensity",
    "GaussianMixtureDensity", "HeatmapStore", "Influence", "LayerEnergy", "NeonExplanation",
    "NeuralizedKMeans", "NeuralizedOneClassSVM", "Neuron", "NeuronGroups", "Objective", "Prototypes",
    "RandomAffine", "SemanticDictionary", "SpRAyResult", "channel_attribution", "channel_prototypes",
    "deep_dream", "influence", "kmeans", "knn_affinity", "maximize_activation", "neuron_groups", "nmf",
    "plot_channel_bars", "plot_influential", "plot_neuron_groups", "plot_prototypes", "pool_heatmaps",
    "pooled_features", "semantic_dictionary", "spectral_decomposition", "spray", "suggest_clusters",
    "write_heatmaps",
]
