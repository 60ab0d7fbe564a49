"""Turning a user's model into an explainer graph: trace once with torch.fx, then put a
RelevanceLayer in place of every layer and functional op that carries relevance.

The user's model is never modified, not even for a moment: the trace runs on an eval-mode view of
it (``fastlrp._common.model_view.eval_view``: shallow module copies that share its parameters and
buffers), and the new graph calls those copies or the functional form of the layers, never the
user's hooks.
"""

from __future__ import annotations

import inspect
import operator
import os
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .. import layers
from ..backends import helpers
from .._common.model_view import eval_view
from ..composites import Composite
from ..rules import (AttnLRP, DeconvNet, Gradient, GuidedBackprop, LayerNormIdentity, LinearRule, Norm, Pass,
                     Proportional, Rule, SoftmaxRule, Uniform)
from .call import TRACE_LOCK
from .op_tables import (ACTIVATIONS, ADD, ATTENTION_FUNCTIONS, DIV, EVAL_IDENTITIES, GATE_FUNCTIONS, GATE_MODULES,
                        MATMUL, MEAN, MUL, NEG, NORMALIZATIONS, POOLS, SHAPE_ATTRIBUTES, SHAPE_METHODS, SIGN_KEEPING,
                        SOFTMAX, STRUCTURAL, STRUCTURAL_HELPERS, SUM)
from .relevance_layers import (AffineLayer, BilinearLayer, BlockLayer, ElementwiseLayer, GatedProductLayer,
                               GradientLayer, MaxPoolLayer, NormLayer, ScaleLayer, SoftmaxLayer, batchnorm_forward,
                               eval_forward)


class UnsupportedLayerError(TypeError):
    """A layer or op in the model has no LRP rule and no pass-through was requested."""


class _Tracer(fx.Tracer):
    """Keeps every layer fastlrp knows as one node, including subclasses defined outside
    torch.nn (torchvision's Conv3DSimple is an nn.Conv3d)."""

    def __init__(self, leaf_types: tuple):
        super().__init__()
        self.leaf_types = leaf_types
        self.record_stack_traces = True  # errors name the source line of an op without a rule

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, qualname)


def trace(view: nn.Module, extra_leaves: tuple = ()) -> fx.GraphModule:
    """The fx graph of ``view`` (an eval-mode view of the user's model)."""
    tracer = _Tracer(layers.SUPPORTED + tuple(extra_leaves))
    try:
        with TRACE_LOCK.writing():  # fx patches nn.Module process-wide while it traces
            graph = tracer.trace(view)
    except Exception as err:
        raise TypeError(
            f"fastlrp could not trace {type(view).__name__} with torch.fx ({type(err).__name__}: {err}). "
            "LRP needs the model's graph; data-dependent Python control flow in forward() cannot be traced. "
            "Move it into a submodule and list that module in passthrough=..., or rewrite it with tensor ops."
        ) from err
    return fx.GraphModule(tracer.root, graph, class_name=f"LRP{type(view).__name__}")




@dataclass
class Options:
    """How the engine treats what composites do not decide."""

    maxpool: str = "winner"
    fold_batchnorm: bool = True
    functional_rules: bool = True
    passthrough: tuple = ()


def _module_path(node: fx.Node) -> tuple:
    """(path, type name) of the innermost module whose forward produced ``node``."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, kind = next(reversed(stack.values()))
    path = path[0] if isinstance(path, tuple) else path
    return path, getattr(kind, "__name__", str(kind).rsplit(".", 1)[-1].strip("'>"))


def _source_line(node: fx.Node) -> str:
    """Where in the model's code ``node`` was made: 'file, line N: code', or ''."""
    lines = (node.stack_trace or "").strip().splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].lstrip().startswith("File ") and f"{os.sep}torch{os.sep}fx{os.sep}" not in lines[i]:
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            return f"{lines[i].strip()}: {code}"
    return ""


def _where(node: fx.Node) -> str:
    path, kind = _module_path(node)
    place = f"{path} ({kind})" if path else (f"the model's own forward ({kind})" if kind else "")
    source = _source_line(node)
    parts = [p for p in (place, source) if p]
    return f" (in {', '.join(parts)})" if parts else ""


