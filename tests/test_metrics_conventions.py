"""Argument order and results of the metrics: (model, x, relevance, target, *, options) -> dataclass."""

import dataclasses

import pytest
import torch
from torch import nn

from fastlrp import metrics


def _linear():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).double().eval()
    x = torch.rand(4, 1, 3, 4, dtype=torch.float64)
    relevance = model[1].weight[2].view(1, 1, 3, 4) * x
    return model, x, relevance


def test_conservation_takes_x_first_and_returns_a_dataclass():
    model, x, relevance = _linear()
    result = metrics.conservation(model, x, relevance=relevance, target=2)
    assert dataclasses.is_dataclass(result) and isinstance(result, metrics.Conservation)
    bias = model[1].bias[2].item()
    torch.testing.assert_close(result.output - result.relevance_sum, torch.full((4,), bias, dtype=torch.float64))
    torch.testing.assert_close(result.absolute_error, torch.full((4,), abs(bias), dtype=torch.float64))


def test_conservation_refuses_positional_relevance_rather_than_guess_the_order():
    """The old order was (model, relevance, x, target): a positional call is ambiguous, so it fails."""
    model, x, relevance = _linear()
    for args in [(relevance, x), (relevance, x, 2), (x, relevance), (x, relevance, 2)]:
        with pytest.raises(TypeError, match="relevance and target by keyword"):
            metrics.conservation(model, *args)
    with pytest.raises(TypeError, match="relevance="):
        metrics.conservation(model, x)
    # an all-keyword call reads the same under the old and the new order
    new = metrics.conservation(model, x=x, relevance=relevance, target=2)
    assert torch.equal(new.absolute_error, metrics.conservation(model, x, relevance=relevance, target=2).absolute_error)


def test_dict_access_to_conservation_is_deprecated_but_works():
    model, x, relevance = _linear()
    result = metrics.conservation(model, x, relevance=relevance, target=2)
    with pytest.warns(DeprecationWarning, match=r"\.relative_error"):
        assert result["relative_error"] is result.relative_error
    with pytest.raises(KeyError):
        result["nope"]


def test_pixel_flipping_has_the_same_order():
    model, x, relevance = _linear()
    curve = metrics.pixel_flipping(model, x, relevance, 2, steps=2)
    assert dataclasses.is_dataclass(curve)
    same = metrics.pixel_flipping(model, x=x, relevance=relevance, target=2, steps=2)
    assert torch.equal(curve.scores, same.scores)
