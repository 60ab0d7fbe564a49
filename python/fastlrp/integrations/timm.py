"""timm models for ``fastlrp.LRP``: ``LRP(prepare(model))``.

fastlrp computes a convolution, linear layer or batch norm from the layer's parameters (it folds
batch norms into the convolution before them), not by calling the layer's ``forward``. timm subclasses
these layers and changes ``forward``: ``BatchNormAct2d`` (EfficientNet, MobileNetV3, RegNet, ...) is a
BatchNorm2d followed by its activation, ``StdConv2d`` standardizes its weight, ``Conv2dSame`` pads
by the input size. ``LRP(model)`` refuses such layers by name (it would otherwise skip their code).

``prepare(model)`` returns a view of the model (``_common.model_view.eval_view``: shared parameters
and buffers, the model itself untouched) in which each ``BatchNormAct2d`` is a plain ``BatchNorm2d``
(the same parameters and statistics) followed by its dropout and activation modules. Other subclasses
of these layers that change ``forward`` are refused with their names.
"""

from __future__ import annotations

from torch import nn

from .. import layers
from .._common.model_view import eval_view

def _split_batchnorm_act(module: nn.Module) -> nn.Module | None:
    """BatchNorm2d + drop + act for timm's BatchNormAct2d (same parameters and buffers), else None."""
    if type(module).__name__ != "BatchNormAct2d" or not isinstance(module, nn.BatchNorm2d):
        return None
    norm = nn.BatchNorm2d(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                          device=module.weight.device if module.affine else None)
    for name in ("weight", "bias"):
        setattr(norm, name, getattr(module, name))  # the same Parameter objects
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        norm._buffers[name] = module._buffers.get(name)
    norm.training = False
    return nn.Sequential(norm, module.drop, module.act)


def prepare(model: nn.Module) -> nn.Module:
    """An eval-mode view of the timm ``model`` that fastlrp explains exactly (see the module docstring)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    view = eval_view(model)
    refused = []
    for parent_name, parent in list(view.named_modules()):
        for name, child in list(parent._modules.items()):
            split = None if child is None else _split_batchnorm_act(child)
            if split is not None:
                parent._modules[name] = split  # the view's own child dict
            elif child is not None and layers.overrides_forward(child):
                refused.append(f"{parent_name + '.' if parent_name else ''}{name} ({type(child).__name__})")
    if refused:
        raise TypeError(f"{type(model).__name__} has layers whose forward differs from torch's, which fastlrp "
                        f"would compute from their parameters alone: {', '.join(refused[:5])}"
                        f"{' ...' if len(refused) > 5 else ''}")
    return view
