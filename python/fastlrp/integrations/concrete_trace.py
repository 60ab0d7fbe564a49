"""Trace a model for one example input, with every shape, size and branch fixed to that example.

torch.fx traces symbolically: ``x.shape`` is a graph value, so code that slices, iterates or branches
on sizes (Hugging Face ``transformers`` everywhere: ``hidden_states.shape[:-1]`` unpacked into a
``view``, position ids sliced to the sequence length, mask helpers) cannot be traced. Here each traced
tensor also carries its value on the example, and everything that is not a tensor (sizes, dtypes,
devices, Python numbers and the truth of conditions on constant tensors) is that value, written into
the graph as a constant. The result is a straight-line ``fx.GraphModule`` for the example's shape,
which ``fastlrp.LRP`` traces again like any model.

What is refused: a condition on a tensor computed from the input (``if x.sum() > 0``) and a number
read from one (``x.max().item()``, an index): they depend on the input values, which the fixed graph
cannot follow.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from .. import layers
from .._common.model_view import eval_view
from ..engine.call import TRACE_LOCK


_VALUE_READS = {"item", "tolist", "__int__", "__float__", "__bool__", "numpy"}
"""Methods that turn a tensor's values (not its shape) into Python values."""


class _ValueProxy(fx.Proxy):
    """A proxy that also holds its value for the example (``_value``) and whether it depends on the
    input (``_from_input``)."""

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        value = getattr(self._value, name)
        if isinstance(value, torch.Tensor) or callable(value):
            return super().__getattr__(name)  # x.T, x.view(...): recorded in the graph
        return value  # x.shape, x.dtype, x.device, x.ndim: the example's

    def __len__(self) -> int:
        return len(self._value)

    def __iter__(self):
        return (self[i] for i in range(len(self._value)))

    def __bool__(self) -> bool:
        return self.tracer.to_bool(self)

    def __index__(self) -> int:
        if self._from_input:
            self.tracer.to_bool(self)  # raises: an index read from the input's values
        return self._value.__index__()


class ConcreteTracer(fx.Tracer):
    """torch.fx tracing that runs the example alongside (see the module docstring). Modules of the
    types fastlrp has rules for (``fastlrp.layers.SUPPORTED``) stay single nodes."""

    def __init__(self, leaf_types: tuple = ()):
        super().__init__()
        self.leaf_types = layers.SUPPORTED + tuple(leaf_types)
        self.record_stack_traces = True
        self._example = None
        self._running = False  # computing a value: fx's patched module calls and attributes step aside
        self.constants = {}  # node -> its value, for tensors computed without the input

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, qualname)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ValueProxy(node, self)

    def trace_example(self, root: nn.Module, example: torch.Tensor) -> fx.Graph:
        self._example = example
        try:
            return self.trace(root)
        finally:
            self._example = None

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        from_input = kind == "placeholder"
        unwrap_count = []

        def value_of(a):
            if isinstance(a, _ValueProxy):
                unwrap_count.append(a._from_input)
                return a._value
            return a

        if kind == "placeholder":
            value = self._example
        else:
            args_v = fx.node.map_aggregate(args, value_of)
            kwargs_v = fx.node.map_aggregate(kwargs, value_of)
            from_input = any(unwrap_count)
            value = self._run(kind, target, args_v, kwargs_v)
        if kind not in ("placeholder", "get_attr") and not _holds_tensor(value):
            if from_input and target in _VALUE_READS:
                raise fx.proxy.TraceError(f"the model reads a number from its input (.{target}()); a graph "
                                          "traced for one example cannot follow that")
            return value  # a size, dtype, number: the example's, a constant in the graph
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        proxy._value = value
        proxy._from_input = from_input
        if not from_input and isinstance(value, torch.Tensor) and kind != "get_attr":
            self.constants[proxy.node] = value
        return proxy

    def _run(self, kind, target, args, kwargs):
        if kind == "get_attr":
            return _attribute(self.root, target)
        self._running = True
        try:
            if kind == "call_function":
                return target(*args, **kwargs)
            if kind == "call_method":
                return getattr(args[0], target)(*args[1:], **kwargs)
            if kind == "call_module":
                return self.root.get_submodule(target)(*args, **kwargs)
        finally:
            self._running = False
        raise NotImplementedError(kind)

    def call_module(self, m, forward, args, kwargs):
        if self._running:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self._running:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def to_bool(self, obj: fx.Proxy) -> bool:
        if getattr(obj, "_from_input", True):
            where = "".join(obj.node.stack_trace.strip().splitlines()[-2:]) if obj.node.stack_trace else ""
            raise fx.proxy.TraceError(
                "the model branches on a value computed from its input; a graph traced for one example "
                f"cannot follow that ({where.strip()})")
        return bool(obj._value)

    def iter(self, obj: fx.Proxy):
        return iter(obj)


