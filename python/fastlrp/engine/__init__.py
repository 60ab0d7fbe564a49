"""The LRP engine: ``LRP`` (explainer.py) builds the explainer graph (graph.py) of relevance layers
(relevance_layers.py) once; each call runs it with per-call state (call.py) on the backends
(``fastlrp.backends``). See docs/design.md."""

from .._common.targets import starting_relevance
from ..backends import available_backends
from .explainer import LRP, Explanation
from .graph import UnsupportedLayerError

__all__ = ["LRP", "Explanation", "UnsupportedLayerError", "available_backends", "starting_relevance"]
