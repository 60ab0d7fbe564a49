"""Activation maximization: inputs that a model's unit, channel, direction or class responds to most.

    prototypes = maximize_activation(model, ClassLogit(1), shape=(4, 3, 32, 32))
    dream = deep_dream(model, image, layer="relu3")

The input is found by gradient ascent on ``objective(x) - penalties(x)`` (Erhan et al. 2009;
Simonyan et al. 2014), with the regularizers of the feature-visualization literature: L2 decay,
random jitter / rotation / scaling (Mordvintsev et al. 2015; Olah et al. 2017), total variation
and blur penalties against high frequencies, a decorrelated Fourier parametrization, a diversity
term across the batch (Olah et al. 2017), a density model of the data as an "expert"
(Montavon et al. 2018) and optimization in the code space of a generator (Nguyen et al. 2016).
Formulas and references: docs/model-analysis.md. The objectives are in objectives.py, the
transform and parametrizations in transforms.py, densities and penalties in priors.py; this
module runs the optimization.

The user's model (and generator) is never touched: the run goes through eval-mode views of them
(``fastlrp._common.model_view.eval_view``, sharing the parameters), our hooks go on the view, and
gradients are taken with respect to the input only (no ``.grad`` is written to any parameter).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from .._common.layers import capturing_outputs, find_module
from .._common.model_view import eval_view
from .._common.validate import check_model, choice, number, positive_int
from .objectives import (OUTPUT, Channel, ClassLogit, ClassProbability, Direction, LayerEnergy, Neuron,
                         Objective)
from .priors import (GaussianDensity, GaussianMixtureDensity, gram_similarity, high_frequency_energy,
                     total_variation)
from .transforms import RandomAffine, _Code, _Fourier, _Pixels

__all__ = ["OUTPUT", "Channel", "ClassLogit", "ClassProbability", "Direction", "GaussianDensity",
           "GaussianMixtureDensity", "LayerEnergy", "Neuron", "Objective", "Prototypes", "RandomAffine",
           "deep_dream", "gram_similarity", "high_frequency_energy", "maximize_activation", "total_variation"]


# --- the optimization ------------------------------------------------------------------

@dataclass
class Prototypes:
    """What ``maximize_activation`` returns."""

    images: torch.Tensor
    """The optimized inputs [N, ...] (detached)."""
    scores: torch.Tensor
    """The objective of each final input, without transforms or penalties [N]."""
    history: torch.Tensor
    """The objective of the (transformed) input at each step [steps, N]."""
    steps: int
    """Gradient steps taken (fewer than asked when ``stop_above`` was reached)."""
    reached: torch.Tensor | None = None
    """Per sample, whether its score reached ``stop_above`` (None without a threshold)."""
    code: torch.Tensor | None = None
    """The optimized generator code, when a generator was used."""


PARAMETRIZATIONS = ("fourier", "pixel")


def maximize_activation(
    model: nn.Module,
    objective: Objective,
    *,
    shape: Sequence[int] | None = None,
    init: torch.Tensor | None = None,
    parametrization: str = "fourier",
    steps: int = 256,
    lr: float = 0.05,
    value_range: tuple = (0.0, 1.0),
    transform: Callable | None = RandomAffine(jitter=1.0),
    l2: float = 0.0,
    total_variation_weight: float = 0.0,
    blur: float = 0.0,
    diversity: float = 0.0,
    diversity_layer: str | None = None,
    expert=None,
    expert_weight: float = 1.0,
    generator: Callable | None = None,
    code: torch.Tensor | None = None,
    code_l2: float = 0.0,
    fourier_decay: float = 1.0,
    init_std: float = 0.01,
    stop_above=None,
    seed: int = 0,
) -> Prototypes:
    """Find inputs that maximize ``objective`` by gradient ascent (Adam).

    Start: ``shape=(N, C, H, W)`` starts from faint noise around the middle of ``value_range``;
    ``init=images`` starts from images (Deep Dream); ``generator=g, code=z0`` optimizes the code z of
    a generator/decoder and the input is g(z) (then ``parametrization``, ``value_range`` and the
    pixel-space start do not apply).

    Outside code space the input is x = low + (high - low) * sigmoid(u), so it always lies in
    ``value_range``; u is either the pixels themselves (``"pixel"``) or an inverse FFT of 1/|f|-scaled
    parameters (``"fourier"``, ``fourier_decay`` is the exponent).

    Maximized per sample: objective(T(x)) - l2 * mean((x - mid)^2) - total_variation_weight * TV(x)
    - blur * mean((x - blur(x))^2) + expert_weight * log p(x) / d - code_l2 * mean(z^2), where T is
    ``transform`` (random per step; None for none), mid the middle of ``value_range``, p the
    ``expert`` density (anything with ``log_prob(x)``, e.g. ``GaussianDensity.fit(images)``) and d
    the number of input values; minus ``diversity`` times the mean Gram-matrix cosine similarity of
    ``diversity_layer``'s activations between samples.

    ``stop_above``: stop as soon as every sample's score (untransformed) reaches this value (a
    number or one per sample); ``Prototypes.steps`` then counts the steps it took.
    """
    _check_arguments(model, objective, parametrization, steps, lr, value_range,
                     dict(l2=l2, total_variation_weight=total_variation_weight, blur=blur, diversity=diversity,
                          code_l2=code_l2, init_std=init_std), transform, expert, generator)
    reference = next(model.parameters(), None)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None else torch.float32
    rng = torch.Generator().manual_seed(seed)
    low, high = float(value_range[0]), float(value_range[1])

    # Eval-mode views share the parameters; whatever we do to them (eval mode, hooks) stays on them.
    view = eval_view(model)
    if isinstance(generator, nn.Module):
        generator = eval_view(generator)

    if generator is not None:
        if shape is not None or init is not None:
            raise ValueError("with a generator, give its starting code= and neither shape= nor init=")
        if not isinstance(code, torch.Tensor) or not code.is_floating_point() or code.ndim < 1:
            raise TypeError("code must be a floating-point tensor [N, ...]: the generator's starting codes")
        param = _Code(code.to(device=device, dtype=dtype), generator)
        to_input = param
        batch = code.shape[0]
    else:
        if code is not None:
            raise ValueError("code= is only used together with generator=")
        raw = _starting_raw(shape, init, low, high, init_std, rng, device, dtype)
        param = _Fourier(raw, fourier_decay) if parametrization == "fourier" else _Pixels(raw)

        def to_input():
            return low + (high - low) * torch.sigmoid(param())
        batch = raw.shape[0]

    if diversity > 0:
        if batch < 2:
            raise ValueError(f"diversity needs at least 2 prototypes, the batch has {batch}")
        hidden = [name for name in objective.layers if name is not OUTPUT]
        diversity_layer = diversity_layer or (hidden[0] if len(hidden) == 1 else None)
        if diversity_layer is None:
            raise ValueError("diversity > 0 needs diversity_layer= (the layer whose Gram matrices must differ)")
    if diversity_layer is not None:
        find_module(model, diversity_layer, "diversity_layer", allow_module=False)
    threshold = None
    if stop_above is not None:
        threshold = torch.as_tensor(stop_above, dtype=dtype, device=device).expand(batch)

    hidden_layers = [name for name in objective.layers if name is not OUTPUT]
    watched = list(dict.fromkeys(hidden_layers + ([diversity_layer] if diversity_layer else [])))
    optimizer = torch.optim.Adam(param.parameters, lr=lr)
    history, taken, reached = [], 0, None

    def clean_scores():
        with torch.no_grad():
            acts[OUTPUT] = view(to_input())
            return objective(acts)

    with capturing_outputs(view, watched, "objective") as acts:
        for step in range(steps + 1):
            if threshold is not None:
                reached = clean_scores() >= threshold
                if bool(reached.all()):
                    break
            if step == steps:
                break
            x = to_input()
            acts[OUTPUT] = view(transform(x, rng) if transform is not None else x)
            score = objective(acts)
            if score.shape != (batch,):
                raise ValueError(f"objective must give one score per sample, shape [{batch}], got {tuple(score.shape)}")
            gain = score - _penalties(x, low, high, l2, total_variation_weight, blur, generator is not None)
            if expert is not None:
                gain = gain + expert_weight * expert.log_prob(x) / x[0].numel()
            if code_l2 > 0:
                gain = gain - code_l2 * param.code.pow(2).flatten(1).mean(1)
            loss = -gain.sum()
            if diversity > 0:
                loss = loss + diversity * gram_similarity(acts[diversity_layer])
            grads = torch.autograd.grad(loss, param.parameters)
            for p, g in zip(param.parameters, grads):
                p.grad = g
            optimizer.step()
            history.append(score.detach())
            taken += 1
        final = clean_scores()

    return Prototypes(
        images=to_input().detach(),
        scores=final.detach(),
        history=torch.stack(history) if history else torch.empty(0, batch, dtype=dtype, device=device),
        steps=taken,
        reached=reached,
        code=param.code.detach() if generator is not None else None,
    )


def deep_dream(model: nn.Module, image: torch.Tensor, layer: str, *, steps: int = 20, lr: float = 0.02,
               parametrization: str = "pixel", transform: Callable | None = RandomAffine(jitter=1.0),
               **options) -> Prototypes:
    """Enhance what ``layer`` detects in ``image`` (Mordvintsev et al. 2015): gradient ascent on the
    layer's mean squared activation, starting from the image. ``options`` go to ``maximize_activation``."""
    if not isinstance(image, torch.Tensor) or not image.is_floating_point():
        raise TypeError("image must be a floating-point tensor [N, C, H, W]")
    return maximize_activation(model, LayerEnergy(layer), init=image, steps=steps, lr=lr,
                               parametrization=parametrization, transform=transform, **options)