def _site_name(node: fx.Node) -> str:
    """A readable name for a functional node: its enclosing module path and the op."""
    stack = node.meta.get("nn_module_stack") or {}
    path = next(reversed(stack.values()))[0] if stack else ""
    if isinstance(path, tuple):
        path = path[0]
    return f"{path}.{node.name}" if path else node.name


def _target_name(target) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", repr(target))


def _node_args(node: fx.Node) -> list:
    return [a for a in node.args if isinstance(a, fx.Node)]


def _bind_functional(node: fx.Node):
    """fn(*tensor_inputs) for a functional node, with its other arguments bound."""
    target, args, kwargs = node.target, node.args, dict(node.kwargs)
    kwargs.pop("inplace", None)
    positions = [i for i, a in enumerate(args) if isinstance(a, fx.Node)]

    def fn(*tensors):
        full = list(args)
        for i, t in zip(positions, tensors):
            full[i] = t
        if isinstance(target, str):
            return getattr(full[0], target.rstrip("_") if target.endswith("_") and not target.startswith("_")
                           else target)(*full[1:], **kwargs)
        if target in (operator.iadd, operator.imul):
            return {operator.iadd: operator.add, operator.imul: operator.mul}[target](*full)
        if target is F.relu_:
            return F.relu(*full)
        return target(*full, **kwargs)

    return fn


def _pool_module(node: fx.Node) -> nn.Module:
    """The nn pooling module equivalent to a functional pooling call."""
    cls = POOLS[node.target]
    fn_params = list(inspect.signature(cls.__init__).parameters)[1:]
    bound = dict(zip(_functional_param_names(node.target), node.args[1:]))
    bound.update(node.kwargs)
    return cls(**{k: v for k, v in bound.items() if k in fn_params})


def _functional_param_names(fn) -> list:
    # boolean-dispatch wrappers (max_pool*) hide their signature behind (*args, **kwargs); all share this order
    pooling = ["kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"]
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return pooling
    if any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in params):
        return pooling
    return [p.name for p in params][1:]


class _Values:
    """What each graph node holds, from the graph alone: a Python value read from shapes (``x.shape``,
    ``x.size(1)``, ``n_h * n_w``, ``h == 224``), a tensor that carries relevance (it depends on the
    input), or a constant (parameters, buffers, what is computed from them only)."""

    def __init__(self, graph: fx.Graph):
        self.shape, self.carrying = set(), set()
        for node in graph.nodes:
            inputs = node.all_input_nodes
            if node.op == "placeholder":
                self.carrying.add(node)
            elif self._reads_shape(node) or (inputs and node.op in ("call_function", "call_method")
                                             and all(a in self.shape for a in inputs)):
                self.shape.add(node)
            elif any(a in self.carrying for a in inputs if a not in self.shape):
                self.carrying.add(node)

    @staticmethod
    def _reads_shape(node: fx.Node) -> bool:
        if node.op == "call_function" and node.target is getattr:
            return node.args[1] in SHAPE_ATTRIBUTES
        return node.op == "call_method" and node.target in SHAPE_METHODS

    def take_over(self, old: fx.Node, new: fx.Node) -> None:
        """``new`` replaces ``old`` in the graph and holds what it held."""
        for kind in (self.shape, self.carrying):
            if old in kind:
                kind.add(new)

    def tensors(self, node: fx.Node) -> list:
        """The node's inputs that are tensors (carrying or constant), in order."""
        return [a for a in _node_args(node) if a not in self.shape]

    def carried(self, nodes) -> tuple:
        return tuple(n in self.carrying for n in nodes)


def _bind(call, args, kwargs):
    """(fn, inputs): ``fn(*values)`` calls ``call`` with the node's arguments, every fx.Node among them
    (in lists and keywords too) replaced by the next value; ``inputs`` are those nodes in order."""
    inputs = []
    fx.node.map_arg((args, kwargs), inputs.append)

    def fn(*values):
        it = iter(values)
        a, k = fx.node.map_arg((args, kwargs), lambda _: next(it))
        return call(*a, **k)

    return fn, inputs


