"""The fused LRP kernels as torch custom ops (``torch.ops.fastlrp.*``).

Each op validates its arguments, allocates its outputs with torch (so the caching allocator,
CUDA graphs and torch.compile keep working), and runs the kernel of fastlrp._C for the
tensors' device and dtype; where _C has none (a source checkout, float16 on the CPU) it runs
the same formula in plain PyTorch. Fake implementations give torch.compile the output shapes.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional, Sequence

import torch
from torch import Tensor

from .._native import _C, cuda_kernels_usable
from ..reference.stabilize import stabilize
from ._views import flat_view, readable, stream_of, view

MASK_NONE, MASK_POSITIVE, MASK_NEGATIVE = 0, 1, 2

# An op's output layout follows its inputs' (channels-last in, channels-last out): under torch.compile
# the inputs must keep the strides they were traced with, or inductor's layout choices (channels-last
# convolutions) would give outputs whose strides differ from the fake kernels'.
_EXACT_STRIDES = (torch.Tag.needs_exact_strides,)
IDENTITY, POSITIVE, NEGATIVE, ONE, TENSOR = 0, 1, 2, 3, 4

_CPU_DTYPES = (torch.float32, torch.float64)
_CUDA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def native_supports(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether fastlrp._C has kernels for tensors of this device and dtype."""
    if _C is None:
        return False
    if device.type == "cpu":
        return dtype in _CPU_DTYPES
    if device.type == "cuda":
        return dtype in _CUDA_DTYPES and cuda_kernels_usable(device)
    return False


def _output_format(like: Tensor, follow_layout: bool = True) -> torch.memory_format:
    """channels-last where ``like`` is and ``follow_layout``, else contiguous."""
    if follow_layout and like.ndim in (4, 5) and not like.is_contiguous():
        fmt = torch.channels_last if like.ndim == 4 else torch.channels_last_3d
        if like.is_contiguous(memory_format=fmt):
            return fmt
    return torch.contiguous_format


def _new_output(shape, like: Tensor, follow_layout: bool = True) -> Tensor:
    """Every kernel output is allocated here (tests replace it to poison outputs), in
    ``_output_format``."""
    return torch.empty(shape, dtype=like.dtype, device=like.device,
                       memory_format=_output_format(like, follow_layout))


def _overwritable(overwrite: Optional[Tensor], allowed: Sequence, op: str, shape, like: Tensor,
                  follow_layout: bool = True) -> Optional[Tensor]:
    """The tensor the caller gave up (``overwrite``) where the kernel may write its result into it: an
    eager call on the CPU kernels, the result's shape and layout. ``allowed``: the inputs the op's
    kernel reads at each position before writing it there (the only ones it may overwrite). The
    CUDA kernels are not used in place (not verified there)."""
    if overwrite is None:
        return None
    if not any(overwrite is t for t in allowed if t is not None):
        raise ValueError(f"fastlrp.ops.{op}: overwrite must be one of the op's inputs it may write into "
                         f"(see its docstring)")
    if (overwrite.device.type == "cpu" and native_supports(overwrite.device, overwrite.dtype)
            and tuple(overwrite.shape) == tuple(shape)
            and overwrite.is_contiguous(memory_format=_output_format(like, follow_layout))):
        return overwrite
    return None


def _shares_memory(a: Tensor, b: Optional[Tensor]) -> bool:
    return b is not None and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def check_pool_shapes(op: str, kind: str, x: Tensor, relevance: Tensor) -> int:
    """The pooling ops' shared checks (native and Triton): a known ``kind``, and x and relevance
    of one rank with 1-3 spatial dims and equal N, C. Returns the number of spatial dims."""
    if kind not in ("avg", "adaptive_avg", "max_proportional"):
        raise ValueError(f"fastlrp.ops.{op}: kind must be 'avg', 'adaptive_avg' or 'max_proportional', got {kind!r}")
    dims = x.ndim - 2
    if dims not in (1, 2, 3) or relevance.ndim != x.ndim or relevance.shape[:2] != x.shape[:2]:
        raise ValueError(f"fastlrp.ops.{op}: x (N, C, *1-3 spatial) and relevance (same N, C) expected, got "
                         f"{tuple(x.shape)} and {tuple(relevance.shape)}")
    return dims


