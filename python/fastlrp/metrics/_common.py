"""Argument checks and small helpers shared by the metrics."""

from __future__ import annotations

import contextlib
import numbers

import torch
from torch import nn


def check_tensor(name: str, value, *, ndim_min: int = 1, floating: bool = True) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if value.ndim < ndim_min:
        raise ValueError(f"{name} must have at least {ndim_min} dimensions, got shape {tuple(value.shape)}")
    return value


def check_positive_int(name: str, value, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_fraction(name: str, value, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    low_ok = value >= 0 if allow_zero else value > 0
    if not (low_ok and value <= 1):
        raise ValueError(f"{name} must lie in {'[0' if allow_zero else '(0'}, 1], got {value}")
    return float(value)


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_model(model) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    """Where the model's parameters live (``fallback`` for a parameterless model)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else fallback


def model_dtype(model: nn.Module, fallback: torch.dtype) -> torch.dtype:
    param = next(model.parameters(), None)
    return param.dtype if param is not None else fallback


@torch.no_grad()
def forward_in_batches(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """model(x) chunk by chunk on the model's device, in eval mode (a training-mode batch norm
    would update its running statistics); the output comes back on x's device."""
    device = model_device(model, x.device)
    dtype = model_dtype(model, x.dtype)
    with eval_mode(model):
        return torch.cat([model(chunk.to(device, dtype)).to(x.device) for chunk in x.split(batch_size)])


def resolve_target(target, logits: torch.Tensor) -> torch.Tensor:
    """One class index per sample (int64 [N] on logits' device) from None, an int or a tensor.

    None means each sample's predicted class."""
    n, num_classes = logits.shape[0], logits.shape[1]
    if target is None:
        return logits.argmax(1)
    if isinstance(target, bool):
        raise TypeError("target must be None, an int or an integer tensor, got bool")
    if isinstance(target, numbers.Integral):
        index = torch.full((n,), int(target), dtype=torch.long, device=logits.device)
    elif isinstance(target, torch.Tensor) and not target.is_floating_point() and target.dtype != torch.bool:
        index = target.to(logits.device).long().reshape(-1)
        if index.numel() == 1:
            index = index.expand(n)
        if index.shape != (n,):
            raise ValueError(f"target must hold one class index per sample ({n}), got shape {tuple(target.shape)}")
    else:
        raise TypeError(f"target must be None, an int or an integer tensor, got {type(target).__name__}"
                        + (f" of dtype {target.dtype}" if isinstance(target, torch.Tensor) else ""))
    if (index < 0).any() or (index >= num_classes).any():
        raise ValueError(f"target index out of range for {num_classes} classes: {index.unique().tolist()}")
    return index.clone()


def pixel_map(relevance: torch.Tensor, name: str = "relevance") -> torch.Tensor:
    """[N, H, W] (or [N, *spatial]) relevance per pixel: channels summed for [N, C, H, W] inputs.

    A tensor with one more dimension than the spatial map is read as [N, C, ...]; 3-D tensors
    are taken to be [N, H, W] already."""
    check_tensor(name, relevance, ndim_min=2)
    return relevance.sum(1) if relevance.ndim >= 4 else relevance


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of each row of a with the same row of b (ties get average ranks)."""
    from scipy.stats import rankdata

    ranks_a = torch.from_numpy(rankdata(a.detach().double().cpu().numpy(), axis=1))
    ranks_b = torch.from_numpy(rankdata(b.detach().double().cpu().numpy(), axis=1))
    ranks_a = ranks_a - ranks_a.mean(1, keepdim=True)
    ranks_b = ranks_b - ranks_b.mean(1, keepdim=True)
    denominator = (ranks_a.norm(dim=1) * ranks_b.norm(dim=1))
    # A constant row has no ranking; report 0 correlation rather than NaN.
    return torch.where(denominator > 0, (ranks_a * ranks_b).sum(1) / denominator.clamp_min(1e-300),
                       torch.zeros_like(denominator))


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Run the model in eval mode, then give every submodule back its own training flag."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training
