"""Composites: which rule goes to which layer. Presets reproduce Zennit's composites.

A composite maps layers to rules by, in order of priority:
1. ``name_map``: module names (``"features.0"``) or functional-op names from the graph;
2. ``first_map``: the first module (in ``named_modules()`` order) of one of the given types;
3. ``layer_map``: layer types, first match wins (the user's entries come before a preset's).
A layer no entry matches keeps its plain gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from torch import nn

from . import layers
from .rules import (AlphaBeta, AttnLRP, Epsilon, Flat, Gamma, LayerNormIdentity, Norm, Pass, Rule, SoftmaxRule, Uniform,
                    WSquare, ZBox, ZPlus)

LayerMap = Sequence[tuple]  # [(type or tuple of types, Rule), ...]


@dataclass
class Composite:
    """A mapping from layers to rules (see the module docstring for the priorities)."""

    layer_map: LayerMap = ()
    first_map: LayerMap = ()
    name_map: dict = field(default_factory=dict)

    def __post_init__(self):
        for entries, what in ((self.layer_map, "layer_map"), (self.first_map, "first_map")):
            for entry in entries:
                if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], Rule)):
                    raise TypeError(f"{what} entries must be (layer type(s), Rule) pairs, got {entry!r}")
        for name, rule in self.name_map.items():
            if not isinstance(rule, Rule):
                raise TypeError(f"name_map[{name!r}] must be a Rule, got {rule!r}")

    def first_layer(self, model: nn.Module) -> str | None:
        """Name of the module that receives the first_map rule, or None."""
        for name, module in model.named_modules():
            if any(isinstance(module, types) for types, _ in self.first_map):
                return name
        return None

    def rule_for(self, name: str, module: nn.Module, first_name: str | None) -> Rule | None:
        if name in self.name_map:
            return self.name_map[name]
        if first_name is not None and name == first_name:
            for types, rule in self.first_map:
                if isinstance(module, types):
                    return rule
        for types, rule in self.layer_map:
            if isinstance(module, types):
                return rule
        return None


def base_layer_map(stabilizer: float = 1e-6) -> list:
    """The map every LRP preset shares: Pass for activations and unfolded batch norm, Norm for
    residual sums and average pooling."""
    return [
        (layers.Activation, Pass()),
        (layers.Sum, Norm(stabilizer)),
        (layers.AvgPool, Norm(stabilizer)),
        (layers.BatchNorm, Pass()),
    ]


def epsilon_plus(epsilon=1e-6, stabilizer=1e-6, zero_params=None, layer_map=(), first_map=(), name_map=None):
    """Convolutions: ZPlus; Linear: Epsilon."""
    return Composite(list(layer_map) + base_layer_map(stabilizer) + [
        (layers.Convolution, ZPlus(stabilizer, zero_params)),
        (nn.Linear, Epsilon(epsilon, zero_params)),
    ], list(first_map), dict(name_map or {}))


def epsilon_alpha2_beta1(epsilon=1e-6, stabilizer=1e-6, zero_params=None, layer_map=(), first_map=(),
                         name_map=None):
    """Convolutions: AlphaBeta(2, 1); Linear: Epsilon."""
    return Composite(list(layer_map) + base_layer_map(stabilizer) + [
        (layers.Convolution, AlphaBeta(2.0, 1.0, stabilizer, zero_params)),
        (nn.Linear, Epsilon(epsilon, zero_params)),
    ], list(first_map), dict(name_map or {}))


def epsilon_plus_flat(epsilon=1e-6, stabilizer=1e-6, zero_params=None, layer_map=(), first_map=(),
                      name_map=None):
    """As epsilon_plus, and the first Linear-type layer: Flat."""
    composite = epsilon_plus(epsilon, stabilizer, zero_params, layer_map, (), name_map)
    composite.first_map = list(first_map) + [(layers.Linear, Flat(stabilizer, zero_params))]
    return composite


def epsilon_alpha2_beta1_flat(epsilon=1e-6, stabilizer=1e-6, zero_params=None, layer_map=(), first_map=(),
                              name_map=None):
    """As epsilon_alpha2_beta1, and the first Linear-type layer: Flat."""
    composite = epsilon_alpha2_beta1(epsilon, stabilizer, zero_params, layer_map, (), name_map)
    composite.first_map = list(first_map) + [(layers.Linear, Flat(stabilizer, zero_params))]
    return composite


def epsilon_gamma_box(low=None, high=None, epsilon=1e-6, gamma=0.25, stabilizer=1e-6, zero_params=None,
                      layer_map=(), first_map=(), name_map=None):
    """Convolutions: Gamma; Linear: Epsilon; the first convolution: ZBox(low, high).

    ``low`` and ``high`` bound the input (e.g. the normalized values of black and white pixels).
    """
    if low is None or high is None:
        raise ValueError("epsilon_gamma_box needs the input bounds: low=..., high=... "
                         "(scalars or per-channel values of the normalized input)")
    return Composite(list(layer_map) + base_layer_map(stabilizer) + [
        (layers.Convolution, Gamma(gamma, stabilizer, zero_params)),
        (nn.Linear, Epsilon(epsilon, zero_params)),
    ], list(first_map) + [(layers.Convolution, ZBox(low, high, stabilizer, zero_params))], dict(name_map or {}))


def excitation_backprop(stabilizer=1e-6, zero_params=None, layer_map=(), first_map=(), name_map=None):
    """Excitation backprop (Zhang et al. 2016): ZPlus everywhere, Norm on sums and average pooling,
    activations keep their gradient."""
    return Composite(list(layer_map) + [
        (layers.Sum, Norm(stabilizer)),
        (layers.AvgPool, Norm(stabilizer)),
        (layers.Linear, ZPlus(stabilizer, zero_params)),
    ], list(first_map), dict(name_map or {}))


def deep_taylor(stabilizer=1e-6, zero_params=None, layer_map=(), first_map=(), name_map=None):
    """Deep Taylor decomposition (Montavon et al. 2017) for ReLU networks whose input is also
    non-negative: the z+ rule on every linear-type layer, the first included."""
    return Composite(list(layer_map) + base_layer_map(stabilizer) + [
        (layers.Linear, ZPlus(stabilizer, zero_params)),
    ], list(first_map), dict(name_map or {}))


def deep_taylor_box(low=None, high=None, stabilizer=1e-6, zero_params=None, layer_map=(), first_map=(),
                    name_map=None):
    """Deep Taylor decomposition with the zB rule at the input layer (pixels bounded by
    ``low`` and ``high``), z+ on every other linear-type layer."""
    if low is None or high is None:
        raise ValueError("deep_taylor_box needs the input bounds: low=..., high=... "
                         "(scalars or per-channel values of the input)")
    composite = deep_taylor(stabilizer, zero_params, layer_map, (), name_map)
    composite.first_map = list(first_map) + [(layers.Linear, ZBox(low, high, stabilizer, zero_params))]
    return composite


def deep_taylor_wsquare(stabilizer=1e-6, zero_params=None, layer_map=(), first_map=(), name_map=None):
    """Deep Taylor decomposition with the w^2 rule at the input layer (unbounded real inputs),
    z+ on every other linear-type layer."""
    composite = deep_taylor(stabilizer, zero_params, layer_map, (), name_map)
    composite.first_map = list(first_map) + [(layers.Linear, WSquare(stabilizer, zero_params))]
    return composite


def attnlrp(epsilon=1e-6, stabilizer=1e-6, zero_params=None, hold_attention=False, layer_map=(), first_map=(),
            name_map=None):
    """AttnLRP (Achtibat et al., ICML 2024): Linear-type layers Epsilon; attention blocks AttnLRP;
    softmax the softmax rule; products of two relevance-carrying tensors the uniform rule; layer norms
    the identity rule on the normalization; activations (GELU, SiLU, ...) and scaling by a constant
    pass relevance unchanged (identity rule); sums and averages Norm. ``hold_attention=True`` is
    CP-LRP (``cp_lrp``)."""
    return Composite(list(layer_map) + base_layer_map(stabilizer) + [
        (layers.Scale, Pass()),
        (layers.Normalization, LayerNormIdentity(stabilizer)),
        (layers.Softmax, SoftmaxRule()),
        (layers.Product, Uniform(stabilizer, hold_attention)),
        (layers.Attention, AttnLRP(stabilizer, hold_attention)),
        (layers.Linear, Epsilon(epsilon, zero_params)),
    ], list(first_map), dict(name_map or {}))


def cp_lrp(epsilon=1e-6, stabilizer=1e-6, zero_params=None, layer_map=(), first_map=(), name_map=None):
    """CP-LRP (Ali et al., ICML 2022): as ``attnlrp``, with the attention weights held constant, so
    relevance flows through the values only (what LXT applies to torchvision's ViT)."""
    return attnlrp(epsilon, stabilizer, zero_params, True, layer_map, first_map, name_map)


PRESETS: dict[str, Callable[..., Composite]] = {
    "epsilon_plus": epsilon_plus,
    "epsilon_plus_flat": epsilon_plus_flat,
    "epsilon_alpha2_beta1": epsilon_alpha2_beta1,
    "epsilon_alpha2_beta1_flat": epsilon_alpha2_beta1_flat,
    "epsilon_gamma_box": epsilon_gamma_box,
    "excitation_backprop": excitation_backprop,
    "deep_taylor": deep_taylor,
    "deep_taylor_box": deep_taylor_box,
    "deep_taylor_wsquare": deep_taylor_wsquare,
    "attnlrp": attnlrp,
    "cp_lrp": cp_lrp,
}


def names() -> list:
    """Names of the preset composites."""
    return list(PRESETS)


def get(composite, **options) -> Composite:
    """A Composite from a preset name (with its options) or a Composite given as is."""
    if isinstance(composite, Composite):
        if options:
            raise TypeError(f"rule options {sorted(options)} only apply to a preset given by name; "
                            "set them on the rules of your Composite instead")
        return composite
    if composite not in PRESETS:
        raise ValueError(f"unknown composite {composite!r}; presets are {names()} or a fastlrp.Composite")
    try:
        return PRESETS[composite](**options)
    except TypeError as err:
        raise TypeError(f"composite {composite!r}: {err}") from None
