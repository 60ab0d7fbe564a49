"""Activation maximization: inputs that a model's unit, channel, direction or class responds to most.

    prototypes = maximize_activation(model, ClassLogit(1), shape=(4, 3, 32, 32))
    dream = deep_dream(model, image, layer="relu3")

The input is found by gradient ascent on ``objective(x) - penalties(x)`` (Erhan et al. 2009;
Simonyan et al. 2014), with the regularizers of the feature-visualization literature: L2 decay,
random jitter / rotation / scaling (Mordvintsev et al. 2015; Olah et al. 2017), total variation
and blur penalties against high frequencies, a decorrelated Fourier parametrization, a diversity
term across the batch (Olah et al. 2017), a density model of the data as an "expert"
(Montavon et al. 2018) and optimization in the code space of a generator (Nguyen et al. 2016).
Formulas and references: docs/model-analysis.md.

The user's model (and generator) is left as it was: eval mode is set for the run and restored,
hooks are removed, and gradients are taken with respect to the input only (no ``.grad`` is
written to any parameter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._model_guard import capturing_outputs, evaluating, resolve_layer

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


# --- robustness transforms -------------------------------------------------------------

class RandomAffine:
    """A random shift (up to ``jitter`` pixels), rotation (up to ``rotate`` degrees) and scaling
    (factor in ``scale``) per sample and step. A prototype must then excite the model wherever and
    however it is drawn, which suppresses high-frequency adversarial patterns (Olah et al. 2017)."""

    def __init__(self, jitter: float = 2.0, rotate: float = 0.0, scale: tuple = (1.0, 1.0)):
        if jitter < 0 or rotate < 0:
            raise ValueError(f"jitter and rotate must be >= 0, got jitter={jitter}, rotate={rotate}")
        if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {scale}")
        self.jitter, self.rotate, self.scale = float(jitter), float(rotate), (float(scale[0]), float(scale[1]))

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"RandomAffine works on images [N, C, H, W], got shape {tuple(x.shape)}")
        n, _, h, w = x.shape

        def uniform(low, high):
            return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)

        angle = uniform(-self.rotate, self.rotate) * math.pi / 180
        factor = uniform(*self.scale)
        # affine_grid works in [-1, 1] coordinates: a shift of s pixels is 2 s / size.
        shift_x = uniform(-self.jitter, self.jitter) * 2 / w
        shift_y = uniform(-self.jitter, self.jitter) * 2 / h
        cos, sin = torch.cos(angle) / factor, torch.sin(angle) / factor
        theta = torch.stack([torch.stack([cos, -sin, shift_x], 1), torch.stack([sin, cos, shift_y], 1)], 1)
        grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
        # Reflection keeps the border statistics of the image instead of inventing black frames.
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def __repr__(self):
        return f"RandomAffine(jitter={self.jitter:g}, rotate={self.rotate:g}, scale={self.scale})"


# --- parametrizations ------------------------------------------------------------------

def _fourier_scale(h: int, w: int, decay: float, device, dtype) -> torch.Tensor:
    """1 / |f|^decay per rfft2 coefficient, normalised to unit root-mean-square."""
    fy = torch.fft.fftfreq(h, device=device, dtype=dtype)[:, None]
    fx = torch.fft.rfftfreq(w, device=device, dtype=dtype)[None, :]
    freq = torch.sqrt(fy**2 + fx**2).clamp(min=1.0 / max(h, w))  # the DC term gets the lowest frequency's weight
    scale = freq.pow(-decay)
    # Unit RMS: white noise in the parameters then gives pixels of about the same spread as the pixel
    # parametrization, so the learning rate means the same thing in both.
    return scale / scale.pow(2).mean().sqrt()


class _Pixels:
    """The image's (pre-squashing) values are the parameters."""

    def __init__(self, raw: torch.Tensor):
        self.raw = raw.detach().clone().requires_grad_(True)
        self.parameters = [self.raw]

    def __call__(self) -> torch.Tensor:
        return self.raw


class _Fourier:
    """The parameters are the image's 2-D real FFT, each frequency scaled by 1 / |f|: gradient steps
    of equal size in every coefficient then change low frequencies most, as natural images do
    (Olah et al. 2017). It preconditions the ascent; the set of reachable images is the same."""

    def __init__(self, raw: torch.Tensor, decay: float):
        h, w = raw.shape[-2:]
        self.size = (h, w)
        self.scale = _fourier_scale(h, w, decay, raw.device, raw.dtype)
        spectrum = torch.fft.rfft2(raw.detach(), norm="ortho") / self.scale
        self.spectrum = torch.view_as_real(spectrum).clone().requires_grad_(True)
        self.parameters = [self.spectrum]

    def __call__(self) -> torch.Tensor:
        return torch.fft.irfft2(torch.view_as_complex(self.spectrum) * self.scale, s=self.size, norm="ortho")


