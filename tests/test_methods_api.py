"""fastlrp.attribute: every method by name on a small CNN, clear errors for bad options, and
the user's model left exactly as it was."""

import pytest
import torch
from torch import nn

import fastlrp
from fastlrp.methods import IntegratedGradients, Occlusion
from methods_models import GapCNN

# small options so every method runs in well under a second on a 3x8x8 input
FAST_OPTIONS = {
    "lrp": {}, "sensitivity": {}, "gradient": {}, "gradient_x_input": {},
    "smoothgrad": {"n_samples": 3}, "integrated_gradients": {"steps": 4}, "deep_taylor": {"low": -3.0, "high": 3.0},
    "guided_backprop": {}, "deconvnet": {}, "occlusion": {"window": 4},
    "meaningful_perturbation": {"steps": 3, "mask_scale": 2, "blur_sigma": 2.0},
    "cam": {}, "gradcam": {"layer": "relu2"}, "gradcam++": {"layer": "relu2"},
    "lime": {"n_samples": 16, "n_segments": 4}, "kernel_shap": {"n_samples": 16, "n_segments": 4},
}
CAM_METHODS = {"cam", "gradcam", "gradcam++"}


def test_every_registered_method_is_exercised():
    assert set(FAST_OPTIONS) == set(fastlrp.methods.names())


