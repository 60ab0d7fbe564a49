"""Tensors as the views fastlrp._C takes: (name, data pointer, dtype code, device type,
device index, sizes, strides). The extension never sees a torch object (docs/design.md, section 7)."""

from __future__ import annotations

import torch

DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3, torch.int64: 4}


def _device(t: torch.Tensor) -> tuple:
    return (1, t.get_device()) if t.is_cuda else (0, -1)


def view(t: torch.Tensor, name: str) -> tuple:
    return (name, t.data_ptr(), DTYPE_CODES[t.dtype], *_device(t), list(t.shape), list(t.stride()))


def _spatial_stride(shape, strides):
    """The stride of the flattened spatial dims of (N, C, *spatial), or False where they cannot be
    flattened without a copy (None: all spatial dims have size one)."""
    base, expected = None, None
    for dim in range(len(shape) - 1, 1, -1):
        if shape[dim] == 1:
            continue  # a unit dimension's stride is arbitrary
        if base is not None and strides[dim] != expected:
            return False
        if base is None:
            base = strides[dim]
        expected = strides[dim] * shape[dim]
    return base


def flattenable(t: torch.Tensor) -> bool:
    """Whether the kernels can read ``t`` in place: contiguous, channels-last, broadcast (stride 0) and
    other layouts whose spatial dims flatten to one strided dim."""
    return t.ndim >= 2 and _spatial_stride(t.shape, t.stride()) is not False


def readable(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself where the kernels can read it in place, else a contiguous copy (a transposed or
    sliced input, a bound broadcast over some spatial dims only)."""
    return t if flattenable(t) else t.contiguous()


def _collapsed(t: torch.Tensor, name: str) -> tuple:
    """(sizes, strides) of ``t`` as (N, C, S); anything that does not flatten is an error naming the
    tensor (the public ops pass ``readable`` tensors)."""
    shape, strides = t.shape, t.stride()
    if len(shape) < 2:
        raise ValueError(f"{name} must have a batch and a channel dimension, got shape {tuple(shape)}")
    base = _spatial_stride(shape, strides)
    if base is False:
        raise ValueError(f"{name} has a memory layout whose spatial dimensions cannot be flattened "
                         f"(shape {tuple(shape)}, strides {strides}); pass a contiguous or "
                         "channels-last tensor")
    size = 1
    for n in shape[2:]:
        size *= n
    return [shape[0], shape[1], size], [strides[0], strides[1], 1 if base is None else base]


def collapse_spatial(t: torch.Tensor, name: str) -> torch.Tensor:
    """(N, C, *spatial) -> (N, C, S) without copying, for a ``flattenable`` tensor."""
    sizes, strides = _collapsed(t, name)
    return t.as_strided(sizes, strides)


def flat_view(t: torch.Tensor, name: str) -> tuple:
    """``view(collapse_spatial(t, name), name)`` without creating the intermediate tensor: the ops build
    several of these per call, and each tensor created costs microseconds."""
    sizes, strides = _collapsed(t, name)
    return (name, t.data_ptr(), DTYPE_CODES[t.dtype], *_device(t), sizes, strides)


def stream_of(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.device.type == "cuda" else 0