def _node_callable(node: fx.Node):
    """The function a call_function / call_method node calls, out of place."""
    target = node.target
    if isinstance(target, str):
        name = target.rstrip("_") if target.endswith("_") and not target.startswith("_") else target
        return lambda first, *rest, **kw: getattr(first, name)(*rest, **kw)
    return {operator.iadd: operator.add, operator.imul: operator.mul, operator.itruediv: operator.truediv}.get(
        target, target)


def build(model: nn.Module, composite: Composite, options: Options) -> fx.GraphModule:
    """The explainer graph of ``model`` under ``composite``."""
    passthrough_types = tuple(p for p in options.passthrough if isinstance(p, type))
    passthrough_names = {p for p in options.passthrough if isinstance(p, str)}
    view = eval_view(model, keep_hooks=False)
    gm = trace(view, passthrough_types)
    first_name = composite.first_layer(view)
    graph = gm.graph
    new_modules: dict[str, nn.Module] = {}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise TypeError(f"{type(model).__name__}.forward takes {len(placeholders)} inputs; "
                        "fastlrp explains models with exactly one input tensor")

    _rebind_in_place(graph)
    folds = _batchnorm_folds(gm, lambda site, m: site in passthrough_names or isinstance(m, passthrough_types)) \
        if options.fold_batchnorm else {}
    _mark_gates(gm)
    _mark_attention(gm)
    values = _Values(graph)

    def resolve(site: str, module: nn.Module) -> Rule:
        rule = composite.rule_for(site, module, first_name)
        return Gradient() if rule is None else rule

    seen_sites: dict[str, int] = {}

    def replace(node: fx.Node, layer: nn.Module, inputs: list):
        # a module called twice (a shared ReLU) gets a layer per call: "relu", "relu#1", ...
        count = seen_sites.get(layer.site, 0)
        seen_sites[layer.site] = count + 1
        if count:
            layer.site = f"{layer.site}#{count}"
        key = f"lrp_{len(new_modules)}"
        new_modules[key] = layer
        gm.add_submodule(key, layer)
        with graph.inserting_before(node):
            new = graph.call_module(key, tuple(inputs))
        new.meta = dict(node.meta)
        values.take_over(node, new)
        node.replace_all_uses_with(new)
        graph.erase_node(node)

    for node in list(graph.nodes):
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            site = node.target
            if site in passthrough_names or isinstance(module, passthrough_types):
                replace(node, GradientLayer(site, module), list(node.args))  # an eval-mode view
                continue
            layer = _module_layer(node, site, module, resolve, options, folds, values)
            if layer is None:  # folded into its predecessor
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
                continue
            replace(node, layer, getattr(layer, "graph_inputs", None) or list(node.args))
        elif node.op in ("call_function", "call_method"):
            if node not in values.carrying:
                continue  # shape arithmetic, assertions, constants: no relevance passes here
            site = _site_name(node)
            layer = _functional_layer(node, site, resolve, options, passthrough_names, values)
            if layer is not None:
                replace(node, layer, getattr(layer, "graph_inputs", None) or _node_args(node))
        elif node.op == "output":
            if not isinstance(node.args[0], fx.Node):
                raise TypeError(f"{type(model).__name__}.forward returns {type(node.args[0]).__name__}; "
                                "fastlrp explains models whose output is one tensor")

    _mark_nonnegative_inputs(gm)
    gm.delete_all_unused_submodules()
    graph.lint()
    gm.recompile()
    return gm


def _check_rule(site: str, module_type: str, rule: Rule, allowed: tuple):
    if not isinstance(rule, allowed):
        names = ", ".join(sorted({c.__name__ for c in allowed}))
        raise TypeError(f"{site} ({module_type}) cannot take the rule {rule!r}; rules for it: {names}")


