"""The native backend end to end: the same relevance as the reference backend for every rule,
layer form and sign of input; backend choice; torch.compile; the graph's sign analysis."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastlrp
from fastlrp import ops

pytestmark = pytest.mark.skipif(not ops.native_supports(torch.device("cpu"), torch.float32),
                                reason="fastlrp._C is not built (source checkout)")

RULES = [fastlrp.Epsilon(), fastlrp.Epsilon(0.1, zero_params="bias"), fastlrp.ZPlus(), fastlrp.AlphaBeta(),
         fastlrp.AlphaBeta(1.0, 0.0), fastlrp.Gamma(0.25), fastlrp.ZBox(low=-2.0, high=2.0), fastlrp.Flat(),
         fastlrp.WSquare()]
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-4, atol=1e-5)}


def both(model, x, target, **options):
    ref = fastlrp.LRP(model, backend="reference", **options)
    nat = fastlrp.LRP(model, backend="native", **options)
    assert nat.backend == "native" and ref.backend == "reference"
    return ref(x, target), nat(x, target), nat


class Stack(nn.Module):
    """conv (signed input) -> relu -> conv (non-negative input) -> pool -> linear -> relu -> linear."""

    def __init__(self, dims=2):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        pool = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}[dims]
        self.conv1, self.conv2 = conv(3, 5, 3, padding=1), conv(5, 4, 3, stride=2, padding=1, dilation=1)
        self.pool, self.flat = pool(2, ceil_mode=True), nn.Flatten()
        self.fc1, self.fc2 = nn.LazyLinear(7), nn.Linear(7, 3)

    def forward(self, x):
        h = self.pool(F.relu(self.conv2(F.relu(self.conv1(x)))))
        return self.fc2(F.relu(self.fc1(self.flat(h))))


@pytest.mark.parametrize("rule", RULES, ids=repr)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_rule_on_every_layer_matches_reference(rule, dtype):
    model = Stack().to(dtype)
    x = torch.randn(3, 3, 7, 9, dtype=dtype)
    model(x)  # materialize the lazy layer
    composite = fastlrp.Composite(layer_map=[(nn.Conv2d, rule), (nn.Linear, rule)])
    expected, got, nat = both(model.eval(), x, torch.tensor([0, 2, 1]), composite=composite)
    assert nat._sites["conv2"].nonnegative_input and not nat._sites["conv1"].nonnegative_input
    torch.testing.assert_close(got, expected, **TOL[dtype])


class Gate(nn.Module):
    """Squeeze-excitation shapes: 1x1 convolutions on a 1x1 map, whose transpose is one GEMM."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv2d(6, 4, 1), nn.Conv2d(4, 5, 1)

    def forward(self, x):
        h = F.adaptive_avg_pool2d(F.relu(self.conv(x)), 1)
        return self.fc2(F.relu(self.fc1(h))).flatten(1)


@pytest.mark.parametrize("rule", [fastlrp.Epsilon(), fastlrp.ZPlus(), fastlrp.Gamma(0.25), fastlrp.AlphaBeta()],
                         ids=repr)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pointwise_layers_on_one_position_match_reference(rule, dtype):
    torch.manual_seed(1)
    model = Gate().to(dtype).eval()
    x = torch.randn(3, 3, 5, 7, dtype=dtype)
    composite = fastlrp.Composite(layer_map=[(nn.Conv2d, rule)])
    expected, got, _ = both(model, x, torch.tensor([4, 0, 2]), composite=composite)
    scale = expected.abs().max()  # the relevance here is small against TOL's atol
    torch.testing.assert_close(got / scale, expected / scale, **TOL[dtype])


@pytest.mark.parametrize("dims,shape", [(1, (2, 3, 11)), (3, (1, 3, 5, 6, 7))])
@pytest.mark.parametrize("composite", ["epsilon_gamma_box", "epsilon_alpha2_beta1_flat"])
def test_conv1d_conv3d(dims, shape, composite):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64)
    model = Stack(dims).double()
    model(x)
    kw = dict(low=-3.0, high=3.0) if composite == "epsilon_gamma_box" else {}
    expected, got, _ = both(model.eval(), x, 1, composite=composite, **kw)
    torch.testing.assert_close(got, expected, **TOL[torch.float64])


