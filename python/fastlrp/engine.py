"""``fastlrp.LRP``: build the explainer graph once, then each call is one forward and one
backward pass whose "gradient" is the relevance."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from . import composites as _composites
from . import graph as _graph
from . import ops
from .relevance_layers import RelevanceLayer

BACKENDS = ("native", "triton", "reference")


def available_backends(device: torch.device | str | None = None) -> list:
    """Backends that can run on ``device`` (default: the CPU), fastest first.

    ``native``: fastlrp._C's fused kernels and the block-form rules (needs the compiled
    extension with kernels for the device). ``triton``: the fully fused Triton kernels (CUDA with
    Triton installed; listed after native until measured on GPUs, see docs/triton.md; on the CPU
    it runs only when asked for, under ``TRITON_INTERPRET=1``). ``reference``: the pure-PyTorch
    oracle, always there."""
    device = torch.device("cpu" if device is None else device)
    names = ["native"] if ops.native_supports(device, torch.float32) else []
    if device.type == "cuda" and _triton_importable():
        names.append("triton")
    return names + ["reference"]


def _triton_importable() -> bool:
    import importlib.util
    return importlib.util.find_spec("triton") is not None


def _choose_backend(requested: str | None) -> str:
    source = "backend=" if requested else "FASTLRP_BACKEND"
    name = requested or os.environ.get("FASTLRP_BACKEND") or available_backends()[0]
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r} (from {source}); known: {list(BACKENDS)}")
    if name == "native" and _native_build() is None:
        raise ValueError(f"backend 'native' (from {source}) needs the compiled extension fastlrp._C, which is not "
                         "built here (install the package with 'pip install .'); use backend='reference'")
    if name == "triton" and not _triton_importable():
        raise ValueError(f"backend 'triton' (from {source}) needs the triton package, which is not installed "
                         "here; use backend='native' or 'reference'")
    return name


def _native_build():
    from ._native import _C
    return _C


@dataclass
class Explanation:
    """What ``LRP.explain`` returns."""

    relevance: torch.Tensor
    """Relevance of the input, same shape as the input."""
    output: torch.Tensor
    """The model's output for the input."""
    start: torch.Tensor
    """The relevance the backward pass started from (same shape as ``output``)."""
    layers: dict = field(default_factory=dict)
    """Relevance arriving at the output of each layer named in ``layers=``."""


class LRP:
    """Layer-wise Relevance Propagation explainer for a PyTorch model.

    ``LRP(model, composite="epsilon_plus", **rule_options)`` traces the model once; then
    ``explainer(x, target)`` returns the relevance of ``x`` (same shape) for ``target``.

    Parameters
    ----------
    model: the network; it is never modified. It is explained in eval mode.
    composite: a preset name (``fastlrp.composites.names()``) or a ``fastlrp.Composite``.
    start: ``"logit"`` (default) starts from the target's output value f_c(x), so relevance sums
        to the prediction where rules conserve; ``"one"`` starts from 1 (Zennit's one-hot).
    maxpool: ``"winner"`` (gradient, Zennit's behaviour) or ``"proportional"``.
    fold_batchnorm: merge batch norms into the preceding linear layer (Zennit's canonizers).
    functional_rules: give functional activations/pooling (``F.relu``, ``F.adaptive_avg_pool2d``,
        ``x.mean``) the rules of their module form. ``False`` keeps their plain gradient, which is
        what Zennit's module hooks compute; residual sums keep the Norm rule either way.
    passthrough: layer types, module names or op names without a rule that relevance may cross
        by the plain gradient (otherwise they raise ``UnsupportedLayerError``).
    backend: ``"native"`` (fused kernels of fastlrp._C, block-form rules), ``"triton"`` (fully fused
        Triton kernels, per layer and shape the faster of them and native) or ``"reference"`` (pure
        PyTorch); default from ``FASTLRP_BACKEND``, else the fastest available. The chosen one is
        ``explainer.backend``. Under ``native``, a layer whose device, dtype or form has no kernel
        (float16 on the CPU, grouped or transposed convolutions) runs the reference rule.
    save_memory: under the native backend, keep only each linear layer's input for the relevance
        pass and recompute its z parts there: peak memory close to the plain gradient's, for one
        more forward convolution per layer (see docs/native.md, "Memory"). The relevance is the same.
    rule_options: options of the preset composite, e.g. ``epsilon=``, ``gamma=``, ``low=``, ``high=``,
        ``zero_params="bias"``, ``layer_map=[(nn.Linear, Epsilon(0.25))]``.
    """

    def __init__(self, model: nn.Module, composite="epsilon_plus", *, start: str = "logit",
                 maxpool: str = "winner", fold_batchnorm: bool = True, functional_rules: bool = True,
                 passthrough: Sequence = (), backend: str | None = None, save_memory: bool = False,
                 **rule_options):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if start not in ("logit", "one"):
            raise ValueError(f"start must be 'logit' or 'one', got {start!r}")
        if maxpool not in ("winner", "proportional"):
            raise ValueError(f"maxpool must be 'winner' or 'proportional', got {maxpool!r}")
        self.composite = _composites.get(composite, **rule_options)
        self.start = start
        self.backend = _choose_backend(backend)
        self.model = model
        options = _graph.Options(maxpool, fold_batchnorm, functional_rules, tuple(passthrough))
        self.graph_module = _graph.build(model, self.composite, options)
        self._sites = {m.site: m for m in self.graph_module.modules() if isinstance(m, RelevanceLayer)}
        self.save_memory = bool(save_memory)
        for layer in self._sites.values():
            layer.backend = self.backend
            layer.save_memory = self.save_memory
        self._input_layer = _layer_reading_input(self.graph_module)

    @property
    def layer_names(self) -> list:
        """Names accepted by ``explain(..., layers=[...])``."""
        return list(self._sites)

    def rules(self) -> dict:
        """Which rule each layer got: {layer name: rule}."""
        return {site: m.rule for site, m in self._sites.items()}

    def __call__(self, x: torch.Tensor, target=None) -> torch.Tensor:
        return self.explain(x, target).relevance

    def explain(self, x: torch.Tensor, target=None, layers: Sequence[str] = ()) -> Explanation:
        """Relevance of ``x`` for ``target``, with the output and optional per-layer relevance.

        ``target``: a class index (int), one index per sample (LongTensor of shape [N]), a
        weight tensor broadcastable to the output (e.g. one-hot [N, C]), a callable mapping
        the output to the starting relevance, or None for each sample's predicted class.
        """
        self._check_input(x)
        if self.model.training:
            warnings.warn(f"{type(self.model).__name__} is in training mode; fastlrp explains it in eval mode "
                          "(running batch-norm statistics, no dropout). Call model.eval() to silence this.",
                          stacklevel=2)
        unknown = [name for name in layers if name not in self._sites]
        if unknown:
            raise KeyError(f"no layer named {unknown} in the explainer; names are explainer.layer_names, "
                           f"e.g. {self.layer_names[:5]}")
        captured, handles = {}, []
        for name in layers:
            handles.append(self._sites[name].register_forward_hook(_capture_relevance(captured, name)))
        try:
            with torch.enable_grad():
                x_leaf = x.detach().requires_grad_(True)
                output = self.graph_module(x_leaf)
                start = starting_relevance(output, target, self.start)
                (relevance,) = torch.autograd.grad(output, x_leaf, start)
        finally:
            for h in handles:
                h.remove()
        return Explanation(relevance, output.detach(), start.detach(), captured)

    def _check_input(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"input must be a floating-point tensor, got {x.dtype}")
        param = next(self.model.parameters(), None)
        if param is not None:
            if param.device != x.device:
                raise ValueError(f"input is on {x.device} but the model's parameters are on {param.device}; "
                                 f"move one of them (x.to({str(param.device)!r}))")
            if param.dtype != x.dtype:
                raise TypeError(f"input dtype {x.dtype} does not match the model's parameters ({param.dtype}); "
                                f"use x.to({param.dtype}) or model.to({x.dtype})")
        if self._input_layer is not None:
            _check_first_layer(self._input_layer, x)


