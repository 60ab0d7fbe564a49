"""The Triton kernels (``fastlrp.kernels``) as custom torch ops, ``torch.ops.fastlrp.triton_*``.

Each op is a ``torch.library.triton_op``: its body allocates the outputs with torch and launches
the kernels through ``wrap_triton``, so torch.compile sees (and can fuse around) the kernels.
Where no Triton kernel can run (a CPU tensor outside ``TRITON_INTERPRET=1``, float64) the body
computes the same formulas with plain torch ops: the reference implementation of the op.

The public wrappers (``affine_forward``, ``affine_relevance``, ``pool_relevance``,
``sum_relevance``) validate their arguments and name the bad one in the error.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .lrp_ops import _output_format, check_pool_shapes
from .triton_fallback import forward_torch, pool_torch, relevance_torch, sum_torch

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _load_kernels():
    """``fastlrp.kernels``: installed next to the package, or the repository's kernels/ in a
    source checkout (PYTHONPATH=python). None where Triton is missing."""
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        from .. import kernels
    except ImportError:
        root = Path(__file__).resolve().parents[3] / "kernels"
        if not (root / "__init__.py").exists():
            return None
        spec = importlib.util.spec_from_file_location("fastlrp.kernels", root / "__init__.py",
                                                      submodule_search_locations=[str(root)])
        kernels = importlib.util.module_from_spec(spec)
        sys.modules["fastlrp.kernels"] = kernels
        spec.loader.exec_module(kernels)
    from fastlrp.kernels import affine_lrp, pool_lrp
    return affine_lrp, pool_lrp


_KERNELS = _load_kernels()


def kernels_available() -> bool:
    """Whether Triton and fastlrp's kernels could be imported."""
    return _KERNELS is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_supports(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the Triton kernels run for tensors of this device and dtype: CUDA, or the CPU under
    ``TRITON_INTERPRET=1`` (float32/float16 there: the interpreter's bfloat16 dot is wrong)."""
    if _KERNELS is None or dtype not in TRITON_DTYPES:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreting() and dtype != torch.bfloat16


# The kernels index with 32-bit integers (Triton's default for int arguments below 2^31): every offset
# they form must stay below this. Larger tensors (long video batches) take the torch formulas instead.
INDEX_LIMIT = 2 ** 31 - 1


def int32_addressable(*tensors) -> bool:
    """Whether every element count and every element offset of these tensors (None skipped) fits a
    signed 32-bit index."""
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        last = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
        if t.numel() > INDEX_LIMIT or last > INDEX_LIMIT:
            return False
    return True


def allow_tf32(device: torch.device, kind: str) -> bool:
    """Whether float32 tile products may use TF32: on CUDA, as torch does for the same layer (cuDNN's
    flag for convolutions, cuBLAS's for Linear), so Triton and native round alike; never elsewhere."""
    if device.type != "cuda":
        return False
    flag = torch.backends.cudnn.allow_tf32 if kind == "conv" else torch.backends.cuda.matmul.allow_tf32
    return bool(flag)


def _like_layout(shape, like: Tensor) -> Tensor:
    """A new tensor of ``shape`` with ``like``'s memory format (channels-last stays channels-last)."""
    return _new_output(shape, like, _output_format(like))


def _new_output(shape, like: Tensor, memory_format) -> Tensor:
    """Every op output is allocated here (tests replace it to poison outputs)."""
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=memory_format)


def _as_5d(t: Tensor) -> Tensor:
    """(N, C, *0-3 spatial) viewed as (N, C, D, H, W) with unit leading spatial dims, without a copy."""
    while t.ndim < 5:
        t = t.unsqueeze(2)
    return t


def _pad3(v: Sequence[int], fill: int) -> list:
    return [fill] * (3 - len(v)) + list(v)


def _out_size(size, kernel, stride, padding, dilation):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


# ---------------------------------------------------------------- linear layers

def _forward_outputs(x, weight, groups_z, write_z, stride, padding, dilation):
    spatial = [_out_size(x.shape[2 + i], weight.shape[2 + i], stride[i], padding[i], dilation[i])
               for i in range(x.ndim - 2)]
    c_out = weight.shape[0]
    y = _like_layout([x.shape[0], c_out] + spatial, x)
    z = _like_layout([x.shape[0], groups_z * c_out] + spatial, x) if write_z else x.new_empty(0)
    return y, z


@triton_op("fastlrp::triton_affine_forward", mutates_args=())
def _affine_forward(x: Tensor, weight: Tensor, packed_weight: Optional[Tensor], bias: Optional[Tensor],
                    z_bias: Optional[Tensor],
                    bound0: Optional[Tensor], bound1: Optional[Tensor], coefficients: list[float],
                    bound_modifiers: list[float], groups_z: int, write_z: bool, nonnegative_input: bool,
                    stride: list[int], padding: list[int], dilation: list[int], groups: int) -> tuple[Tensor, Tensor]:
    y, z = _forward_outputs(x, weight, groups_z, write_z, stride, padding, dilation)
    if not triton_supports(x.device, x.dtype) or not int32_addressable(x, weight, y, z, bound0, bound1):
        y_ref, z_ref = forward_torch(x, weight, bias, z_bias, bound0, bound1, coefficients, bound_modifiers,
                                      groups_z, stride, padding, dilation, groups)
        y.copy_(y_ref)
        if write_z:
            z.copy_(z_ref)
        return y, z
    affine = _KERNELS[0]
    if packed_weight is None:
        packed_weight = affine.pack_weights(_as_5d(weight), groups, forward_variants(
            coefficients, nonnegative_input, bound0 is not None, bound1 is not None), bound_modifiers)
    affine.launch_forward(
        _as_5d(x), _as_5d(weight), packed_weight, bias, z_bias, None if bound0 is None else _as_5d(bound0),
        None if bound1 is None else _as_5d(bound1), _as_5d(y), _as_5d(z) if write_z else None, coefficients,
        bound_modifiers, groups_z, nonnegative_input, _pad3(stride, 1), _pad3(padding, 0), _pad3(dilation, 1),
        groups, allow_tf32=allow_tf32(x.device, "conv" if x.ndim > 2 else "linear"), wrap=wrap_triton)
    return y, z


@triton_op("fastlrp::triton_affine_relevance", mutates_args=())
def _affine_relevance(x: Tensor, weight: Tensor, relevance: Tensor, z: Tensor, y: Tensor, bound0: Optional[Tensor],
                      bound1: Optional[Tensor], coefficients: list[float], bound_modifiers: list[float],
                      group_coefficients: list[float], group_masks: list[int], epsilon: float, stride: list[int],
                      padding: list[int], dilation: list[int], groups: int) -> Tensor:
    out = _like_layout(x.shape, x)
    # On CUDA the fused relevance kernel is never launched: its K loop redoes the division and masks per
    # (row, tap) and is bound by instruction issue at 8-64x its tensor-core time (docs/gpu.md). The torch
    # formulas run the same pass as element-wise ops around cuDNN's transposed convolution.
    if (x.device.type == "cuda" or not triton_supports(x.device, x.dtype)
            or not int32_addressable(x, weight, relevance, z, y, bound0, bound1, out)):
        out.copy_(relevance_torch(x, weight, relevance, z, y, bound0, bound1, coefficients, bound_modifiers,
                                   group_coefficients, group_masks, epsilon, stride, padding, dilation, groups))
        return out
    _KERNELS[0].launch_relevance(
        _as_5d(x), _as_5d(weight), _as_5d(relevance), _as_5d(z), _as_5d(y),
        None if bound0 is None else _as_5d(bound0), None if bound1 is None else _as_5d(bound1), _as_5d(out),
        coefficients, bound_modifiers, group_coefficients, group_masks, epsilon, _pad3(stride, 1),
        _pad3(padding, 0), _pad3(dilation, 1), groups,
        allow_tf32=allow_tf32(x.device, "conv" if x.ndim > 2 else "linear"), wrap=wrap_triton)
    return out


# Explicit fakes: the default fake of a triton_op runs its body, which under TRITON_INTERPRET=1
# would hand fake tensors to the interpreter.
@_affine_forward.register_fake
def _(x, weight, packed_weight, bias, z_bias, bound0, bound1, coefficients, bound_modifiers, groups_z, write_z,
      nonnegative_input, stride, padding, dilation, groups):
    return _forward_outputs(x, weight, groups_z, write_z, stride, padding, dilation)


@_affine_relevance.register_fake
def _(x, weight, relevance, z, y, bound0, bound1, coefficients, bound_modifiers, group_coefficients, group_masks,
      epsilon, stride, padding, dilation, groups):
    return _like_layout(x.shape, x)


def _check_tensor(t, name, op, like=None, like_name=None):
    if not isinstance(t, Tensor):
        raise TypeError(f"fastlrp.ops.{op}: {name} must be a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"fastlrp.ops.{op}: {name} must be a floating-point tensor, got {t.dtype}")
    if like is not None:
        if t.device != like.device:
            raise ValueError(f"fastlrp.ops.{op}: {name} is on {t.device} but {like_name} is on {like.device}")
        if t.dtype != like.dtype:
            raise TypeError(f"fastlrp.ops.{op}: {name} is {t.dtype} but {like_name} is {like.dtype}")


def _check_geometry(x, weight, stride, padding, dilation, groups, op):
    dims = x.ndim - 2
    if dims not in (0, 1, 2, 3) or weight.ndim != x.ndim:
        raise ValueError(f"fastlrp.ops.{op}: x must be (N, C) or (N, C, *1-3 spatial) and weight (O, C/groups, "
                         f"*kernel) of the same rank, got x {tuple(x.shape)} and weight {tuple(weight.shape)}")
    for name, v, low in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        if len(v) != dims or any(int(i) < low for i in v):
            raise ValueError(f"fastlrp.ops.{op}: {name} must hold {dims} ints >= {low}, got {list(v)}")
    if groups < 1 or x.shape[1] % groups or weight.shape[0] % groups or weight.shape[1] * groups != x.shape[1]:
        raise ValueError(f"fastlrp.ops.{op}: groups={groups} does not fit x with {x.shape[1]} channels and "
                         f"weight {tuple(weight.shape)}")


def _check_rule_numbers(coefficients, bound_modifiers, groups_z, op):
    if len(coefficients) != 10:
        raise ValueError(f"fastlrp.ops.{op}: coefficients must hold 10 numbers (2 groups x y, pp, pn, np, nn), "
                         f"got {len(coefficients)}")
    if len(bound_modifiers) != 8:
        raise ValueError(f"fastlrp.ops.{op}: bound_modifiers must hold 8 numbers ((a, b, c, d) twice), "
                         f"got {len(bound_modifiers)}")
    if groups_z not in (1, 2):
        raise ValueError(f"fastlrp.ops.{op}: 1 or 2 denominator groups supported, got {groups_z}")


def forward_variants(coefficients, nonnegative_input: bool, has_bound0: bool, has_bound1: bool) -> list:
    """The weight variants (W, W+, W-, M_0, M_1) the forward kernel reads for this rule, in pack order."""
    return _KERNELS[0].forward_plan(coefficients, nonnegative_input, has_bound0, has_bound1)[0]


def pack_forward_weights(weight: Tensor, coefficients: Sequence[float], bound_modifiers: Sequence[float],
                         bounds: Sequence, nonnegative_input: bool, groups: int) -> Tensor | None:
    """The forward kernel's packed weights (``kernels.affine_lrp.pack_weights``) for a rule, built once per
    layer and handed to ``affine_forward``; None where Triton is missing."""
    if _KERNELS is None:
        return None
    bound0, bound1 = (list(bounds) + [None, None])[:2]
    variants = forward_variants([float(c) for c in coefficients], nonnegative_input, bound0 is not None,
                                bound1 is not None)
    return _KERNELS[0].pack_weights(_as_5d(weight.detach()), groups, variants, [float(m) for m in bound_modifiers])


def affine_forward(x: Tensor, weight: Tensor, bias: Tensor | None, z_bias: Tensor | None, bounds: Sequence,
                   coefficients: Sequence[float], bound_modifiers: Sequence[float], groups_z: int,
                   write_z: bool = True, nonnegative_input: bool = False, stride=(), padding=(), dilation=(),
                   groups: int = 1, packed_weight: Tensor | None = None):
    """(y, z): the layer output f(x; W, b) and every z_g stacked along channels, in one pass.

    ``bounds``: up to two tensors broadcast to x (ones, ZBox bounds) or None; ``write_z=False``
    when z_0 is y itself (z is then an empty tensor); ``packed_weight``: ``pack_forward_weights`` of the
    same arguments, else packed per call."""
    op = "affine_forward"
    _check_tensor(x, "x", op)
    _check_tensor(weight, "weight", op, x, "x")
    _check_geometry(x, weight, stride, padding, dilation, groups, op)
    _check_rule_numbers(coefficients, bound_modifiers, groups_z, op)
    bound0, bound1 = (list(bounds) + [None, None])[:2]
    if packed_weight is not None and _KERNELS is not None:
        _check_tensor(packed_weight, "packed_weight", op, x, "x")
        variants = forward_variants([float(c) for c in coefficients], bool(nonnegative_input), bound0 is not None,
                                    bound1 is not None)
        expected = _KERNELS[0].packed_shape(_as_5d(weight).shape, int(groups), variants)
        if tuple(packed_weight.shape) != expected or not packed_weight.is_contiguous():
            raise ValueError(f"fastlrp.ops.{op}: packed_weight must be contiguous of shape {expected} "
                             f"(pack_forward_weights of these arguments), got {tuple(packed_weight.shape)}")
    for name, t, size in (("bias", bias, weight.shape[0]), ("z_bias", z_bias, weight.shape[0] * groups_z)):
        if t is not None:
            _check_tensor(t, name, op, x, "x")
            if tuple(t.shape) != (size,):
                raise ValueError(f"fastlrp.ops.{op}: {name} must have shape ({size},), got {tuple(t.shape)}")
    bound0, bound1 = (_checked_bound(b, f"bounds[{k}]", x, op) for k, b in enumerate((bound0, bound1)))
    return _affine_forward(x, weight, packed_weight, bias, z_bias, bound0, bound1, [float(c) for c in coefficients],
                           [float(m) for m in bound_modifiers], int(groups_z), bool(write_z), bool(nonnegative_input),
                           [int(v) for v in stride], [int(v) for v in padding], [int(v) for v in dilation], int(groups))


def _checked_bound(b, name, x, op):
    if b is None:
        return None
    _check_tensor(b, name, op, x, "x")
    try:
        return b.expand(x.shape)
    except RuntimeError:
        raise ValueError(f"fastlrp.ops.{op}: {name} of shape {tuple(b.shape)} does not broadcast to x's shape "
                         f"{tuple(x.shape)}") from None


def affine_relevance(x: Tensor, weight: Tensor, relevance: Tensor, z: Tensor, y: Tensor, bounds: Sequence,
                     coefficients: Sequence[float], bound_modifiers: Sequence[float],
                     group_coefficients: Sequence[float], group_masks: Sequence[int], epsilon: float = 1e-6,
                     stride=(), padding=(), dilation=(), groups: int = 1) -> Tensor:
    """R_in = sum over the rule's parts of m(x) * f^T(c_g mask_g R / stab(z_g); W_part), in one pass."""
    op = "affine_relevance"
    _check_tensor(x, "x", op)
    for name, t in (("weight", weight), ("relevance", relevance), ("z", z), ("y", y)):
        _check_tensor(t, name, op, x, "x")
    _check_geometry(x, weight, stride, padding, dilation, groups, op)
    groups_z = len(group_coefficients)
    _check_rule_numbers(coefficients, bound_modifiers, groups_z, op)
    if len(group_masks) != groups_z or any(int(m) not in (0, 1, 2) for m in group_masks):
        raise ValueError(f"fastlrp.ops.{op}: group_masks must hold one of 0, 1, 2 per group, got {list(group_masks)}")
    if y.shape != relevance.shape:
        raise ValueError(f"fastlrp.ops.{op}: y has shape {tuple(y.shape)} but relevance has {tuple(relevance.shape)}")
    expected = (relevance.shape[0], relevance.shape[1] * groups_z) + tuple(relevance.shape[2:])
    if tuple(z.shape) != expected:
        raise ValueError(f"fastlrp.ops.{op}: z must have shape {expected} ({groups_z} groups along channels), "
                         f"got {tuple(z.shape)}")
    bound0, bound1 = (list(bounds) + [None, None])[:2]
    bound0, bound1 = (_checked_bound(b, f"bounds[{k}]", x, op) for k, b in enumerate((bound0, bound1)))
    return _affine_relevance(x, weight, relevance, z, y, bound0, bound1, [float(c) for c in coefficients],
                             [float(m) for m in bound_modifiers], [float(c) for c in group_coefficients],
                             [int(m) for m in group_masks], float(epsilon), [int(v) for v in stride],
                             [int(v) for v in padding], [int(v) for v in dilation], int(groups))


# ---------------------------------------------------------------- pooling and sums

@triton_op("fastlrp::triton_pool_relevance", mutates_args=())
def _pool_relevance(x: Tensor, relevance: Tensor, y: Optional[Tensor], mode: int, kernel: list[int],
                    stride: list[int], padding: list[int], adaptive: bool, count_include_pad: bool,
                    divisor_override: int, epsilon: float) -> Tensor:
    out = _like_layout(x.shape, x)
    if not triton_supports(x.device, x.dtype) or not int32_addressable(x, relevance, y, out):
        out.copy_(pool_torch(x, relevance, y, mode, kernel, stride, padding, adaptive, count_include_pad,
                              divisor_override, epsilon))
        return out
    share = torch.empty(relevance.shape, dtype=torch.float32, device=x.device)
    _KERNELS[1].launch_pool(_as_5d(x), _as_5d(relevance), None if y is None else _as_5d(y), _as_5d(share),
                            _as_5d(out), mode, _pad3(kernel, 1), _pad3(stride, 1), _pad3(padding, 0), adaptive,
                            count_include_pad, divisor_override, epsilon, wrap=wrap_triton)
    return out


@_pool_relevance.register_fake
def _(x, relevance, y, mode, kernel, stride, padding, adaptive, count_include_pad, divisor_override, epsilon):
    return _like_layout(x.shape, x)


def pool_relevance(x: Tensor, relevance: Tensor, kind: str, kernel_size=None, stride=None, padding=0,
                   count_include_pad: bool = True, divisor_override: int | None = None, y: Tensor | None = None,
                   epsilon: float = 1e-6) -> Tensor:
    """LRP of a 1d/2d/3d pooling layer: ``kind`` "avg" (Norm rule, ``y`` the pooled output),
    "adaptive_avg" or "max_proportional". The output size (also under ``ceil_mode``) is relevance's."""
    op = "triton_pool_relevance"
    _check_tensor(x, "x", op)
    _check_tensor(relevance, "relevance", op, x, "x")
    dims = check_pool_shapes(op, kind, x, relevance)
    if kind == "avg":
        if y is None:
            raise ValueError(f"fastlrp.ops.{op}: average pooling needs y, the pooled output")
    if y is not None:
        _check_tensor(y, "y", op, x, "x")
        if y.shape != relevance.shape:
            raise ValueError(f"fastlrp.ops.{op}: y has shape {tuple(y.shape)} but relevance has "
                             f"{tuple(relevance.shape)}")
    adaptive = kind == "adaptive_avg"
    if adaptive:
        kernel, stride_, pad = [1] * dims, [1] * dims, [0] * dims
    else:
        if kernel_size is None:
            raise ValueError(f"fastlrp.ops.{op}: kernel_size is required for kind={kind!r}")
        kernel = _ints(kernel_size, dims, "kernel_size", op, 1)
        stride_ = _ints(kernel_size if stride is None or stride == [] else stride, dims, "stride", op, 1)
        pad = _ints(padding, dims, "padding", op, 0)
    return _pool_relevance(x, relevance, y if kind != "max_proportional" else None,
                           1 if kind == "max_proportional" else 0, kernel, stride_, pad, adaptive,
                           bool(count_include_pad), int(divisor_override or 0), float(epsilon))


def _ints(v, dims, name, op, low):
    v = list(v) if isinstance(v, (tuple, list)) else [v] * dims
    if len(v) != dims or not all(isinstance(i, int) and i >= low for i in v):
        raise ValueError(f"fastlrp.ops.{op}: {name} must be an int or {dims} ints >= {low}, got {v}")
    return v


def _dense_same_layout(tensors) -> bool:
    first = tensors[0]
    dense = first.is_contiguous() or (first.ndim in (4, 5) and first.is_contiguous(
        memory_format=torch.channels_last if first.ndim == 4 else torch.channels_last_3d))
    return dense and all(t.stride() == first.stride() for t in tensors)


@triton_op("fastlrp::triton_sum_relevance", mutates_args=())
def _sum_relevance(inputs: list[Tensor], alpha: list[float], y: Tensor, relevance: Tensor,
                   epsilon: float) -> list[Tensor]:
    outs = [_like_layout(relevance.shape, relevance) for _ in inputs]
    if not triton_supports(relevance.device, relevance.dtype) or not int32_addressable(*inputs, y, relevance):
        for out, value in zip(outs, sum_torch(inputs, alpha, y, relevance, epsilon)):
            out.copy_(value)
        return outs
    tensors = list(inputs) + [y, relevance]
    if not _dense_same_layout(tensors + outs):  # one flat index must address every tensor alike
        tensors = [t.contiguous() for t in tensors]
        flat_outs = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in outs]
    else:
        flat_outs = outs
    _KERNELS[1].launch_sum(tensors[:-2], alpha, tensors[-2], tensors[-1], flat_outs, epsilon, wrap=wrap_triton)
    if flat_outs is not outs:
        for out, flat in zip(outs, flat_outs):
            out.copy_(flat)
    return outs


@_sum_relevance.register_fake
def _(inputs, alpha, y, relevance, epsilon):
    return [_like_layout(relevance.shape, relevance) for _ in inputs]


def sum_relevance(inputs: Sequence[Tensor], relevance: Tensor, y: Tensor, alpha: Sequence[float] | None = None,
                  epsilon: float = 1e-6) -> list:
    """Norm rule of y = sum_i a_i x_i: R_i = a_i x_i R / stab(y), two summands per kernel pass."""
    op = "triton_sum_relevance"
    _check_tensor(relevance, "relevance", op)
    inputs = list(inputs)
    if not inputs:
        raise ValueError(f"fastlrp.ops.{op}: inputs must hold at least one tensor")
    for k, t in enumerate(inputs + [y]):
        name = f"inputs[{k}]" if k < len(inputs) else "y"
        _check_tensor(t, name, op, relevance, "relevance")
        if t.shape != relevance.shape:
            raise ValueError(f"fastlrp.ops.{op}: {name} has shape {tuple(t.shape)} but relevance has "
                             f"{tuple(relevance.shape)}")
    alpha = [1.0] * len(inputs) if alpha is None else [float(a) for a in alpha]
    if len(alpha) != len(inputs):
        raise ValueError(f"fastlrp.ops.{op}: alpha needs one entry per input ({len(inputs)})")
    return _sum_relevance(inputs, alpha, y, relevance, float(epsilon))
