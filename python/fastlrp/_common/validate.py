"""Argument checks shared by the methods, the metrics and the analysis code. Each returns the
checked value (converted where that is the point, e.g. an int) and raises an error that names
the argument at fault."""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn


class OptionTypeError(TypeError, ValueError):
    """An option of the wrong type (a float where an int is needed, a string for a number).

    Both a TypeError and a ValueError: the metrics raised the first and the methods the second
    before the checks were merged, and code that catches either keeps working."""


def check_model(model, argument: str = "model") -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{argument} must be a torch.nn.Module, got {type(model).__name__}")
    return model


def check_callable(value, argument: str, expected: str):
    """``value`` must be callable; ``expected`` describes what it maps, e.g. "(x, target) -> relevance"."""
    if not callable(value):
        raise TypeError(f"{argument} must be a callable {expected}, got {type(value).__name__}")
    return value


def check_tensor(name: str, value, *, ndim_min: int = 1, floating: bool = True) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if value.ndim < ndim_min:
        raise ValueError(f"{name} must have at least {ndim_min} dimensions, got shape {tuple(value.shape)}")
    return value


def check_input(model: nn.Module, x, name: str = "x") -> torch.Tensor:
    """A batch for ``model``: a floating-point tensor [N, features] or [N, C, ...] on the model's device."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"{name} must be batched: [N, features] or [N, C, ...], got shape {tuple(x.shape)}")
    param = next(model.parameters(), None)
    if param is not None and param.device != x.device:
        raise ValueError(f"{name} is on {x.device} but the model's parameters are on {param.device}")
    return x


def model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    """Where the model's parameters live (``fallback`` for a parameterless model)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else fallback


def model_dtype(model: nn.Module, fallback: torch.dtype) -> torch.dtype:
    param = next(model.parameters(), None)
    return param.dtype if param is not None else fallback


def positive_int(name: str, value, minimum: int = 1) -> int:
    """An integer >= ``minimum`` (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise OptionTypeError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def number(name: str, value, minimum: float = 0.0, strict: bool = False) -> float:
    """A finite number >= ``minimum`` (> with ``strict``)."""
    bound = f"> {minimum}" if strict else f">= {minimum}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise OptionTypeError(f"{name} must be a finite number {bound}, got {value!r}")
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def fraction(name: str, value, *, allow_zero: bool = False) -> float:
    """A number in (0, 1] ([0, 1] with ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise OptionTypeError(f"{name} must be a number, got {type(value).__name__}")
    low_ok = value >= 0 if allow_zero else value > 0
    if not (low_ok and value <= 1):
        raise ValueError(f"{name} must lie in {'[0' if allow_zero else '(0'}, 1], got {value}")
    return float(value)


def choice(name: str, value, options):
    if value not in options:
        raise ValueError(f"{name} must be one of {list(options)}, got {value!r}")
    return value


def per_dim(name: str, value, ndim: int) -> tuple:
    """An int for every spatial dimension, or a tuple with one per dimension."""
    values = (value,) * ndim if isinstance(value, int) and not isinstance(value, bool) else tuple(value)
    if len(values) != ndim or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"{name} must be a positive int or {ndim} positive ints (one per spatial "
                         f"dimension), got {value!r}")
    return values


def tri_state(name: str, value):
    """None, True or False (e.g. ``progress``: None means "decide for me")."""
    if value not in (None, True, False):
        raise ValueError(f"{name} must be None, True or False, got {value!r}")
    return value