def _module_layer(node, site, module, resolve, options, folds, values):
    kind = type(module).__name__
    if layers.overrides_forward(module):
        base = next(c for c in type(module).__mro__ if c.__module__.startswith("torch.nn"))
        raise UnsupportedLayerError(
            f"{site} ({kind}, from {type(module).__module__}) is an nn.{base.__name__} whose forward() differs from "
            f"torch's; fastlrp computes nn.{base.__name__} from its parameters and would silently skip that code. "
            f"Pass passthrough=[{kind}] or passthrough=['{site}'] to explain it by its plain gradient"
            + (", or explain fastlrp.integrations.timm.prepare(model)" if kind in ("BatchNormAct2d",) else "")
            + ".")
    if isinstance(module, layers.Normalization + (nn.MultiheadAttention,)):
        rule = resolve(site, module)
        _check_rule(site, kind, rule, (LayerNormIdentity, Gradient) if isinstance(module, layers.Normalization)
                    else (AttnLRP, Gradient))
        fn, inputs = _bind(eval_forward(module), node.args, node.kwargs)
        pair = isinstance(module, nn.MultiheadAttention)
        if pair:
            _check_attention_weights_unused(node, site)
        if isinstance(rule, Gradient):
            return _with_inputs(GradientLayer(site, (lambda *v: fn(*v)[0]) if pair else fn), inputs, pair)
        return _with_inputs(BlockLayer(site, rule, fn, values.carried(inputs), returns_pair=pair), inputs)
    if isinstance(module, nn.Softmax):
        rule = resolve(site, module)
        _check_rule(site, kind, rule, (SoftmaxRule, Gradient))
        if isinstance(rule, Gradient):
            return GradientLayer(site, eval_forward(module))
        return SoftmaxLayer(site, rule, eval_forward(module), module.dim if module.dim is not None else -1)
    if isinstance(module, layers.Linear):
        rule = resolve(site, module)
        _check_rule(site, kind, rule, (LinearRule, Gradient))
        return AffineLayer(site, rule, module, folds.get(node))
    if isinstance(module, layers.BatchNorm):
        if node in folds:
            return None
        rule = resolve(site, module)
        _check_rule(site, kind, rule, (Pass, Gradient))
        return ElementwiseLayer(site, rule, batchnorm_forward(module))
    if isinstance(module, layers.Activation):
        rule = resolve(site, module)
        _check_rule(site, kind, rule, (Pass, Gradient) + ((GuidedBackprop, DeconvNet)
                                                          if isinstance(module, nn.ReLU) else ()))
        return ElementwiseLayer(site, rule, eval_forward(module), isinstance(module, layers.NonNegative))
    if isinstance(module, layers.AvgPool):
        rule = resolve(site, module)
        _check_rule(site, kind, rule, (Norm, Gradient))
        return _norm_or_gradient(site, rule, eval_forward(module), _pooling_spec(module))
    if isinstance(module, layers.MaxPool):
        return _maxpool_layer(site, kind, module, resolve, options)
    if isinstance(module, layers.Structural):
        keeps_sign = not isinstance(module, nn.Upsample) or module.mode in ("nearest", "nearest-exact", "linear",
                                                                            "bilinear", "trilinear")
        return GradientLayer(site, eval_forward(module), preserves_sign=keeps_sign)
    raise UnsupportedLayerError(
        f"{site} ({kind}, from {type(module).__module__}) has no LRP rule in fastlrp{_where(node)}. "
        f"Pass passthrough=[{kind}] or passthrough=['{site}'] to let relevance through it by the plain gradient, "
        "or give it a rule in your composite if it is a subclass of a supported layer.")


def _maxpool_layer(site, kind, module, resolve, options):
    """The composite's rule for a max pooling, else the one chosen by ``maxpool=``."""
    rule = resolve(site, module)
    if isinstance(rule, Gradient) and options.maxpool == "proportional":
        rule = Proportional()
    _check_rule(site, kind, rule, (Proportional, Gradient))
    return MaxPoolLayer(site, rule, module)


def _norm_or_gradient(site, rule, fn, pooling=None):
    return NormLayer(site, rule, fn, pooling) if isinstance(rule, Norm) else GradientLayer(site, fn, preserves_sign=True)