def _layer_reading_input(gm) -> RelevanceLayer | None:
    """The linear layer that takes the model's input directly (its shape is checked before a
    call, for a clear error); None when something (a flatten, a reshape) comes first."""
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    for user in placeholder.users:
        if user.op == "call_module":
            layer = gm.get_submodule(user.target)
            if hasattr(layer, "op") and user.args and user.args[0] is placeholder:
                return layer
    return None


def _check_first_layer(layer, x):
    module = layer._module[0]
    op = layer.op
    if op.kind == "linear":
        ok, expected = x.shape[-1] == module.in_features, f"[..., {module.in_features}]"
    else:
        ok = x.ndim == op.dims + 2 and x.shape[1] == module.in_channels
        expected = f"[N, {module.in_channels}" + ", ..." * op.dims + "]"
    if not ok:
        raise ValueError(f"input of shape {tuple(x.shape)} does not fit the first layer {layer.site} "
                         f"({type(module).__name__}), which expects {expected}")


def _capture_relevance(store: dict, name: str):
    def hook(module, inputs, output):
        def keep(grad):
            if grad is not None:  # None where no relevance arrives (a gate branch)
                store[name] = grad.detach()
        if output.requires_grad:
            output.register_hook(keep)
    return hook


def starting_relevance(output: torch.Tensor, target, start: str = "logit") -> torch.Tensor:
    """The relevance placed on the output before the backward pass."""
    if callable(target) and not isinstance(target, torch.Tensor):
        start_rel = target(output.detach())
        if not isinstance(start_rel, torch.Tensor) or start_rel.shape != output.shape:
            raise ValueError(f"target callable must return a tensor of the output's shape {tuple(output.shape)}")
        return start_rel.to(output.dtype)
    if output.ndim < 2:
        raise ValueError(f"model output of shape {tuple(output.shape)} has no class dimension; "
                         "pass target as a callable returning the starting relevance")
    if target is None:
        target = output.detach().argmax(1)
    if isinstance(target, int) or (isinstance(target, torch.Tensor) and target.dtype in
                                   (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)):
        index = torch.as_tensor(target, device=output.device).long()
        if index.ndim == 0:
            index = index.expand(output.shape[0])
        if index.shape != (output.shape[0],):
            raise ValueError(f"target indices must be an int or have shape [{output.shape[0]}] (one per sample), "
                             f"got shape {tuple(index.shape)}")
        if (index < 0).any() or (index >= output.shape[1]).any():
            raise ValueError(f"target index out of range for {output.shape[1]} classes: {index.tolist()}")
        shape = (output.shape[0], 1) + (1,) * (output.ndim - 2)
        weights = torch.zeros_like(output).scatter_(1, index.reshape(shape).expand(
            (output.shape[0], 1) + tuple(output.shape[2:])), 1.0)
    elif isinstance(target, torch.Tensor):
        try:
            weights = target.to(device=output.device, dtype=output.dtype).expand(output.shape)
        except RuntimeError:
            raise ValueError(f"target weights of shape {tuple(target.shape)} do not broadcast to the output "
                             f"{tuple(output.shape)}") from None
    else:
        raise TypeError(f"target must be an int, a tensor or a callable, got {type(target).__name__}")
    return output.detach() * weights if start == "logit" else weights.clone()
