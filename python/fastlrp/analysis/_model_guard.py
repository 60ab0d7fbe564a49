"""Run a user's model for analysis without leaving a trace on it.

Analysis code needs the model in eval mode (batch norm must not update its running
statistics while an image is optimized) and needs to read hidden layers through forward
hooks. Both are undone on the way out, also when the caller's code raises.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn


@contextmanager
def evaluating(*modules: nn.Module) -> Iterator[None]:
    """Put ``modules`` (and all their submodules) in eval mode; restore each flag on exit."""
    saved = [(m, m.training) for module in modules if isinstance(module, nn.Module) for m in module.modules()]
    try:
        for module in modules:
            if isinstance(module, nn.Module):
                module.eval()
        yield
    finally:
        for m, training in saved:
            m.training = training


def resolve_layer(model: nn.Module, layer: str, argument: str = "layer") -> nn.Module:
    """The submodule named ``layer``; a ValueError naming ``argument`` and the valid names if there is none."""
    if not isinstance(layer, str):
        raise TypeError(f"{argument} must be a module name (str), got {type(layer).__name__}")
    modules = dict(model.named_modules())
    if layer not in modules or layer == "":
        names = [name for name in modules if name]
        raise ValueError(f"{argument}={layer!r} is not a module of {type(model).__name__}; "
                         f"names are {names[:12]}{' ...' if len(names) > 12 else ''}")
    return modules[layer]


@contextmanager
def capturing_outputs(model: nn.Module, layers: Iterable[str], argument: str = "layer") -> Iterator[dict]:
    """Record the output of each named module in the yielded dict (refreshed on every forward pass)."""
    store: dict = {}
    modules = {name: resolve_layer(model, name, argument) for name in layers}
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