def _plain_eager(tensors) -> bool:
    """Whether a call may run an op's implementation directly instead of through torch's dispatcher.

    torch's Python custom-op dispatch costs about 0.1 ms a call on the CPU, more than the kernel on
    most layers, and an explanation makes one to three calls per layer. The dispatcher is needed only
    where something watches or transforms the call: torch.compile and export tracing, a torch-function
    or dispatch mode (FakeTensorMode, make_fx), the profiler (which then lists the op by name),
    functorch transforms, tensor subclasses, and inputs that would need a gradient."""
    if (torch.compiler.is_compiling() or torch._C._autograd._profiler_enabled()
            or torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()):
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if type(t) is not Tensor or (grad and t.requires_grad) or _functorch_wrapped(t):
            return False
    return True


_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def _check_float(t: Tensor, name: str, op: str):
    if not isinstance(t, Tensor):
        raise TypeError(f"fastlrp.ops.{op}: {name} must be a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"fastlrp.ops.{op}: {name} must be a floating-point tensor, got {t.dtype}")


def _check_like(ref: Tensor, ref_name: str, t: Tensor, name: str, op: str, shape: bool = True):
    _check_float(t, name, op)
    if t.device != ref.device:
        raise ValueError(f"fastlrp.ops.{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")
    if t.dtype != ref.dtype:
        raise TypeError(f"fastlrp.ops.{op}: {name} is {t.dtype} but {ref_name} is {ref.dtype}")
    if shape and t.shape != ref.shape:
        raise ValueError(f"fastlrp.ops.{op}: {name} has shape {tuple(t.shape)} but {ref_name} has "
                         f"shape {tuple(ref.shape)}")


# ---------------------------------------------------------------- stabilize-and-divide

def _stabilize_divide_impl(relevance: Tensor, z: list[Tensor], y: Optional[Tensor], coefficients: list[float],
                      masks: list[int], epsilon: float) -> Tensor:
    return _stabilize_divide_into(None, relevance, z, y, coefficients, masks, epsilon)


def _stabilize_divide_into(out: Optional[Tensor], relevance: Tensor, z: list[Tensor], y: Optional[Tensor],
                           coefficients: list[float], masks: list[int], epsilon: float) -> Tensor:
    channels = relevance.shape[1]
    if out is None:
        out = _new_output((relevance.shape[0], channels * len(z)) + tuple(relevance.shape[2:]), relevance)
    parts = [out.narrow(1, g * channels, channels) for g in range(len(z))]
    if native_supports(relevance.device, relevance.dtype):
        _C.stabilize_divide(
            flat_view(relevance, "relevance"),
            [flat_view(t, f"z[{g}]") for g, t in enumerate(z)],
            None if y is None else flat_view(y, "y"),
            list(coefficients), list(masks), [flat_view(t, f"out[{g}]")
                                              for g, t in enumerate(parts)],
            float(epsilon), stream_of(relevance))
        return out
    for part, zg, c, m in zip(parts, z, coefficients, masks):
        r = relevance if m == MASK_NONE else (y > 0 if m == MASK_POSITIVE else y < 0).to(y.dtype) * relevance
        part.copy_(c * (r / stabilize(zg, epsilon)))
    return out


_stabilize_divide = torch.library.custom_op("fastlrp::stabilize_divide", mutates_args=(), tags=_EXACT_STRIDES)(
    _stabilize_divide_impl)


@_stabilize_divide.register_fake
def _(relevance, z, y, coefficients, masks, epsilon):
    # the same layout as the real op (channels-last in, channels-last out): inductor checks the strides
    return _new_output((relevance.shape[0], relevance.shape[1] * len(z)) + tuple(relevance.shape[2:]), relevance)


def stabilize_divide(relevance: Tensor, z: Sequence[Tensor], coefficients: Sequence[float] | None = None,
                     masks: Sequence[int] | None = None, y: Tensor | None = None, epsilon: float = 1e-6,
                     overwrite: Tensor | None = None) -> Tensor:
    """s_g = c_g * mask_g(y) * R / stab(z_g) for each group g, concatenated along channels.

    ``relevance`` R and every ``z[g]`` have the layer output's shape (N, C, ...); the result
    has G*C channels. ``masks[g]``: 0 none, 1 where y > 0, 2 where y < 0 (the Gamma rule).
    ``overwrite``: ``relevance``, given up by the caller; with one group the result may be written into
    it (eager CPU calls), and the returned tensor is then that one.
    """
    op = "stabilize_divide"
    _check_float(relevance, "relevance", op)
    z = list(z)
    if not z:
        raise ValueError(f"fastlrp.ops.{op}: z must hold at least one tensor")
    for g, t in enumerate(z):
        _check_like(relevance, "relevance", t, f"z[{g}]", op)
    coefficients = [1.0] * len(z) if coefficients is None else [float(c) for c in coefficients]
    masks = [MASK_NONE] * len(z) if masks is None else [int(m) for m in masks]
    if len(coefficients) != len(z) or len(masks) != len(z):
        raise ValueError(f"fastlrp.ops.{op}: coefficients and masks need one entry per z ({len(z)})")
    if any(m not in (MASK_NONE, MASK_POSITIVE, MASK_NEGATIVE) for m in masks):
        raise ValueError(f"fastlrp.ops.{op}: masks must be 0 (none), 1 (y > 0) or 2 (y < 0), got {masks}")
    if any(m != MASK_NONE for m in masks):
        if y is None:
            raise ValueError(f"fastlrp.ops.{op}: a mask needs y, the layer's output")
        _check_like(relevance, "relevance", y, "y", op)
    if relevance.ndim < 2:
        raise ValueError(f"fastlrp.ops.{op}: relevance must be (N, C, ...), got shape {tuple(relevance.shape)}")
    args = (readable(relevance), [readable(t) for t in z], None if y is None else readable(y), coefficients,
            masks, float(epsilon))
    if not _plain_eager((args[0], *args[1], args[2])):
        return _stabilize_divide(*args)
    shape = (relevance.shape[0], relevance.shape[1] * len(z)) + tuple(relevance.shape[2:])
    return _stabilize_divide_into(_overwritable(overwrite, [relevance], op, shape, relevance), *args)


# ---------------------------------------------------------------- combine

def _combine_impl(x: Tensor, chunks: list[Tensor], modifiers: list[int], bounds: list[Tensor]) -> Tensor:
    return _combine_into(None, x, chunks, modifiers, bounds)


def _combine_into(out: Optional[Tensor], x: Tensor, chunks: list[Tensor], modifiers: list[int],
                  bounds: list[Tensor]) -> Tensor:
    if out is None:
        out = _new_output(x.shape, x)
    if native_supports(x.device, x.dtype):
        bound_iter = iter(bounds)
        bound_views = [flat_view(next(bound_iter), f"bound[{k}]") if m == TENSOR else None
                       for k, m in enumerate(modifiers)]
        _C.combine(flat_view(x, "x"),
                   [flat_view(c, f"g[{k}]") for k, c in enumerate(chunks)],
                   list(modifiers), bound_views, flat_view(out, "out"), stream_of(x))
        return out
    bound_iter = iter(bounds)
    total = None
    for m, chunk in zip(modifiers, chunks):
        factor = {IDENTITY: lambda: x, POSITIVE: lambda: x.clamp(min=0), NEGATIVE: lambda: x.clamp(max=0),
                  ONE: lambda: torch.ones_like(x), TENSOR: lambda: next(bound_iter)}[m]()
        term = factor * chunk
        total = term if total is None else total + term
    out.copy_(total)
    return out


_combine = torch.library.custom_op("fastlrp::combine", mutates_args=(), tags=_EXACT_STRIDES)(
    _combine_impl)


@_combine.register_fake
def _(x, chunks, modifiers, bounds):
    return _new_output(x.shape, x)


def combine(x: Tensor, g: Tensor | Sequence[Tensor], modifiers: Sequence[int],
            bounds: Sequence[Tensor] = (), overwrite: Tensor | None = None) -> Tensor:
    """R_in = sum_k m_k(x) * g_k, where g holds the K parts g_k along channels (N, K*C, ...), or is the
    list of the K parts, each of x's shape (no concatenation where they come from separate products).

    ``modifiers[k]``: 0 x, 1 x+, 2 x-, 3 one, 4 the next tensor of ``bounds`` (broadcast to x).
    ``overwrite``: the first part g_0 (or g itself, with one part), given up by the caller; the result
    may be written into it (eager CPU calls), and the returned tensor is then that one.
    """
    op = "combine"
    _check_float(x, "x", op)
    if x.ndim < 2:
        raise ValueError(f"fastlrp.ops.{op}: x must be (N, C, ...), got shape {tuple(x.shape)}")
    modifiers = [int(m) for m in modifiers]
    if not modifiers or any(m not in (IDENTITY, POSITIVE, NEGATIVE, ONE, TENSOR) for m in modifiers):
        raise ValueError(f"fastlrp.ops.{op}: modifiers must be a non-empty list of 0..4, got {modifiers}")
    if isinstance(g, Tensor):
        _check_like(x, "x", g, "g", op, shape=False)
        expected = (x.shape[0], x.shape[1] * len(modifiers)) + tuple(x.shape[2:])
        if tuple(g.shape) != expected:
            raise ValueError(f"fastlrp.ops.{op}: g must have shape {expected} ({len(modifiers)} parts of x's "
                             f"shape along channels), got {tuple(g.shape)}")
        channels = x.shape[1]
        chunks = [g.narrow(1, k * channels, channels) for k in range(len(modifiers))]
    else:
        chunks = list(g)
        if len(chunks) != len(modifiers):
            raise ValueError(f"fastlrp.ops.{op}: g holds {len(chunks)} parts for {len(modifiers)} modifiers")
        for k, t in enumerate(chunks):
            _check_like(x, "x", t, f"g[{k}]", op)
    bounds = list(bounds)
    if len(bounds) != modifiers.count(TENSOR):
        raise ValueError(f"fastlrp.ops.{op}: {modifiers.count(TENSOR)} bound tensors needed, got {len(bounds)}")
    expanded = []
    for k, b in enumerate(bounds):
        _check_like(x, "x", b, f"bounds[{k}]", op, shape=False)
        try:
            expanded.append(b.expand(x.shape))
        except RuntimeError:
            raise ValueError(f"fastlrp.ops.{op}: bounds[{k}] of shape {tuple(b.shape)} does not broadcast to "
                             f"x's shape {tuple(x.shape)}") from None
    args = (readable(x), [readable(t) for t in chunks], modifiers, [readable(b) for b in expanded])
    if not _plain_eager((args[0], *args[1], *args[3])):
        return _combine(*args)
    first = g if isinstance(g, Tensor) else chunks[0]
    target = _overwritable(overwrite, [first], op, x.shape, x)
    if target is not None and _shares_memory(target, x):  # the kernel reads x in every part's sweep, g_0 in the first
        target = None
    return _combine_into(target, *args)


# ---------------------------------------------------------------- pooling

@lru_cache(maxsize=256)
def _window_tables(in_sizes: tuple, out_sizes: tuple, kernel: tuple, stride: tuple, padding: tuple,
                   adaptive: bool, count_include_pad: bool, device: str):
    """Per spatial dim: the input range of each window, the window range of each input and
    the divisor factor of each window, as the tensors the kernel reads. Vectorized: window
    starts and ends never decrease, so the windows covering input i are those with
    end > i and start <= i, found by binary search."""
    longest = max(max(in_sizes), max(out_sizes))
    index = torch.zeros(3, 4, longest, dtype=torch.int64)
    scale = torch.ones(3, longest, dtype=torch.float64)
    for d in range(3):
        n_in, n_out = in_sizes[d], out_sizes[d]
        o = torch.arange(n_out, dtype=torch.int64)
        if adaptive:
            lo, hi = (o * n_in) // n_out, -((-(o + 1) * n_in) // n_out)
            padded = hi - lo
        else:
            lo = o * stride[d] - padding[d]
            hi = lo + kernel[d]
            padded = hi.clamp(max=n_in + padding[d]) - lo
            lo, hi = lo.clamp(min=0), hi.clamp(max=n_in)
        index[d, 0, :n_out], index[d, 1, :n_out] = lo, hi
        divisor = padded if count_include_pad else (hi - lo).clamp(min=1)
        scale[d, :n_out] = 1.0 / divisor.to(torch.float64)
        i = torch.arange(n_in, dtype=torch.int64)
        first = torch.searchsorted(hi, i, right=True)  # windows ending at or before i do not cover it
        last = torch.searchsorted(lo, i, right=True)   # windows starting after i do not cover it
        empty = first >= last
        index[d, 2, :n_in] = first.masked_fill(empty, 0)
        index[d, 3, :n_in] = last.masked_fill(empty, 0)
    return index.to(device), scale.to(device)


def _pool_relevance_impl(x: Tensor, relevance: Tensor, y: Optional[Tensor], window_sum: bool, index_table: Tensor,
                    scale_table: Tensor, scale_all: float, epsilon: float) -> Tensor:
    out = _new_output(x.shape, x)
    workspace = _new_output(relevance.shape, relevance)
    x5, r5, o5, w5 = (_as_5d(t) for t in (x, relevance, out, workspace))
    if not native_supports(x.device, x.dtype):
        raise RuntimeError("pool_relevance without fastlrp._C kernels is handled by fastlrp.ops.pool_relevance")
    _C.pool(view(x5, "x"), view(r5, "relevance"), None if y is None else view(_as_5d(y), "y"), window_sum,
            view(index_table, "index_table"), view(scale_table, "scale_table"), float(scale_all), view(w5, "workspace"),
            view(o5, "out"), float(epsilon), stream_of(x))
    return out


_pool_relevance = torch.library.custom_op("fastlrp::pool_relevance", mutates_args=(), tags=_EXACT_STRIDES)(
    _pool_relevance_impl)


@_pool_relevance.register_fake
def _(x, relevance, y, window_sum, index_table, scale_table, scale_all, epsilon):
    return _new_output(x.shape, x)


def _as_5d(t: Tensor) -> Tensor:
    while t.ndim < 5:
        t = t.unsqueeze(2)
    return t


def _triple(v, dims: int, name: str, fill: int = 1) -> tuple:
    v = tuple(v) if isinstance(v, (tuple, list)) else (v,) * dims
    if len(v) != dims or not all(isinstance(i, int) and i >= 0 for i in v):
        raise ValueError(f"fastlrp.ops.pool_relevance: {name} must be an int or {dims} non-negative ints, got {v}")
    return (fill,) * (3 - dims) + v  # leading unit dims: kernel and stride 1, padding 0


def pool_relevance(x: Tensor, relevance: Tensor, kind: str, kernel_size=None, stride=None, padding=0,
                   ceil_mode: bool = False, count_include_pad: bool = True, divisor_override: int | None = None,
                   y: Tensor | None = None, epsilon: float = 1e-6) -> Tensor:
    """LRP of a pooling layer (1d/2d/3d) in two passes, one per window and one per input.

    ``kind``: "avg" (Norm rule; ``y`` is the pooled output), "adaptive_avg" (output size from
    ``relevance``) or "max_proportional" (relevance in proportion to the inputs of each window).
    """
    op = "pool_relevance"
    _check_float(x, "x", op)
    _check_like(x, "x", relevance, "relevance", op, shape=False)
    dims = check_pool_shapes(op, kind, x, relevance)
    if kind != "max_proportional":
        if y is None:
            raise ValueError(f"fastlrp.ops.{op}: average pooling needs y, the pooled output")
        _check_like(relevance, "relevance", y, "y", op)
    adaptive = kind == "adaptive_avg"
    if adaptive:
        kernel, stride_, pad = (1,) * 3, (1,) * 3, (0,) * 3
    else:
        if kernel_size is None:
            raise ValueError(f"fastlrp.ops.{op}: kernel_size is required for kind={kind!r}")
        kernel = _triple(kernel_size, dims, "kernel_size")
        stride_ = _triple(kernel_size if stride is None or stride == [] else stride, dims, "stride")
        pad = _triple(padding, dims, "padding", fill=0)
        _check_window(op, x, relevance, kernel[3 - dims:], stride_[3 - dims:], pad[3 - dims:], ceil_mode)
    in_sizes = (1,) * (3 - dims) + tuple(x.shape[2:])
    out_sizes = (1,) * (3 - dims) + tuple(relevance.shape[2:])
    if not native_supports(x.device, x.dtype):
        return _pool_reference(x, relevance, kind, kernel_size, stride, padding, ceil_mode, count_include_pad,
                               divisor_override, epsilon)
    index, scale = _window_tables(in_sizes, out_sizes, kernel, stride_, pad, adaptive,
                                  count_include_pad or kind == "max_proportional", str(x.device))
    if kind == "max_proportional":
        scale = torch.ones_like(scale)
        scale_all = 1.0
    else:
        scale_all = 1.0
        if divisor_override:
            scale, scale_all = torch.ones_like(scale), 1.0 / divisor_override
    args = (readable(x), readable(relevance), None if y is None else readable(y), kind == "max_proportional",
            index, scale, scale_all, float(epsilon))
    return (_pool_relevance_impl if _plain_eager(args[:3]) else _pool_relevance)(*args)


def _pooled_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> int:
    """Output length of a pooling window sweep, as torch computes it."""
    span = size + 2 * padding - kernel
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1  # the last window must start inside the input or its left padding
    return out


def _check_window(op, x, relevance, kernel, stride, padding, ceil_mode):
    """Kernel and stride of at least 1, padding at most half the kernel (torch's own limits), and a
    relevance of exactly the pooled output's size."""
    if any(k < 1 for k in kernel) or any(s < 1 for s in stride):
        raise ValueError(f"fastlrp.ops.{op}: kernel_size and stride must be >= 1, got {kernel} and {stride}")
    if any(2 * p > k for p, k in zip(padding, kernel)):
        raise ValueError(f"fastlrp.ops.{op}: padding {padding} must be at most half of kernel_size {kernel}")
    expected = tuple(_pooled_size(n, k, s, p, ceil_mode)
                     for n, k, s, p in zip(x.shape[2:], kernel, stride, padding))
    if tuple(relevance.shape[2:]) != expected:
        raise ValueError(f"fastlrp.ops.{op}: relevance has spatial size {tuple(relevance.shape[2:])} but pooling "
                         f"{tuple(x.shape[2:])} with kernel {kernel}, stride {stride}, padding {padding} "
                         f"(ceil_mode={ceil_mode}) gives {expected}")


def _pool_reference(x, relevance, kind, kernel_size, stride, padding, ceil_mode, count_include_pad,
                    divisor_override, epsilon):
    from ..reference import maxpool_proportional, norm
    import torch.nn.functional as F
    dims = x.ndim - 2
    if kind == "max_proportional":
        return maxpool_proportional(x, relevance, kernel_size, kernel_size if stride is None else stride, padding,
                                    ceil_mode, epsilon)
    if kind == "adaptive_avg":
        pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[dims]
        return norm(lambda t: pool(t, tuple(relevance.shape[2:])), [x], relevance, epsilon)[0]
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[dims]
    extra = {} if dims == 1 else {"divisor_override": divisor_override}
    return norm(lambda t: pool(t, kernel_size, stride, padding, ceil_mode, count_include_pad, **extra), [x],
                relevance, epsilon)[0]


# ---------------------------------------------------------------- n-ary sum

def _sum_relevance_impl(inputs: list[Tensor], alpha: list[float], y: Tensor, relevance: Tensor,
                   epsilon: float) -> list[Tensor]:
    return _sum_relevance_into(None, inputs, alpha, y, relevance, epsilon)


def _sum_relevance_into(out: Optional[Tensor], inputs: list[Tensor], alpha: list[float], y: Tensor,
                        relevance: Tensor, epsilon: float) -> list[Tensor]:
    outs = [out] if out is not None else [_new_output(relevance.shape, relevance) for _ in inputs]
    if native_supports(relevance.device, relevance.dtype):
        _C.sum([flat_view(t, f"inputs[{k}]") for k, t in enumerate(inputs)],
               list(alpha), flat_view(y, "y"), flat_view(relevance, "relevance"),
               [flat_view(t, f"out[{k}]") for k, t in enumerate(outs)],
               float(epsilon), stream_of(relevance))
        return outs
    ratio = relevance / stabilize(y, epsilon)
    for out, t, a in zip(outs, inputs, alpha):
        out.copy_(t * (a * ratio))
    return outs


_sum_relevance = torch.library.custom_op("fastlrp::sum_relevance", mutates_args=(), tags=_EXACT_STRIDES)(
    _sum_relevance_impl)


@_sum_relevance.register_fake
def _(inputs, alpha, y, relevance, epsilon):
    return [_new_output(relevance.shape, relevance) for _ in inputs]


def sum_relevance(inputs: Sequence[Tensor], relevance: Tensor, y: Tensor, alpha: Sequence[float] | None = None,
                  epsilon: float = 1e-6, overwrite: Tensor | None = None) -> list:
    """Norm rule of y = sum_i a_i x_i (residual sums): R_i = a_i x_i R / stab(y), in one pass.
    ``overwrite``: ``relevance``, given up by the caller; with one input the result may be written into
    it (eager CPU calls), and the returned tensor is then that one."""
    op = "sum_relevance"
    _check_float(relevance, "relevance", op)
    inputs = list(inputs)
    if len(inputs) < 1:
        raise ValueError(f"fastlrp.ops.{op}: inputs must hold at least one tensor")
    for k, t in enumerate(inputs):
        _check_like(relevance, "relevance", t, f"inputs[{k}]", op)
    _check_like(relevance, "relevance", y, "y", op)
    alpha = [1.0] * len(inputs) if alpha is None else [float(a) for a in alpha]
    if len(alpha) != len(inputs):
        raise ValueError(f"fastlrp.ops.{op}: alpha needs one entry per input ({len(inputs)})")
    if relevance.ndim < 2:
        raise ValueError(f"fastlrp.ops.{op}: relevance must be (N, C, ...), got shape {tuple(relevance.shape)}")
    args = ([readable(t) for t in inputs], alpha, readable(y), readable(relevance), float(epsilon))
    if not _plain_eager((*args[0], args[2], args[3])):
        return _sum_relevance(*args)
    target = _overwritable(overwrite, [relevance], op, relevance.shape, relevance)
    return _sum_relevance_into(target if len(inputs) == 1 else None, *args)


# ---------------------------------------------------------------- softmax rule

def _rows(t: Tensor, name: str, length: int) -> tuple:
    """A contiguous tensor as the kernel's (rows, L) view along its last dim."""
    return view(t.view(t.numel() // length if length else 0, length), name)


def _softmax_relevance_impl(x: Tensor, s: Tensor, relevance: Optional[Tensor], gradient: Optional[Tensor],
                            dim: int) -> Tensor:
    return _softmax_relevance_into(None, x, s, relevance, gradient, dim)


def _softmax_relevance_into(out: Optional[Tensor], x: Tensor, s: Tensor, relevance: Optional[Tensor],
                            gradient: Optional[Tensor], dim: int) -> Tensor:
    if out is None:
        out = _new_output(x.shape, x, follow_layout=False)  # contiguous: the kernel's rows
    if dim % x.ndim == x.ndim - 1 and native_supports(x.device, x.dtype):  # rows along the last dim
        length = x.shape[-1]
        dense = [None if t is None else t.contiguous() for t in (x, s, relevance, gradient)]  # kept alive
        rows = [None if t is None else _rows(t, name, length)
                for t, name in zip(dense, ("x", "s", "relevance", "gradient"))]
        _C.softmax_rule(*rows, _rows(out, "out", length), stream_of(x))
        return out
    total = relevance if gradient is None else (
        s * gradient if relevance is None else torch.addcmul(relevance, s, gradient))
    torch.mul(torch.addcmul(total, s, total.sum(dim, keepdim=True), value=-1), x, out=out)
    return out.masked_fill_(torch.isneginf(x), 0)


_softmax_relevance = torch.library.custom_op("fastlrp::softmax_relevance", mutates_args=(),
                                             tags=_EXACT_STRIDES)(_softmax_relevance_impl)


@_softmax_relevance.register_fake
def _(x, s, relevance, gradient, dim):
    return _new_output(x.shape, x, follow_layout=False)


def softmax_relevance(x: Tensor, s: Tensor, relevance: Optional[Tensor] = None, gradient: Optional[Tensor] = None,
                      dim: int = -1, overwrite: Tensor | None = None) -> Tensor:
    """AttnLRP's softmax rule for s = softmax(x, dim): R_x = x * (T - s * sum_dim(T)) with T = R + s * g, the
    relevance at s given as relevance R, as a gradient g (the relevance s * g), or both; a masked logit
    (x = -inf) gets 0. One pass over rows along ``dim``. ``overwrite``: ``relevance`` or ``gradient``,
    given up by the caller; the result may be written into it (eager CPU calls, rows along the last
    dim), and the returned tensor is then that one."""
    op = "softmax_relevance"
    _check_float(x, "x", op)
    _check_like(x, "x", s, "s", op)
    if relevance is None and gradient is None:
        raise ValueError(f"fastlrp.ops.{op}: give the relevance at s, its gradient form, or both")
    for t, name in ((relevance, "relevance"), (gradient, "gradient")):
        if t is not None:
            _check_like(x, "x", t, name, op)
    if not -x.ndim <= dim < x.ndim:
        raise ValueError(f"fastlrp.ops.{op}: dim {dim} is out of range for x of shape {tuple(x.shape)}")
    args = (x, s, relevance, gradient, int(dim))
    if not _plain_eager((x, s, relevance, gradient)):
        return _softmax_relevance(*args)
    target = _overwritable(overwrite, [relevance, gradient], op, x.shape, x, follow_layout=False)
    # the kernel walks rows along the last dim; the written-out form reads its inputs more than once
    rows = dim % x.ndim == x.ndim - 1 and target is not None and not _shares_memory(target, x) and \
        not _shares_memory(target, s)
    return _softmax_relevance_into(target if rows else None, *args)
