"""The Triton ops' formulas in plain torch: what ``torch.ops.fastlrp.triton_*`` compute where no
Triton kernel can run (a CPU tensor outside ``TRITON_INTERPRET=1``, float64). They are the ops'
own reference: the kernels must give the same numbers."""

from __future__ import annotations

import torch

from ..reference.stabilize import stabilize


def _conv(x, weight, stride, padding, dilation, groups):
    dims = x.ndim - 2
    if dims == 0:
        return torch.nn.functional.linear(x, weight)
    conv = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}[dims]
    return conv(x, weight, None, stride, padding, dilation, groups)


def _conv_t(s, weight, input_shape, stride, padding, dilation, groups):
    if s.ndim == 2:
        return s.matmul(weight)
    dummy = s.new_empty(1).expand(input_shape)  # convolution_backward reads only its shape
    return torch.ops.aten.convolution_backward(s, dummy, weight, None, list(stride), list(padding),
                                               list(dilation), False, [0] * (s.ndim - 2), groups,
                                               [True, False, False])[0]


def _bound_weight(weight, modifiers):
    a, b, c, d = modifiers
    return a * weight.clamp(min=0) + b * weight.clamp(max=0) + c * weight * weight + d * torch.ones_like(weight)


def _split_products(x, weight, fn, need):
    """The five products the kernels form from tiles, here as whole tensors (the torch path)."""
    xp, xn, wp, wn = x.clamp(min=0), x.clamp(max=0), weight.clamp(min=0), weight.clamp(max=0)
    pairs = [(x, weight), (xp, wp), (xp, wn), (xn, wp), (xn, wn)]
    return [fn(a, w) if n else None for (a, w), n in zip(pairs, need)]


def forward_torch(x, weight, bias, z_bias, bound0, bound1, coefficients, bound_modifiers, groups_z,
                   stride, padding, dilation, groups):
    conv = lambda a, w: _conv(a, w, stride, padding, dilation, groups)  # noqa: E731
    need = [any(coefficients[g * 5 + p] != 0 for g in range(2)) for p in range(5)]
    products = _split_products(x, weight, conv, need)
    y = conv(x, weight) if products[0] is None else products[0]
    bshape = (1, -1) + (1,) * (x.ndim - 2)
    zs = []
    for g in range(groups_z):
        z = sum(coefficients[g * 5 + p] * products[p] for p in range(5) if products[p] is not None)
        z = torch.zeros_like(y) + z
        if g == 0:
            for b, m in ((bound0, bound_modifiers[:4]), (bound1, bound_modifiers[4:])):
                if b is not None:
                    z = z + conv(b, _bound_weight(weight, m))
        if z_bias is not None:
            z = z + z_bias[g * y.shape[1]:(g + 1) * y.shape[1]].reshape(bshape)
        zs.append(z)
    if bias is not None:
        y = y + bias.reshape(bshape)
    return y, torch.cat(zs, dim=1)


def relevance_torch(x, weight, relevance, z, y, bound0, bound1, coefficients, bound_modifiers,
                     group_coefficients, group_masks, epsilon, stride, padding, dilation, groups):
    c_out = relevance.shape[1]
    shares = []
    for g, (c, mask) in enumerate(zip(group_coefficients, group_masks)):
        s = c * relevance / stabilize(z.narrow(1, g * c_out, c_out), epsilon)
        if mask == 1:
            s = s * (y > 0).to(s.dtype)
        elif mask == 2:
            s = s * (y < 0).to(s.dtype)
        shares.append(s)
    conv_t = lambda s, w: _conv_t(s, w, x.shape, stride, padding, dilation, groups)  # noqa: E731
    xp, xn, wp, wn = x.clamp(min=0), x.clamp(max=0), weight.clamp(min=0), weight.clamp(max=0)
    total = torch.zeros_like(x)
    for p, (inp, w) in enumerate([(x, weight), (xp, wp), (xp, wn), (xn, wp), (xn, wn)]):
        cs = [coefficients[g * 5 + p] for g in range(len(shares))]
        if any(cs):
            total = total + inp * conv_t(sum(c * s for c, s in zip(cs, shares)), w)
    for b, m in ((bound0, bound_modifiers[:4]), (bound1, bound_modifiers[4:])):
        if b is not None:
            total = total + b * conv_t(shares[0], _bound_weight(weight, m))
    return total


def pool_torch(x, relevance, y, mode, kernel, stride, padding, adaptive, count_include_pad, divisor_override,
                epsilon):
    from ..reference import maxpool_proportional, norm
    dims = x.ndim - 2
    F = torch.nn.functional
    if mode == 1:
        return maxpool_proportional(x, relevance, kernel, stride, padding, False, epsilon)
    if adaptive:
        pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[dims]
        return norm(lambda t: pool(t, tuple(relevance.shape[2:])), [x], relevance, epsilon)[0]
    # the output size is given by relevance, so ceil_mode is implied: pool with it and crop
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[dims]
    extra = {} if dims == 1 else {"divisor_override": divisor_override or None}

    def fn(t):
        out = pool(t, kernel, stride, padding, True, count_include_pad, **extra)
        return out[(slice(None), slice(None)) + tuple(slice(0, s) for s in relevance.shape[2:])]
    return norm(fn, [x], relevance, epsilon)[0]


def sum_torch(inputs, alpha, y, relevance, epsilon):
    ratio = relevance / stabilize(y, epsilon)
    return [t * (a * ratio) for t, a in zip(inputs, alpha)]
