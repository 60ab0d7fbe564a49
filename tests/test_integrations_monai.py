"""MONAI 3D networks (extra ``fastlrp[monai]``): DenseNet121 and SEResNet50 classifiers and a 3D UNet
explained for a segmentation target. Random weights, one float64 volume each, narrow widths where
MONAI lets the depth stay the named network's (DenseNet121's block configuration is kept)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastlrp
from integrations_checks import assert_backends_agree, assert_conserves, assert_unchanged, epsilon_composite, snapshot

nets = pytest.importorskip("monai.networks.nets")
SEResNetBottleneck = pytest.importorskip("monai.networks.nets.senet").SEResNetBottleneck

pytestmark = pytest.mark.usefixtures("single_thread")

# Conservation: the default composite (epsilon_plus: ZPlus on convolutions, epsilon on the classifier)
# with the biases left out of every z sums to the logit up to the relevance lost at neurons whose z+ is
# 0 and the 1e-6 stabilizers (measured: 1.8e-5 relative on DenseNet121, 2.0e-6 on SEResNet50).
CNN_RTOL = 1e-4


def _randomize_batchnorm(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial batch-norm statistics, so folding them is checked too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def _densenet121():
    torch.manual_seed(0)
    model = nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=2, init_features=8, growth_rate=4)
    return _randomize_batchnorm(model, 0).double().eval()


def _seresnet50(blocks=(3, 4, 6, 3)):
    """SEResNet50; ``blocks=(1, 1, 1, 1)``: its bottleneck blocks and widths, one block per stage."""
    torch.manual_seed(1)
    model = nets.SEResNet50(layers=blocks, spatial_dims=3, in_channels=1, num_classes=2)
    return _randomize_batchnorm(model, 1).double().eval()


def _unet(norm="instance"):
    torch.manual_seed(2)
    model = nets.UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2),
                      num_res_units=1, norm=norm)
    return _randomize_batchnorm(model, 2).double().eval()


def _volume(*spatial, seed=0):
    return torch.randn(1, 1, *spatial, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_densenet121_3d():
    model = _densenet121()
    before = snapshot(model)
    x = _volume(32, 32, 32)
    result = assert_backends_agree(model, x, 1)  # the default composite: epsilon_plus
    assert result.relevance.shape == x.shape and torch.isfinite(result.relevance).all()
    torch.testing.assert_close(result.output, model(x).detach())
    assert_conserves(fastlrp.LRP(model, zero_params="bias").explain(x, 1), rtol=CNN_RTOL)
    assert_unchanged(model, before)


def test_seresnet50_3d():
    """The squeeze-and-excitation gate is held constant, relevance passes to the features. At 32^3 the
    last stage is one voxel, so gate and features have the same shape: the engine knows the gate by the
    sigmoid it comes from, through MONAI's ``.view`` of it."""
    model = _seresnet50()
    before = snapshot(model)
    x = _volume(32, 32, 32)
    result = fastlrp.LRP(model, zero_params="bias").explain(x, 0)
    assert torch.isfinite(result.relevance).all() and "native" in result.backends.values()
    assert_conserves(result, rtol=CNN_RTOL)
    assert_unchanged(model, before)
    # native == reference on its blocks, one per stage (the full depth costs seconds per pass in float64)
    short = _seresnet50(blocks=(1, 1, 1, 1))
    assert torch.isfinite(assert_backends_agree(short, x, 0).relevance).all()


def _class1_inside(mask: torch.Tensor) -> torch.Tensor:
    """Target weights: the class-1 logits inside ``mask`` (a boolean [D, H, W] region)."""
    weights = torch.zeros(1, 2, *mask.shape, dtype=torch.float64)
    weights[:, 1] = mask
    return weights


def test_unet_3d_segmentation_target():
    model = _unet()
    before = snapshot(model)
    x = _volume(16, 16, 16)
    region = torch.zeros(16, 16, 16, dtype=torch.bool)
    region[4:12, 4:12, 4:12] = True
    weights = _class1_inside(region)
    # MONAI's default instance norm has no LRP rule: refused with a message naming it and the fix
    with pytest.raises(fastlrp.UnsupportedLayerError, match="InstanceNorm3d.*passthrough"):
        fastlrp.LRP(model)
    options = {"passthrough": [nn.InstanceNorm3d]}
    by_weights = assert_backends_agree(model, x, weights, **options)
    assert by_weights.relevance.shape == x.shape and torch.isfinite(by_weights.relevance).all()
    logits = model(x).detach()
    torch.testing.assert_close(by_weights.start.sum(), logits[:, 1][:, region].sum())
    # the same target as a callable: output -> starting relevance
    by_callable = fastlrp.LRP(model, **options).explain(x, lambda out: out * weights)
    torch.testing.assert_close(by_callable.relevance, by_weights.relevance)
    assert_unchanged(model, before)


def test_unet_3d_batchnorm_conserves():
    """With batch norms (folded into the convolutions) every layer has a conserving rule. LRP-0 here:
    ZPlus loses the relevance of outputs whose z+ is 0, which PReLU's signed inputs make common in the
    transposed convolutions (0.002% to 12% of the score over four seeds). LRP-0: 1e-10 to 4.5e-7."""
    model = _unet(norm="batch")
    x = _volume(16, 16, 16, seed=1)
    region = torch.zeros(16, 16, 16, dtype=torch.bool)
    region[2:9, 5:14, 3:10] = True
    result = fastlrp.LRP(model, epsilon_composite()).explain(x, _class1_inside(region))
    assert torch.isfinite(result.relevance).all()
    assert_conserves(result, rtol=1e-5)
    assert_backends_agree(model, x, _class1_inside(region))
