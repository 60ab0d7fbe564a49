"""Every torchvision classification, video and segmentation model explains with its default composite
(issue 14): random weights, the smallest input each model accepts, finite relevance, model unchanged.

Left out, with the reason: the quantized int8 models (``torchvision.models.quantization``; LRP needs
float weights and gradients), optical flow (RAFT: two images in, a list of flow fields out) and
detection (lists of boxes out; not part of the issue's scope).

Random weights are not torchvision's initialization: the largest models (vit_h_14, regnet_y_128gf,
630M parameters each) take 30-40 s to initialize on two cores, so construction skips ``nn.init`` and
every parameter is filled from one random pool, scaled by 1/sqrt(fan-in) (layer-norm and batch-norm
scales around 1). Buffers (batch-norm statistics, relative position indices) are torchvision's own.
"""

from __future__ import annotations

import contextlib
import math
from unittest import mock

import pytest
import torch
from torch import nn

import fastlrp

torchvision = pytest.importorskip("torchvision")
from torchvision.models import get_model, list_models  # noqa: E402

CLASSIFICATION = list_models(module=torchvision.models)
VIDEO = list_models(module=torchvision.models.video)
SEGMENTATION = list_models(module=torchvision.models.segmentation)

# Builder options and input shapes: the smallest each model accepts (default: 3 x 32 x 32).
OPTIONS = {name: {"image_size": 28 if "_14" in name else 32} for name in CLASSIFICATION if name.startswith("vit_")}
# MViT's builders fix their input size (16 x 224 x 224: position embeddings and pooling grids).
SHAPES = {"alexnet": (3, 64, 64), "inception_v3": (3, 75, 75), "maxvit_t": (3, 224, 224),
          "vit_h_14": (3, 28, 28), "s3d": (3, 16, 224, 224), "mvit_v1_b": (3, 16, 224, 224),
          "mvit_v2_s": (3, 16, 224, 224)}
VIDEO_SHAPE = (3, 4, 32, 32)


class SegmentationOutput(nn.Module):
    """torchvision's segmentation models answer a dict; LRP explains its "out" tensor."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)["out"]


@contextlib.contextmanager
def skipped_init():
    names = [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")]
    with contextlib.ExitStack() as stack:
        for name in names:
            stack.enter_context(mock.patch.object(nn.init, name, lambda tensor, *args, **kwargs: tensor))
        yield


@torch.no_grad()
def fill_random(model: nn.Module, seed: int) -> None:
    pool = torch.randn(1 << 20, generator=torch.Generator().manual_seed(seed))
    for i, (name, p) in enumerate(model.named_parameters()):
        flat = p.view(-1)
        chunk = pool.roll(i * 7919)
        for start in range(0, flat.numel(), chunk.numel()):
            piece = flat[start:start + chunk.numel()]
            piece.copy_(chunk[:piece.numel()])
        if p.ndim >= 2:
            p.mul_(1.0 / math.sqrt(max(1, p[0].numel())))
        elif name.endswith("weight"):
            p.mul_(0.1).add_(1.0)
        else:
            p.mul_(0.1)


def fingerprint(model: nn.Module):
    """What must not change: every state tensor (identity, version, values), flags and hooks."""
    state = {k: (v.data_ptr(), v._version, v.dtype, v.shape, v.sum(dtype=torch.float64).item(),
                 v.abs().sum(dtype=torch.float64).item())
             for k, v in model.state_dict(keep_vars=True).items()}
    modules = {n: (m.training, dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
               for n, m in model.named_modules()}
    return state, modules, {n: p.requires_grad for n, p in model.named_parameters()}


def build(name: str, kind: str) -> tuple[nn.Module, tuple]:
    options = dict(OPTIONS.get(name, {}))
    if kind == "segmentation":
        options["weights_backbone"] = None  # else torchvision downloads the backbone
    with skipped_init():
        model = get_model(name, weights=None, num_classes=7, **options)
    fill_random(model, seed=len(name))
    shape = SHAPES.get(name, VIDEO_SHAPE if kind == "video" else (3, 32, 32))
    return model.eval(), shape


ZOO = [(n, "classification") for n in CLASSIFICATION] + [(n, "video") for n in VIDEO] + \
      [(n, "segmentation") for n in SEGMENTATION]


@pytest.mark.slow
@pytest.mark.parametrize("name, kind", ZOO, ids=[n for n, _ in ZOO])
def test_model_explains_with_its_default_composite(name, kind):
    model, shape = build(name, kind)
    before = fingerprint(model)
    explained = SegmentationOutput(model).eval() if kind == "segmentation" else model
    x = torch.randn(1, *shape)
    explanation = fastlrp.LRP(explained).explain(x)  # the predicted class
    assert explanation.relevance.shape == x.shape
    assert torch.isfinite(explanation.relevance).all(), name
    if explanation.start.abs().sum() > 0:  # (random SqueezeNets can end in an all-zero ReLU map)
        assert explanation.relevance.abs().sum() > 0, name
    with torch.no_grad():
        expected = explained(x)
    torch.testing.assert_close(explanation.output, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    assert fingerprint(model) == before


def test_zoo_covers_every_builder():
    """The walk above takes every builder of these three families (110 at torchvision 0.29)."""
    assert len(ZOO) == len(set(ZOO)) and len(ZOO) >= 90
    assert {"vit_b_16", "swin_v2_t", "maxvit_t", "convnext_tiny", "inception_v3", "mvit_v2_s", "swin3d_t",
            "deeplabv3_resnet50"} <= {n for n, _ in ZOO}
