"""``fastlrp.LRP``: build the explainer graph once, then each call is one forward and one
backward pass whose "gradient" is the relevance."""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from .. import backends as _backends
from .. import composites as _composites
from .._common.model_view import training_warning
from .._common.targets import starting_relevance
from . import graph as _graph
from .batching import is_out_of_memory, join, target_part
from .defaults import default_composite
from .call import TRACE_LOCK, Call, ParameterWatch, WeightBudget, active
from .relevance_layers import AffineLayer, RelevanceLayer


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
    activations: dict = field(default_factory=dict)
    """The output (activation) of each layer named in ``layers=``."""
    backends: dict = field(default_factory=dict)
    """The backend that ran each layer with a rule (layer name -> "native", "triton", "reference")."""


class LRP:
    """Layer-wise Relevance Propagation explainer for a PyTorch model.

    ``LRP(model, composite=None, **rule_options)`` traces the model once; then
    ``explainer(x, target)`` returns the relevance of ``x`` (same shape) for ``target``.

    Parameters
    ----------
    model: the network; it is never modified. It is explained in eval mode.
    composite: a preset name (``fastlrp.composites.names()``) or a ``fastlrp.Composite``; None (default)
        chooses by the model (``engine.defaults.default_composite``): ``"attnlrp"`` for models with
        attention or layer norms, else ``"epsilon_plus"``.
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
        (float16 on the CPU, transposed convolutions) runs the reference rule.
    nonfinite: what to do when input samples hold NaN or Inf (their relevance cannot be finite):
        ``"warn"`` (default) names the samples in a warning, ``"raise"`` raises a ValueError.
    weight_cache: the derived weights (folded batch norms, block weights, kernel tables) kept between
        calls, at most this multiple of the model's own weight bytes (default 1.0); the rest is built
        again in each call (a few element-wise passes over those weights). ``None``: keep all of them.
    save_memory: under the native backend, keep only each linear layer's input for the relevance
        pass and recompute its z parts there: peak memory close to the plain gradient's, for one
        more forward convolution per layer (see docs/native.md, "Memory"). The relevance is the same.
    rule_options: options of the preset composite, e.g. ``epsilon=``, ``gamma=``, ``low=``, ``high=``,
        ``zero_params="bias"``, ``layer_map=[(nn.Linear, Epsilon(0.25))]``.
    """

    def __init__(self, model: nn.Module, composite=None, *, start: str = "logit",
                 maxpool: str = "winner", fold_batchnorm: bool = True, functional_rules: bool = True,
                 passthrough: Sequence = (), backend: str | None = None, save_memory: bool = False,
                 nonfinite: str = "warn", weight_cache: float | None = 1.0, **rule_options):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if start not in ("logit", "one"):
            raise ValueError(f"start must be 'logit' or 'one', got {start!r}")
        if maxpool not in ("winner", "proportional"):
            raise ValueError(f"maxpool must be 'winner' or 'proportional', got {maxpool!r}")
        if nonfinite not in ("warn", "raise"):
            raise ValueError(f"nonfinite must be 'warn' or 'raise', got {nonfinite!r}")
        self.nonfinite = nonfinite
        if composite is None:
            composite = default_composite(model)
        self.composite = _composites.get(composite, **rule_options)
        self.start = start
        self.backend = _backends.choose(backend)
        """The backend asked for; layers it cannot run fall back along ``backends.chain`` (see
        ``Explanation.backends`` for what ran where)."""
        self.save_memory = bool(save_memory)
        self.model = model
        options = _graph.Options(maxpool, fold_batchnorm, functional_rules, tuple(passthrough))
        self.graph_module = _graph.build(model, self.composite, options)
        self._sites = {m.site: m for m in self.graph_module.modules() if isinstance(m, RelevanceLayer)}
        self._affine = [m for m in self._sites.values() if isinstance(m, AffineLayer)]
        self._watch = ParameterWatch([layer.sources for layer in self._affine])
        budget = WeightBudget(_weight_budget(model, weight_cache))
        for layer in self._affine:
            layer.budget = budget
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
        """Relevance of ``x`` for ``target``, with the output, the relevance and activation at each
        layer named in ``layers``, and the backend that ran each layer (``Explanation.backends``).

        ``target``: a class index (int), one index per sample (LongTensor of shape [N]), a
        weight tensor broadcastable to the output (e.g. one-hot [N, C]), a callable mapping
        the output to the starting relevance, or None for each sample's predicted class (at each
        position, for a dense output such as a segmentation map).
        """
        self._check_input(x)
        self._check_finite(x)
        message = training_warning(self.model)
        if message:
            warnings.warn(message, stacklevel=2)
        unknown = [name for name in layers if name not in self._sites]
        if unknown:
            raise KeyError(f"no layer named {unknown} in the explainer; names are explainer.layer_names, "
                           f"e.g. {self.layer_names[:5]}")
        return self._explain_fitting(x, target, tuple(layers))

    def _explain_fitting(self, x, target, layers) -> Explanation:
        """``_explain_batch``, halving the batch while it runs out of memory (CPU or CUDA)."""
        try:
            return self._explain_batch(x, target, layers)
        except Exception as err:  # noqa: BLE001 - only out-of-memory errors are handled, others re-raised
            if not is_out_of_memory(err) or x.shape[0] < 2 or torch.compiler.is_compiling():
                raise  # one sample that does not fit: save_memory=True or a smaller input is the user's call
        if x.device.type == "cuda":  # what the failed attempt held is free once the error is gone
            torch.cuda.empty_cache()
        half = (x.shape[0] + 1) // 2
        warnings.warn(f"out of memory explaining a batch of {x.shape[0]}; explaining it in parts of {half}",
                      stacklevel=3)
        n = x.shape[0]
        parts = [self._explain_fitting(x[i:i + half], target_part(target, i, i + half, n), layers)
                 for i in range(0, n, half)]
        return join(parts, Explanation)

    def _explain_conditioned(self, x, target, conditions: dict, through: Sequence[str] = (),
                             layers: Sequence[str] = ()) -> Explanation:
        """The entry point of ``fastlrp.concepts``: one forward and one backward pass in which the relevance
        arriving at each layer of ``conditions`` ({name: mask broadcastable to its output}) is multiplied
        by the mask. The backward pass is chained through the layers of ``through`` (output first), so no
        relevance reaches the input on a path that bypasses them (zennit-crp's ``exclude_parallel``)."""
        self._check_input(x)
        self._check_finite(x)
        return self._explain_batch(x, target, tuple(layers), conditions, tuple(through))

    def _explain_batch(self, x, target, layers, conditions=None, through=()) -> Explanation:
        call = Call(_backends.chain(self.backend), self.save_memory, frozenset(layers), conditions=conditions or {})
        # (a lock cannot be traced by torch.compile; a compiled call does not run concurrently with a build)
        guard = contextlib.nullcontext() if torch.compiler.is_compiling() else TRACE_LOCK.reading()
        with guard, active(call):
            self._refresh_weights()
            with torch.enable_grad():
                x_leaf = x.detach().requires_grad_(True)
                output = self.graph_module(x_leaf)
                start = starting_relevance(output, target, self.start)
                relevance = _relevance_through(call, output, start, x_leaf, through)
        return Explanation(relevance, output.detach(), start.detach(), dict(call.captured), dict(call.activations),
                           dict(call.used))

    def _refresh_weights(self):
        """Drop the cached weights of every layer whose parameters changed since the last call."""
        if torch.compiler.is_compiling():
            return  # the layers fold and derive their weights inside the compiled graph
        for i in self._watch.changed():
            self._affine[i].invalidate()

    def _check_finite(self, x):
        if x.device.type == "meta" or x.numel() == 0:
            return
        bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(1) if x.ndim else ~torch.isfinite(x).reshape(1)
        if bool(bad.any()):
            samples = bad.nonzero().flatten().tolist()
            message = (f"input samples {samples[:10]}{' ...' if len(samples) > 10 else ''} contain NaN or Inf; "
                       "their relevance is not finite (clean the input, or pass nonfinite='raise' to stop here)")
            if self.nonfinite == "raise":
                raise ValueError(message)
            warnings.warn(message, stacklevel=3)

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


