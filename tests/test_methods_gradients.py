"""Gradient methods, integrated gradients, SmoothGrad and the engine-based methods against
closed forms on linear and piecewise-linear toy models."""

import pytest
import torch
from torch import nn

import fastlrp
from fastlrp.methods import (Deconvolution, DeepTaylor, GradientTimesInput, GuidedBackpropagation,
                             IntegratedGradients, PlainGradient, SensitivityAnalysis, SmoothGrad)
from methods_models import LinearImageModel, linear_model, relu_mlp


def test_gradient_family_on_a_linear_model():
    model = linear_model()
    x = torch.randn(4, 6, dtype=torch.float64)
    target = torch.tensor([0, 2, 1, 2])
    w = model.weight[target].detach()
    torch.testing.assert_close(PlainGradient(model)(x, target), w)
    torch.testing.assert_close(SensitivityAnalysis(model)(x, target), w ** 2)
    # gradient x input = the contributions w_ci x_i (the bias is no input's contribution)
    torch.testing.assert_close(GradientTimesInput(model)(x, target), w * x)


def test_gradient_x_input_on_a_bias_free_relu_network_equals_its_contributions():
    model = relu_mlp()
    x = torch.randn(3, 5, dtype=torch.float64)
    target = 1
    first, second = model[0].weight.detach(), model[2].weight.detach()
    active = (x @ first.T > 0).double()                     # [N, hidden]
    local_weights = (active * second[target]) @ first       # [N, features]: the linear piece at x
    result = fastlrp.attribute(model, x, target, method="gradient_x_input")
    torch.testing.assert_close(result, local_weights * x)
    torch.testing.assert_close(result.sum(1), model(x)[:, target].detach())  # positive homogeneity


def _smooth_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Softplus(), nn.Linear(8, 2)).double().eval()


def test_integrated_gradients_completeness_with_enough_steps():
    model = _smooth_mlp()
    x = torch.randn(3, 4, dtype=torch.float64) * 2
    result = IntegratedGradients(model, steps=200, rule="trapezoid", batch_size=97).explain(x, 0)
    f_x = model(x)[:, 0].detach()
    f_0 = model(torch.zeros_like(x))[:, 0].detach()
    total = result.relevance.sum(1)
    assert (total - (f_x - f_0)).abs().max() < 1e-4
    torch.testing.assert_close(result.completeness_gap, total - (f_x - f_0))
    torch.testing.assert_close(result.baseline_score, f_0)
    # a coarse left Riemann sum reports an honest, larger gap
    coarse = IntegratedGradients(model, steps=3, rule="left").explain(x, 0)
    assert coarse.completeness_gap.abs().max() > 10 * result.completeness_gap.abs().max()


@pytest.mark.parametrize("rule", ["left", "right", "midpoint", "trapezoid"])
def test_integrated_gradients_chunking_does_not_change_the_result(rule):
    model = _smooth_mlp()
    x = torch.randn(3, 4, dtype=torch.float64)
    small = IntegratedGradients(model, steps=9, rule=rule, batch_size=2)(x, 1)
    large = IntegratedGradients(model, steps=9, rule=rule, batch_size=1000)(x, 1)
    torch.testing.assert_close(small, large)


def test_integrated_gradients_of_a_linear_model_is_exact_for_any_baseline():
    model = LinearImageModel().eval()
    x = torch.randn(2, 2, 6, 5, dtype=torch.float64)
    w = model.fc.weight[1].detach().reshape(2, 6, 5)
    for baseline in (0.5, torch.randn(1, 2, 6, 5, dtype=torch.float64), "blur"):
        method = IntegratedGradients(model, baseline=baseline, steps=2, rule="left", blur_sigma=1.0)
        result = method.explain(x, 1)
        torch.testing.assert_close(result.relevance, w * (x - result.baseline))
        assert result.completeness_gap.abs().max() < 1e-10
    blurred = IntegratedGradients(model, baseline="blur", blur_sigma=1.0).explain(x, 1).baseline
    assert not torch.allclose(blurred, x) and blurred.shape == x.shape


