"""What the static checks compile: real layer shapes, the rules the composites put on them, and the
launches the engine would make for them (through ``backends.triton.rule_coefficients`` and the
kernels' own launchers, on 'meta' tensors)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastlrp import rules
from fastlrp.backends.triton import rule_coefficients
from fastlrp.linear_form import broadcast_bound

from .aot import Capture


@dataclass(frozen=True)
class Layer:
    """A linear layer at batch N: input (N, C, *spatial), O outputs, kernel/stride/padding per dim."""
    name: str
    x: tuple
    out_channels: int
    kernel: tuple = ()
    stride: tuple = ()
    padding: tuple = ()

    @property
    def dims(self):
        return len(self.kernel)

    def out_spatial(self):
        return tuple((s + 2 * p - k) // st + 1 for s, k, st, p in zip(self.x[2:], self.kernel, self.stride,
                                                                        self.padding))

    def macs(self):
        """Multiply-adds of the layer's forward convolution."""
        out = 1
        for s in self.out_spatial():
            out *= s
        k = 1
        for v in self.kernel:
            k *= v
        return self.x[0] * out * self.out_channels * self.x[1] * k


def conv2d(name, n, c, hw, o, k, s, p):
    return Layer(name, (n, c, hw, hw), o, (k, k), (s, s), (p, p))


def representative_layers(n: int = 64) -> dict:
    """One layer of each kind the three bench models have (ResNet-50, VGG16, r3d_18)."""
    layers = [
        conv2d("r50_conv1_7x7s2", n, 3, 224, 64, 7, 2, 3),
        conv2d("r50_3x3s1_64", n, 64, 56, 64, 3, 1, 1),
        conv2d("r50_1x1_256to64", n, 256, 56, 64, 1, 1, 0),
        conv2d("r50_3x3s2_128", n, 128, 56, 128, 3, 2, 1),
        conv2d("r50_ds_1x1s2_256to512", n, 256, 56, 512, 1, 2, 0),
        Layer("r50_fc_2048", (n, 2048), 1000),
        conv2d("vgg_3x3s1_3to64", n, 3, 224, 64, 3, 1, 1),
        Layer("r3d_stem_3x7x7", (n, 3, 16, 112, 112), 64, (3, 7, 7), (1, 2, 2), (1, 3, 3)),
        Layer("r3d_3x3x3_64", (n, 64, 16, 56, 56), 64, (3, 3, 3), (1, 1, 1), (1, 1, 1)),
    ]
    return {layer.name: layer for layer in layers}


def rule_of(name: str):
    """The rules the composites put on linear layers (gamma as in EpsilonGammaBox)."""
    return {"epsilon": rules.Epsilon(1e-6), "zplus": rules.ZPlus(), "gamma": rules.Gamma(0.25),
            "alphabeta": rules.AlphaBeta(2, 1), "flat": rules.Flat(), "wsquare": rules.WSquare(),
            "zbox": rules.ZBox(-3.0, 3.0)}[name]


# (layer, rule, non-negative input): the worst cases per layer kind. Gamma on a signed input has
# four products in two groups; first layers get ZBox or Flat; hidden layers follow a ReLU.
VARIANTS = [
    ("r50_conv1_7x7s2", "zbox", False), ("r50_conv1_7x7s2", "flat", False), ("r50_conv1_7x7s2", "zplus", False),
    ("r50_3x3s1_64", "zplus", True), ("r50_3x3s1_64", "gamma", True), ("r50_3x3s1_64", "gamma", False),
    ("r50_3x3s1_64", "alphabeta", False),
    ("r50_1x1_256to64", "gamma", True), ("r50_3x3s2_128", "zplus", True), ("r50_3x3s2_128", "gamma", True),
    ("r50_ds_1x1s2_256to512", "gamma", True), ("r50_fc_2048", "epsilon", False),
    ("vgg_3x3s1_3to64", "zbox", False), ("r3d_stem_3x7x7", "zplus", False), ("r3d_3x3x3_64", "gamma", True),
]
# What the static performance model needs (bench/static_model.py): every conv/linear kind of the
# three models under EpsilonPlus (ZPlus after a ReLU) and EpsilonGammaBox (Gamma after a ReLU).
MODEL_LAYERS = ["r50_3x3s1_64", "r50_3x3s2_128", "r50_1x1_256to64", "r50_ds_1x1s2_256to512", "r3d_3x3x3_64"]
MODEL_VARIANTS = ([(layer, "zplus", True) for layer in MODEL_LAYERS] + [("r50_fc_2048", "epsilon", False)]
                  + [(layer, "gamma", True) for layer in MODEL_LAYERS])
# Four products live at once (x+ and x- against W+ and W-): the register-hungry kernels, where the
# 64x64 tiles spill and only the mid tiles remain.
SIGNED_VARIANTS = [("r50_3x3s1_64", "gamma", False), ("r50_3x3s1_64", "alphabeta", False)]
# The CI subset: the four-product worst case, a strided layer, a Linear.
CI_VARIANTS = [("r50_3x3s1_64", "gamma", False), ("r50_3x3s2_128", "zplus", True), ("r50_fc_2048", "epsilon", False)]


