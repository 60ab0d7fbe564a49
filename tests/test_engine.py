"""The engine: model untouched, targets, errors, layer coverage on torchvision models."""

import pytest
import torch
import torchvision
from torch import nn

import fastlrp
from fastlrp import LRP, UnsupportedLayerError


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: (m.training, dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
             for n, m in model.named_modules()},
            {n: p.requires_grad for n, p in model.named_parameters()})


def assert_unchanged(model, snap):
    state, modules, grads = snap
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]) and v.dtype == state[k].dtype, k
    now = {n: (m.training, dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
           for n, m in model.named_modules()}
    assert now == modules
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


def small_cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                         nn.MaxPool2d(2), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 5))


def test_model_is_bit_identical_after_explaining_in_train_mode():
    model = small_cnn()
    calls = []
    model[0].register_forward_hook(lambda *a: calls.append(1))
    model.train()
    snap = snapshot(model)
    with pytest.warns(UserWarning, match="training mode"):
        explainer = LRP(model, "epsilon_plus")
        explainer(torch.randn(2, 3, 8, 8), 1)
    assert_unchanged(model, snap)
    assert calls == []  # the user's hooks do not fire inside the explainer


def test_train_mode_is_explained_in_eval_mode():
    model = small_cnn()
    nn.init.uniform_(model[1].running_var, 0.5, 2.0)
    x = torch.randn(4, 3, 8, 8)
    model.eval()
    expected = LRP(model)(x, 2)
    model.train()
    with pytest.warns(UserWarning):
        got = LRP(model)(x, 2)
    torch.testing.assert_close(got, expected)


def test_targets_index_tensor_weights_callable_and_start():
    model = small_cnn().eval()
    x = torch.randn(3, 3, 8, 8)
    explainer = LRP(model, "epsilon_plus")
    out = model(x)
    by_int = explainer.explain(x, 2)
    by_tensor = explainer(x, torch.tensor([2, 2, 2]))
    onehot = torch.zeros(3, 5)
    onehot[:, 2] = 1
    by_weights = explainer(x, onehot)
    by_callable = explainer(x, lambda o: o * onehot)
    for r in (by_tensor, by_weights, by_callable):
        torch.testing.assert_close(r, by_int.relevance)
    torch.testing.assert_close(by_int.output, out)
    torch.testing.assert_close(by_int.start[:, 2], out[:, 2])
    unit = LRP(model, "epsilon_plus", start="one")(x, 2)
    torch.testing.assert_close(unit * out[:, 2].reshape(3, 1, 1, 1), by_int.relevance)
    default = explainer(x)  # predicted class
    torch.testing.assert_close(default, explainer(x, out.argmax(1)))


@pytest.mark.parametrize("bad, error, match", [
    (7, ValueError, "out of range"),
    (torch.tensor([1, 2]), ValueError, "one per sample"),
    (torch.ones(3, 4), ValueError, "do not broadcast"),
    ("cat", TypeError, "target must be"),
])
def test_bad_targets_are_clear(bad, error, match):
    model = small_cnn().eval()
    with pytest.raises(error, match=match):
        LRP(model)(torch.randn(3, 3, 8, 8), bad)


def test_bad_inputs_are_clear():
    model = small_cnn().eval()
    explainer = LRP(model)
    with pytest.raises(TypeError, match="dtype"):
        explainer(torch.randn(2, 3, 8, 8, dtype=torch.float64), 0)
    with pytest.raises(TypeError, match="floating-point"):
        explainer(torch.ones(2, 3, 8, 8, dtype=torch.long), 0)
    with pytest.raises(ValueError, match=r"first layer 0 \(Conv2d\)"):
        explainer(torch.randn(2, 4, 8, 8), 0)
    with pytest.raises(ValueError, match="expects"):
        explainer(torch.randn(3, 8, 8), 0)
    with pytest.raises(TypeError, match="torch.Tensor"):
        explainer([[1.0]], 0)


@pytest.mark.gpu
def test_device_mismatch_is_clear():
    explainer = LRP(small_cnn().eval())
    with pytest.raises(ValueError, match="cuda"):
        explainer(torch.randn(2, 3, 8, 8, device="cuda"), 0)


