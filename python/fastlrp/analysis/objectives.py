"""What activation maximization maximizes: objectives that map the activations of a forward pass
to one score per sample (a class logit, a unit, a channel, a direction, a layer's energy), and
their weighted sums. Used by ``maximize_activation`` (activation_max.py)."""

from __future__ import annotations

from typing import Sequence

import torch

OUTPUT = None  # key of the model's output among the activations an objective reads


# --- objectives ------------------------------------------------------------------------

class Objective:
    """What to maximize: maps the activations of a forward pass to one score per sample.

    ``layers`` names the modules whose outputs the objective reads (``None``: the model's
    output). Objectives add and scale: ``ClassLogit(1) + 0.5 * Channel("relu3", 4)``.
    """

    layers: tuple = ()

    def __call__(self, activations: dict) -> torch.Tensor:
        raise NotImplementedError

    def __add__(self, other: "Objective") -> "Objective":
        if not isinstance(other, Objective):
            return NotImplemented
        return _WeightedSum([(1.0, self), (1.0, other)])

    def __mul__(self, weight: float) -> "Objective":
        if not isinstance(weight, (int, float)):
            return NotImplemented
        return _WeightedSum([(float(weight), self)])

    __rmul__ = __mul__

    def __neg__(self) -> "Objective":
        return _WeightedSum([(-1.0, self)])

    def __sub__(self, other: "Objective") -> "Objective":
        return self + (-other)


class _WeightedSum(Objective):
    def __init__(self, terms: list):
        self.terms = [(w * v, o) for w, obj in terms
                      for v, o in (obj.terms if isinstance(obj, _WeightedSum) else [(1.0, obj)])]
        self.layers = tuple(dict.fromkeys(name for _, o in self.terms for name in o.layers))

    def __call__(self, activations):
        return sum(w * o(activations) for w, o in self.terms)

    def __repr__(self):
        return " + ".join(f"{w:g} * {o!r}" for w, o in self.terms)


def _per_sample(index, batch: int, device, argument: str) -> torch.Tensor:
    """An int, or one int per sample, as a LongTensor of shape [batch]."""
    tensor = torch.as_tensor(index, device=device)
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(f"{argument} must be an int or a sequence of ints, got {index!r}")
    tensor = tensor.long().reshape(-1)
    if tensor.numel() == 1:
        return tensor.expand(batch)
    if tensor.numel() != batch:
        raise ValueError(f"{argument} has {tensor.numel()} entries but the batch has {batch} samples; "
                         "give one int or one per sample")
    return tensor


def _check_range(index: torch.Tensor, size: int, argument: str, what: str):
    if (index < 0).any() or (index >= size).any():
        raise ValueError(f"{argument} {index.tolist()} out of range for {size} {what}")


class ClassLogit(Objective):
    """The logit f_c(x) of class ``index`` (one int, or one per prototype)."""

    layers = (OUTPUT,)

    def __init__(self, index):
        self.index = index

    def _class_scores(self, output: torch.Tensor) -> torch.Tensor:
        return output

    def __call__(self, activations):
        out = activations[OUTPUT]
        name = type(self).__name__
        if out.ndim != 2:
            raise ValueError(f"{name} needs a model output of shape [N, classes], got {tuple(out.shape)}")
        idx = _per_sample(self.index, out.shape[0], out.device, f"{name} index")
        _check_range(idx, out.shape[1], f"{name} index", "classes")
        return self._class_scores(out).gather(1, idx[:, None])[:, 0]

    def __repr__(self):
        return f"{type(self).__name__}({self.index!r})"


class ClassProbability(ClassLogit):
    """The log-probability log softmax(f(x))_c of class ``index``. Unlike the logit it can also
    rise by lowering the other classes' logits (Simonyan et al. 2014 prefer the logit for that
    reason); the log keeps the gradient alive once the probability nears 1."""

    def _class_scores(self, output):
        return output.log_softmax(1)


class Neuron(Objective):
    """One unit of ``layer``: its activation at ``index`` (channel, y, x) or (unit,) for a dense layer."""

    def __init__(self, layer: str, index: Sequence[int]):
        self.layers = (layer,)
        self.index = tuple(int(i) for i in index) if not isinstance(index, int) else (int(index),)

    def __call__(self, activations):
        act = activations[self.layers[0]]
        if len(self.index) != act.ndim - 1:
            raise ValueError(f"Neuron index {self.index} needs {act.ndim - 1} entries for layer "
                             f"{self.layers[0]!r} with activations of shape {tuple(act.shape)}")
        for i, size in zip(self.index, act.shape[1:]):
            if not -size <= i < size:
                raise ValueError(f"Neuron index {self.index} out of range for activations {tuple(act.shape)}")
        return act[(slice(None),) + self.index]

    def __repr__(self):
        return f"Neuron({self.layers[0]!r}, {self.index})"


class Channel(Objective):
    """The mean activation of channel ``channel`` of ``layer`` over all positions (one int, or one per prototype)."""

    def __init__(self, layer: str, channel):
        self.layers = (layer,)
        self.channel = channel

    def __call__(self, activations):
        act = activations[self.layers[0]]
        idx = _per_sample(self.channel, act.shape[0], act.device, "Channel channel")
        _check_range(idx, act.shape[1], "Channel channel", f"channels of layer {self.layers[0]!r}")
        picked = act.gather(1, idx.reshape((-1, 1) + (1,) * (act.ndim - 2)).expand((-1, 1) + act.shape[2:]))
        return picked.flatten(1).mean(1)

    def __repr__(self):
        return f"Channel({self.layers[0]!r}, {self.channel!r})"


class Direction(Objective):
    """Projection of ``layer``'s activations on ``vector`` / |vector|.

    A vector of shape [C] is a direction in channel space, applied at every position and averaged
    (Olah et al. 2017); a vector of the activations' shape without the batch is one direction in the
    whole activation space.
    """

    def __init__(self, layer: str, vector: torch.Tensor):
        if not isinstance(vector, torch.Tensor) or vector.ndim == 0:
            raise TypeError("Direction vector must be a tensor of shape [C] or the layer's activation shape")
        norm = vector.norm()
        if not torch.isfinite(norm) or norm == 0:
            raise ValueError("Direction vector must be finite and non-zero")
        self.layers = (layer,)
        self.vector = vector.detach() / norm

    def __call__(self, activations):
        act = activations[self.layers[0]]
        v = self.vector.to(act)
        if v.shape == act.shape[1:]:
            return (act * v).flatten(1).sum(1)
        if v.ndim == 1 and act.ndim >= 2 and v.shape[0] == act.shape[1]:
            return (act * v.reshape((1, -1) + (1,) * (act.ndim - 2))).sum(1).flatten(1).mean(1)
        raise ValueError(f"Direction vector of shape {tuple(v.shape)} fits neither the channels nor the "
                         f"activations {tuple(act.shape[1:])} of layer {self.layers[0]!r}")

    def __repr__(self):
        return f"Direction({self.layers[0]!r}, shape={tuple(self.vector.shape)})"


class LayerEnergy(Objective):
    """Mean squared activation of ``layer``: Deep Dream's objective, which amplifies whatever the
    layer already detects in the image (Mordvintsev et al. 2015)."""

    def __init__(self, layer: str):
        self.layers = (layer,)

    def __call__(self, activations):
        return activations[self.layers[0]].pow(2).flatten(1).mean(1)

    def __repr__(self):
        return f"LayerEnergy({self.layers[0]!r})"
