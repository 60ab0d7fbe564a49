"""Compare explainers on metrics: several explainers x several metrics on a dataset -> a table and plots.

An explainer is any callable (x, target) -> relevance of x's shape: a ``fastlrp.LRP`` instance, a
lambda around another attribution method, ... Each is run once per batch; every metric then
reads the same relevance. Metrics return one value per sample, so results over many batches are
exact means, and curve metrics (pixel flipping) also keep their curves for plotting.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .._common.targets import class_indices
from .._common.validate import check_model, positive_int
from ._common import forward_in_batches
from .localization import relevance_mass_accuracy, relevance_rank_accuracy
from .perturbation import PerturbationCurve, pixel_flipping
from .properties import continuity, conservation


@dataclass
class MetricInput:
    """What a metric sees: one batch, one explainer and its relevance."""

    model: nn.Module
    explainer: Callable
    x: torch.Tensor
    target: torch.Tensor
    relevance: torch.Tensor
    masks: torch.Tensor | None


@dataclass
class Metric:
    """A named measurement: ``compute(MetricInput)`` returns [N] values or a ``PerturbationCurve``
    (whose per-sample AOPC becomes the value)."""

    name: str
    compute: Callable[[MetricInput], object]
    higher_is_better: bool | None = None
    needs_masks: bool = False


def pixel_flipping_metric(order: str = "most_relevant_first", name: str | None = None, **options) -> Metric:
    """AOPC of the pixel-flipping curve in ``order`` (options as for ``pixel_flipping``)."""
    short = {"most_relevant_first": "morf", "least_relevant_first": "lerf", "random": "random"}.get(order, order)

    def compute(data: MetricInput):
        return pixel_flipping(data.model, data.x, data.relevance, data.target, order=order, **options)

    # MoRF: a fast drop (large AOPC) is good; LeRF: the score should hold (small AOPC).
    better = {"most_relevant_first": True, "least_relevant_first": False}.get(order)
    return Metric(name or f"aopc_{short}", compute, better)


def relevance_mass_metric(name: str = "relevance_mass") -> Metric:
    return Metric(name, lambda d: relevance_mass_accuracy(d.relevance, d.masks), True, needs_masks=True)


def relevance_rank_metric(name: str = "relevance_rank") -> Metric:
    return Metric(name, lambda d: relevance_rank_accuracy(d.relevance, d.masks), True, needs_masks=True)


def conservation_metric(name: str = "conservation_error", baseline: torch.Tensor | None = None) -> Metric:
    """Relative conservation error |sum R - f_c(x)| / |f_c(x)| (smaller is better)."""
    def compute(data: MetricInput):
        return conservation(data.model, data.x, relevance=data.relevance, target=data.target,
                            baseline=baseline).relative_error
    return Metric(name, compute, False)


def continuity_metric(name: str = "continuity", **options) -> Metric:
    """Normalized continuity ratio (smaller is more continuous; options as for ``continuity``)."""
    return Metric(name, lambda d: continuity(d.explainer, d.x, d.target, **options), False)


STANDARD_METRICS = {
    "aopc_morf": lambda: pixel_flipping_metric("most_relevant_first"),
    "aopc_lerf": lambda: pixel_flipping_metric("least_relevant_first"),
    "relevance_mass": relevance_mass_metric,
    "relevance_rank": relevance_rank_metric,
    "conservation_error": conservation_metric,
    "continuity": continuity_metric,
}


def _metric(spec) -> Metric:
    if isinstance(spec, Metric):
        return spec
    if isinstance(spec, str):
        if spec not in STANDARD_METRICS:
            raise ValueError(f"metrics: unknown metric {spec!r}; standard ones are {list(STANDARD_METRICS)}, "
                             "or pass a fastlrp.metrics.Metric")
        return STANDARD_METRICS[spec]()
    raise TypeError(f"metrics must hold names or Metric objects, got {type(spec).__name__}")


def _batches(data, target, masks, batch_size: int):
    """(x, target, masks) per batch from a tensor or from an iterable of (x, target[, masks]) tuples."""
    if isinstance(data, torch.Tensor):
        n = data.shape[0]
        if isinstance(target, torch.Tensor) and target.ndim > 0 and target.shape[0] != n:
            raise ValueError(f"target must have one entry per sample ({n}), got shape {tuple(target.shape)}")
        per_sample_masks = isinstance(masks, torch.Tensor) and masks.ndim == data.ndim - 1
        for start in range(0, n, batch_size):
            stop = start + batch_size
            t = target[start:stop] if isinstance(target, torch.Tensor) and target.ndim > 0 else target
            m = masks[start:stop] if per_sample_masks else masks
            yield data[start:stop], t, m
        return
    if target is not None or masks is not None:
        raise ValueError("target and masks go inside the batches when data is an iterable of (x, target[, masks])")
    if not isinstance(data, Iterable):
        raise TypeError(f"data must be a tensor or an iterable of (x, target[, masks]) batches, "
                        f"got {type(data).__name__}")
    for batch in data:
        if isinstance(batch, torch.Tensor):
            yield batch, None, None
        elif isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
            yield batch[0], batch[1], batch[2] if len(batch) == 3 else None
        else:
            raise TypeError("data: each batch must be a tensor or a tuple (x, target[, masks])")


@dataclass
class Comparison:
    """The result of ``compare``: per-sample values, curves, a table and plots."""

    explainers: list
    metrics: list
    values: dict = field(default_factory=dict)
    """values[explainer][metric]: [N] tensor of per-sample values."""
    curves: dict = field(default_factory=dict)
    """curves[explainer][metric]: PerturbationCurve over all samples, for curve metrics."""
    seconds: dict = field(default_factory=dict)
    """seconds[explainer]: time spent computing the explanations."""

    def rows(self) -> list:
        """One dict per explainer: its name, the mean of each metric and its seconds per sample."""
        out = []
        for name in self.explainers:
            row = {"explainer": name}
            for metric in self.metrics:
                row[metric.name] = self.values[name][metric.name].double().mean().item()
            n = next(iter(self.values[name].values())).shape[0] if self.values[name] else 0
            row["seconds_per_sample"] = self.seconds[name] / max(n, 1)
            out.append(row)
        return out

    def table(self, digits: int = 4) -> str:
        """A plain-text table of ``rows()``; each metric's header says which direction is better."""
        arrows = {True: " (+)", False: " (-)", None: ""}
        headers = ["explainer"] + [m.name + arrows[m.higher_is_better] for m in self.metrics] + ["s/sample"]
        body = [[row["explainer"]] + [f"{row[m.name]:.{digits}g}" for m in self.metrics]
                + [f"{row['seconds_per_sample']:.3g}"] for row in self.rows()]
        widths = [max(len(line[i]) for line in [headers] + body) for i in range(len(headers))]
        lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                           enumerate(zip(line, widths))) for line in [headers] + body]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append("(+) higher is better, (-) lower is better")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def plot(self, metric: str | None = None, ax=None):
        """Mean perturbation curve of every explainer for one curve metric (default: the first);
        returns the matplotlib Axes."""
        curve_metrics = [m.name for m in self.metrics if any(m.name in self.curves.get(e, {}) for e in self.explainers)]
        if not curve_metrics:
            raise ValueError("no curve metric was computed; add e.g. 'aopc_morf' to metrics")
        metric = metric or curve_metrics[0]
        if metric not in curve_metrics:
            raise ValueError(f"metric {metric!r} has no curves; curve metrics here: {curve_metrics}")
        if ax is None:
            import matplotlib.pyplot as plt
            _, ax = plt.subplots(figsize=(5, 3.5))
        for name in self.explainers:
            curve = self.curves[name][metric]
            ax.plot(curve.fractions.numpy(), curve.mean().numpy(),
                    label=f"{name} (AOPC {curve.aopc():.3g})")
        curve = self.curves[self.explainers[0]][metric]
        ax.set_xlabel(f"fraction of {curve.patch_size}x{curve.patch_size} patches perturbed ({curve.perturbation})")
        ax.set_ylabel("score of the target class")
        ax.set_title(f"{metric}: {curve.order.replace('_', ' ')}")
        ax.legend()
        return ax