class _Code:
    """The parameters are a generator's code z; the image is generator(z) (Nguyen et al. 2016)."""

    def __init__(self, code: torch.Tensor, generator: Callable):
        self.code = code.detach().clone().requires_grad_(True)
        self.generator = generator
        self.parameters = [self.code]

    def __call__(self) -> torch.Tensor:
        return self.generator(self.code)


# --- density models for "AM with an expert" ---------------------------------------------

class GaussianDensity:
    """A Gaussian N(mean, covariance) over flattened inputs, fitted with ``GaussianDensity.fit(data)``.

    Its log-density is the expert term log p(x) of Montavon et al. (2018), Sec. 3.2.
    """

    def __init__(self, mean: torch.Tensor, covariance: torch.Tensor):
        d = mean.numel()
        if covariance.shape != (d, d):
            raise ValueError(f"covariance must have shape [{d}, {d}] for a mean of {d} values, "
                             f"got {tuple(covariance.shape)}")
        chol, info = torch.linalg.cholesky_ex(covariance)
        if info != 0:
            raise ValueError("covariance is not positive definite; fit with shrinkage > 0")
        self.shape = tuple(mean.shape)
        self.mean = mean.reshape(-1)
        self.cholesky = chol  # solves are cheaper than forming the inverse of a d x d matrix
        self._constant = -0.5 * (d * math.log(2 * math.pi) + 2 * chol.diagonal().log().sum())

    @classmethod
    def fit(cls, data: torch.Tensor, shrinkage: float = 0.1) -> "GaussianDensity":
        """Mean and covariance of ``data`` [N, ...], the covariance shrunk toward its average variance:
        (1 - shrinkage) S + shrinkage tr(S)/d I, so it is invertible even with fewer samples than
        dimensions."""
        flat = _flatten_data(data, "data")
        if not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"shrinkage must lie in [0, 1], got {shrinkage}")
        mean = flat.mean(0)
        centred = flat - mean
        cov = centred.T @ centred / max(flat.shape[0] - 1, 1)
        d = cov.shape[0]
        cov = (1 - shrinkage) * cov + shrinkage * cov.diagonal().mean() * torch.eye(d, dtype=cov.dtype, device=cov.device)
        return cls(mean.reshape(data.shape[1:]), cov)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) for each sample of x [N, ...]."""
        diff = x.reshape(x.shape[0], -1) - self.mean.to(x)
        # (x - mu)^T S^-1 (x - mu) = |L^-1 (x - mu)|^2 with S = L L^T
        whitened = torch.linalg.solve_triangular(self.cholesky.to(x), diff.T, upper=False)
        return self._constant.to(x) - 0.5 * whitened.pow(2).sum(0)


class GaussianMixtureDensity:
    """A mixture of Gaussians with diagonal covariances over flattened inputs, fitted by EM.

    Diagonal covariances keep fitting and evaluation linear in the input size; a mixture of
    full-covariance Gaussians over images would need one d x d matrix per component.
    """

    def __init__(self, weights: torch.Tensor, means: torch.Tensor, variances: torch.Tensor):
        if not (weights.ndim == 1 and means.shape == variances.shape and means.shape[0] == weights.shape[0]):
            raise ValueError("weights [K], means [K, d] and variances [K, d] do not fit together")
        self.log_weights = weights.log()
        self.means, self.variances = means, variances

    @classmethod
    def fit(cls, data: torch.Tensor, components: int = 3, iterations: int = 50,
            min_variance: float = 1e-4, seed: int = 0) -> "GaussianMixtureDensity":
        """EM from ``components`` distinct data points as means; ``min_variance`` is added to every
        variance so a component cannot collapse onto a single point."""
        flat = _flatten_data(data, "data")
        if not isinstance(components, int) or not 1 <= components <= flat.shape[0]:
            raise ValueError(f"components must be an int between 1 and the number of samples "
                             f"({flat.shape[0]}), got {components!r}")
        if iterations < 1 or min_variance <= 0:
            raise ValueError(f"iterations must be >= 1 and min_variance > 0, got {iterations}, {min_variance}")
        g = torch.Generator().manual_seed(seed)
        means = flat[torch.randperm(flat.shape[0], generator=g)[:components]].clone()
        variances = (flat.var(0) + min_variance).expand(components, -1).clone()
        weights = torch.full((components,), 1.0 / components, dtype=flat.dtype)
        for _ in range(iterations):
            model = cls(weights, means, variances)
            log_resp = model._component_log_probs(flat)
            log_resp = log_resp - log_resp.logsumexp(1, keepdim=True)
            resp = log_resp.exp()  # [N, K]
            counts = resp.sum(0) + 1e-12
            means = resp.T @ flat / counts[:, None]
            variances = resp.T @ flat.pow(2) / counts[:, None] - means.pow(2)
            variances = variances.clamp(min=0) + min_variance
            weights = counts / counts.sum()
        return cls(weights, means, variances)

    def _component_log_probs(self, flat: torch.Tensor) -> torch.Tensor:
        """log pi_k + log N(x | mu_k, diag sigma_k^2), shape [N, K]."""
        means, variances = self.means.to(flat), self.variances.to(flat)
        quad = ((flat[:, None, :] - means[None]).pow(2) / variances[None]).sum(2)
        log_norm = -0.5 * (variances.log().sum(1) + flat.shape[1] * math.log(2 * math.pi))
        return self.log_weights.to(flat) + log_norm - 0.5 * quad

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) for each sample of x [N, ...]."""
        return self._component_log_probs(x.reshape(x.shape[0], -1)).logsumexp(1)