def test_unsupported_layer_names_module_and_type_and_passthrough_works():
    model = nn.Sequential(nn.Linear(4, 6), nn.GroupNorm(2, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    with pytest.raises(UnsupportedLayerError, match=r"^1 \(GroupNorm, from torch.nn"):
        LRP(model)
    x = torch.randn(5, 4)
    by_type = LRP(model, passthrough=[nn.GroupNorm])(x, 0)
    by_name = LRP(model, passthrough=["1"])(x, 0)
    torch.testing.assert_close(by_type, by_name)
    assert by_type.shape == x.shape and by_type.abs().sum() > 0


def test_unsupported_function_is_named():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(torch.exp(x))

    with pytest.raises(UnsupportedLayerError, match=r"exp\(\) has no LRP rule"):
        LRP(Net())


def test_composite_options_and_bad_names():
    model = small_cnn().eval()
    with pytest.raises(ValueError, match="unknown composite"):
        LRP(model, "epsilon_minus")
    with pytest.raises(ValueError, match="low=..., high="):
        LRP(model, "epsilon_gamma_box")
    with pytest.raises(TypeError, match="epsilon_plus"):
        LRP(model, "epsilon_plus", gamma=0.5)
    rules = LRP(model, "epsilon_gamma_box", low=-1, high=1).rules()
    assert isinstance(rules["0"], fastlrp.ZBox) and isinstance(rules["4"], fastlrp.Gamma)
    assert isinstance(rules["8"], fastlrp.Epsilon) and isinstance(rules["2"], fastlrp.Pass)
    assert isinstance(rules["3"], fastlrp.Gradient) and isinstance(rules["6"], fastlrp.Norm)


def test_user_composite_by_type_name_and_first_layer():
    model = small_cnn().eval()
    composite = fastlrp.Composite(
        layer_map=[(nn.Conv2d, fastlrp.Gamma(0.5)), (nn.Linear, fastlrp.Epsilon(0.1)), (nn.ReLU, fastlrp.Pass())],
        first_map=[(nn.Conv2d, fastlrp.WSquare())],
        name_map={"8": fastlrp.Epsilon(0.0)})
    rules = LRP(model, composite).rules()
    assert isinstance(rules["0"], fastlrp.WSquare)
    assert rules["4"] == fastlrp.Gamma(0.5)
    assert rules["8"] == fastlrp.Epsilon(0.0)
    with pytest.raises(TypeError, match="cannot take the rule"):
        LRP(model, fastlrp.Composite(layer_map=[(nn.ReLU, fastlrp.ZPlus())]))


def test_conservation_epsilon_plus_without_biases():
    model = nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(6, 6, 3, bias=False),
                          nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 4, bias=False)).eval().double()
    x = torch.rand(3, 3, 14, 14, dtype=torch.float64)
    result = LRP(model, "epsilon_plus").explain(x, 1)
    torch.testing.assert_close(result.relevance.sum((1, 2, 3)), result.output[:, 1], rtol=1e-4, atol=1e-6)


def test_residual_sum_splits_relevance_in_proportion():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3, bias=False)

        def forward(self, x):
            out = self.a(x)
            out += x
            return out

    model = Residual().eval().double()
    x = torch.rand(2, 3, dtype=torch.float64)
    explainer = LRP(model, fastlrp.Composite(layer_map=[(fastlrp.layers.Sum, fastlrp.Norm()),
                                                        (nn.Linear, fastlrp.Epsilon())]))
    result = explainer.explain(x, 0, layers=["add"])
    torch.testing.assert_close(result.relevance.sum(1), result.output[:, 0])
    assert result.layers["add"].shape == (2, 3)


def test_layer_relevance_capture_and_names():
    model = small_cnn().eval()
    explainer = LRP(model)
    assert "4" in explainer.layer_names
    result = explainer.explain(torch.randn(2, 3, 8, 8), 1, layers=["4", "8"])
    assert result.layers["4"].shape == (2, 8, 2, 2)
    torch.testing.assert_close(result.layers["8"], result.start)
    with pytest.raises(KeyError, match="no layer named"):
        explainer.explain(torch.randn(2, 3, 8, 8), 1, layers=["nope"])


