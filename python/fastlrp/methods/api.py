"""``fastlrp.attribute(model, x, target, method=..., **options)``: every method by name."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .base import AttributionMethod
from .cam import CAM, GradCAM, GradCAMPlusPlus
from .gradients import GradientTimesInput, IntegratedGradients, PlainGradient, SensitivityAnalysis, SmoothGrad
from .perturbation import MeaningfulPerturbation, Occlusion
from .propagation import Deconvolution, DeepTaylor, GuidedBackpropagation, LRPMethod
from .surrogates import LIME, KernelSHAP

METHODS: dict[str, type] = {cls.name: cls for cls in (
    LRPMethod, SensitivityAnalysis, PlainGradient, GradientTimesInput, SmoothGrad, IntegratedGradients,
    DeepTaylor, GuidedBackpropagation, Deconvolution, Occlusion, MeaningfulPerturbation,
    CAM, GradCAM, GradCAMPlusPlus, LIME, KernelSHAP,
)}


def names() -> list:
    """Names ``attribute(method=...)`` accepts."""
    return list(METHODS)


def get(method: str, model: nn.Module, **options) -> AttributionMethod:
    """The method object for a name, with its options checked."""
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method {method!r}; methods are {names()}")
    cls = METHODS[method]
    parameters = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    allowed = [name for name in parameters if name not in ("self", "model")
               and parameters[name].kind is not inspect.Parameter.VAR_KEYWORD]
    unknown = sorted(set(options) - set(allowed))
    if unknown and not takes_any:
        raise TypeError(f"method {method!r} has no option {', '.join(map(repr, unknown))}; "
                        f"its options are {allowed}")
    return cls(model, **options)


def attribute(model: nn.Module, x: torch.Tensor, target=None, method: str = "gradient", **options) -> torch.Tensor:
    """Explain ``model``'s prediction for the batch ``x`` with one of ``names()``.

    Returns a tensor of x's shape (CAM methods: the layer's spatial shape [N, *spatial], or the
    input's with ``upsample=True``). ``target`` is a class index, one per sample, weights over the
    output, a callable, or None for the predicted class, as for ``fastlrp.LRP``. For what else a
    method reports (completeness gap, mask and score curve, superpixel weights), build it with
    ``fastlrp.methods.get(method, model, **options)`` and call ``.explain(x, target)``: a dataclass
    whose ``relevance`` is this tensor. The model is run through an eval-mode view and never modified.
    """
    return get(method, model, **options)(x, target)