def _pooling_spec(module: nn.Module):
    """How the native kernels see an average pooling module (None: the reference handles it)."""
    if isinstance(module, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
        return ("avg", module)
    if isinstance(module, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
        return ("adaptive_avg", None)
    return None




def _mark_gates(gm: fx.GraphModule) -> None:
    """Mark sigmoid outputs: multiplied with another tensor they are a gate (squeeze-and-excitation),
    which tells gate from value even where both have the same shape (a 1x1 feature map)."""
    for node in gm.graph.nodes:
        if (node.op == "call_module" and isinstance(gm.get_submodule(node.target), GATE_MODULES)) or \
                (node.op in ("call_function", "call_method") and node.target in GATE_FUNCTIONS):
            node.meta["fastlrp_gate"] = True
        elif node.op in ("call_function", "call_method") and node.target in STRUCTURAL and node.args and \
                isinstance(node.args[0], fx.Node) and node.args[0].meta.get("fastlrp_gate"):
            node.meta["fastlrp_gate"] = True  # a reshaped gate (MONAI's SE blocks: fc(y).view(b, c, 1, 1, 1))


def _batchnorm_folds(gm: fx.GraphModule, passed_through) -> dict:
    """{linear node: batch norm module} for each eval-mode batch norm whose input is the output
    of a linear layer used by nothing else; such a pair computes one affine map. Layers passed through
    (``passed_through(site, module)``) or with a forward of their own are never folded."""
    folds = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), layers.BatchNorm):
            continue
        bn = gm.get_submodule(node.target)
        prev = node.args[0] if node.args else None
        if not (isinstance(prev, fx.Node) and prev.op == "call_module" and len(prev.users) == 1):
            continue
        linear = gm.get_submodule(prev.target)
        if any(passed_through(n.target, m) or layers.overrides_forward(m)
               for n, m in ((node, bn), (prev, linear))):
            continue
        if not isinstance(linear, layers.Linear) or not bn.track_running_stats or bn.running_var is None:
            continue
        if isinstance(linear, nn.modules.conv._ConvTransposeNd) and linear.groups != 1:
            continue
        out_channels = linear.out_features if isinstance(linear, nn.Linear) else linear.out_channels
        if out_channels == bn.num_features:
            folds[prev] = bn
            folds[node] = None  # marks the batch norm itself as folded away
    return folds


