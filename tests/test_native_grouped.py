"""Grouped and depthwise convolutions on the native backend, end to end: whole mobile networks
(MobileNetV3, ShuffleNet v2, EfficientNet-B0; random weights, 32x32) give the reference backend's
relevance to float64 rounding, with every grouped convolution run natively."""

import pytest
import torch
from torch import nn

import fastlrp
from fastlrp import ops

torchvision = pytest.importorskip("torchvision")
pytestmark = pytest.mark.skipif(not ops.native_supports(torch.device("cpu"), torch.float64),
                                reason="fastlrp._C is not built (source checkout)")

MODELS = {
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
    "shufflenet_v2": lambda: torchvision.models.shufflenet_v2_x0_5(num_classes=10),
    "efficientnet_b0": lambda: torchvision.models.efficientnet_b0(num_classes=10),
}
# one composite with a single rule group (ZPlus), one with two masked groups and bounds (Gamma, ZBox);
# AlphaBeta on grouped layers is covered layer by layer in tests/test_rules.py
COMPOSITES = {"epsilon_plus": {}, "epsilon_gamma_box": {"low": -3.0, "high": 3.0}}


def randomized(model: nn.Module) -> nn.Module:
    """Batch norms with non-trivial statistics, so folding and the signs of inputs matter."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    return model.double().eval()


def grouped_sites(model):
    return {name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1}


@pytest.mark.parametrize("composite", list(COMPOSITES))
@pytest.mark.parametrize("name", list(MODELS))
def test_mobile_net_native_equals_reference(name, composite):
    torch.manual_seed(1)
    model = randomized(MODELS[name]())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    target = torch.tensor([3, 7])
    options = COMPOSITES[composite]
    ref = fastlrp.LRP(model, composite, backend="reference", **options)(x, target)
    explanation = fastlrp.LRP(model, composite, backend="native", **options).explain(x, target)
    grouped = grouped_sites(model)
    assert grouped and all(explanation.backends[site] == "native" for site in grouped)
    scale = ref.abs().max()
    assert scale > 0 and torch.isfinite(explanation.relevance).all()
    assert ((explanation.relevance - ref).abs().max() / scale).item() < 1e-10


def test_grouped_conv_channels_last_and_save_memory_equal_reference():
    """The interleaved block layout holds for channels-last input and the recomputed z."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.ReLU(),
                          nn.Conv2d(6, 8, 1, groups=2), nn.Conv2d(8, 8, 3, padding=1, groups=4),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).double().eval()
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64).to(memory_format=torch.channels_last)
    for composite, options in {**COMPOSITES, "epsilon_alpha2_beta1": {}}.items():
        ref = fastlrp.LRP(model, composite, backend="reference", **options)(x, 1)
        for save_memory in (False, True):
            got = fastlrp.LRP(model, composite, backend="native", save_memory=save_memory, **options)(x, 1)
            torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_depthwise_layers_never_run_channel_multiplier_convolutions():
    """Gamma and AlphaBeta on depthwise layers run one depthwise convolution per (rule group, input)
    part, never one with two outputs per input channel (torch ran those 5-18x slower on the CPU), and
    still give the reference's relevance, with biases, signed inputs and a strided layer."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Convolutions(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.convolution.default:
                x, w, groups, transposed = args[0], args[1], args[8], args[6]
                self.calls.append((x.shape[1], w.shape[0], groups, transposed))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Hardswish(),
                          nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.SiLU(),
                          nn.Conv2d(6, 6, 5, stride=2, padding=2, groups=6),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).double().eval()
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    for composite, options in {"epsilon_gamma_box": {"low": -3.0, "high": 3.0}, "epsilon_alpha2_beta1": {}}.items():
        ref = fastlrp.LRP(model, composite, backend="reference", **options)(x, 1)
        explainer = fastlrp.LRP(model, composite, backend="native", **options)
        with Convolutions() as seen:
            got = explainer(x, 1)
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
        depthwise = [(c_in, c_out, transposed) for c_in, c_out, groups, transposed in seen.calls if groups == 6]
        assert depthwise and all(c_in == c_out == 6 for c_in, c_out, _ in depthwise), depthwise
