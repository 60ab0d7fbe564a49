"""opcheck on every Triton op, and whole explanations with backend="triton" against the reference."""

import pytest
import torch
from torch import nn

from kernel_testing import DEVICE, channels_last, needs_kernels, relative_error

import fastlrp
from fastlrp.ops import triton_ops

pytestmark = needs_kernels


# AOT dispatch traces into a triton_op's body, which the CPU interpreter cannot run on traced
# tensors; it is part of the check where the kernels are compiled (a GPU).
OPCHECK_UTILS = (("test_schema", "test_autograd_registration", "test_faketensor") if DEVICE == "cpu"
                 else ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))


def opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=OPCHECK_UTILS)


def test_opcheck_every_op():
    x = torch.randn(2, 5, device=DEVICE)
    w, b = torch.randn(3, 5, device=DEVICE), torch.randn(3, device=DEVICE)
    coef = [0.0, 1.0, 0.0, 0.0, 1.0] + [0.0] * 5  # ZPlus
    geometry = ([], [], [], 1)
    forward_args = (x, w, None, b, b.clamp(min=0), None, None, coef, [0.0] * 8, 1, True, False, *geometry)
    opcheck(torch.ops.fastlrp.triton_affine_forward, forward_args)
    packed = triton_ops.pack_forward_weights(w, coef, [0.0] * 8, [], False, 1)
    opcheck(torch.ops.fastlrp.triton_affine_forward, (x, w, packed) + forward_args[3:])
    y, z = torch.ops.fastlrp.triton_affine_forward(*forward_args)
    opcheck(torch.ops.fastlrp.triton_affine_relevance,
                          (x, w, torch.randn_like(y), z, y, None, None, coef, [0.0] * 8, [1.0], [0], 1e-6, *geometry))
    xp = torch.randn(1, 2, 5, 4, device=DEVICE)
    yp = torch.nn.functional.avg_pool2d(xp, 2)
    opcheck(torch.ops.fastlrp.triton_pool_relevance,
                          (xp, torch.randn_like(yp), yp, 0, [2, 2], [2, 2], [0, 0], False, True, 0, 1e-6))
    opcheck(torch.ops.fastlrp.triton_sum_relevance, ([xp, xp.flip(0)], [1.0, 1.0], 2 * xp,
                                                                    torch.randn_like(xp), 1e-6))


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2)
        self.avg = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        h = self.pool(torch.relu(self.bn1(self.conv1(x))))
        h = torch.relu(self.conv2(h)) + h[:, :, ::2, ::2]  # a residual sum
        return self.fc(self.avg(h).flatten(1))


@pytest.mark.parametrize("composite,options", [("epsilon_plus", {"maxpool": "proportional"}),
                                               ("epsilon_gamma_box", {"low": -3.0, "high": 3.0}),
                                               ("epsilon_alpha2_beta1_flat", {})])
def test_whole_model_agrees_with_the_reference_backend(composite, options, monkeypatch):
    calls = []
    for name in ("affine_forward", "affine_relevance", "pool_relevance", "sum_relevance"):
        original = getattr(triton_ops, name)
        monkeypatch.setattr(triton_ops, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    model = TinyCNN().to(DEVICE).eval()
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-0.5, 0.5)
        model.bn1.running_var.uniform_(0.5, 2.0)
    x = channels_last(torch.randn(2, 3, 8, 6, device=DEVICE))
    fast = fastlrp.LRP(model, composite, backend="triton", **options)
    assert fast.backend == "triton"
    got = fast(x, 1)
    expected = fastlrp.LRP(model, composite, backend="reference", **options)(x, 1)
    assert relative_error(got, expected) < 1e-4
    assert calls.count("affine_forward") == 3 and calls.count("affine_relevance") == 3
    assert calls.count("sum_relevance") == 1 and calls.count("pool_relevance") >= 1