def test_smoothgrad_of_a_linear_model_is_its_weight():
    model = linear_model()
    x = torch.randn(2, 6, dtype=torch.float64)
    w = model.weight[2].detach().expand(2, 6)
    torch.testing.assert_close(SmoothGrad(model, n_samples=5, batch_size=3)(x, 2), w)
    torch.testing.assert_close(SmoothGrad(model, n_samples=5, squared=True)(x, 2), w ** 2)


def test_smoothgrad_averages_gradients_at_noisy_inputs():
    model = _smooth_mlp()
    x = torch.randn(2, 4, dtype=torch.float64)
    torch.testing.assert_close(SmoothGrad(model, noise_level=0.0, n_samples=3)(x, 0), PlainGradient(model)(x, 0))
    first = SmoothGrad(model, noise_level=0.2, n_samples=6, seed=3, batch_size=5)(x, 0)
    again = SmoothGrad(model, noise_level=0.2, n_samples=6, seed=3, batch_size=64)(x, 0)
    torch.testing.assert_close(first, again)
    # by hand: the same noise, sigma = 0.2 * (max - min) per sample
    gen = torch.Generator().manual_seed(3)
    sigma = 0.2 * (x.amax(1) - x.amin(1))[:, None]
    noisy = x + sigma * torch.randn((6,) + tuple(x.shape), generator=gen, dtype=x.dtype)
    grads = torch.stack([PlainGradient(model)(copy, 0) for copy in noisy])
    torch.testing.assert_close(first, grads.mean(0))


def _one_hidden_relu():
    model = relu_mlp(n_features=4, hidden=6, n_classes=2)
    x = torch.randn(3, 4, dtype=torch.float64)
    return model, x, model[0].weight.detach(), model[2].weight.detach()


def test_guided_backprop_and_deconvnet_closed_forms():
    model, x, first, second = _one_hidden_relu()
    active = (x @ first.T > 0).double()
    top = second[1].expand(3, -1)
    guided = (active * top.clamp(min=0)) @ first          # both the input and the signal positive
    deconv = top.clamp(min=0) @ first                     # only the signal
    torch.testing.assert_close(GuidedBackpropagation(model)(x, 1), guided)
    torch.testing.assert_close(fastlrp.attribute(model, x, 1, method="deconvnet"), deconv)
    torch.testing.assert_close(Deconvolution(model)(x, 1), deconv)


def test_deep_taylor_composites():
    model = relu_mlp(n_features=4, hidden=6, n_classes=2)
    rules = DeepTaylor(model, input_rule="wsquare").explainer.rules()
    assert isinstance(rules["0"], fastlrp.WSquare) and isinstance(rules["2"], fastlrp.ZPlus)
    rules = DeepTaylor(model, input_rule="zb", low=-1.0, high=1.0).explainer.rules()
    assert isinstance(rules["0"], fastlrp.ZBox) and isinstance(rules["2"], fastlrp.ZPlus)
    # z+ conserves on a bias-free ReLU network with non-negative input and a positive logit
    x = torch.rand(8, 4, dtype=torch.float64)
    out = model(x).detach()
    target = out.argmax(1)
    keep = out.gather(1, target[:, None])[:, 0] > 0
    relevance = DeepTaylor(model, input_rule="zplus")(x, target)
    # (up to the stabilizer 1e-6 added to every denominator)
    torch.testing.assert_close(relevance.sum(1)[keep], out.gather(1, target[:, None])[keep, 0], rtol=1e-4, atol=1e-8)
    assert (relevance >= 0).all()
    with pytest.raises(ValueError, match="low=... and high="):
        DeepTaylor(model, input_rule="zb")
    with pytest.raises(ValueError, match="input_rule"):
        DeepTaylor(model, input_rule="zz")
