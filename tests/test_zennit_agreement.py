"""End to end: fastlrp's relevance equals Zennit's for every shared composite, float64, random
weights, small spatial sizes. max |ours - zennit| / max |zennit| <= 1e-6."""

import pytest
import torch
import torchvision
from torch import nn
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.torchvision import ResNetCanonizer, VGGCanonizer

import fastlrp
from zennit_reference import ZENNIT_COMPOSITES, densenet_canonizer, zennit_relevance

COMPOSITES = list(ZENNIT_COMPOSITES)


def randomize_batchnorm(model):
    """Fresh models have identity batch-norm statistics; make them matter."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features) + 0.5)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, std=0.1)
    return model


class SmallNet1d(nn.Sequential):
    def __init__(self):
        super().__init__(
            nn.Conv1d(2, 8, 5, padding=2), nn.BatchNorm1d(8), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(8, 8, 3, stride=2), nn.ReLU(), nn.AvgPool1d(2),
            nn.ConvTranspose1d(8, 6, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool1d(4),
            nn.Flatten(), nn.Linear(24, 16), nn.ReLU(), nn.Dropout(), nn.Linear(16, 10))


class SmallNet3d(nn.Sequential):
    def __init__(self):
        super().__init__(
            nn.Conv3d(1, 6, 3, padding=1), nn.BatchNorm3d(6), nn.ReLU(), nn.MaxPool3d(2),
            nn.Conv3d(6, 8, (1, 3, 3), padding=(0, 1, 1)), nn.ReLU(),
            nn.ConvTranspose3d(8, 4, 2, stride=2), nn.ReLU(), nn.AdaptiveAvgPool3d(2),
            nn.Flatten(), nn.Linear(32, 10))


def build(arch):
    """(model, input, Zennit canonizers, fastlrp options)."""
    if arch == "conv1d":
        return SmallNet1d(), torch.randn(3, 2, 37), [SequentialMergeBatchNorm()], {}
    if arch == "conv3d":
        return SmallNet3d(), torch.randn(2, 1, 6, 10, 9), [SequentialMergeBatchNorm()], {}
    model = getattr(torchvision.models, arch)(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    if arch.startswith("resnet"):
        return model, x, [ResNetCanonizer()], {}
    if arch.startswith("vgg"):
        return model, x, [VGGCanonizer()], {}
    # DenseNet calls F.relu and F.adaptive_avg_pool2d; Zennit's hooks see only modules.
    return model, x, [densenet_canonizer(model)], {"functional_rules": False}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["vgg16", "vgg16_bn", "resnet18", "resnet50", "densenet121", "conv1d", "conv3d"])
def test_agrees_with_zennit(arch):
    model, x, canonizers, options = build(arch)
    model = randomize_batchnorm(model).eval().double()
    x = x.double()
    target = torch.randint(0, 10, (x.shape[0],))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for composite in COMPOSITES:
        rule_options = {"low": -3.0, "high": 3.0} if composite == "epsilon_gamma_box" else {}
        expected = zennit_relevance(model, x, composite, target, canonizers, **rule_options)
        ours = fastlrp.LRP(model, composite, **options, **rule_options)(x, target)
        assert ours.shape == x.shape
        error = ((ours - expected).abs().max() / expected.abs().max()).item()
        assert error <= 1e-6, f"{arch} {composite}: relative error {error:.2e}"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{arch}: {k} changed"


def test_zbox_per_channel_bounds_agree_with_zennit():
    model, x, canonizers, _ = build("resnet18")
    model = randomize_batchnorm(model).eval().double()
    x = x.double()
    target = torch.tensor([3, 4])
    low = torch.tensor([-2.1, -2.0, -1.8], dtype=torch.float64).reshape(1, 3, 1, 1)
    high = torch.tensor([2.2, 2.4, 2.6], dtype=torch.float64).reshape(1, 3, 1, 1)
    expected = zennit_relevance(model, x, "epsilon_gamma_box", target, canonizers, low=low, high=high)
    ours = fastlrp.LRP(model, "epsilon_gamma_box", low=low.flatten(), high=high.flatten())(x, target)
    assert ((ours - expected).abs().max() / expected.abs().max()).item() <= 1e-6