def _flatten_data(data, argument: str) -> torch.Tensor:
    if not isinstance(data, torch.Tensor) or not data.is_floating_point() or data.ndim < 2:
        raise TypeError(f"{argument} must be a floating-point tensor [N, ...] of samples")
    if data.shape[0] < 2:
        raise ValueError(f"{argument} needs at least 2 samples, got {data.shape[0]}")
    return data.detach().reshape(data.shape[0], -1)


# --- penalties -------------------------------------------------------------------------

def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of neighbouring pixels, per sample (Mahendran & Vedaldi 2015, beta = 2)."""
    dy = (x[..., 1:, :] - x[..., :-1, :]).pow(2).flatten(1).mean(1)
    dx = (x[..., :, 1:] - x[..., :, :-1]).pow(2).flatten(1).mean(1)
    return dy + dx


def high_frequency_energy(x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Mean squared difference between x and x blurred by a Gaussian of width ``sigma``, per sample."""
    radius = max(1, int(math.ceil(2 * sigma)))
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    padded = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    blurred = F.conv2d(padded, kernel.reshape(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    blurred = F.conv2d(blurred, kernel.reshape(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return (x - blurred).pow(2).flatten(1).mean(1)


def gram_similarity(activations: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity between the Gram matrices of different samples' activations
    [N, C, ...] (Olah et al. 2017's diversity term is its negative)."""
    a = activations.flatten(2)  # [N, C, positions]
    gram = (a @ a.transpose(1, 2)).flatten(1)
    gram = F.normalize(gram, dim=1)
    sim = gram @ gram.T
    n = sim.shape[0]
    return (sim.sum() - sim.diagonal().sum()) / (n * (n - 1))


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
        resolve_layer(model, diversity_layer, "diversity_layer")
    threshold = None
    if stop_above is not None:
        threshold = torch.as_tensor(stop_above, dtype=dtype, device=device).expand(batch)

    hidden_layers = [name for name in objective.layers if name is not OUTPUT]
    watched = list(dict.fromkeys(hidden_layers + ([diversity_layer] if diversity_layer else [])))
    optimizer = torch.optim.Adam(param.parameters, lr=lr)
    history, taken, reached = [], 0, None

    def clean_scores():
        with torch.no_grad():
            acts[OUTPUT] = model(to_input())
            return objective(acts)

    with evaluating(model, generator), capturing_outputs(model, watched, "objective") as acts:
        for step in range(steps + 1):
            if threshold is not None:
                reached = clean_scores() >= threshold
                if bool(reached.all()):
                    break
            if step == steps:
                break
            x = to_input()
            acts[OUTPUT] = model(transform(x, rng) if transform is not None else x)
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
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(objective, Objective):
        raise TypeError(f"objective must be a fastlrp.analysis Objective (ClassLogit, Channel, ...), "
                        f"got {type(objective).__name__}")
    if parametrization not in PARAMETRIZATIONS:
        raise ValueError(f"parametrization must be one of {PARAMETRIZATIONS}, got {parametrization!r}")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if len(value_range) != 2 or not value_range[0] < value_range[1]:
        raise ValueError(f"value_range must be (low, high) with low < high, got {value_range!r}")
    for name, value in weights.items():
        if not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    if transform is not None and not callable(transform):
        raise TypeError(f"transform must be callable (x, generator) -> x or None, got {type(transform).__name__}")
    if expert is not None and not callable(getattr(expert, "log_prob", None)):
        raise TypeError(f"expert must have a log_prob(x) method (e.g. GaussianDensity.fit(data)), "
                        f"got {type(expert).__name__}")
    if generator is not None and not callable(generator):
        raise TypeError(f"generator must be callable code -> input, got {type(generator).__name__}")
    for name in objective.layers:
        if name is not OUTPUT:
            resolve_layer(model, name, "objective")


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