def _check_arguments(model, objective, parametrization, steps, lr, value_range, weights, transform, expert,
                     generator):
    check_model(model)
    if not isinstance(objective, Objective):
        raise TypeError(f"objective must be a fastlrp.analysis Objective (ClassLogit, Channel, ...), "
                        f"got {type(objective).__name__}")
    choice("parametrization", parametrization, PARAMETRIZATIONS)
    positive_int("steps", steps, minimum=0)
    number("lr", lr, strict=True)
    if len(value_range) != 2 or not value_range[0] < value_range[1]:
        raise ValueError(f"value_range must be (low, high) with low < high, got {value_range!r}")
    for name, value in weights.items():
        number(name, value)
    if transform is not None and not callable(transform):
        raise TypeError(f"transform must be callable (x, generator) -> x or None, got {type(transform).__name__}")
    if expert is not None and not callable(getattr(expert, "log_prob", None)):
        raise TypeError(f"expert must have a log_prob(x) method (e.g. GaussianDensity.fit(data)), "
                        f"got {type(expert).__name__}")
    if generator is not None and not callable(generator):
        raise TypeError(f"generator must be callable code -> input, got {type(generator).__name__}")
    for name in objective.layers:
        if name is not OUTPUT:
            find_module(model, name, "objective", allow_module=False)


