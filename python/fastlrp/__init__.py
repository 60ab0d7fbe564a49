"""fastlrp: Layer-wise Relevance Propagation for PyTorch at the speed of a plain gradient.

    import fastlrp
    explainer = fastlrp.LRP(model, composite="epsilon_plus")
    relevance = explainer(x, target)
"""

from . import analysis, composites, layers, reference, rules
from ._native import build_info
from .composites import Composite
from .engine import LRP, Explanation, available_backends, starting_relevance
from .graph import UnsupportedLayerError
from .rules import (AlphaBeta, DeconvNet, Epsilon, Flat, Gamma, Gradient, GuidedBackprop, Norm, Pass,
                    Proportional, WSquare, ZBox, ZPlus)

__version__ = "0.1.0"

__all__ = [
    "LRP", "Explanation", "Composite", "UnsupportedLayerError", "available_backends", "build_info",
    "starting_relevance", "analysis", "composites", "layers", "reference", "rules",
    "AlphaBeta", "DeconvNet", "Epsilon", "Flat", "Gamma", "Gradient", "GuidedBackprop", "Norm", "Pass",
    "Proportional", "WSquare", "ZBox", "ZPlus",
]