def _relevance_through(call, output, start, x_leaf, through):
    """The backward pass from ``output`` to ``x_leaf``, in stages through the outputs of ``through``."""
    tensor, relevance = output, start
    for site in through:
        if site not in call.outputs:
            raise ValueError(f"layer {site!r} is not conditioned or carries no relevance in this call")
        (relevance,) = torch.autograd.grad(tensor, call.outputs[site], relevance)  # masked by its hook
        tensor = call.outputs[site]
    (relevance,) = torch.autograd.grad(tensor, x_leaf, relevance)
    return relevance


def _weight_budget(model: nn.Module, multiple) -> int | None:
    if multiple is None:
        return None
    if not isinstance(multiple, (int, float)) or multiple < 0:
        raise ValueError(f"weight_cache must be None or a number >= 0 (a multiple of the model's weight bytes), "
                         f"got {multiple!r}")
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()
                if p.device.type != "meta"}
    return int(multiple * sum(storages.values()))


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
    module = layer.module
    op = layer.op
    if op.kind == "linear":
        ok, expected = x.shape[-1] == module.in_features, f"[..., {module.in_features}]"
    else:
        ok = x.ndim == op.dims + 2 and x.shape[1] == module.in_channels
        expected = f"[N, {module.in_channels}" + ", ..." * op.dims + "]"
    if not ok:
        raise ValueError(f"input of shape {tuple(x.shape)} does not fit the first layer {layer.site} "
                         f"({type(module).__name__}), which expects {expected}")
