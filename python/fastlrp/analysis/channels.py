"""Channel attribution and semantic dictionaries at a hidden layer (Olah et al. 2018, "The Building
Blocks of Interpretability").

    result = channel_attribution(model, x, layer="relu5", target=1)
    result.per_channel          # [N, C]: how much each channel contributes to the decision
    result.top_channels(5)      # the channels that carry it
    semantic_dictionary(result, k=3).indices   # [N, H, W, 3]: the strongest channels at each position

The attribution at the layer is LRP relevance (``fastlrp.LRP(...).explain(x, target, layers=[layer])``),
gradient x activation, or the plain activation. Reducing it over positions or over channels is a sum,
so per-channel and per-position attributions both add up to the layer's total relevance.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .._common.layers import capturing_outputs
from .._common.model_view import eval_view
from .._common.targets import target_weights
from .._common.validate import check_tensor, choice
from ..engine import LRP

METHODS = ("lrp", "gradient_x_activation", "activation")


@dataclass
class ChannelAttribution:
    """What ``channel_attribution`` returns. Tensors are detached, shaped [N, C, *positions]."""

    layer: str
    method: str
    relevance: torch.Tensor
    """Attribution of each unit of the layer (LRP relevance for ``method="lrp"``)."""
    activation: torch.Tensor
    """The layer's output for the input."""
    output: torch.Tensor
    """The model's output for the input."""

    @property
    def attribution(self) -> torch.Tensor:
        """Deprecated name of ``relevance``."""
        warnings.warn("ChannelAttribution.attribution is deprecated; use .relevance", DeprecationWarning,
                      stacklevel=2)
        return self.relevance

    @property
    def per_channel(self) -> torch.Tensor:
        """Relevance summed over positions: [N, C]."""
        return self.relevance.flatten(2).sum(2) if self.relevance.ndim > 2 else self.relevance

    @property
    def per_position(self) -> torch.Tensor:
        """Relevance summed over channels: [N, *positions] (a heatmap at the layer's resolution)."""
        return self.relevance.sum(1)

    @property
    def total(self) -> torch.Tensor:
        """The layer's whole relevance per sample: [N]."""
        return self.relevance.flatten(1).sum(1)

    def top_channels(self, k: int, sample: int | None = None, absolute: bool = False):
        """The ``k`` channels with the largest attribution, largest first: (values, indices).

        Per sample ([N, k] each), or for one ``sample`` ([k]). ``absolute`` ranks by |attribution|,
        to find channels that speak strongly against the decision as well.
        """
        channels = self.per_channel.shape[1]
        if not isinstance(k, int) or not 1 <= k <= channels:
            raise ValueError(f"k must be an int between 1 and the layer's {channels} channels, got {k!r}")
        scores = self.per_channel
        if sample is not None:
            if not -scores.shape[0] <= sample < scores.shape[0]:
                raise ValueError(f"sample {sample} out of range for a batch of {scores.shape[0]}")
            scores = scores[sample]
        order = (scores.abs() if absolute else scores).topk(k, dim=-1).indices
        return scores.gather(-1, order), order


def channel_attribution(model, x: torch.Tensor, layer: str, target=None, *, method: str = "lrp",
                        composite="epsilon_plus", **rule_options) -> ChannelAttribution:
    """Attribution of the decision for ``target`` to the units of ``layer``.

    ``model``: an ``nn.Module``, or a ``fastlrp.LRP`` explainer to reuse (then ``composite`` and
    ``rule_options`` are its own). ``layer``: a name from ``LRP(model).layer_names`` (for LRP) or a
    module name (for the other methods). ``target``: as for ``LRP.explain`` (a class, one per sample,
    weights, a callable, or None for the predicted class).

    ``method``: ``"lrp"`` -- the relevance arriving at the layer's output; ``"gradient_x_activation"``
    -- a * df/da, the attribution of Olah et al. (2018); ``"activation"`` -- a itself, no target.
    """
    choice("method", method, METHODS)
    check_tensor("x", x)
    if isinstance(model, LRP):
        if method != "lrp":
            raise ValueError(f"an LRP explainer was given as model; method={method!r} needs the nn.Module itself")
        if rule_options or composite != "epsilon_plus":
            raise ValueError("composite and rule options cannot change an existing LRP explainer; "
                             "build it with them or pass the nn.Module")
        return _lrp_attribution(model, x, layer, target)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or a fastlrp.LRP explainer, got {type(model).__name__}")
    if method == "lrp":
        return _lrp_attribution(LRP(model, composite, **rule_options), x, layer, target)
    if rule_options or composite != "epsilon_plus":
        raise ValueError(f"composite and rule options only apply to method='lrp', not {method!r}")
    return _gradient_attribution(model, x, layer, target, method)