def _functional_layer(node, site, resolve, options, passthrough_names, values):
    target = node.target
    tensor_args = values.tensors(node)
    name = _target_name(target)
    if site in passthrough_names or name in passthrough_names:
        return None
    transformer = _transformer_layer(node, site, name, resolve, values)
    if transformer is not False:
        return transformer
    if target in ADD:
        if len(tensor_args) < 2:
            return None  # adding a constant: the gradient passes relevance unchanged
        alpha = node.kwargs.get("alpha", 1.0)
        template = layers.Sum(alpha)
        rule = resolve(site, template)
        _check_rule(site, "residual sum", rule, (Norm, Gradient))
        fn = _bind_functional(node)
        alphas = [1.0] * (len(tensor_args) - 1) + [float(alpha)]
        if isinstance(rule, Norm):
            return NormLayer(site, rule, fn, ("sum", alphas) if alpha >= 0 else None)
        return GradientLayer(site, fn, preserves_sign=alpha >= 0)
    if target in MUL:
        if len(tensor_args) < 2:
            return None  # scaling by a constant keeps its gradient
        gates = [i for i, a in enumerate(tensor_args) if a.meta.get("fastlrp_gate")]
        constants = [i for i, a in enumerate(tensor_args) if a not in values.carrying]
        gate = gates[0] if len(gates) == 1 else (constants[0] if len(constants) == 1 else None)
        return _with_inputs(GatedProductLayer(site, Pass(), gate), tensor_args)
    if not options.functional_rules and (target in ACTIVATIONS or target in POOLS
                                         or target in MEAN or target in SUM):
        nonnegative = target in ACTIVATIONS and issubclass(ACTIVATIONS[target], layers.NonNegative)
        # as Zennit's hooks, which see only modules
        return GradientLayer(site, _bind_functional(node), preserves_sign=target not in ACTIVATIONS,
                             nonnegative_output=nonnegative)
    if target in ACTIVATIONS:
        template = ACTIVATIONS[target]()
        rule = resolve(site, template)
        _check_rule(site, f"{name}()", rule, (Pass, Gradient) + ((GuidedBackprop, DeconvNet)
                                                                  if isinstance(template, nn.ReLU) else ()))
        return ElementwiseLayer(site, rule, _bind_functional(node), isinstance(template, layers.NonNegative))
    if target in POOLS:
        template = _pool_module(node)
        if isinstance(template, layers.MaxPool):
            return _maxpool_layer(site, f"{name}()", template, resolve, options)
        rule = resolve(site, template)
        _check_rule(site, f"{name}()", rule, (Norm, Gradient))
        return _norm_or_gradient(site, rule, _bind_functional(node), _pooling_spec(template))
    if target in MEAN or target in SUM:
        template = layers.Mean(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim"))
        rule = resolve(site, template)
        _check_rule(site, f"{name}()", rule, (Norm, Gradient))
        return _norm_or_gradient(site, rule, _bind_functional(node))
    if target in STRUCTURAL or name in EVAL_IDENTITIES or name in STRUCTURAL_HELPERS:
        return None
    raise UnsupportedLayerError(
        f"{site}: the operation {name}() has no LRP rule in fastlrp{_where(node)}. "
        f"Pass passthrough=['{name}'] to let relevance through it by the plain gradient.")


def _with_inputs(layer, inputs, returns_pair: bool = False):
    """Tell ``build`` which graph nodes feed ``layer`` (when not simply the node's tensor arguments)."""
    layer.graph_inputs = list(inputs)
    if returns_pair:  # a GradientLayer standing for nn.MultiheadAttention answers (output, None) too
        layer.forward = _pair(layer.forward)
    return layer


def _pair(forward):
    return lambda *inputs: (forward(*inputs), None)


def _check_attention_weights_unused(node, site):
    for user in node.users:
        is_item = user.op == "call_function" and user.target is operator.getitem
        if not (is_item and (user.args[1] == 0 or not user.users)):  # x, _ = attention(...) is fine
            raise UnsupportedLayerError(
                f"{site} (MultiheadAttention){_where(user)}: only its output ([0]) may be used; fastlrp gives no "
                "relevance to the returned attention weights (call it with need_weights=False)")


def _transformer_layer(node, site, name, resolve, values):
    """The layer for a transformer op (scaling, products, softmax, norms, attention, fx-wrapped helpers),
    None to keep the node's gradient, or False when ``node`` is none of these."""
    target = node.target
    fn, inputs = _bind(_node_callable(node), node.args, node.kwargs)
    carrying = values.carried(inputs)
    n_carrying = sum(carrying)
    if (target in MUL and n_carrying == 1 and len(values.tensors(node)) == 1) or target in NEG or \
            (target in DIV and n_carrying == 1 and node.args[0] in values.carrying):
        rule = resolve(site, layers.Scale())  # by a number, a shape value or (dividing) a constant tensor
        if rule is None or isinstance(rule, Gradient):
            return None  # its gradient (Zennit's presets see no module here)
        _check_rule(site, f"{name}()", rule, (Pass,))
        return _with_inputs(ScaleLayer(site, rule, fn, carrying.index(True)), inputs)
    if target in DIV:
        raise UnsupportedLayerError(
            f"{site}: {name}() divides by a tensor that carries relevance{_where(node)}; fastlrp has no rule for "
            "that. Put it in a function wrapped with torch.fx.wrap (explained as one block) or pass "
            f"passthrough=['{name}'].")
    if target in MATMUL or (target in MUL and n_carrying == 2 and len(values.tensors(node)) == 2):
        rule = resolve(site, layers.Product())
        if rule is None or isinstance(rule, Gradient):
            return False if target in MUL else None
        _check_rule(site, f"{name}()", rule, (Uniform,))
        attention = tuple(bool(n.meta.get("fastlrp_attention")) for n in inputs)
        return _with_inputs(BilinearLayer(site, rule, fn, carrying, attention), inputs)
    if target in SOFTMAX:
        rule = resolve(site, nn.Softmax())
        if rule is None or isinstance(rule, Gradient):
            return None
        _check_rule(site, f"{name}()", rule, (SoftmaxRule,))
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else -1)
        return _with_inputs(SoftmaxLayer(site, rule, fn, dim), inputs)
    if target in NORMALIZATIONS:
        return _block(site, f"{name}()", layers.Normalization[0](1), (LayerNormIdentity,), fn, inputs, carrying,
                      resolve)
    if target in ATTENTION_FUNCTIONS or (node.op == "call_function" and _is_wrapped_helper(target)
                                         and name not in STRUCTURAL_HELPERS and name not in EVAL_IDENTITIES):
        # a wrapped helper may write into its inputs (MViT's _add_rel_pos); torch's functions do not
        lighter = helpers.lighter_version(target)
        return _block(site, f"{name}()", layers.Function(name), (AttnLRP,), fn, inputs, carrying, resolve,
                      writes_inputs=target not in ATTENTION_FUNCTIONS,
                      lighter_fn=None if lighter is None else _bind(lighter, node.args, node.kwargs)[0])
    return False


