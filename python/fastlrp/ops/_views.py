"""Tensors as the views fastlrp._C takes: (name, data pointer, dtype code, device type,
device index, sizes, strides). The extension never sees a torch object (docs/design.md, section 7)."""

from __future__ import annotations

import torch

DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3, torch.int64: 4}


def view(t: torch.Tensor, name: str) -> tuple:
    return (name, t.data_ptr(), DTYPE_CODES[t.dtype], 1 if t.device.type == "cuda" else 0,
            -1 if t.device.index is None else t.device.index, list(t.shape), list(t.stride()))


def _spatial_stride(t: torch.Tensor):
    """The stride of the flattened spatial dims of (N, C, *spatial), or False where they cannot be
    flattened without a copy (None: all spatial dims have size one)."""
    base, expected = None, None
    for dim in range(t.ndim - 1, 1, -1):
        if t.shape[dim] == 1:
            continue  # a unit dimension's stride is arbitrary
        if base is not None and t.stride(dim) != expected:
            return False
        if base is None:
            base = t.stride(dim)
        expected = t.stride(dim) * t.shape[dim]
    return base


def flattenable(t: torch.Tensor) -> bool:
    """Whether the kernels can read ``t`` in place: contiguous, channels-last, broadcast (stride 0) and
    other layouts whose spatial dims flatten to one strided dim."""
    return t.ndim >= 2 and _spatial_stride(t) is not False


def readable(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself where the kernels can read it in place, else a contiguous copy (a transposed or
    sliced input, a bound broadcast over some spatial dims only)."""
    return t if flattenable(t) else t.contiguous()


def collapse_spatial(t: torch.Tensor, name: str) -> torch.Tensor:
    """(N, C, *spatial) -> (N, C, S) without copying, for a ``flattenable`` tensor; anything else is an
    error naming the tensor (the public ops pass ``readable`` tensors)."""
    if t.ndim < 2:
        raise ValueError(f"{name} must have a batch and a channel dimension, got shape {tuple(t.shape)}")
    base = _spatial_stride(t)
    if base is False:
        raise ValueError(f"{name} has a memory layout whose spatial dimensions cannot be flattened "
                         f"(shape {tuple(t.shape)}, strides {t.stride()}); pass a contiguous or "
                         "channels-last tensor")
    size = 1
    for n in t.shape[2:]:
        size *= n
    return t.as_strided((t.shape[0], t.shape[1], size), (t.stride(0), t.stride(1), 1 if base is None else base))


def stream_of(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.device.type == "cuda" else 0