def _lrp_attribution(explainer: LRP, x, layer, target) -> ChannelAttribution:
    if not isinstance(layer, str) or layer not in explainer.layer_names:
        raise ValueError(f"layer={layer!r} is not a layer of the explainer; names are {explainer.layer_names}")
    result = explainer.explain(x, target, layers=[layer])  # relevance and activation, kept per call
    if layer not in result.layers:
        raise ValueError(f"no relevance reaches layer {layer!r} (is it on a branch the output does not depend on?)")
    return ChannelAttribution(layer, "lrp", result.layers[layer], result.activations[layer], result.output)


def _gradient_attribution(model, x, layer, target, method) -> ChannelAttribution:
    # The hook goes on an eval-mode view of the model; the model itself is not touched.
    view = eval_view(model)
    with capturing_outputs(view, [layer]) as acts, torch.enable_grad():
        output = view(x.detach())
        activation = acts[layer]
        if method == "activation":
            return ChannelAttribution(layer, method, activation.detach(), activation.detach(), output.detach())
        if not activation.requires_grad:
            raise ValueError(f"layer {layer!r} does not depend on anything that carries a gradient")
        # start="one": the gradient of the target's logit (or of the weighted logits for weight targets).
        weights = target_weights(output, target)
        (grad,) = torch.autograd.grad(output, activation, weights, allow_unused=True)
    if grad is None:
        raise ValueError(f"the output does not depend on layer {layer!r}")
    relevance = (activation * grad).detach()
    return ChannelAttribution(layer, method, relevance, activation.detach(), output.detach())


@dataclass
class SemanticDictionary:
    """The strongest channels at each position of a layer: ``indices`` and ``values`` [N, *positions, k],
    strongest first. Paired with a feature visualization of each channel (``channel_prototypes``) it is
    Olah et al.'s (2018) semantic dictionary."""

    indices: torch.Tensor
    values: torch.Tensor


def semantic_dictionary(attribution, k: int = 3, by: str = "activation") -> SemanticDictionary:
    """Rank channels at every position of a ``ChannelAttribution`` ``by`` its ``"activation"`` (what the
    layer sees there) or its ``"relevance"`` (what matters there for the decision; ``"attribution"`` is
    the deprecated old name); or of a raw tensor [N, C, *positions]."""
    if isinstance(attribution, ChannelAttribution):
        if by == "attribution":
            warnings.warn("semantic_dictionary(by='attribution') is deprecated; use by='relevance'",
                          DeprecationWarning, stacklevel=2)
            by = "relevance"
        if by not in ("activation", "relevance"):
            raise ValueError(f"by must be 'activation' or 'relevance', got {by!r}")
        tensor = getattr(attribution, by)
    elif isinstance(attribution, torch.Tensor):
        tensor = attribution
    else:
        raise TypeError(f"attribution must be a ChannelAttribution or a tensor, got {type(attribution).__name__}")
    if tensor.ndim < 3:
        raise ValueError(f"a semantic dictionary needs positions: a tensor [N, C, *positions], got {tuple(tensor.shape)}")
    if not isinstance(k, int) or not 1 <= k <= tensor.shape[1]:
        raise ValueError(f"k must be an int between 1 and the {tensor.shape[1]} channels, got {k!r}")
    values, indices = tensor.movedim(1, -1).topk(k, dim=-1)
    return SemanticDictionary(indices, values)


def channel_prototypes(model: nn.Module, layer: str, channels, shape=(3, 32, 32), **options):
    """One activation-maximization prototype per channel of ``layer`` (a ``Prototypes`` batch):
    the pictures of a semantic dictionary. ``options`` go to ``maximize_activation``."""
    from .activation_max import Channel, maximize_activation

    channels = [int(c) for c in torch.as_tensor(channels).reshape(-1)]
    return maximize_activation(model, Channel(layer, channels), shape=(len(channels), *shape), **options)