@pytest.mark.parametrize("name", ["vgg11_bn", "resnet18", "densenet121"])
def test_torchvision_models_all_composites(name):
    torchvision = pytest.importorskip("torchvision")
    model = getattr(torchvision.models, name)(num_classes=10).eval().double()
    if name.startswith("vgg"):
        # The 25088x4096 classifier costs minutes in float64 and is covered by the Zennit
        # agreement test; a narrow head keeps pooling -> flatten -> Linear -> ReLU -> Linear.
        model.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 32), nn.ReLU(), nn.Dropout(),
                                         nn.Linear(32, 10)).double()
    for m in model.modules():  # non-trivial batch-norm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    extra = dict(functional_rules=False) if name.startswith("densenet") else {}
    # DenseNet is the slowest to trace and run: two composites cover its block forms.
    composites = (["epsilon_gamma_box", "epsilon_alpha2_beta1_flat"] if name.startswith("densenet")
                  else fastlrp.composites.names())
    for composite in composites:
        kw = dict(low=-3.0, high=3.0) if "box" in composite else {}
        expected, got, _ = both(model, x, 4, composite=composite, maxpool="proportional", **kw, **extra)
        torch.testing.assert_close(got, expected, **TOL[torch.float64], msg=f"{name} {composite}")


def test_channels_last_input_matches():
    model = Stack().eval()
    x = torch.randn(2, 3, 8, 8)
    model(x)
    expected, _, nat = both(model, x, 0, composite="epsilon_gamma_box", low=-3.0, high=3.0)
    got = nat(x.contiguous(memory_format=torch.channels_last), 0)
    torch.testing.assert_close(got, expected, **TOL[torch.float32])


def test_negated_relu_output_is_not_treated_as_nonnegative():
    """relu(x) * -1 is non-positive: dropping the x- parts there would be wrong."""
    class Negated(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(2, 3, 3), nn.Conv2d(3, 2, 3)

        def forward(self, x):
            return self.conv2(F.relu(self.conv1(x)) * -1.0).sum((2, 3))

    model = Negated().double().eval()
    x = torch.randn(2, 2, 7, 7, dtype=torch.float64)
    expected, got, nat = both(model, x, 1, composite=fastlrp.Composite(layer_map=[(nn.Conv2d, fastlrp.ZPlus())]),
                              functional_rules=True, passthrough=["sum"])
    assert not nat._sites["conv2"].nonnegative_input
    torch.testing.assert_close(got, expected, **TOL[torch.float64])


def test_residual_sums_and_pools_use_kernels(monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=5).eval().double()
    calls = []
    for name in ("sum_relevance", "pool_relevance", "stabilize_divide", "combine"):
        original = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    fastlrp.LRP(model, "epsilon_plus", backend="native", maxpool="proportional")(
        torch.randn(1, 3, 32, 32, dtype=torch.float64), 0)
    assert calls.count("sum_relevance") == 8 and calls.count("pool_relevance") == 2  # 8 blocks; avgpool + maxpool
    assert calls.count("stabilize_divide") == calls.count("combine") == 21  # 20 convolutions + fc


def test_backend_choice_and_environment(monkeypatch):
    model = Stack().eval()
    model(torch.randn(1, 3, 8, 8))
    assert fastlrp.available_backends() == ["native", "reference"]
    assert fastlrp.LRP(model).backend == "native"
    monkeypatch.setenv("FASTLRP_BACKEND", "reference")
    assert fastlrp.LRP(model).backend == "reference"
    assert fastlrp.LRP(model, backend="native").backend == "native"
    monkeypatch.setenv("FASTLRP_BACKEND", "fast")
    with pytest.raises(ValueError, match="unknown backend 'fast' \\(from FASTLRP_BACKEND\\)"):
        fastlrp.LRP(model)


def test_unsupported_dtype_falls_back_per_layer():
    """bfloat16 has no CPU kernel: the native backend runs the reference rule there."""
    model = Stack().eval()
    x = torch.randn(2, 3, 8, 8)
    model(x)
    model = model.bfloat16()
    expected, got, _ = both(model, x.bfloat16(), 1, composite="epsilon_plus")
    torch.testing.assert_close(got, expected)


def test_explanation_under_torch_compile():
    model = Stack().eval()
    x = torch.randn(2, 3, 8, 8)
    model(x)
    explainer = fastlrp.LRP(model, "epsilon_gamma_box", backend="native", low=-3.0, high=3.0)
    expected = explainer(x, 1)
    compiled = torch.compile(lambda t: explainer(t, 1), backend="aot_eager")
    torch.testing.assert_close(compiled(x), expected, **TOL[torch.float32])
    torch.testing.assert_close(compiled(x * 2), explainer(x * 2, 1), **TOL[torch.float32])


def test_block_weights_follow_parameter_changes():
    model = Stack().eval()
    x = torch.randn(2, 3, 8, 8)
    model(x)
    explainer = fastlrp.LRP(model, "epsilon_plus", backend="native")
    first = explainer(x, 0)
    with torch.no_grad():
        model.conv2.weight.mul_(-1.5)
    second = explainer(x, 0)
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, fastlrp.LRP(model, "epsilon_plus", backend="reference")(x, 0),
                               **TOL[torch.float32])


