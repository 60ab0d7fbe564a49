"""Model analysis: what a model looks for (activation maximization, Deep Dream), which hidden
channels and neuron groups carry a decision, and which training points a prediction rests on."""

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
    "GaussianMixtureDensity", "Influence", "LayerEnergy", "Neuron", "NeuronGroups", "Objective", "Prototypes",
    "RandomAffine", "SemanticDictionary", "channel_attribution", "channel_prototypes", "deep_dream", "influence",
    "maximize_activation", "neuron_groups", "nmf", "plot_channel_bars", "plot_influential", "plot_neuron_groups",
    "plot_prototypes", "semantic_dictionary",
]
