"""The model-randomization sanity check (Adebayo et al. 2018, "Sanity checks for saliency maps").

An explanation that depends on what the model learned must change when the learned weights are
destroyed. Layers of a *copy* of the model are re-initialized, either cascading from the output
layer down to the input (each step keeps the layers randomized before it) or one at a time
(independent), and the explanation of the randomized copy is compared with the original one by
Spearman rank correlation per sample, of the signed and of the absolute heatmaps (channels summed).
A method that passes shows correlations that fall towards 0 as more layers are randomized.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from .._common.targets import class_indices
from .._common.validate import check_callable, check_model, check_tensor, choice, positive_int
from ._common import forward_in_batches, pixel_map, rank_correlation
from .properties import explain_in_batches

MODES = ("cascading", "independent")


@dataclass
class RandomizationStep:
    layers: list
    """Names of the layers re-initialized in this step's copy."""
    spearman: torch.Tensor
    """[N] rank correlation of the signed heatmaps with the original ones."""
    spearman_abs: torch.Tensor
    """[N] rank correlation of the absolute heatmaps."""


@dataclass
class RandomizationResult:
    mode: str
    steps: list = field(default_factory=list)

    def rows(self) -> list:
        """One dict per step: the last layer randomized and the mean correlations."""
        return [{"step": k, "layer": step.layers[-1], "spearman": step.spearman.mean().item(),
                 "spearman_abs": step.spearman_abs.mean().item()} for k, step in enumerate(self.steps)]


def parameter_layers(model: nn.Module) -> list:
    """Names of the modules that own parameters, in registration order (input side first)."""
    return [name for name, module in model.named_modules()
            if any(True for _ in module.parameters(recurse=False))]


def reinitialize(module: nn.Module, generator_seed: int) -> None:
    """Re-draw a module's own parameters (in place: call it on a copy).

    Uses the module's ``reset_parameters`` (PyTorch's default initialization) where it has one;
    otherwise each parameter's entries are shuffled, which keeps their distribution and destroys
    what was learned."""
    # Fork the RNG of every device the parameters live on, so the user's random state is untouched.
    devices = sorted({p.device.index or 0 for p in module.parameters(recurse=False) if p.is_cuda})
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(generator_seed)
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
            return
        for param in module.parameters(recurse=False):
            flat = param.view(-1)
            flat.copy_(flat[torch.randperm(flat.numel()).to(flat.device)])


def model_randomization(
    model: nn.Module,
    explainer_factory: Callable[[nn.Module], Callable],
    x: torch.Tensor,
    target=None,
    *,
    mode: str = "cascading",
    layers: Sequence[str] | None = None,
    batch_size: int = 64,
    seed: int = 0,
) -> RandomizationResult:
    """Re-initialize layers of a deep copy of ``model`` and compare explanations.

    explainer_factory: builds an explainer for a model, e.g. ``lambda m: fastlrp.LRP(m)``; it is
        called on the original model and on each randomized copy. The original is never modified.
    target: class per sample (None: the original model's prediction), kept for every copy.
    mode: ``"cascading"`` (randomize from the output layer downwards, accumulating) or
        ``"independent"`` (one layer at a time, the others as trained).
    layers: module names to randomize, in any order (default: every module that owns
        parameters); cascading goes through them from the output side, i.e. in reverse
        registration order.
    """
    check_model(model)
    check_callable(explainer_factory, "explainer_factory", "model -> explainer")
    check_tensor("x", x, ndim_min=2)
    choice("mode", mode, MODES)
    batch_size = positive_int("batch_size", batch_size)
    available = parameter_layers(model)
    if layers is None:
        chosen = available
    else:
        if isinstance(layers, str):
            raise TypeError("layers must be a sequence of module names, got a single string")
        unknown = [name for name in layers if name not in available]
        if unknown:
            raise ValueError(f"layers {unknown} are not modules with parameters of the model; "
                             f"choose from {available}")
        chosen = [name for name in available if name in set(layers)]
    if not chosen:
        raise ValueError("the model has no layers with parameters to randomize")
    chosen = chosen[::-1]  # from the output side

    target = class_indices(forward_in_batches(model, x, batch_size), target)
    original = pixel_map(explain_in_batches(explainer_factory(model), x, target, batch_size)).flatten(1)

    result = RandomizationResult(mode)
    randomized = copy.deepcopy(model)
    for step, name in enumerate(chosen):
        if mode == "independent":
            randomized = copy.deepcopy(model)
        reinitialize(randomized.get_submodule(name), seed + step)
        done = chosen[:step + 1] if mode == "cascading" else [name]
        heat = pixel_map(explain_in_batches(explainer_factory(randomized), x, target, batch_size)).flatten(1)
        result.steps.append(RandomizationStep(done, rank_correlation(original, heat),
                                              rank_correlation(original.abs(), heat.abs())))
    return result
