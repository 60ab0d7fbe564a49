"""LRP of pooling layers and n-ary sums.

Pooling runs in two passes. Pass 1, one program lane per output window w: s_w = scale_w R_w / stab(z_w)
with z_w = y_w (average pooling, the Norm rule; scale_w = 1 / divisor) or z_w = the window's sum
(max pooling, proportional rule; scale_w = 1). Pass 2, one lane per input element i: R_i = x_i *
sum of s_w over the windows that cover i, found by arithmetic (no index tables). Window
geometry follows PyTorch's: regular windows start at o * stride - padding; adaptive windows
span [floor(o * in / out), ceil((o + 1) * in / out)). Tensors are 5-d views of any strides.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

AVERAGE, MAX_PROPORTIONAL = 0, 1


def _block():
    return 128 if os.environ.get("TRITON_INTERPRET", "0") == "1" else 512


@triton.jit
def _unflatten(idx, C, D, H, W):
    """(n, c, d, h, w) of a flat index into a contiguous (N, C, D, H, W) enumeration."""
    w = idx % W
    rest = idx // W
    h = rest % H
    rest = rest // H
    d = rest % D
    rest = rest // D
    return rest // C, rest % C, d, h, w


@triton.jit
def _window(o, IN, OUT, K, S, P, ADAPTIVE: tl.constexpr):
    """[lo, hi) of window o along one dim, before clipping to the input (padding included)."""
    if ADAPTIVE:
        lo = (o * IN) // OUT
        hi = ((o + 1) * IN + OUT - 1) // OUT
    else:
        lo = o * S - P
        hi = lo + K
    return lo, hi


@triton.jit
def _window_share_kernel(
        x_ptr, r_ptr, y_ptr, s_ptr, total,
        C, D, H, W, OD, OH, OW, KD, KH, KW, SD, SH, SW, PD, PH, PW,
        sxn, sxc, sxd, sxh, sxw, srn, src, srd, srh, srw, syn, syc, syd, syh, syw,
        inv_divisor, epsilon,
        MODE: tl.constexpr, ADAPTIVE: tl.constexpr, COUNT_PAD: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < total
    n, c, od, oh, ow = _unflatten(idx, C, OD, OH, OW)
    d0, d1 = _window(od, D, OD, KD, SD, PD, ADAPTIVE)
    h0, h1 = _window(oh, H, OH, KH, SH, PH, ADAPTIVE)
    w0, w1 = _window(ow, W, OW, KW, SW, PW, ADAPTIVE)
    rel = tl.load(r_ptr + n * srn + c * src + od * srd + oh * srh + ow * srw, mask=ok, other=0.0).to(tl.float32)
    if MODE == 0:
        z = tl.load(y_ptr + n * syn + c * syc + od * syd + oh * syh + ow * syw, mask=ok, other=1.0).to(tl.float32)
        if inv_divisor > 0:  # divisor_override
            scale = tl.zeros_like(z) + inv_divisor
        elif COUNT_PAD:  # the window clipped to the padded input
            span = ((tl.minimum(d1, D + PD) - d0) * (tl.minimum(h1, H + PH) - h0) * (tl.minimum(w1, W + PW) - w0))
            scale = 1.0 / span.to(tl.float32)
        else:
            span = ((tl.minimum(d1, D) - tl.maximum(d0, 0)) * (tl.minimum(h1, H) - tl.maximum(h0, 0))
                    * (tl.minimum(w1, W) - tl.maximum(w0, 0)))
            scale = 1.0 / tl.maximum(span, 1).to(tl.float32)
    else:
        # proportional max pooling: z is the window's sum (padding adds zeros)
        z = tl.zeros((BLOCK,), tl.float32)
        base = n * sxn + c * sxc
        for kd in range(KD):
            i_d = d0 + kd
            for kh in range(KH):
                i_h = h0 + kh
                for kw in range(KW):
                    i_w = w0 + kw
                    inside = ok & (i_d >= 0) & (i_d < D) & (i_h >= 0) & (i_h < H) & (i_w >= 0) & (i_w < W)
                    z += tl.load(x_ptr + base + i_d * sxd + i_h * sxh + i_w * sxw, mask=inside,
                                 other=0.0).to(tl.float32)
        scale = tl.full((BLOCK,), 1.0, tl.float32)
    share = scale * rel / (z + tl.where(z >= 0, epsilon, -epsilon))
    tl.store(s_ptr + idx, share, mask=ok)  # float32 workspace, contiguous (N, C, OD, OH, OW)


@triton.jit
def _covering_first(i, IN, OUT, K, S, P, ADAPTIVE: tl.constexpr):
    """The first window that can cover input index i."""
    if ADAPTIVE:
        first = (i * OUT) // IN
    else:
        t = i + P - K + 1
        first = tl.where(t > 0, (t + S - 1) // S, 0)
    return first


@triton.jit
def _input_relevance_kernel(
        x_ptr, s_ptr, out_ptr, total,
        C, D, H, W, OD, OH, OW, KD, KH, KW, SD, SH, SW, PD, PH, PW, MD, MH, MW,
        sxn, sxc, sxd, sxh, sxw, son, soc, sod, soh, sow,
        ADAPTIVE: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < total
    n, c, i_d, ih, iw = _unflatten(idx, C, D, H, W)
    fd = _covering_first(i_d, D, OD, KD, SD, PD, ADAPTIVE)
    fh = _covering_first(ih, H, OH, KH, SH, PH, ADAPTIVE)
    fw = _covering_first(iw, W, OW, KW, SW, PW, ADAPTIVE)
    acc = tl.zeros((BLOCK,), tl.float32)
    s_base = (n * C + c) * OD
    for jd in range(MD):  # MD, MH, MW: the most windows that cover one input, per dim
        od = fd + jd
        d0, d1 = _window(od, D, OD, KD, SD, PD, ADAPTIVE)
        hit_d = (od < OD) & (d0 <= i_d) & (i_d < d1)
        for jh in range(MH):
            oh = fh + jh
            h0, h1 = _window(oh, H, OH, KH, SH, PH, ADAPTIVE)
            hit_h = hit_d & (oh < OH) & (h0 <= ih) & (ih < h1)
            for jw in range(MW):
                ow = fw + jw
                w0, w1 = _window(ow, W, OW, KW, SW, PW, ADAPTIVE)
                hit = ok & hit_h & (ow < OW) & (w0 <= iw) & (iw < w1)
                acc += tl.load(s_ptr + ((s_base + od) * OH + oh) * OW + ow, mask=hit, other=0.0)
    x = tl.load(x_ptr + n * sxn + c * sxc + i_d * sxd + ih * sxh + iw * sxw, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + n * son + c * soc + i_d * sod + ih * soh + iw * sow, (x * acc).to(out_ptr.dtype.element_ty),
             mask=ok)


@triton.jit
def _sum_relevance_kernel(a_ptr, b_ptr, y_ptr, r_ptr, out_a_ptr, out_b_ptr, total, alpha_a, alpha_b, epsilon,
                          HAS_B: tl.constexpr, BLOCK: tl.constexpr):
    # every tensor shares one dense layout, so one flat index addresses all of them
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < total
    y = tl.load(y_ptr + idx, mask=ok, other=1.0).to(tl.float32)
    ratio = tl.load(r_ptr + idx, mask=ok, other=0.0).to(tl.float32) / (y + tl.where(y >= 0, epsilon, -epsilon))
    a = tl.load(a_ptr + idx, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_a_ptr + idx, (alpha_a * a * ratio).to(out_a_ptr.dtype.element_ty), mask=ok)
    if HAS_B:
        b = tl.load(b_ptr + idx, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_b_ptr + idx, (alpha_b * b * ratio).to(out_b_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------- host launchers

def _most_covering(in_size, out_size, kernel, stride, adaptive):
    if adaptive:
        return -(-out_size // in_size) + 1
    return -(-kernel // stride)


def launch_pool(x, relevance, y, share, out, mode: int, kernel, stride, padding, adaptive: bool,
                count_include_pad: bool, divisor_override, epsilon: float, wrap=None):
    """5-d views: R_in of average (``mode`` 0) or proportional max pooling (1); ``share`` is a
    float32 contiguous workspace of relevance's shape."""
    n, c, d, h, w = x.shape
    od, oh, ow = relevance.shape[2:]
    block = _block()
    y_view = y if y is not None else relevance
    first = _window_share_kernel if wrap is None else wrap(_window_share_kernel)
    windows = relevance.numel()
    first[(triton.cdiv(windows, block),)](
        x, relevance, y_view, share, windows, c, d, h, w, od, oh, ow, *kernel, *stride, *padding,
        *x.stride(), *relevance.stride(), *y_view.stride(),
        1.0 / divisor_override if divisor_override else 0.0, float(epsilon),
        MODE=mode, ADAPTIVE=adaptive, COUNT_PAD=count_include_pad, BLOCK=block)
    most = [_most_covering(i, o, k, s, adaptive) for i, o, k, s in zip((d, h, w), (od, oh, ow), kernel, stride)]
    second = _input_relevance_kernel if wrap is None else wrap(_input_relevance_kernel)
    second[(triton.cdiv(x.numel(), block),)](
        x, share, out, x.numel(), c, d, h, w, od, oh, ow, *kernel, *stride, *padding, *most,
        *x.stride(), *out.stride(), ADAPTIVE=adaptive, BLOCK=block)


def launch_sum(inputs, alpha, y, relevance, outs, epsilon: float, wrap=None):
    """Flat, same-layout tensors: outs[i] = alpha[i] * inputs[i] * R / stab(y), two summands per launch."""
    block = _block()
    kernel = _sum_relevance_kernel if wrap is None else wrap(_sum_relevance_kernel)
    total = relevance.numel()
    for k in range(0, len(inputs), 2):
        has_b = k + 1 < len(inputs)
        b, out_b, alpha_b = (inputs[k + 1], outs[k + 1], alpha[k + 1]) if has_b else (inputs[k], outs[k], 0.0)
        kernel[(triton.cdiv(total, block),)](inputs[k], b, y, relevance, outs[k], out_b, total, float(alpha[k]),
                                             float(alpha_b), float(epsilon), HAS_B=has_b, BLOCK=block)