def compare(
    model: nn.Module,
    explainers: Mapping[str, Callable],
    metrics: Sequence,
    data,
    target=None,
    masks: torch.Tensor | None = None,
    *,
    batch_size: int = 32,
) -> Comparison:
    """Run every explainer on ``data`` and every metric on its explanations.

    model: the classifier the explainers explain (used by perturbation and conservation metrics).
    explainers: {name: callable (x, target) -> relevance}.
    metrics: names from ``STANDARD_METRICS`` ("aopc_morf", "aopc_lerf", "relevance_mass",
        "relevance_rank", "conservation_error", "continuity") or ``Metric`` objects, e.g.
        ``pixel_flipping_metric("most_relevant_first", patch_size=4, perturbation="blur")``.
    data: a tensor [N, ...] (then ``target`` and ``masks`` go alongside, split into batches of
        ``batch_size``) or an iterable of batches (x, target) or (x, target, masks).
    target: None (the model's prediction), an int, or one class per sample.
    masks: ground-truth regions for the localization metrics, [H, W] or [N, H, W].
    """
    check_model(model)
    if not isinstance(explainers, Mapping) or not explainers:
        raise TypeError("explainers must be a non-empty dict {name: callable (x, target) -> relevance}")
    for name, explainer in explainers.items():
        if not callable(explainer):
            raise TypeError(f"explainers[{name!r}] must be callable (x, target) -> relevance, "
                            f"got {type(explainer).__name__}")
    if isinstance(metrics, (str, Metric)):
        metrics = [metrics]
    metric_list = [_metric(spec) for spec in metrics]
    if not metric_list:
        raise ValueError("metrics must name at least one metric")
    names = [m.name for m in metric_list]
    if len(set(names)) != len(names):
        raise ValueError(f"metrics must have distinct names, got {names}")
    batch_size = positive_int("batch_size", batch_size)

    result = Comparison(list(explainers), metric_list)
    values = {e: {m.name: [] for m in metric_list} for e in explainers}
    curves = {e: {} for e in explainers}
    seconds = dict.fromkeys(explainers, 0.0)
    for x, batch_target, batch_masks in _batches(data, target, masks, batch_size):
        batch_target = class_indices(forward_in_batches(model, x, batch_size), batch_target).to(x.device)
        for metric in metric_list:
            if metric.needs_masks and batch_masks is None:
                raise ValueError(f"metric {metric.name!r} needs ground-truth masks; pass masks=")
        for name, explainer in explainers.items():
            start = time.perf_counter()
            relevance = explainer(x, batch_target).detach()
            seconds[name] += time.perf_counter() - start
            if relevance.shape != x.shape:
                raise ValueError(f"explainers[{name!r}] returned shape {tuple(relevance.shape)} for input "
                                 f"{tuple(x.shape)}; relevance must have the input's shape")
            data_in = MetricInput(model, explainer, x, batch_target, relevance, batch_masks)
            for metric in metric_list:
                value = metric.compute(data_in)
                if isinstance(value, PerturbationCurve):
                    curves[name].setdefault(metric.name, []).append(value)
                    value = value.aopc("none")
                values[name][metric.name].append(torch.as_tensor(value).double().reshape(-1).cpu())
    if not any(values[e][metric_list[0].name] for e in explainers):
        raise ValueError("data holds no samples")
    for name in explainers:
        result.values[name] = {m: torch.cat(parts) for m, parts in values[name].items()}
        result.curves[name] = {m: _concatenate_curves(parts) for m, parts in curves[name].items()}
    result.seconds = seconds
    return result


def _concatenate_curves(parts: list) -> PerturbationCurve:
    first = parts[0]
    return PerturbationCurve(first.fractions, torch.cat([p.scores for p in parts]),
                             torch.cat([p.target for p in parts]), first.order, first.patch_size, first.perturbation)
