"""Methods that are modified backward passes, run by the LRP engine: LRP itself, deep Taylor
decomposition (composites ``deep_taylor*``), guided backpropagation and deconvolution
(the engine's GuidedBackprop and DeconvNet rules at every ReLU, the plain gradient elsewhere)."""

from __future__ import annotations

from torch import nn

from .. import composites
from .._common.validate import check_input, choice
from ..engine import LRP
from ..rules import DeconvNet, GuidedBackprop
from ._common import Attribution, score
from .base import AttributionMethod


class _EngineMethod(AttributionMethod):
    """Runs ``fastlrp.LRP`` with a composite; the explainer is traced once, at construction."""

    def _build(self, composite, start: str, **engine_options):
        self.explainer = LRP(self.model, composite, start=start, **engine_options)

    def explain(self, x, target=None) -> Attribution:
        # The engine runs its own eval-mode view of the model and warns about training mode itself.
        check_input(self.model, x)
        return self._explain(None, x.detach(), target)

    def _explain(self, model, x, target):
        result = self.explainer.explain(x, target)
        # start="logit" begins from output * weights, start="one" from the weights themselves
        explained = (score(result.output, result.start) if self.explainer.start == "one"
                     else result.start.flatten(1).sum(1))
        return Attribution(result.relevance, result.output, explained)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(composite={self.explainer.composite!r})"


class LRPMethod(_EngineMethod):
    """``fastlrp.LRP`` behind the common interface: ``attribute(model, x, target, method="lrp",
    composite="epsilon_plus", ...)``; every option of ``fastlrp.LRP`` applies."""

    name = "lrp"

    def __init__(self, model, composite="epsilon_plus", start: str = "logit", **engine_options):
        super().__init__(model)
        self._build(composite, start, **engine_options)


class DeepTaylor(_EngineMethod):
    """Deep Taylor decomposition (Montavon et al. 2017) as LRP composites.

    input_rule: the rule of the first (input) layer: "zplus" for non-negative inputs,
        "zb" for inputs bounded by ``low`` and ``high`` (pixels), "wsquare" for unbounded inputs.
    Every other linear-type layer gets z+. Relevance starts from the target logit.
    """

    name = "deep_taylor"

    _PRESETS = {"zplus": "deep_taylor", "zb": "deep_taylor_box", "wsquare": "deep_taylor_wsquare"}

    def __init__(self, model, input_rule: str = "zb", low=None, high=None, **engine_options):
        super().__init__(model)
        self.input_rule = choice("input_rule", input_rule, tuple(self._PRESETS))
        bounds = {}
        if input_rule == "zb":
            if low is None or high is None:
                raise ValueError("input_rule='zb' needs the input bounds low=... and high=... "
                                 "(e.g. the values of black and white pixels)")
            bounds = {"low": low, "high": high}
        elif low is not None or high is not None:
            raise ValueError(f"low and high only apply to input_rule='zb', not {input_rule!r}")
        self._build(self._PRESETS[input_rule], "logit", **bounds, **engine_options)


def _relu_rule_composite(rule) -> composites.Composite:
    # Only ReLUs change; every other layer keeps its gradient, so the result is a gradient
    # with the ReLU's backward replaced.
    return composites.Composite(layer_map=[(nn.ReLU, rule)])


class GuidedBackpropagation(_EngineMethod):
    """Guided backpropagation (Springenberg et al. 2015): at every ReLU, the gradient passes
    where both the forward input and the backward signal are positive."""

    name = "guided_backprop"

    def __init__(self, model, **engine_options):
        super().__init__(model)
        self._build(_relu_rule_composite(GuidedBackprop()), "one", fold_batchnorm=False, **engine_options)


class Deconvolution(_EngineMethod):
    """Deconvolution (Zeiler and Fergus 2014): at every ReLU, the backward signal is clamped at
    zero, regardless of the forward input."""

    name = "deconvnet"

    def __init__(self, model, **engine_options):
        super().__init__(model)
        self._build(_relu_rule_composite(DeconvNet()), "one", fold_batchnorm=False, **engine_options)