def test_backend_names_and_fallback_per_layer():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.ConvTranspose2d(3, 2, 3)).eval()
    x = torch.randn(1, 2, 5, 5, device=DEVICE)
    # the transposed convolution has no Triton kernel: it falls back (native or reference) per layer
    got = fastlrp.LRP(model, "epsilon_plus", backend="triton")(x, lambda out: out)
    expected = fastlrp.LRP(model, "epsilon_plus", backend="reference")(x, lambda out: out)
    assert relative_error(got, expected) < 1e-4
    assert "triton" not in fastlrp.available_backends("cpu")
    with pytest.raises(ValueError, match="unknown backend"):
        fastlrp.LRP(model, backend="tritonn")


def test_speed_choice_is_cached_and_can_be_forced(monkeypatch, tmp_path):
    from fastlrp.backends import timing
    timing.reset_choices()
    monkeypatch.setenv("FASTLRP_TRITON_CACHE", str(tmp_path / "choices.json"))
    monkeypatch.setenv("FASTLRP_TRITON_CHOICE", "native")
    assert not timing.prefers_first("k", torch.device("cpu"), None, None)
    monkeypatch.setenv("FASTLRP_TRITON_CHOICE", "fastest")
    with pytest.raises(ValueError, match="FASTLRP_TRITON_CHOICE"):
        timing.prefers_first("k", torch.device("cpu"), None, None)
    monkeypatch.delenv("FASTLRP_TRITON_CHOICE")
    assert timing.prefers_first("k", torch.device("cpu"), None, None)  # nothing to measure off CUDA


def test_explanation_reports_the_backend_of_every_layer():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.ConvTranspose2d(3, 2, 3)).eval()
    result = fastlrp.LRP(model, "epsilon_plus", backend="triton").explain(torch.randn(1, 2, 5, 5, device=DEVICE),
                                                                          lambda out: out)
    assert result.backends["0"] == "triton"
    assert result.backends["2"] in ("native", "reference")  # no Triton kernel for transposed convolutions


@pytest.mark.gpu
def test_speed_choice_measures_once_per_shape_on_gpu(monkeypatch, tmp_path):
    from fastlrp.backends import timing
    timing.reset_choices()
    monkeypatch.setenv("FASTLRP_TRITON_CACHE", str(tmp_path / "choices.json"))
    runs = []
    first = timing.prefers_first("k", torch.device("cuda"), lambda: runs.append("t"), lambda: runs.append("n"))
    assert timing.prefers_first("k", torch.device("cuda"), None, None) == first
    assert runs.count("t") == runs.count("n") == 6 and (tmp_path / "choices.json").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resnet18_on_gpu_agrees_with_native(dtype, monkeypatch, tmp_path):
    """A real network at a real size, Triton forced for every layer it takes, against native."""
    torchvision = pytest.importorskip("torchvision")
    monkeypatch.setenv("FASTLRP_TRITON_CHOICE", "triton")
    model = torchvision.models.resnet18(weights=None).cuda().to(dtype).eval()
    x = channels_last(torch.randn(8, 3, 224, 224, device="cuda", dtype=dtype))
    got = fastlrp.LRP(model, "epsilon_gamma_box", low=-3.0, high=3.0, backend="triton")(x, 1)
    native = fastlrp.LRP(model, "epsilon_gamma_box", low=-3.0, high=3.0, backend="native")(x, 1)
    assert relative_error(got, native) < (1e-3 if dtype == torch.float32 else 5e-2)


@pytest.mark.gpu
def test_explanation_under_torch_compile_on_gpu(monkeypatch):
    monkeypatch.setenv("FASTLRP_TRITON_CHOICE", "triton")
    model = TinyCNN().cuda().eval()
    x = torch.randn(2, 3, 8, 6, device="cuda")
    explainer = fastlrp.LRP(model, "epsilon_plus", backend="triton")
    expected = explainer(x, 1)
    compiled = torch.compile(lambda t: explainer(t, 1))
    assert relative_error(compiled(x), expected) < 1e-4
