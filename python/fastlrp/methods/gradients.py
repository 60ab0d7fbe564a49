"""Gradient-based methods: sensitivity analysis, the plain gradient, gradient x input,
SmoothGrad and integrated gradients (formulas and citations in docs/methods.md)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._common.validate import choice, number, positive_int
from ._common import (Attribution, gaussian_blur, generator, input_gradient, per_sample_range, sample_shape_tensor,
                      score, target_weights)
from .base import AttributionMethod


class _GradientFamily(AttributionMethod):
    """One gradient of the score at the input, post-processed per method."""

    def _combine(self, grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _explain(self, model, x, target):
        # One forward pass, differentiated; the target is resolved on its output.
        grad, output, weights = input_gradient(model, x, lambda out: target_weights(out, target))
        return Attribution(self._combine(grad, x), output, score(output, weights))


class SensitivityAnalysis(_GradientFamily):
    """Sensitivity analysis: R_i = (d f / d x_i)^2 (Simonyan et al. 2014; Montavon et al. 2018).
    Per input variable; sum over channels for a pixel map."""

    name = "sensitivity"

    def _combine(self, grad, x):
        return grad.square()


class PlainGradient(_GradientFamily):
    """The gradient d f / d x itself (signed)."""

    name = "gradient"

    def _combine(self, grad, x):
        return grad


class GradientTimesInput(_GradientFamily):
    """Gradient x input, the simple Taylor decomposition at the root point 0: R_i = x_i df/dx_i.
    Exact contributions for a linear model without bias and for bias-free ReLU networks."""

    name = "gradient_x_input"

    def _combine(self, grad, x):
        return grad * x


def _chunked_gradients(model, inputs: torch.Tensor, weights: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Gradients of many inputs, at most batch_size per forward/backward pass (the memory bound)."""
    if inputs.shape[0] == 0:  # an empty batch: nothing to differentiate, torch.cat needs one piece
        return torch.zeros_like(inputs)
    grads = [input_gradient(model, inputs[i:i + batch_size], weights[i:i + batch_size])[0]
             for i in range(0, inputs.shape[0], batch_size)]
    return torch.cat(grads)


class SmoothGrad(AttributionMethod):
    """SmoothGrad (Smilkov et al. 2017): the gradient averaged over noisy copies of the input.

    noise_level: standard deviation of the Gaussian noise as a fraction of each sample's value
        range (max - min); the paper finds 0.1-0.2 works.
    n_samples: noisy copies per sample.
    squared: average the squared gradients (SmoothGrad-squared) instead.
    batch_size: noisy inputs per forward/backward pass.
    seed: for reproducible noise (None: torch's global generator).
    """

    name = "smoothgrad"

    def __init__(self, model, noise_level: float = 0.15, n_samples: int = 25, squared: bool = False,
                 batch_size: int = 64, seed: int | None = None):
        super().__init__(model)
        self.noise_level = number("noise_level", noise_level)
        self.n_samples = positive_int("n_samples", n_samples)
        self.squared = bool(squared)
        self.batch_size = positive_int("batch_size", batch_size)
        self.seed = None if seed is None else positive_int("seed", seed, minimum=0)

    def _explain(self, model, x, target):
        with torch.no_grad():
            output = model(x)
        weights = target_weights(output, target)
        gen = generator(self.seed, x.device)
        sigma = self.noise_level * per_sample_range(x)
        # rows are (copy, sample) pairs, so one chunk mixes samples and fills the batch
        noisy = x.unsqueeze(0) + sigma.unsqueeze(0) * torch.randn(
            (self.n_samples,) + tuple(x.shape), generator=gen, device=x.device, dtype=x.dtype)
        rows = noisy.reshape(-1, *x.shape[1:])
        row_weights = weights.unsqueeze(0).expand(self.n_samples, *weights.shape).reshape(-1, *weights.shape[1:])
        grads = _chunked_gradients(model, rows, row_weights, self.batch_size).reshape(noisy.shape)
        mean = grads.square().mean(0) if self.squared else grads.mean(0)
        return Attribution(mean, output, score(output, weights))


