"""Evaluation of explanations: pixel flipping / region perturbation, selectivity, continuity,
conservation, the model-randomization sanity check, localization against ground-truth masks,
and a runner that compares several explainers on several metrics."""

from .compare import (STANDARD_METRICS, Comparison, Metric, MetricInput, compare, conservation_metric,
                      continuity_metric, pixel_flipping_metric, relevance_mass_metric, relevance_rank_metric)
from .localization import relevance_mass_accuracy, relevance_rank_accuracy
from .perturbation import (BlurFill, InpaintFill, MeanFill, NoiseFill, PerturbationCurve, abpc, aopc,
                           gaussian_blur, patch_ranks, pixel_flipping, selectivity)
from .properties import Conservation, conservation, continuity
from .sanity import RandomizationResult, RandomizationStep, model_randomization, parameter_layers, reinitialize

__all__ = [
    "STANDARD_METRICS", "BlurFill", "Comparison", "Conservation", "InpaintFill", "MeanFill", "Metric", "MetricInput", "NoiseFill",
    "PerturbationCurve", "RandomizationResult", "RandomizationStep", "abpc", "aopc", "compare", "conservation",
    "conservation_metric", "continuity", "continuity_metric", "gaussian_blur", "model_randomization",
    "parameter_layers", "patch_ranks", "pixel_flipping", "pixel_flipping_metric", "reinitialize",
    "relevance_mass_accuracy", "relevance_mass_metric", "relevance_rank_accuracy", "relevance_rank_metric",
    "selectivity",
]