def _fold_constants(traced: fx.GraphModule, constants: dict) -> None:
    """Tensors computed without the input (position embeddings, masks, rotary tables) become buffers
    holding their value: no relevance flows there, and the explainer then sees only the input's path."""
    for i, (node, value) in enumerate(constants.items()):
        if not any(user.op != "output" and user not in constants for user in node.users):
            continue  # used only by other constants (folded themselves) or nowhere
        name = f"_constant{i}"
        traced.register_buffer(name, value.detach(), persistent=False)
        with traced.graph.inserting_before(node):
            folded = traced.graph.get_attr(name)
        node.replace_all_uses_with(folded)


def _attribute(root: nn.Module, target: str):
    """``root``'s attribute at the dotted path ``target``, read from the module dicts (not through
    ``nn.Module.__getattr__``, which fx patches while it traces)."""
    obj = root
    for name in target.split("."):
        for store in ("_modules", "_parameters", "_buffers"):
            if name in getattr(obj, "__dict__", {}).get(store, {}):
                obj = obj.__dict__[store][name]
                break
        else:
            obj = object.__getattribute__(obj, name)
    return obj


def _holds_tensor(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_holds_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_tensor(v) for v in value.values())
    return False


def concrete_trace(module: nn.Module, example: torch.Tensor, leaf_types: tuple = (),
                   substitute=None) -> fx.GraphModule:
    """A GraphModule computing ``module(x)`` for inputs shaped like ``example`` (see the module
    docstring). It is traced through an eval-mode view of ``module`` and shares its parameters and
    buffers; ``module`` is not changed. ``substitute(submodule)`` may return a module computing the
    same function from the same parameters, which then takes the submodule's place in the view (a
    layer fastlrp has a rule for, standing in for a library's own class), or None."""
    if not isinstance(example, torch.Tensor):
        raise TypeError(f"example must be a tensor, got {type(example).__name__}")
    view = eval_view(module, keep_hooks=False)
    if substitute is not None:
        for parent in list(view.modules()):
            for name, child in list(parent._modules.items()):
                replacement = None if child is None else substitute(child)
                if replacement is not None:
                    parent._modules[name] = replacement  # the view's own child dict
    tracer = ConcreteTracer(leaf_types)
    try:
        with TRACE_LOCK.writing(), torch.no_grad():  # fx patches nn.Module process-wide while it traces
            graph = tracer.trace_example(view, example)
    except Exception as err:
        raise TypeError(f"fastlrp could not trace {type(module).__name__} for an input of shape "
                        f"{tuple(example.shape)} ({type(err).__name__}: {err})") from err
    traced = fx.GraphModule(tracer.root, graph, class_name=f"Traced{type(module).__name__}")
    _fold_constants(traced, tracer.constants)
    traced.graph.eliminate_dead_code()  # tensors computed for a branch or a size only
    traced.delete_all_unused_submodules()
    traced.recompile()
    return traced