@dataclass
class IntegratedGradientsAttribution(Attribution):
    baseline: torch.Tensor = None
    """The baseline the path started from."""
    baseline_score: torch.Tensor = None
    """f(baseline) per sample."""
    completeness_gap: torch.Tensor = None
    """sum(relevance) - (f(x) - f(baseline)) per sample: the integration error (0 for the exact integral)."""


_RULES = ("left", "right", "midpoint", "trapezoid")


def path_points(steps: int, rule: str, dtype, device) -> tuple:
    """Positions alpha in [0, 1] along the path and their quadrature weights."""
    k = torch.arange(steps + (rule == "trapezoid"), dtype=dtype, device=device)
    alphas = {"left": k / steps, "right": (k + 1) / steps, "midpoint": (k + 0.5) / steps,
              "trapezoid": k / steps}[rule]
    weights = torch.full_like(alphas, 1.0 / steps)
    if rule == "trapezoid":
        weights[0] = weights[-1] = 0.5 / steps
    return alphas, weights


class IntegratedGradients(AttributionMethod):
    """Integrated gradients (Sundararajan et al. 2017):
    R_i = (x_i - x0_i) * integral_0^1 d f(x0 + a (x - x0)) / d x_i da.

    baseline: "zeros", "blur" (the input blurred with ``blur_sigma``, in pixels), a number or a
        tensor broadcast to the input.
    steps: quadrature intervals; rule: "left", "right", "midpoint" (Riemann sums) or "trapezoid".
    batch_size: path points per forward/backward pass (bounds memory: the path of all samples is
        never held at once).
    ``explain`` reports the completeness gap sum(R) - (f(x) - f(x0)).
    """

    name = "integrated_gradients"

    def __init__(self, model, baseline="zeros", steps: int = 50, rule: str = "trapezoid",
                 batch_size: int = 64, blur_sigma: float = 5.0):
        super().__init__(model)
        if isinstance(baseline, str):
            choice("baseline", baseline, ("zeros", "blur"))
        elif not isinstance(baseline, (int, float, torch.Tensor)) or isinstance(baseline, bool):
            raise TypeError(f"baseline must be 'zeros', 'blur', a number or a tensor, got {type(baseline).__name__}")
        self.baseline = baseline
        self.steps = positive_int("steps", steps)
        self.rule = choice("rule", rule, _RULES)
        self.batch_size = positive_int("batch_size", batch_size)
        self.blur_sigma = number("blur_sigma", blur_sigma)

    def _baseline_for(self, x):
        if isinstance(self.baseline, str):
            if self.baseline == "zeros":
                return torch.zeros_like(x)
            if x.ndim < 3:
                raise ValueError("baseline='blur' needs spatial inputs [N, C, ...]; for [N, features] "
                                 "pass a number or a tensor")
            return gaussian_blur(x, self.blur_sigma)
        return sample_shape_tensor("baseline", self.baseline, x)

    def _explain(self, model, x, target):
        with torch.no_grad():
            output = model(x)
        weights = target_weights(output, target)
        baseline = self._baseline_for(x)
        alphas, quad = path_points(self.steps, self.rule, x.dtype, x.device)
        delta = x - baseline
        integral = torch.zeros_like(x)
        # walk the path of every sample in chunks of path points, summing as we go, so memory
        # holds batch_size inputs and not steps * N of them
        n, points = x.shape[0], alphas.numel()
        flat_index = torch.arange(points * n, device=x.device)
        for start in range(0, points * n, self.batch_size):
            idx = flat_index[start:start + self.batch_size]
            point, sample = idx // n, idx % n
            shape = (-1,) + (1,) * (x.ndim - 1)
            inputs = baseline[sample] + alphas[point].reshape(shape) * delta[sample]
            grads = input_gradient(model, inputs, weights[sample])[0]
            integral.index_add_(0, sample, grads * quad[point].reshape(shape))
        relevance = delta * integral
        with torch.no_grad():
            baseline_score = score(model(baseline), weights)
        explained = score(output, weights)
        gap = relevance.flatten(1).sum(1) - (explained - baseline_score)
        return IntegratedGradientsAttribution(relevance, output, explained, baseline, baseline_score, gap)
