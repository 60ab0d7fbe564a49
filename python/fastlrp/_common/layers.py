"""Naming a layer of a model, and reading its output during a forward pass.

Hooks go on whatever module tree is passed in: callers pass an ``eval_view`` of the user's
model, so the user's own modules never carry a hook of ours."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn


def find_module(model: nn.Module, layer, argument: str = "layer", allow_module: bool = True) -> tuple:
    """(name, module) for a module name of ``model`` (or, with ``allow_module``, one of its modules).

    Errors name ``argument`` and list the valid names."""
    named = dict(model.named_modules())
    if allow_module and isinstance(layer, nn.Module):
        for name, module in named.items():
            if module is layer:
                return name, module
        raise ValueError(f"{argument} is a {type(layer).__name__} that is not part of the model")
    if not isinstance(layer, str):
        kind = "a module name or a module of the model" if allow_module else "a module name (str)"
        raise TypeError(f"{argument} must be {kind}, got {type(layer).__name__}")
    if layer not in named or layer == "":
        names = [name for name in named if name]
        close = [name for name in names if layer and layer in name][:5]
        hint = (f"did you mean one of {close}?" if close
                else f"names are {names[:12]}{' ...' if len(names) > 12 else ''}")
        raise ValueError(f"{argument}={layer!r} is not a module of {type(model).__name__}; {hint}")
    return layer, named[layer]


@contextmanager
def capturing_outputs(model: nn.Module, layers: Iterable[str], argument: str = "layer") -> Iterator[dict]:
    """Record the output of each named module in the yielded dict (refreshed on every forward pass);
    the hooks are removed on exit."""
    store: dict = {}
    modules = {name: find_module(model, name, argument, allow_module=False)[1] for name in layers}
    handles = []
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(_keep_output(store, name)))
        yield store
    finally:
        for handle in handles:
            handle.remove()


def _keep_output(store: dict, name: str):
    def hook(module, inputs, output):
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"layer {name!r} ({type(module).__name__}) returns {type(output).__name__}, "
                            "not a tensor; pick a layer whose output is one tensor")
        store[name] = output
    return hook