def test_maxpool_proportional_spreads_relevance():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 2)).eval()
    with torch.no_grad():  # positive everywhere, so every window carries relevance
        for p in model.parameters():
            p.abs_()
    x = torch.rand(1, 1, 4, 4) + 0.1
    # relevance arriving at the ReLU's output is what the max pooling handed down
    winner = LRP(model, maxpool="winner").explain(x, 0, layers=["1"]).layers["1"]
    spread = LRP(model, maxpool="proportional").explain(x, 0, layers=["1"]).layers["1"]
    assert (winner != 0).sum() == 4 * 2  # one winner per window and channel
    assert (spread != 0).sum() == 16 * 2
    torch.testing.assert_close(spread.sum(), winner.sum(), rtol=1e-4, atol=1e-5)


def test_shared_relu_gets_one_layer_per_call():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.relu = nn.Linear(4, 4), nn.Linear(4, 2), nn.ReLU()

        def forward(self, x):
            return self.b(self.relu(self.a(self.relu(x))))

    names = LRP(Shared()).layer_names
    assert "relu" in names and "relu#1" in names


@pytest.mark.slow
@pytest.mark.parametrize("arch, shape", [
    ("mobilenet_v2", (2, 3, 32, 32)), ("efficientnet_b0", (2, 3, 32, 32)),
    ("r3d_18", (1, 3, 4, 32, 32)), ("mc3_18", (1, 3, 4, 32, 32)),
])
def test_torchvision_models_explain(arch, shape):
    builder = getattr(torchvision.models.video, arch, None) or getattr(torchvision.models, arch)
    model = builder(num_classes=10).eval().double()
    snap = snapshot(model)
    x = torch.randn(shape, dtype=torch.float64)
    # Randomly initialized EfficientNet has activations ~1e-13 at its head: float64 and tiny
    # stabilizers keep the relevance from being absorbed by eps there.
    result = LRP(model, "epsilon_plus", epsilon=1e-100, stabilizer=1e-100).explain(x, 3)
    assert result.relevance.shape == x.shape
    assert torch.isfinite(result.relevance).all() and result.relevance.abs().sum() > 0
    # every layer here conserves except through biases; the sums must at least have the logit's scale
    ratio = (result.relevance.sum((1, 2, 3) if x.ndim == 4 else (1, 2, 3, 4)) / result.output[:, 3]).abs()
    assert (ratio > 1e-3).all() and (ratio < 1e3).all()
    assert_unchanged(model, snap)


def test_flatten_before_the_first_linear_layer_is_accepted():
    """The input-shape check applies only to a linear layer that reads the input directly."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).eval()
    x = torch.randn(2, 1, 3, 4)
    relevance = fastlrp.LRP(model, "epsilon_plus")(x, 1)
    assert relevance.shape == x.shape
    with pytest.raises(ValueError, match=r"\[\.\.\., 12\]"):
        fastlrp.LRP(torch.nn.Sequential(torch.nn.Linear(12, 3)).eval())(torch.randn(2, 5), 0)


class _BatchNormThenReLU(nn.BatchNorm2d):
    """A batch norm subclass whose forward adds an activation (as timm's BatchNormAct2d does)."""

    def forward(self, x):
        return torch.relu(super().forward(x))


def test_layer_subclass_with_its_own_forward_is_refused_not_skipped():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _BatchNormThenReLU(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()
    with torch.no_grad():
        model[1].running_mean.normal_()
    with pytest.raises(fastlrp.UnsupportedLayerError, match=r"1 \(_BatchNormThenReLU.*forward\(\) differs"):
        fastlrp.LRP(model)
    x = torch.randn(2, 3, 8, 8)
    explained = fastlrp.LRP(model, passthrough=[_BatchNormThenReLU]).explain(x, 0)
    torch.testing.assert_close(explained.output, model(x))


def test_batch_norm_passed_through_is_not_also_folded():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 8, 8)
    for passthrough in ([nn.BatchNorm2d], ["1"]):
        torch.testing.assert_close(fastlrp.LRP(model, passthrough=passthrough).explain(x, 0).output, model(x))


def test_no_target_on_a_dense_output_explains_each_positions_predicted_class():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 1)).eval()
    x = torch.randn(2, 3, 6, 6)
    explainer = fastlrp.LRP(model, "epsilon_plus", backend="reference")
    output = model(x)
    one_hot = torch.zeros_like(output).scatter_(1, output.argmax(1, keepdim=True), 1.0)
    torch.testing.assert_close(explainer(x), explainer(x, one_hot))
    assert not torch.equal(explainer(x), explainer(x, 0))