def _state(model):
    return ([(n, m.training) for n, m in model.named_modules()],
            [(n, p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()],
            [(n, dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
             for n, m in model.named_modules()])


def _assert_same_state(before, after):
    assert before[0] == after[0] and before[2] == after[2]
    for (name, flag, value), (name2, flag2, value2) in zip(before[1], after[1]):
        assert name == name2 and flag == flag2 and torch.equal(value, value2)


@pytest.mark.parametrize("method", sorted(FAST_OPTIONS))
def test_attribute_by_name_shapes_and_untouched_model(method):
    if method in ("lime", "kernel_shap"):
        pytest.importorskip("skimage")
    model = GapCNN().eval()
    model.conv1.weight.requires_grad_(False)      # a mix of flags that must survive
    x = torch.randn(2, 3, 8, 8)
    before = _state(model)
    result = fastlrp.attribute(model, x, torch.tensor([0, 2]), method=method, **FAST_OPTIONS[method])
    _assert_same_state(before, _state(model))
    expected = (2, 8, 8) if method in CAM_METHODS else x.shape
    assert result.shape == expected and torch.isfinite(result).all()


def test_model_state_is_restored_after_an_error_and_in_training_mode():
    model = GapCNN().train()
    model.fc.weight.requires_grad_(False)
    before = _state(model)
    with pytest.warns(UserWarning, match="training mode"):
        with pytest.raises(ValueError, match="target index out of range"):
            fastlrp.attribute(model, torch.randn(1, 3, 8, 8), 7, method="integrated_gradients")
    with pytest.warns(UserWarning, match="training mode"), pytest.raises(ValueError, match="spatial"):
        fastlrp.attribute(model, torch.randn(1, 3, 8, 8), 0, method="gradcam", layer="fc")
    _assert_same_state(before, _state(model))
    assert model.training


def test_tabular_inputs_work_with_a_feature_axis():
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(4, 5)
    for method, options in [("sensitivity", {}), ("gradient", {}), ("gradient_x_input", {}),
                            ("smoothgrad", {"n_samples": 2}), ("integrated_gradients", {"steps": 3}),
                            ("guided_backprop", {}), ("deconvnet", {}), ("occlusion", {}),
                            ("deep_taylor", {"input_rule": "wsquare"}), ("lime", {"n_samples": 20}),
                            ("kernel_shap", {"n_samples": 40}),
                            ("meaningful_perturbation", {"perturbation": "noise", "steps": 2})]:
        assert fastlrp.attribute(model, x, 1, method=method, **options).shape == x.shape, method


@pytest.mark.parametrize("method,options,error,message", [
    ("nope", {}, ValueError, "unknown method 'nope'"),
    ("gradient", {"steps": 3}, TypeError, "method 'gradient' has no option 'steps'"),
    ("integrated_gradients", {"steps": 0}, ValueError, "steps must be an integer >= 1"),
    ("integrated_gradients", {"rule": "simpson"}, ValueError, "rule must be one of"),
    ("integrated_gradients", {"baseline": "noise"}, ValueError, "baseline must be one of"),
    ("integrated_gradients", {"batch_size": 2.5}, ValueError, "batch_size must be an integer"),
    ("smoothgrad", {"noise_level": -0.1}, ValueError, "noise_level must be a finite number >= 0"),
    ("occlusion", {"window": (2, 2, 2)}, ValueError, "window must be a positive int or 2 positive ints"),
    ("occlusion", {"stride": 0}, ValueError, "stride must be a positive int"),
    ("occlusion", {"baseline": "zero"}, TypeError, "baseline must be a number or a tensor"),
    ("occlusion", {"baseline": torch.zeros(5)}, ValueError, "baseline of shape"),
    ("meaningful_perturbation", {"mode": "insert"}, ValueError, "mode must be one of"),
    ("meaningful_perturbation", {"lr": 0}, ValueError, "lr must be a finite number > 0"),
    ("meaningful_perturbation", {"score": "softmax"}, ValueError, "score must be one of"),
    ("gradcam", {"layer": "layer9"}, ValueError, "layer='layer9' is not a module"),
    ("lime", {"kernel_width": 0}, ValueError, "kernel_width must be"),
    ("lime", {"segments": 3.5}, TypeError,
     "segments must be None, one of ['slic', 'quickshift', 'grid'], a label tensor or a callable"),
    ("lime", {"segments": "felzenszwalb"}, ValueError, "segments must be one of"),
    ("kernel_shap", {"segments": torch.zeros(3, 3, dtype=torch.long)}, ValueError, "segments must be integer labels"),
    ("kernel_shap", {"n_samples": 1}, ValueError, "n_samples must be an integer >= 2"),
    ("deep_taylor", {"input_rule": "zplus", "low": 0.0}, ValueError, "low and high only apply"),
])
def test_bad_options_name_the_argument(method, options, error, message):
    model = GapCNN().eval()
    with pytest.raises(error, match=message.replace("(", r"\(").replace("[", r"\[")):
        fastlrp.attribute(model, torch.randn(1, 3, 8, 8), 0, method=method, **options)


def test_bad_inputs_and_targets():
    model = GapCNN().eval()
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        IntegratedGradients(model)([1.0], 0)
    with pytest.raises(TypeError, match="floating-point"):
        Occlusion(model)(torch.zeros(1, 3, 8, 8, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="target indices"):
        fastlrp.attribute(model, torch.randn(2, 3, 8, 8), torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fastlrp.attribute(lambda x: x, torch.randn(2, 3), 0)


def test_integrated_gradients_on_the_demo_model():
    from fastlrp.apps.demo.data import make_dataset
    from fastlrp.apps.demo.model import load_demo_model
    model = load_demo_model()
    images = make_dataset(2, seed=0)[0]
    ig = IntegratedGradients(model, steps=16).explain(images, None)
    assert ig.relevance.shape == images.shape
    assert (ig.completeness_gap.abs() < 0.1 * ig.score.abs().clamp(min=1)).all()


@pytest.mark.gpu
@pytest.mark.parametrize("method", sorted(FAST_OPTIONS))
def test_every_method_runs_on_cuda_and_matches_the_cpu_where_deterministic(method):
    if method in ("lime", "kernel_shap"):
        pytest.importorskip("skimage")
    model = GapCNN().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    target = torch.tensor([0, 2])
    on_gpu = fastlrp.attribute(model.cuda(), x.cuda(), target.cuda(), method=method, **FAST_OPTIONS[method])
    assert on_gpu.device.type == "cuda" and torch.isfinite(on_gpu).all()
    if method not in ("smoothgrad", "meaningful_perturbation", "lime", "kernel_shap"):  # random draws
        on_cpu = fastlrp.attribute(model.cpu(), x, target, method=method, **FAST_OPTIONS[method])
        torch.testing.assert_close(on_gpu.cpu(), on_cpu)
