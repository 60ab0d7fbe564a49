"""Conditional heatmaps: one input heatmap per concept, for any number of concepts per call.

How the concepts share the work (measured, docs/concepts.md): the conditions become extra batch
entries. The input is repeated once per condition of a pass, every entry gets its own channel masks
at the conditioned layers, and one forward and one backward pass of the engine explain them all. The
forward is therefore not shared (it runs on the repeated batch); what is gained is that the backward
passes run batched, which on ResNet-50 was several times faster than one forward followed by one
backward pass per condition (autograd's ``is_grads_batched`` would share the forward, but vmap has no
rule for the native kernels' custom ops).

With ``exclude_parallel=True`` (zennit-crp's default) the backward pass is chained through the
conditioned layers: relevance reaches the input only through them, not around them on a parallel
path (a residual shortcut). For a layer everything flows through, both settings agree.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from .._common.targets import starting_relevance
from .._common.validate import check_tensor
from ..engine import LRP
from ..engine.batching import is_out_of_memory
from .conditions import as_condition

DEFAULT_ENTRIES = 32  # batch entries (samples x conditions) per pass on the CPU; halved on out-of-memory


@dataclass
class ConditionalHeatmaps:
    """What ``conditional_heatmaps`` returns; tensors are detached."""

    conditions: list
    relevance: torch.Tensor
    """[N, K, *input]: the input relevance of sample n conditioned on concept k."""
    concept_relevance: torch.Tensor
    """[N, K]: the relevance of each concept at its own layer (its masked relevance, summed)."""
    targets: torch.Tensor
    """[N, K]: the class each entry explains."""
    output: torch.Tensor
    """[N, classes]: the model's output for the input."""
    layers: dict = field(default_factory=dict)
    """Relevance at the layers named in ``layers=``: {name: [N, K, *shape]}, conditioned."""

    @property
    def heatmaps(self) -> torch.Tensor:
        """[N, K, *spatial]: the relevance summed over the input channels."""
        return self.relevance.sum(2)

    @property
    def labels(self) -> list:
        return [c.label for c in self.conditions]


def explainer_for(model, composite="epsilon_plus", **rule_options) -> LRP:
    """``model`` itself when it is an ``LRP`` explainer, else ``LRP(model, composite, **rule_options)``."""
    if isinstance(model, LRP):
        if rule_options or composite != "epsilon_plus":
            raise ValueError("composite and rule options cannot change an existing LRP explainer; "
                             "build it with them or pass the nn.Module")
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or a fastlrp.LRP explainer, got {type(model).__name__}")
    return LRP(model, composite, **rule_options)


