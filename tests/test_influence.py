"""Influence functions against leave-one-out retraining on L2-regularized logistic regression."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastlrp.analysis import influence
from fastlrp.apps.demo import load_demo_model, make_dataset

N, D, WEIGHT_DECAY = 40, 4, 0.01

pytestmark = pytest.mark.usefixtures("single_thread")


def _bce(output, target):
    return F.binary_cross_entropy_with_logits(output, target)


def _fit(model, x, y, keep):
    """Minimize 1/N sum_i keep_i loss_i + WEIGHT_DECAY/2 |theta|^2 to convergence (LBFGS, float64).
    keep_j = 0 drops point j with the other terms unchanged: the eps = -1/N of Koh & Liang."""
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        losses = F.binary_cross_entropy_with_logits(model(x), y, reduction="none")[:, 0]
        loss = (losses * keep).sum() / N + 0.5 * WEIGHT_DECAY * sum(p.pow(2).sum() for p in model.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    return model


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    w_true = torch.tensor([2.0, -1.0, 0.5, 0.0], dtype=torch.float64)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    # Label noise, so that some training points mislead and are harmful to a test prediction.
    y = ((x @ w_true + 0.7 * torch.randn(N, generator=g, dtype=torch.float64)) > 0).double()[:, None]
    x_test = torch.randn(3, D, generator=g, dtype=torch.float64)
    y_test = ((x_test @ w_true) > 0).double()[:, None]
    torch.manual_seed(0)
    model = _fit(nn.Linear(D, 1).double(), x, y, torch.ones(N, dtype=torch.float64))
    return model, x, y, x_test, y_test


@pytest.fixture(scope="module")
def leave_one_out(problem):
    """Actual change of each test loss when each training point is removed and the model retrained."""
    model, x, y, x_test, y_test = problem
    with torch.no_grad():
        base = F.binary_cross_entropy_with_logits(model(x_test), y_test, reduction="none")[:, 0]
    change = torch.zeros(len(x_test), N, dtype=torch.float64)
    for j in range(N):
        keep = torch.ones(N, dtype=torch.float64)
        keep[j] = 0
        retrained = _fit(copy.deepcopy(model), x, y, keep)
        with torch.no_grad():
            change[:, j] = F.binary_cross_entropy_with_logits(retrained(x_test), y_test, reduction="none")[:, 0] - base
    return change


def _spearman(a, b):
    ranks = torch.stack([a.argsort().argsort(), b.argsort().argsort()]).double()
    return torch.corrcoef(ranks)[0, 1].item()


def test_exact_influence_ranks_like_leave_one_out(problem, leave_one_out):
    model, x, y, x_test, y_test = problem
    result = influence(model, _bce, x, y, x_test, y_test, weight_decay=WEIGHT_DECAY)
    assert result.scores.shape == (3, N) and result.inverse_hvp.shape == (3, D + 1)
    for t in range(3):
        rho = _spearman(result.scores[t], leave_one_out[t])
        assert rho > 0.8, (t, rho)
        # The extremes agree too: the most helpful point raises the loss most when removed.
        assert leave_one_out[t].argmax() in result.most_helpful(3, test=t)
        assert leave_one_out[t].argmin() in result.most_harmful(3, test=t)
    # Both signs occur: helpful and harmful points exist, and the predictions share their signs.
    assert (result.scores > 0).any() and (result.scores < 0).any()
    agree = (result.scores.sign() == leave_one_out.sign()).double().mean()
    assert agree > 0.9


def test_lissa_matches_the_exact_inverse(problem):
    model, x, y, x_test, y_test = problem
    exact = influence(model, _bce, x, y, x_test, y_test, weight_decay=WEIGHT_DECAY)
    full = influence(model, _bce, x, y, x_test, y_test, weight_decay=WEIGHT_DECAY, method="lissa", lissa_depth=300)
    torch.testing.assert_close(full.scores, exact.scores, rtol=1e-6, atol=1e-9)
    # Stochastic mini-batch Hessians: close, not exact.
    sampled = influence(model, _bce, x, y, x_test, y_test, weight_decay=WEIGHT_DECAY, method="lissa",
                        lissa_depth=300, lissa_batch_size=20, lissa_repeats=4)
    relative = (sampled.scores - exact.scores).norm() / exact.scores.norm()
    assert relative < 0.25, relative
    for t in range(3):
        assert _spearman(sampled.scores[t], exact.scores[t]) > 0.9


def test_last_layer_influence_on_the_demo_cnn():
    """Koh & Liang's recipe for deep nets: influence over the last layer only, the rest held fixed."""
    model = load_demo_model().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y, _ = make_dataset(120, seed=11)
    x_test, y_test, _ = make_dataset(2, seed=12)
    result = influence(model, F.cross_entropy, x, y, x_test, y_test, parameters=["fc.weight", "fc.bias"],
                       damping=0.01)
    assert result.scores.shape == (2, 120) and result.parameters == ("fc.weight", "fc.bias")
    for t in range(2):
        helpful = result.most_helpful(10, test=t)
        # Points that support a prediction are mostly of the predicted class.
        assert (y[helpful] == y_test[t]).double().mean() >= 0.8
    # The user's model is untouched: parameters, buffers, modes, gradients, hooks.
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())

    import matplotlib.pyplot as plt

    from fastlrp.analysis import plot_influential

    fig = plot_influential(x, result, test=1, k=4)
    titles = [ax.get_title() for ax in fig.axes if ax.images]
    assert len(titles) == 8 and titles[0].startswith(f"#{int(result.most_helpful(1, test=1))}:")
    plt.close(fig)


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(method="newton"), ValueError, "method"),
    (dict(weight_decay=-1.0), ValueError, "weight_decay"),
    (dict(damping=-1.0), ValueError, "damping"),
    (dict(parameters=["nope"]), ValueError, "parameters"),
    (dict(parameters=[]), ValueError, "parameters"),
    (dict(max_exact_parameters=2), ValueError, "max_exact_parameters"),
    (dict(method="lissa", lissa_depth=0), ValueError, "lissa_depth"),
    (dict(method="lissa", lissa_batch_size=1000), ValueError, "lissa_batch_size"),
])
def test_bad_arguments_name_the_argument(problem, kwargs, error, words):
    model, x, y, x_test, y_test = problem
    with pytest.raises(error, match=words):
        influence(model, _bce, x, y, x_test, y_test, **kwargs)


def test_mismatched_data_and_indefinite_hessian_are_reported(problem):
    model, x, y, x_test, y_test = problem
    with pytest.raises(ValueError, match="train_inputs"):
        influence(model, _bce, x, y[:-1], x_test, y_test)
    with pytest.raises(ValueError, match="test_inputs"):
        influence(model, _bce, x, y, x_test[:1], y_test)
    with pytest.raises(ValueError, match="not positive definite"):
        # Maximizing the loss is a maximum, not a minimum: the Hessian is negative definite.
        influence(model, lambda o, t: -_bce(o, t), x, y, x_test, y_test)
    with pytest.raises(ValueError, match="k must be"):
        influence(model, _bce, x, y, x_test, y_test, weight_decay=WEIGHT_DECAY).most_helpful(0)