def _block(site, label, template, allowed, fn, inputs, carrying, resolve, writes_inputs=False, lighter_fn=None):
    rule = resolve(site, template)
    _check_rule(site, label, rule, allowed + (Gradient,))
    if isinstance(rule, Gradient):
        return _with_inputs(GradientLayer(site, fn), inputs)
    return _with_inputs(BlockLayer(site, rule, fn, carrying, writes_inputs=writes_inputs, lighter_fn=lighter_fn),
                        inputs)


def _is_wrapped_helper(target) -> bool:
    """A function torch.fx recorded whole although it is not torch's: one wrapped with torch.fx.wrap
    (torchvision's window attention and MViT helpers, or the user's own)."""
    module = (getattr(target, "__module__", None) or "").split(".")[0]
    return callable(target) and module not in ("", "torch", "_operator", "operator", "builtins", "math")


def _rebind_in_place(graph: fx.Graph) -> None:
    """``x.add_(y)`` changes ``x`` for every op after it, but the explainer computes out of place: those
    ops read the in-place op's result instead. A wrapped helper whose result nobody reads (MViT's
    ``_add_shortcut(x, q)``) can only be there for what it writes into its first argument."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        first = node.args[0] if node.args else None
        if not isinstance(first, fx.Node):
            continue
        in_place = (node.op == "call_method" and isinstance(node.target, str) and node.target.endswith("_")
                    and not node.target.startswith("_") and node.target != "requires_grad_") or \
            node.kwargs.get("inplace") is True or \
            (node.op == "call_function" and not node.users and _is_wrapped_helper(node.target))
        if not in_place:
            continue
        for user in list(first.users):
            if user is not node and order[user] > order[node]:
                user.replace_input_with(first, node)


def _mark_attention(gm: fx.GraphModule) -> None:
    """Mark softmax outputs and what only reshapes them (dropout, views): attention weights, which
    CP-LRP holds constant in the product with the values."""
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method") and node.target in SOFTMAX or \
                (node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Softmax)):
            node.meta["fastlrp_attention"] = True
        elif node.op in ("call_function", "call_method") and node.target in STRUCTURAL:
            first = _node_args(node)[:1]
            if first and first[0].meta.get("fastlrp_attention"):
                node.meta["fastlrp_attention"] = True
        elif node.op == "call_module" and isinstance(gm.get_submodule(node.target), layers.Structural):
            first = _node_args(node)[:1]
            if first and first[0].meta.get("fastlrp_attention"):
                node.meta["fastlrp_attention"] = True




def _mark_nonnegative_inputs(gm: fx.GraphModule) -> None:
    """Tell each linear layer whether its input is never negative, from the graph alone
    (after a ReLU, through pooling, sums and reshapes); there its rule's x- parts are zero."""
    nonnegative = {}
    for node in gm.graph.nodes:
        inputs = _node_args(node)
        if node.op == "call_module":
            layer = gm.get_submodule(node.target)
            nonnegative[node] = bool(getattr(layer, "nonnegative_output", False)) or (
                bool(getattr(layer, "preserves_sign", False)) and bool(inputs)
                and all(nonnegative.get(a, False) for a in inputs))
            if isinstance(layer, AffineLayer):
                layer.nonnegative_input = bool(inputs) and nonnegative.get(inputs[0], False)
        elif node.op in ("call_function", "call_method"):
            nonnegative[node] = (node.target in SIGN_KEEPING and bool(inputs)
                                 and all(nonnegative.get(a, False) for a in inputs))
        else:
            nonnegative[node] = False
