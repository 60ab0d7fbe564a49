"""Attribution methods besides LRP, behind one interface (docs/methods.md).

    fastlrp.attribute(model, x, target, method="integrated_gradients", steps=64)
    fastlrp.methods.IntegratedGradients(model, steps=64).explain(x, target).completeness_gap
"""

from .api import METHODS, attribute, get, names
from .base import AttributionMethod
from .cam import CAM, GradCAM, GradCAMPlusPlus
from .gradients import GradientTimesInput, IntegratedGradients, PlainGradient, SensitivityAnalysis, SmoothGrad
from .perturbation import MeaningfulPerturbation, Occlusion
from .propagation import Deconvolution, DeepTaylor, GuidedBackpropagation, LRPMethod
from .surrogates import LIME, KernelSHAP

__all__ = [
    "METHODS", "attribute", "get", "names", "AttributionMethod",
    "CAM", "GradCAM", "GradCAMPlusPlus", "GradientTimesInput", "IntegratedGradients", "PlainGradient",
    "SensitivityAnalysis", "SmoothGrad", "MeaningfulPerturbation", "Occlusion", "Deconvolution", "DeepTaylor",
    "GuidedBackpropagation", "LRPMethod", "LIME", "KernelSHAP",
]
