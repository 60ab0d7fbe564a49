"""Tensors as the views fastlrp._C takes: (name, data pointer, dtype code, device type,
device index, sizes, strides). The extension never sees a torch object (docs/design.md, section 7)."""

from __future__ import annotations

import torch

DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3, torch.int64: 4}


def view(t: torch.Tensor, name: str) -> tuple:
    return (name, t.data_ptr(), DTYPE_CODES[t.dtype], 1 if t.device.type == "cuda" else 0,
            -1 if t.device.index is None else t.device.index, list(t.shape), list(t.stride()))


def collapse_spatial(t: torch.Tensor, name: str) -> torch.Tensor:
    """(N, C, *spatial) -> (N, C, S) without copying. Works for contiguous, channels-last and
    broadcast (stride 0) tensors; anything else is an error naming the tensor."""
    if t.ndim < 2:
        raise ValueError(f"{name} must have a batch and a channel dimension, got shape {tuple(t.shape)}")
    n, c, spatial = t.shape[0], t.shape[1], t.shape[2:]
    size, base, expected = 1, None, None
    for dim in range(t.ndim - 1, 1, -1):
        size *= t.shape[dim]
        if t.shape[dim] == 1:
            continue  # a unit dimension's stride is arbitrary
        if base is not None and t.stride(dim) != expected:
            raise ValueError(f"{name} has a memory layout whose spatial dimensions cannot be flattened "
                             f"(shape {tuple(t.shape)}, strides {t.stride()}); pass a contiguous or "
                             "channels-last tensor")
        if base is None:
            base = t.stride(dim)
        expected = t.stride(dim) * t.shape[dim]
    return t.as_strided((n, c, size), (t.stride(0), t.stride(1), 1 if base is None else base))


def stream_of(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.device.type == "cuda" else 0