@pytest.mark.gpu
def test_cuda_matches_reference_in_every_dtype():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10).eval().cuda()
    x = torch.randn(2, 3, 64, 64, device="cuda")
    expected = fastlrp.LRP(model.double(), "epsilon_gamma_box", backend="reference", low=-3.0, high=3.0)(x.double(), 1)
    for dtype, tol in [(torch.float32, 1e-3), (torch.bfloat16, 1e-1), (torch.float16, 5e-2)]:
        m = model.to(dtype)
        got = fastlrp.LRP(m, "epsilon_gamma_box", backend="native", low=-3.0, high=3.0)(x.to(dtype), 1)
        err = (got.double() - expected).abs().max() / expected.abs().max()
        assert err < tol, (dtype, float(err))


@pytest.mark.gpu
def test_explanation_captured_in_a_cuda_graph():
    model = Stack().eval().cuda()
    x = torch.randn(2, 3, 8, 8, device="cuda")
    model(x)
    explainer = fastlrp.LRP(model, "epsilon_gamma_box", backend="native", low=-3.0, high=3.0)
    static_x = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: block weights, window tables and caches are built here
        for _ in range(2):
            explainer(static_x, 1)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_relevance = explainer(static_x, 1)
    static_x.copy_(x * 2)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_relevance, explainer(x * 2, 1), rtol=1e-4, atol=1e-5)


def _saved_bytes(explainer, x, target):
    """Bytes autograd keeps from the forward pass for the backward pass of one explanation."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        explainer(x, target)
    return total


@pytest.mark.parametrize("composite", ["epsilon_plus", "epsilon_gamma_box", "epsilon_alpha2_beta1"])
def test_save_memory_keeps_less_and_gives_the_same_relevance(composite):
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10).eval().double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    kw = dict(low=-3.0, high=3.0) if "box" in composite else {}
    plain = fastlrp.LRP(model, composite, backend="native", **kw)
    lean = fastlrp.LRP(model, composite, backend="native", save_memory=True, **kw)
    torch.testing.assert_close(lean(x, 3), plain(x, 3), **TOL[torch.float64])
    kept, kept_lean = _saved_bytes(plain, x, 3), _saved_bytes(lean, x, 3)
    # every ZPlus/Gamma/AlphaBeta convolution drops its z (as large as its output, or twice that)
    assert kept_lean < 0.75 * kept, (kept_lean, kept)


class SmallResidualNet(nn.Module):
    """Convolutions of four widths with batch norms (folded) and a residual sum: enough layers of
    different shapes for dynamo to recompile the per-layer code with symbolic sizes."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.branch = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                    nn.Conv2d(6, 6, 1))
        self.down = nn.Sequential(nn.Conv2d(6, 10, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(10, 12, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 4))

    def forward(self, x):
        h = self.stem(x)
        return self.head(self.down(F.relu(h + self.branch(h))))


def test_explanation_under_torch_compile_with_inductor():
    """The default backend and automatic dynamic shapes (no aot_eager, no dynamic=False)."""
    model = SmallResidualNet().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 8, 8)
    explainer = fastlrp.LRP(model, "epsilon_gamma_box", backend="native", low=-3.0, high=3.0)
    compiled = torch.compile(lambda t: explainer(t, 1))
    torch.testing.assert_close(compiled(x), explainer(x, 1), **TOL[torch.float32])
    y = torch.randn(3, 3, 10, 10)  # another shape: the symbolic-size path
    torch.testing.assert_close(compiled(y), explainer(y, 1), **TOL[torch.float32])