def launched_by_engine(layer: Layer) -> bool:
    """Whether the Triton backend sends this layer to its kernels on CUDA (backends.triton.cuda_worthwhile):
    layers with few input channels run natively; their compiles are reported, not judged."""
    from fastlrp.backends.triton import MIN_INPUT_CHANNELS
    return layer.x[1] >= MIN_INPUT_CHANNELS


def _5d(t):
    while t.ndim < 5:
        t = t.unsqueeze(2)
    return t


def affine_launches(layer: Layer, rule_name: str, nonnegative: bool, dtype, allow_tf32: bool,
                    channels_last: bool = False):
    """[(kernel, grid, args, kwargs)] of the forward and the relevance launch the engine makes."""
    from fastlrp.kernels import affine_lrp
    meta = dict(device="meta", dtype=dtype)
    x = torch.empty(layer.x, **meta)
    if channels_last and x.ndim in (4, 5):
        x = x.contiguous(memory_format=torch.channels_last if x.ndim == 4 else torch.channels_last_3d)
    weight = torch.empty((layer.out_channels, layer.x[1]) + layer.kernel, **meta)
    bias = torch.empty(layer.out_channels, **meta)
    rule = rule_of(rule_name)
    form = rule.form()
    spec = rule_coefficients(form, bias, nonnegative)
    if spec is None:
        raise ValueError(f"{rule_name}: the Triton kernels have no form for it")
    bounds = [torch.ones(1, **meta).expand(x.shape) if b == "ones" else broadcast_bound(form.bounds[b], x, b)
              for b in spec.bounds]
    b0, b1 = ([_5d(b) for b in bounds] + [None, None])[:2]
    groups_z = len(spec.group_coefficients)
    y = torch.empty((layer.x[0], layer.out_channels) + layer.out_spatial(), **meta)
    if channels_last and y.ndim in (4, 5):
        y = y.contiguous(memory_format=torch.channels_last if y.ndim == 4 else torch.channels_last_3d)
    z = None if spec.z_is_output else torch.empty_like(y).repeat_interleave(groups_z, 1)
    pad = 3 - layer.dims
    stride, padding = [1] * pad + list(layer.stride), [0] * pad + list(layer.padding)
    dilation = [1, 1, 1]
    capture = Capture()
    variants, _ = affine_lrp.forward_plan(spec.coefficients, nonnegative, b0 is not None, b1 is not None)
    packed = affine_lrp.pack_weights(_5d(weight), 1, variants, spec.bound_modifiers)
    affine_lrp.launch_forward(_5d(x), _5d(weight), packed, bias, spec.z_bias, b0, b1, _5d(y),
                              None if z is None else _5d(z), spec.coefficients, spec.bound_modifiers, groups_z,
                              nonnegative, stride, padding, dilation, 1, allow_tf32=allow_tf32, wrap=capture)
    z_rel = y if z is None else z
    affine_lrp.launch_relevance(_5d(x), _5d(weight), _5d(y), _5d(z_rel), _5d(y), b0, b1, _5d(torch.empty_like(x)),
                                spec.coefficients, spec.bound_modifiers, spec.group_coefficients, spec.group_masks,
                                spec.epsilon, stride, padding, dilation, 1, allow_tf32=allow_tf32, wrap=capture)
    return capture.launches


def pool_launches(dtype, n: int = 64):
    """[(name, (kernel, grid, args, kwargs))]: ResNet's max pool and global average pool, a residual sum."""
    from fastlrp.kernels import pool_lrp
    meta = dict(device="meta", dtype=dtype)
    capture = Capture()
    x = torch.empty(n, 64, 1, 112, 112, **meta)
    r = torch.empty(n, 64, 1, 56, 56, **meta)
    share = torch.empty(r.shape, device="meta", dtype=torch.float32)
    pool_lrp.launch_pool(x, r, None, share, torch.empty_like(x), 1, [1, 3, 3], [1, 2, 2], [0, 1, 1], False, True,
                         None, 1e-6, wrap=capture)
    x = torch.empty(n, 2048, 1, 7, 7, **meta)
    r = torch.empty(n, 2048, 1, 1, 1, **meta)
    share = torch.empty(r.shape, device="meta", dtype=torch.float32)
    pool_lrp.launch_pool(x, r, r, share, torch.empty_like(x), 0, [1, 1, 1], [1, 1, 1], [0, 0, 0], True, True, None,
                         1e-6, wrap=capture)
    t = torch.empty(n, 256, 56, 56, **meta)
    pool_lrp.launch_sum([t, t], [1.0, 1.0], t, t, [t, t], 1e-6, wrap=capture)
    names = ("maxpool_share", "maxpool_inputs", "adaptive_share", "adaptive_inputs", "sum2")
    return list(zip(names, capture.launches))
