"""fastlrp: Layer-wise Relevance Propagation for PyTorch at the speed of a plain gradient.

    import fastlrp
    explainer = fastlrp.LRP(model, composite="epsilon_plus")
    relevance = explainer(x, target)
"""

from . import analysis, backends, composites, layers, linear_form, metrics, reference, rules, viz
from ._native import build_info
from .composites import Composite
from .engine import LRP, Explanation, available_backends, starting_relevance
from .engine import UnsupportedLayerError
from . import methods
from . import concepts
from .methods import attribute
from .methods import (CAM, LIME, Deconvolution, DeepTaylor, GradCAM, GradCAMPlusPlus, GradientTimesInput,
                      GuidedBackpropagation, IntegratedGradients, KernelSHAP, MeaningfulPerturbation, Occlusion,
                      PlainGradient, SensitivityAnalysis, SmoothGrad)
from .viz import heatmap
from .allocator import reuse_freed_memory
from .audit import audit  # the function; the module stays importable as fastlrp.audit via its full path
from .rules import (AlphaBeta, DeconvNet, Epsilon, Flat, Gamma, Gradient, GuidedBackprop, Norm, Pass,
                    Proportional, WSquare, ZBox, ZPlus)

__version__ = "0.1.0"

__all__ = [
    "LRP", "Explanation", "Composite", "UnsupportedLayerError", "available_backends", "build_info",
    "starting_relevance", "reuse_freed_memory", "audit", "analysis", "backends", "composites", "linear_form",
    "heatmap", "layers", "metrics",
    "reference", "rules", "viz", "concepts",
    "AlphaBeta", "DeconvNet", "Epsilon", "Flat", "Gamma", "Gradient", "GuidedBackprop", "Norm", "Pass",
    "Proportional", "WSquare", "ZBox", "ZPlus",
    # other attribution methods (fastlrp.methods)
    "methods", "attribute", "CAM", "LIME", "Deconvolution", "DeepTaylor", "GradCAM", "GradCAMPlusPlus",
    "GradientTimesInput", "GuidedBackpropagation", "IntegratedGradients", "KernelSHAP", "MeaningfulPerturbation",
    "Occlusion", "PlainGradient", "SensitivityAnalysis", "SmoothGrad",
]
