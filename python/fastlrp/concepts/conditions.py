"""What a concept is: a channel, or a group of channels, of one layer (``Condition``), optionally for
one class and inside a parent concept at a higher layer. Concept Relevance Propagation (Achtibat et
al., Nature Machine Intelligence 2023) conditions the backward pass on it: the relevance arriving at
the layer's output is multiplied by the concept's channel mask, everything else is zeroed.

    Condition("layer4", 117)                     # one channel
    Condition("layer4", [3, 17, 117])             # a group: the sum of its members
    Condition("layer3", 5, parent=Condition("layer4", 117))   # a sub-concept of layer4's channel 117
    group_conditions(neuron_groups(model, x, "relu5", 4))     # NMF neuron groups as concepts
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(eq=False)
class Condition:
    """A concept at ``layer``: ``channels`` (an index or a list of them), or ``weights``, one mask value
    per channel of the layer (a soft group, e.g. an NMF factor). ``target``: the class whose relevance
    is propagated (None: the call's target). ``parent``: a concept at a higher layer the relevance is
    first restricted to. ``name`` labels it in plots."""

    layer: str
    channels: int | Sequence[int] | None = None
    target: int | None = None
    weights: torch.Tensor | None = None
    parent: "Condition | None" = None
    name: str | None = None

    def __post_init__(self):
        if not isinstance(self.layer, str):
            raise TypeError(f"Condition.layer must be a layer name (str), got {type(self.layer).__name__}")
        if (self.channels is None) == (self.weights is None):
            raise ValueError(f"Condition at {self.layer!r}: give either channels or weights")
        if self.channels is not None:
            channels = [self.channels] if isinstance(self.channels, int) else list(self.channels)
            if not channels or not all(isinstance(c, int) and not isinstance(c, bool) for c in channels):
                raise TypeError(f"Condition at {self.layer!r}: channels must be an int or a non-empty list of "
                                f"ints, got {self.channels!r}")
            self.channels = tuple(channels)
        else:
            if not isinstance(self.weights, torch.Tensor) or self.weights.ndim != 1:
                raise TypeError(f"Condition at {self.layer!r}: weights must be a 1-D tensor (one value per channel)")
        if self.target is not None and (not isinstance(self.target, int) or isinstance(self.target, bool)):
            raise TypeError(f"Condition at {self.layer!r}: target must be a class index (int) or None")
        if self.parent is not None and not isinstance(self.parent, Condition):
            raise TypeError(f"Condition at {self.layer!r}: parent must be a Condition")

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        what = (f"{self.channels[0]}" if len(self.channels) == 1 else f"{list(self.channels)}") \
            if self.channels is not None else "group"
        inner = f"{self.layer}:{what}"
        return inner if self.parent is None else f"{self.parent.label} > {inner}"

    def chain(self) -> list:
        """The conditions from the outermost parent down to this one."""
        return ([] if self.parent is None else self.parent.chain()) + [self]

    def mask(self, channels: int, like: torch.Tensor) -> torch.Tensor:
        """The channel mask [channels] in ``like``'s dtype and device."""
        if self.weights is not None:
            if self.weights.shape[0] != channels:
                raise ValueError(f"Condition at {self.layer!r} has {self.weights.shape[0]} weights; "
                                 f"the layer has {channels} channels")
            return self.weights.detach().to(like)
        bad = [c for c in self.channels if not -channels <= c < channels]
        if bad:
            raise ValueError(f"Condition at {self.layer!r}: channels {bad} out of range for {channels} channels")
        mask = like.new_zeros(channels)
        mask[list(self.channels)] = 1
        return mask


def as_condition(value) -> Condition:
    """A ``Condition`` from itself or a tuple (layer, channels) / (layer, channels, target)."""
    if isinstance(value, Condition):
        return value
    if isinstance(value, tuple) and len(value) in (2, 3):
        return Condition(value[0], value[1], *value[2:])
    raise TypeError(f"a condition must be a fastlrp.concepts.Condition or a tuple (layer, channels[, target]), "
                    f"got {value!r}")


def channel_conditions(layer: str, channels, target: int | None = None, parent: Condition | None = None) -> list:
    """One condition per channel index of ``channels`` (an int count, or indices)."""
    indices = range(channels) if isinstance(channels, int) else [int(c) for c in torch.as_tensor(channels).flatten()]
    return [Condition(layer, c, target, parent=parent) for c in indices]


def group_conditions(groups, target: int | None = None, mode: str = "share", threshold: float = 0.5) -> list:
    """NMF neuron groups (``fastlrp.analysis.neuron_groups``) as concepts, one per group.

    ``mode="share"``: channel c belongs to group g with weight G[g, c] / sum_h G[h, c], so the groups
    split every channel's relevance and their conditional heatmaps add up to the layer's unconditioned
    one. ``mode="members"``: the channels whose factor is at least ``threshold`` (factors are scaled to
    a maximum of 1), with weight 1 each."""
    if not hasattr(groups, "channel_factors") or not hasattr(groups, "layer"):
        raise TypeError(f"groups must be fastlrp.analysis.NeuronGroups, got {type(groups).__name__}")
    factors = groups.channel_factors
    if mode == "share":
        share = factors / factors.sum(0, keepdim=True).clamp(min=1e-30)
        return [Condition(groups.layer, weights=share[g], target=target, name=f"{groups.layer}:group {g}")
                for g in range(factors.shape[0])]
    if mode == "members":
        out = []
        for g in range(factors.shape[0]):
            members = (factors[g] >= threshold).nonzero().flatten().tolist()
            out.append(Condition(groups.layer, members, target, name=f"{groups.layer}:group {g}"))
        return out
    raise ValueError(f"mode must be 'share' or 'members', got {mode!r}")
