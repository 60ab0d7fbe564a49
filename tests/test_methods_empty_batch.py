"""Issue 16, D8: an empty batch (x of shape [0, ...]) gives an empty relevance for every method,
with the shape the method gives a one-sample batch except for the batch axis."""

import warnings

import pytest
import torch

import fastlrp
from methods_models import GapCNN

# options a method cannot run without, and small settings to keep the one-sample run quick
OPTIONS = {
    "deep_taylor": {"low": -3.0, "high": 3.0},
    "smoothgrad": {"n_samples": 2, "seed": 0},
    "integrated_gradients": {"steps": 4},
    "meaningful_perturbation": {"steps": 3, "seed": 0},
    "lime": {"n_samples": 8, "segments": "grid", "n_segments": 4, "seed": 0},
    "kernel_shap": {"n_samples": 8, "segments": "grid", "n_segments": 4, "seed": 0},
    "occlusion": {"window": 4},
}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GapCNN().eval()


@pytest.mark.parametrize("name", fastlrp.methods.names())
@pytest.mark.parametrize("target", [None, 1])
def test_empty_batch_gives_empty_relevance(model, name, target):
    options = OPTIONS.get(name, {})
    one = torch.randn(1, 3, 8, 8)
    empty = one[:0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = fastlrp.attribute(model, one, target, method=name, **options)
        method = fastlrp.methods.get(name, model, **options)
        result = method.explain(empty, target)
    relevance = result.relevance
    assert relevance.shape == (0,) + tuple(expected.shape[1:])
    assert relevance.dtype == expected.dtype
    assert result.output.shape[0] == 0 and result.score.shape == (0,)
    if not name.endswith("cam") and name != "gradcam++":
        assert relevance.shape == empty.shape


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_lrp_empty_batch(model, backend):
    empty = torch.randn(0, 3, 8, 8)
    explainer = fastlrp.LRP(model, composite="epsilon_gamma_box", low=-3.0, high=3.0, backend=backend)
    assert explainer(empty, 1).shape == empty.shape
    result = explainer.explain(empty, None, layers=["conv2"])
    assert result.relevance.shape == empty.shape
    assert result.layers["conv2"].shape[0] == 0