def _starting_raw(shape, init, low, high, init_std, rng, device, dtype) -> torch.Tensor:
    """The pre-sigmoid values u of the starting input."""
    if (shape is None) == (init is None):
        raise ValueError("give exactly one of shape= (start from noise) and init= (start from images)")
    if init is not None:
        if not isinstance(init, torch.Tensor) or not init.is_floating_point() or init.ndim != 4:
            raise TypeError("init must be a floating-point image tensor [N, C, H, W]")
        unit = ((init.detach().to(device=device, dtype=dtype) - low) / (high - low))
        # Values on the range's edge would need u = +-inf; nudge them inside.
        return torch.logit(unit.clamp(1e-3, 1 - 1e-3))
    shape = tuple(shape)
    if len(shape) != 4 or any(not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"shape must be (N, C, H, W) of positive ints, got {shape!r}")
    return (init_std * torch.randn(shape, generator=rng, dtype=torch.float64)).to(device=device, dtype=dtype)


def _penalties(x, low, high, l2, tv, blur, code_space):
    total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    if l2 > 0:
        centre = 0.0 if code_space else (low + high) / 2
        total = total + l2 * (x - centre).pow(2).flatten(1).mean(1)
    if tv > 0:
        total = total + tv * total_variation(x)
    if blur > 0:
        total = total + blur * high_frequency_energy(x)
    return total