def conditional_heatmaps(model, x: torch.Tensor, conditions: Sequence, target=None, *,
                         exclude_parallel: bool = True, chunk_size: int | None = None, layers: Sequence[str] = (),
                         composite="epsilon_plus", **rule_options) -> ConditionalHeatmaps:
    """The input heatmap of every sample of ``x`` for every concept of ``conditions``.

    ``model``: an ``nn.Module`` or a ``fastlrp.LRP`` (then ``composite`` and rule options are its own).
    ``conditions``: ``Condition`` objects or tuples (layer, channels[, target]). ``target``: the class
    explained where a condition names none: an int, one index per sample, or None (the prediction).
    ``chunk_size``: conditions per pass; None fits them to memory (``DEFAULT_ENTRIES`` batch entries on
    the CPU, the free memory on CUDA), and a pass that runs out of memory is halved.
    ``layers``: layer names whose conditioned relevance to keep as well (for concept hierarchies).
    """
    explainer = explainer_for(model, composite, **rule_options)
    check_tensor("x", x, ndim_min=2)
    conditions = [as_condition(c) for c in conditions]
    if not conditions:
        raise ValueError("conditions is empty; give at least one Condition")
    names = explainer.layer_names
    for c in conditions:
        for link in c.chain():
            if link.layer not in names:
                raise KeyError(f"condition layer {link.layer!r} is not a layer of the explainer; names are "
                               f"explainer.layer_names, e.g. {names[-5:]}")
    unknown = [name for name in layers if name not in names]
    if unknown:
        raise KeyError(f"layers {unknown} are not layers of the explainer")
    base = _base_targets(target, x.shape[0], x.device)
    order = {name: i for i, name in enumerate(names)}

    # Conditions on the same chain of layers share passes (the chained backward needs one order).
    by_chain: dict = {}
    for k, c in enumerate(conditions):
        chain = tuple(sorted({link.layer for link in c.chain()}, key=order.get, reverse=True))
        by_chain.setdefault(chain, []).append(k)
    n, count = x.shape[0], len(conditions)
    relevance = concept = targets = output = None
    kept: dict = {}
    for chain, members in by_chain.items():
        step = chunk_size or _fitting_chunk(x, len(members))
        start = 0
        while start < len(members):
            part = members[start:start + step]
            try:
                result = _one_pass(explainer, x, [conditions[k] for k in part], base, chain, exclude_parallel, layers)
            except Exception as err:  # noqa: BLE001 - only out-of-memory is handled, others re-raised
                if not is_out_of_memory(err) or step == 1:
                    raise
                if x.device.type == "cuda":
                    torch.cuda.empty_cache()
                step = max(1, step // 2)
                continue
            heat, conc, tgt, out, taps = result
            if relevance is None:
                relevance = heat.new_zeros((n, count) + heat.shape[2:])
                concept, targets, output = heat.new_zeros(n, count), tgt.new_zeros(n, count), out[:, 0]
            relevance[:, part], concept[:, part], targets[:, part] = heat, conc, tgt
            for name, value in taps.items():
                if name not in kept:
                    kept[name] = value.new_zeros((n, count) + value.shape[2:])
                kept[name][:, part] = value
            start += len(part)
    return ConditionalHeatmaps(conditions, relevance, concept, targets, output, kept)


def _base_targets(target, n: int, device) -> torch.Tensor:
    """One class index per sample, -1 where the prediction decides."""
    if target is None:
        return torch.full((n,), -1, dtype=torch.long, device=device)
    if isinstance(target, bool) or not isinstance(target, (int, torch.Tensor)) or (
            isinstance(target, torch.Tensor) and target.is_floating_point()):
        raise TypeError(f"target must be None, a class index or one index per sample, got {target!r}")
    index = torch.as_tensor(target, device=device).long().reshape(-1)
    if index.numel() == 1:
        index = index.expand(n)
    if index.shape != (n,):
        raise ValueError(f"target must be one class index per sample ({n}), got shape {tuple(index.shape)}")
    return index.clone()


def _fitting_chunk(x: torch.Tensor, count: int) -> int:
    """Conditions per pass: what fits the free CUDA memory (a guess from the input's size, corrected by
    halving on out-of-memory), or ``DEFAULT_ENTRIES`` batch entries on the CPU."""
    entries = DEFAULT_ENTRIES
    if x.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(x.device)
        # An explained network holds a few hundred times its input per sample (activations and saved
        # tensors of every layer); the first pass that does not fit is halved.
        entries = max(1, int(free // (400 * x[:1].numel() * x.element_size())))
    return max(1, min(count, entries // max(1, x.shape[0])))


def _one_pass(explainer: LRP, x, conditions: list, base, chain, exclude_parallel, layers):
    n, k = x.shape[0], len(conditions)
    entries = x.repeat_interleave(k, 0)  # entry n * k + j: sample n under condition j
    wanted = torch.stack([base if c.target is None else torch.full_like(base, c.target) for c in conditions], 1)
    wanted = wanted.reshape(-1)
    start = explainer.start

    explained = []

    def start_relevance(out):
        index = torch.where(wanted >= 0, wanted, out.argmax(1))
        explained.append(index)
        return starting_relevance(out, index, start)

    masks = _masks(explainer, x, conditions, chain, n)
    result = explainer._explain_conditioned(entries, start_relevance, masks,
                                            through=chain if exclude_parallel else (),
                                            layers=tuple(dict.fromkeys((*chain, *layers))))
    own = [c.layer for c in conditions]
    shaped = {name: value.reshape(n, k, *value.shape[1:]) for name, value in result.layers.items()}
    missing = [name for name in chain if name not in shaped]
    if missing:
        raise ValueError(f"no relevance reaches layer {missing[0]!r} for this output")
    concept = torch.stack([shaped[layer][:, j].flatten(1).sum(1) for j, layer in enumerate(own)], 1)
    taps = {name: shaped[name] for name in layers if name in shaped}
    targets = explained[-1].reshape(n, k)
    return (result.relevance.reshape(n, k, *x.shape[1:]), concept, targets,
            result.output.reshape(n, k, *result.output.shape[1:]), taps)


def _masks(explainer: LRP, x, conditions: list, chain, n: int) -> dict:
    """{layer: [n * k, C, 1, ...]} channel masks, ones where an entry's condition leaves a layer free."""
    shapes = _layer_shapes(explainer, x[:1], chain)
    k = len(conditions)
    masks = {}
    for layer in chain:
        shape = shapes[layer]
        per_condition = []
        for c in conditions:
            link = next((l for l in c.chain() if l.layer == layer), None)
            ones = x.new_ones(shape[1])
            per_condition.append(ones if link is None else link.mask(shape[1], ones))
        mask = torch.stack(per_condition).repeat(n, 1)  # [n * k, C], entry order as the batch
        masks[layer] = mask.reshape(n * k, shape[1], *([1] * (len(shape) - 2)))
    return masks


_SHAPES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _layer_shapes(explainer: LRP, probe: torch.Tensor, layers) -> dict:
    """The output shape of each of ``layers`` for an input like ``probe`` (one sample)."""
    per_input = _SHAPES.setdefault(explainer, {})
    key = (tuple(probe.shape[1:]), probe.dtype, probe.device)
    known = per_input.get(key, {})
    if not all(layer in known for layer in layers):
        result = explainer.explain(probe, None, layers=list(layers))
        known = {**known, **{name: tuple(value.shape) for name, value in result.activations.items()}}
        per_input[key] = known
    missing = [layer for layer in layers if layer not in known]
    if missing:
        raise ValueError(f"layer {missing[0]!r} gives no tensor output for this input")
    return known
