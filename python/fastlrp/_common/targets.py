"""What ``target`` means, in one place: the engine, the methods, the metrics and the analysis code
all turn a user's target into starting relevance (weights over the output) or class indices here.

A target is a class index, one index per sample, a weight tensor broadcast to the output (e.g.
one-hot), a callable mapping the output to the starting relevance, or None (the predicted class; for a
dense output of shape (N, C, ...), such as a segmentation map, the predicted class at each position).
"""

from __future__ import annotations

import numbers

import torch

_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def starting_relevance(output: torch.Tensor, target, start: str = "logit") -> torch.Tensor:
    """The relevance placed on the output before the backward pass.

    ``start="logit"``: output * weights (relevance starts from the target logit); ``start="one"``:
    the weights themselves."""
    if callable(target) and not isinstance(target, torch.Tensor):
        start_rel = target(output.detach())
        if not isinstance(start_rel, torch.Tensor) or start_rel.shape != output.shape:
            raise ValueError(f"target callable must return a tensor of the output's shape {tuple(output.shape)}")
        return start_rel.to(output.dtype)
    if output.ndim < 2:
        raise ValueError(f"model output of shape {tuple(output.shape)} has no class dimension; "
                         "pass target as a callable returning the starting relevance")
    if target is None and output.ndim > 2:  # a dense output (segmentation): each position's predicted class
        target = torch.zeros_like(output).scatter_(1, output.detach().argmax(1, keepdim=True), 1.0)
    elif target is None:
        target = output.detach().argmax(1)
    if isinstance(target, int) or (isinstance(target, torch.Tensor) and target.dtype in _INDEX_DTYPES):
        index = torch.as_tensor(target, device=output.device).long()
        if index.ndim == 0:
            index = index.expand(output.shape[0])
        if index.shape != (output.shape[0],):
            raise ValueError(f"target indices must be an int or have shape [{output.shape[0]}] (one per sample), "
                             f"got shape {tuple(index.shape)}")
        if output.device.type != "meta" and ((index < 0).any() or (index >= output.shape[1]).any()):
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


def target_weights(output: torch.Tensor, target) -> torch.Tensor:
    """Per-output weights whose dot product with the output is the explained score
    (``starting_relevance`` with ``start="one"``)."""
    return starting_relevance(output, target, "one")


def class_indices(output: torch.Tensor, target) -> torch.Tensor:
    """One class index per sample (int64 [N] on the output's device) from None (each sample's
    predicted class), an int, or an integer tensor with one index (or one per sample).

    For the metrics, which score one class per sample: weights and callables are refused."""
    n, num_classes = output.shape[0], output.shape[1]
    if target is None:
        return output.argmax(1)
    if isinstance(target, bool):
        raise TypeError("target must be None, an int or an integer tensor, got bool")
    if isinstance(target, numbers.Integral):
        index = torch.full((n,), int(target), dtype=torch.long, device=output.device)
    elif isinstance(target, torch.Tensor) and not target.is_floating_point() and target.dtype != torch.bool:
        index = target.to(output.device).long().reshape(-1)
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


def fixed_class_indices(target, n: int, device, why: str) -> torch.Tensor:
    """One class index per sample (int64 [n]) given without looking at an output: an int, a
    sequence or an integer tensor. None and weights are refused (``why`` says why)."""
    if target is None or isinstance(target, bool) or (isinstance(target, torch.Tensor) and target.is_floating_point()):
        raise TypeError(f"target must be a class index or one index per sample ({why}), got {target!r}")
    index = torch.as_tensor(target, device=device).long()
    if index.ndim == 0:
        index = index.expand(n)
    if index.shape != (n,):
        raise ValueError(f"target must be one class index per sample ({n}), got shape {tuple(index.shape)}")
    return index
