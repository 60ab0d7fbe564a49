"""Run a user's model in eval mode without ever touching it.

``eval_view(model)`` is a second module tree over the same parameters and buffers: every module is
a shallow copy with its own training flag (False), its own child dict and its own hook dicts. Calling
it, tracing it or hooking it changes nothing on ``model``, so it is safe while another thread trains,
explains or builds an explainer on the same model. Parameter and buffer dicts are shared, so later
weight updates (also ``.data`` edits and replaced parameters) are seen through the view.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

from torch import nn

# nn.Module's per-instance hook registries: a view gets copies, so hooks added to it stay on it
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")


def eval_view(model: nn.Module, keep_hooks: bool = True, own_tensor_dicts: bool = False) -> nn.Module:
    """An eval-mode view of ``model`` that shares its parameters and buffers (see the module docstring).

    ``keep_hooks=False`` drops the user's forward/backward hooks from the view (the LRP graph does:
    a user's hook must not alter the relevance pass). ``own_tensor_dicts=True`` gives every module
    of the view its own parameter and buffer dicts (holding the same tensors), so that swapping a
    tensor in the view (``torch.func.functional_call`` does) leaves the model's dicts alone; the
    view then no longer sees parameters the user replaces later."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    memo: dict[int, nn.Module] = {}

    def view(module: nn.Module) -> nn.Module:
        if id(module) in memo:  # a module used at two places (tied layers) stays one module
            return memo[id(module)]
        clone = copy.copy(module)  # a new __dict__; the values are still the original's
        memo[id(module)] = clone
        object.__setattr__(clone, "training", False)
        object.__setattr__(clone, "_modules", {name: None if child is None else view(child)
                                                for name, child in module._modules.items()})
        if own_tensor_dicts:
            object.__setattr__(clone, "_parameters", copy.copy(module._parameters))
            object.__setattr__(clone, "_buffers", copy.copy(module._buffers))
        for name in _HOOK_DICTS:
            if name in module.__dict__:
                hooks = module.__dict__[name]
                kept = OrderedDict(hooks) if keep_hooks or name.startswith(("_state", "_load")) else OrderedDict()
                object.__setattr__(clone, name, kept)
        return clone

    return view(model)


def training_warning(model: nn.Module) -> str | None:
    """The one warning text for explaining a model left in training mode (None if it is in eval mode)."""
    if not model.training:
        return None
    return (f"{type(model).__name__} is in training mode; fastlrp explains it in eval mode (running batch-norm "
            "statistics, no dropout) through a view, without changing the model. Call model.eval() to silence this.")
