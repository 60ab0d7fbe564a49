"""Where relevance goes missing: a per-layer conservation audit (docs/audit.md).

``fastlrp.audit(explainer, x, target)`` explains ``x`` once and then, for every layer that received
relevance, compares the relevance arriving at its output with the relevance its rule hands to its
inputs, and attributes the difference to its causes. For a linear layer under a rule declared as a
``LinearForm`` (docs/design.md, section 3), with a_g = sum of group g's parts without bias, b_g its
bias and z_g = a_g + b_g, the relevance passed on is (adjointness of f and f^T)

    sum R_in = sum over g and output neurons j of  share_gj * a_gj / stab(z_gj),
    share_gj = c_g * mask_gj * R_j,

so the loss sum R - sum R_in splits exactly into

- ``rule``: sum R - sum share, what the rule's coefficients and masks do not hand to any group
  (Gamma where the output is exactly 0; AlphaBeta variants with alpha - beta != 1);
- ``vanished``: share - passed where the denominator vanished, |z_gj| < epsilon (also z = 0):
  ZPlus on a neuron without positive contributions passes nothing, its share is lost;
- ``bias``: share * b / stab(z) elsewhere, what the bias absorbs;
- ``stabilizer``: share * epsilon * sign(z) / stab(z) elsewhere, what the stabilizer absorbs.

Sums, average pooling and means (Norm rule) have a = the op's output and no bias. Layers of other
kinds (proportional max pooling, the plain gradient, ...) report their measured loss as ``other``;
for the kinds above ``other`` is only rounding (tests/test_audit.py). The relevance each layer
passes on is computed by the layer's reference definition from its input in the same forward pass;
the relevance lost between layers (ops without a rule) is the run's total loss minus the layers'.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx

from .engine.explainer import LRP
from .engine.relevance_layers import AffineLayer, NormLayer, RelevanceLayer
from .linear_form import modified_input
from .reference.stabilize import stabilize
from .rules import Gradient

CAUSES = ("rule", "vanished", "bias", "stabilizer", "other")


@dataclass
class LayerAudit:
    """Relevance into and out of one layer (sums over the batch), and the causes of the difference."""

    layer: str
    rule: str
    relevance_out: float
    """Relevance arriving at the layer's output (from the layers after it)."""
    relevance_in: float
    """Relevance the layer's rule hands to its inputs."""
    rule_loss: float = 0.0
    vanished: float = 0.0
    bias: float = 0.0
    stabilizer: float = 0.0
    other: float = 0.0
    vanished_neurons: int = 0
    """Output neurons (over the batch) with relevance where some group's denominator vanished."""
    neurons: int = 0
    """Output neurons (over the batch) that carry relevance."""

    @property
    def loss(self) -> float:
        return self.relevance_out - self.relevance_in

    def causes(self) -> dict:
        return {"rule": self.rule_loss, "vanished": self.vanished, "bias": self.bias,
                "stabilizer": self.stabilizer, "other": self.other}


