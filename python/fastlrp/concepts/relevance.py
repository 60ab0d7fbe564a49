"""Which concepts carry a prediction: the most relevant channels of every layer (``concept_relevance``)
and how a concept's relevance splits over the channels of lower layers (``concept_hierarchy``).

A channel's relevance is its relevance at the layer's output summed over positions; its share is that
divided by the sum of |relevance| over the layer's channels (zennit-crp's ``abs_norm``), so shares of
one layer have absolute values adding up to 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .._common.validate import check_tensor, positive_int
from .conditions import Condition
from .heatmaps import conditional_heatmaps, explainer_for


@dataclass
class LayerConcepts:
    """The ``k`` most relevant channels of one layer for one sample, most relevant first."""

    layer: str
    channels: list
    relevance: list
    """Each channel's relevance (summed over positions)."""
    shares: list
    """relevance / sum over all channels of |relevance|."""
    total: float
    """The layer's whole relevance."""


def channel_relevance(relevance: torch.Tensor) -> torch.Tensor:
    """[N, C] relevance per channel of a layer's relevance [N, C, *positions]."""
    return relevance.flatten(2).sum(2) if relevance.ndim > 2 else relevance


def shares(per_channel: torch.Tensor) -> torch.Tensor:
    """Each channel's part of the layer: relevance / sum of |relevance| over channels."""
    return per_channel / per_channel.abs().sum(-1, keepdim=True).clamp(min=1e-30)


def _top(layer: str, per_channel: torch.Tensor, k: int) -> LayerConcepts:
    k = min(k, per_channel.shape[0])
    values, order = per_channel.topk(k)
    share = shares(per_channel)
    return LayerConcepts(layer, order.tolist(), values.tolist(), share[order].tolist(), per_channel.sum().item())


def concept_relevance(model, x: torch.Tensor, target=None, layers: Sequence[str] | None = None, k: int = 5,
                      *, composite="epsilon_plus", **rule_options) -> dict:
    """For one sample ``x`` ([1, ...]): {layer: LayerConcepts} with the ``k`` most relevant channels of
    each layer of ``layers`` (default: every layer with channels), from one explanation."""
    explainer = explainer_for(model, composite, **rule_options)
    check_tensor("x", x, ndim_min=2)
    if x.shape[0] != 1:
        raise ValueError(f"concept_relevance explains one sample; x has {x.shape[0]} (pass x[i:i + 1])")
    positive_int("k", k)
    names = explainer.layer_names if layers is None else list(layers)
    result = explainer.explain(x, target, layers=names)
    out = {}
    for name in names:
        relevance = result.layers.get(name)
        if relevance is None or relevance.ndim < 2:
            if layers is not None:
                raise ValueError(f"layer {name!r} carries no channel relevance for this output")
            continue
        out[name] = _top(name, channel_relevance(relevance)[0], k)
    return out


@dataclass
class ConceptNode:
    """A concept in a hierarchy: its ``condition`` (parents included), its relevance and share within
    its parent's relevance at its layer, and its most relevant sub-concepts one layer down."""

    condition: Condition
    relevance: float
    share: float
    children: list = field(default_factory=list)

    @property
    def layer(self) -> str:
        return self.condition.layer

    @property
    def channel(self) -> int:
        return self.condition.channels[0]

    def walk(self, depth: int = 0):
        """(depth, node) over the tree, parents first."""
        yield depth, self
        for child in self.children:
            yield from child.walk(depth + 1)


def concept_hierarchy(model, x: torch.Tensor, concept: Condition, lower_layers: Sequence[str],
                      target=None, width: int | Sequence[int] = 3, *, exclude_parallel: bool = True,
                      composite="epsilon_plus", **rule_options) -> ConceptNode:
    """How ``concept``'s relevance for the prediction on ``x`` ([1, ...]) splits over ``lower_layers``
    (from the concept's layer downwards): the ``width`` most relevant channels of each lower layer, each
    conditioned on its whole chain of parents. All nodes of one level are explained in one batched call."""
    explainer = explainer_for(model, composite, **rule_options)
    check_tensor("x", x, ndim_min=2)
    if x.shape[0] != 1:
        raise ValueError(f"concept_hierarchy explains one sample; x has {x.shape[0]}")
    if not isinstance(concept, Condition):
        raise TypeError(f"concept must be a Condition, got {type(concept).__name__}")
    widths = [width] * len(lower_layers) if isinstance(width, int) else list(width)
    if len(widths) != len(lower_layers):
        raise ValueError(f"width has {len(widths)} entries for {len(lower_layers)} lower layers")
    top = conditional_heatmaps(explainer, x, [concept], target)
    root = ConceptNode(concept, top.concept_relevance[0, 0].item(), 1.0)
    level = [root]
    for layer, w in zip(lower_layers, widths):
        result = conditional_heatmaps(explainer, x, [node.condition for node in level], target,
                                      exclude_parallel=exclude_parallel, layers=[layer])
        if layer not in result.layers:
            raise ValueError(f"no relevance of {concept.label} reaches layer {layer!r}")
        per_channel = channel_relevance(result.layers[layer][0])  # [nodes, C]
        next_level = []
        for node, channels in zip(level, per_channel):
            best = _top(layer, channels, w)
            for c, r, s in zip(best.channels, best.relevance, best.shares):
                child = ConceptNode(Condition(layer, c, node.condition.target, parent=node.condition), r, s)
                node.children.append(child)
                next_level.append(child)
        level = next_level
    return root
