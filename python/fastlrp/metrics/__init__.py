"""Evaluation of explanations: pixel flipping / region perturbation, selectivity, continuity,
conservation, the model-randomization sanity check, localization against ground-truth masks,
and a runner that compares several explainers on several metrics."""

from .perturbation import (BlurFill, InpaintFill, MeanFill, NoiseFill, PerturbationCurve, abpc, aopc,
                           gaussian_blur, patch_ranks, pixel_flipping, selectivity)