@dataclass
class Audit:
    """What ``audit`` returns: one ``LayerAudit`` per layer that received relevance, in forward order."""

    layers: list
    start: float
    """Sum of the starting relevance (the explained logits, batch total)."""
    input: float
    """Sum of the relevance at the input, from the explanation itself (batch total)."""
    relevance: torch.Tensor = field(repr=False)
    """The input relevance of the explanation that was audited."""

    @property
    def total_loss(self) -> float:
        return self.start - self.input

    @property
    def between_layers(self) -> float:
        """Relevance lost outside the audited layers (ops without a rule); 0 for a net whose every
        op is a layer with a rule or a reshape, split, concatenation."""
        return self.total_loss - sum(a.loss for a in self.layers)

    def totals(self) -> dict:
        """Each cause summed over the layers, plus ``between_layers``."""
        out = {cause: sum(a.causes()[cause] for a in self.layers) for cause in CAUSES}
        out["between_layers"] = self.between_layers
        out["vanished_neurons"] = sum(a.vanished_neurons for a in self.layers)
        return out

    def table(self, min_fraction: float = 0.0, top: int | None = None) -> str:
        """A Markdown table of the layers whose loss is at least ``min_fraction`` of the starting
        relevance (largest first, at most ``top``), the loss and each cause as a fraction of it."""
        scale = self.start if self.start != 0 else 1.0
        rows = sorted((a for a in self.layers if abs(a.loss) >= min_fraction * abs(scale)),
                      key=lambda a: -abs(a.loss))[:top]
        lines = ["| layer | rule | R out | loss | rule | vanished (neurons) | bias | stabilizer | other |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for a in rows:
            lines.append(f"| {a.layer} | {a.rule} | {a.relevance_out / scale:.4g} | {a.loss / scale:.3g} | "
                         f"{a.rule_loss / scale:.2g} | {a.vanished / scale:.3g} ({a.vanished_neurons} of "
                         f"{a.neurons}) | {a.bias / scale:.2g} | {a.stabilizer / scale:.2g} | {a.other / scale:.2g} |")
        t = self.totals()
        lines.append(f"| all {len(self.layers)} layers | | | {sum(a.loss for a in self.layers) / scale:.3g} | "
                     f"{t['rule'] / scale:.2g} | {t['vanished'] / scale:.3g} ({t['vanished_neurons']}) | "
                     f"{t['bias'] / scale:.2g} | {t['stabilizer'] / scale:.2g} | {t['other'] / scale:.2g} |")
        lines.append(f"\ninput relevance / start: {self.input / scale:.6g}; lost between layers: "
                     f"{self.between_layers / scale:.2g} (fractions of the starting relevance {self.start:.6g})")
        return "\n".join(lines)


def audit(explainer: LRP, x: torch.Tensor, target=None) -> Audit:
    """Explain ``x`` for ``target`` with ``explainer`` and audit every layer's conservation.

    Each layer's terms are computed in float64 from its input (a forward pass through the
    explainer's graph) and the relevance that reached its output in the explanation."""
    if not isinstance(explainer, LRP):
        raise TypeError(f"audit needs a fastlrp.LRP explainer, got {type(explainer).__name__}")
    explanation = explainer.explain(x, target, layers=explainer.layer_names)
    inputs = _layer_inputs(explainer.graph_module, x)  # in forward order
    rows = []
    for site in inputs:
        relevance = explanation.layers.get(site)
        if relevance is None:
            continue  # no relevance arrived (a gate branch)
        layer = explainer._sites[site]
        rows.append(_audit_layer(site, layer, inputs[site], relevance))
    start = float(explanation.start.double().sum())
    return Audit(rows, start, float(explanation.relevance.double().sum()), explanation.relevance)


class _Recorder(torch.fx.Interpreter):
    """Runs the explainer's graph forward with each layer's plain ``compute`` (no backend, no
    call state) and keeps the inputs of every layer."""

    def __init__(self, gm):
        super().__init__(gm)
        self.inputs = {}

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        if isinstance(module, RelevanceLayer):
            self.inputs[module.site] = tuple(a.detach() for a in args if isinstance(a, torch.Tensor))
            return module.compute(*args)
        return super().call_module(target, args, kwargs)


def _layer_inputs(gm, x) -> dict:
    recorder = _Recorder(gm)
    with torch.no_grad():
        recorder.run(x.detach())
    return recorder.inputs


def _audit_layer(site: str, layer, inputs: tuple, relevance: torch.Tensor) -> LayerAudit:
    wide = torch.float64
    r_out = relevance.to(wide)
    row = LayerAudit(site, type(layer.rule).__name__, float(r_out.sum()), 0.0,
                     neurons=int((r_out != 0).sum()))
    wide_inputs = tuple(t.to(wide) for t in inputs)
    with torch.no_grad():
        r_in = _relevance_in(layer, wide_inputs, r_out)
    row.relevance_in = float(sum(t.sum() for t in r_in if t is not None))
    if isinstance(layer, AffineLayer) and hasattr(layer.rule, "form"):
        _affine_terms(row, layer, wide_inputs[0], r_out)
    elif isinstance(layer, NormLayer) and not isinstance(layer.rule, Gradient):
        with torch.no_grad():
            y = layer.compute(*wide_inputs)
        _split(row, [(r_out, y, None)], layer.rule.stabilizer)
    row.other = row.loss - (row.rule_loss + row.vanished + row.bias + row.stabilizer)
    return row


def _relevance_in(layer, inputs, relevance) -> tuple:
    """The relevance the layer hands to its inputs, by its reference definition (float64)."""
    if isinstance(layer.rule, Gradient):
        leaves = [t.detach().requires_grad_(True) for t in inputs]
        with torch.enable_grad():
            out = layer.compute(*leaves)
            grads = torch.autograd.grad(out, leaves, relevance, allow_unused=True)
        return tuple(grads)
    if isinstance(layer, AffineLayer):
        weight, bias = (None if t is None else t.to(relevance.dtype) for t in layer.params())
        from .reference import linear_relevance
        return (linear_relevance(layer.op, layer.form(merge_positive=False), inputs[0], weight, bias, relevance),)
    return tuple(layer.reference_relevance(inputs, [t.shape for t in inputs], relevance))


def _affine_terms(row: LayerAudit, layer: AffineLayer, x: torch.Tensor, relevance: torch.Tensor):
    """rule, vanished, bias and stabilizer of a linear layer, from its declared form."""
    op, form = layer.op, layer.form(merge_positive=False)
    weight, bias = (None if t is None else t.to(relevance.dtype) for t in layer.params())
    output = op(x, weight, bias) if form.uses_mask else None
    groups = []
    for g, group in enumerate(form.groups):
        a = sum(op(modified_input(p.input, x, form.bounds), p.weight.apply(weight)) for p in form.parts_of(g))
        b = form.group_bias(g, bias)
        b = None if b is None else b.reshape(op.bias_shape(a.ndim))
        share = group.coefficient * relevance
        if group.mask != "none":
            share = share * ((output > 0) if group.mask == "positive" else (output < 0)).to(share.dtype)
        groups.append((share, a, b))
    _split(row, groups, form.stabilizer, total=relevance)


def _split(row: LayerAudit, groups: list, epsilon: float, total: torch.Tensor | None = None):
    """Fill the causes from (share, a, b) per group: z = a + b, passed = share * a / stab(z)."""
    total = groups[0][0] if total is None else total
    row.rule_loss = float(total.sum() - sum(share.sum() for share, _, _ in groups))
    vanished_any = torch.zeros_like(total, dtype=torch.bool)
    for share, a, b in groups:
        z = a if b is None else a + b
        stab = stabilize(z, epsilon)
        vanished = (z.abs() < epsilon) | (z == 0)
        lost = share - share * a / stab
        row.vanished += float(lost[vanished].sum())
        keep = ~vanished
        if b is not None:
            row.bias += float((share * b / stab)[keep].sum())
        row.stabilizer += float((share * epsilon * torch.where(z >= 0, 1.0, -1.0).to(z.dtype) / stab)[keep].sum())
        vanished_any |= vanished & (share != 0)
    row.vanished_neurons = int(vanished_any.sum())


def bias_free_copy(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """A copy of ``model`` (eval mode) for conservation checks: no biases, batch norms that are the
    identity, and every Linear/ConvNd weight rescaled so that its output has unit root mean square
    on the calibration input ``x``. Without biases LRP-0 conserves exactly, so any loss left is the
    rules' own; the rescaling keeps activations O(1) however deep the random network is."""
    import copy

    from torch import nn

    model = copy.deepcopy(model).eval()
    norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    linear = (nn.Linear, nn.modules.conv._ConvNd)
    handles = []

    def rescale(module, args, output):
        rms = output.detach().pow(2).mean().sqrt().clamp(min=1e-12)
        module.weight.data /= rms
        return output / rms

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, norms):
                module.running_mean.zero_()
                module.running_var.fill_(1.0 - module.eps)  # sqrt(var + eps) = 1
                if module.affine:
                    module.weight.fill_(1.0)
                    module.bias.zero_()
            elif isinstance(module, linear):
                if module.bias is not None:
                    module.bias.zero_()
                handles.append(module.register_forward_hook(rescale))
        try:
            model(x)
        finally:
            for handle in handles:
                handle.remove()
    return model
