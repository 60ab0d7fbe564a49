"""timm models (extra ``fastlrp[timm]``): ResNet, EfficientNet and ConvNeXt CNNs, ViT, DeiT and Swin
transformers. Random weights (no download), 32x32 float64 images, the tiny variants with the patch and
window sizes shrunk to fit."""

from __future__ import annotations

import pytest
import torch

import fastlrp
from fastlrp.integrations import one_input
from fastlrp.integrations.timm import prepare
from integrations_checks import assert_backends_agree, assert_conserves, assert_unchanged, epsilon_composite, snapshot

timm = pytest.importorskip("timm")

pytestmark = pytest.mark.usefixtures("single_thread")

CNNS = ["resnet18", "resnet26", "efficientnet_b0", "convnext_atto"]
TRANSFORMERS = {"vit_tiny_patch16_224": {"img_size": 32, "patch_size": 8},
                "deit_tiny_patch16_224": {"img_size": 32, "patch_size": 8},
                "swin_tiny_patch4_window7_224": {"img_size": 32, "window_size": 2}}


def _model(name, zero_bias=False, **options):
    torch.manual_seed(len(name))
    model = timm.create_model(name, pretrained=False, num_classes=5, **options).double().eval()
    if zero_bias:
        with torch.no_grad():
            for key, p in model.named_parameters():
                if key.endswith("bias"):
                    p.zero_()
    return model


def _image(seed=0):
    return torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("name", CNNS)
def test_timm_cnn(name):
    model = _model(name)
    before = snapshot(model)
    x = _image()
    explained = prepare(model)  # EfficientNet's BatchNormAct2d: batch norm, then its activation
    result = assert_backends_agree(explained, x, 3)  # default composite: epsilon_plus (attnlrp for ConvNeXt)
    assert result.relevance.shape == x.shape and torch.isfinite(result.relevance).all()
    torch.testing.assert_close(result.output, model(x).detach())
    if name == "convnext_atto":
        # layer norms: the attnlrp preset (identity rule on the normalization), biases out of z.
        # Measured 5.7e-5 relative: the norms' eps (1e-6) and the 1e-6 stabilizers.
        assert fastlrp.engine.defaults.default_composite(model) == "attnlrp"
        assert_conserves(fastlrp.LRP(explained, zero_params="bias").explain(x, 3), rtol=5e-4)
    else:
        # LRP-0 without biases in z (measured: 4e-11 relative on ResNet-18, 2.9e-6 on EfficientNet-B0).
        # epsilon_plus does not conserve here: ZPlus drops the relevance of outputs whose z+ is 0, which
        # signed inputs make common (SiLU in EfficientNet).
        assert_conserves(fastlrp.LRP(explained, epsilon_composite()).explain(x, 3), rtol=2e-5)
    assert_unchanged(model, before)


@pytest.mark.parametrize("name", list(TRANSFORMERS))
def test_timm_transformer(name):
    """timm's VisionTransformer.forward takes optional arguments (attn_mask): ``one_input`` gives fastlrp
    the one-tensor module it traces. Swin's forward is already one-tensor."""
    model = _model(name, **TRANSFORMERS[name])
    before = snapshot(model)
    explained = prepare(model) if name.startswith("swin") else one_input(prepare(model))
    assert fastlrp.engine.defaults.default_composite(model) == "attnlrp"
    x = _image(1)
    result = assert_backends_agree(explained, x, 2)
    assert torch.isfinite(result.relevance).all()
    torch.testing.assert_close(result.output, model(x).detach())
    assert_unchanged(model, before)


@pytest.mark.parametrize("name", list(TRANSFORMERS))
def test_timm_transformer_conserves_without_biases(name):
    """CP-LRP (attention weights held constant) on a bias-free model with 1e-12 stabilizers conserves
    from the logit down to the token embeddings. In ViT/DeiT the class (and distillation) token and the
    position embeddings are constants added there: they take their share of the relevance (a residual
    sum's Norm rule), so the check stops at the sum's output (``pos_drop``), not the pixels."""
    model = _model(name, zero_bias=True, **TRANSFORMERS[name])
    explained = prepare(model) if name.startswith("swin") else one_input(prepare(model))
    explainer = fastlrp.LRP(explained, "cp_lrp", zero_params="bias", epsilon=1e-12, stabilizer=1e-12)
    x = _image(2)
    if name.startswith("swin"):
        assert_conserves(explainer.explain(x, 2), rtol=1e-6)
    else:
        result = explainer.explain(x, 2, layers=["model.pos_drop"])
        torch.testing.assert_close(result.layers["model.pos_drop"].sum(), result.start.sum(), rtol=1e-6, atol=0)


def test_prepare_refuses_layers_computed_otherwise():
    """A convolution whose forward is not torch's (timm's StdConv2d standardizes its weight) would be
    computed from its raw weight: refused, naming it."""
    from timm.layers import StdConv2d
    model = torch.nn.Sequential(StdConv2d(3, 4, 3), torch.nn.ReLU())
    with pytest.raises(TypeError, match=r"0 \(StdConv2d\)"):
        prepare(model)
