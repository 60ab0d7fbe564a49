"""Checks shared by tests/test_integrations_*.py (timm, Hugging Face transformers, MONAI).

For every model: the relevance is finite, the user's model is left as it was (every state tensor's
values, every module's training flag, every parameter's requires_grad), the native backend gives the
reference backend's relevance, and where the rules conserve, the relevance sums to the explained score.
"""

from __future__ import annotations

import torch
from torch import nn

import fastlrp
from fastlrp import layers
from fastlrp.composites import base_layer_map


def snapshot(model: nn.Module) -> dict:
    """What explaining must not change."""
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "training": {n: m.training for n, m in model.named_modules()},
            "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()}}


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), f"{key} changed"


def epsilon_composite(extra=()) -> fastlrp.Composite:
    """LRP-0: Epsilon(1e-12) on every linear layer with the biases left out of z, Pass through
    activations, Norm (stabilizer 1e-12) for sums and average pooling. Each layer hands on the relevance
    it receives wherever its z is not 0, so the input relevance sums to the starting relevance. LRP-0's
    relevance grows large where z nearly cancels (the known noise of LRP-0 in deep networks), so the
    stabilizers are kept far below Zennit's 1e-6, whose share would then be visible in the sum."""
    return fastlrp.Composite(layer_map=list(extra) + base_layer_map(stabilizer=1e-12) + [
        (layers.Linear, fastlrp.Epsilon(1e-12, zero_params="bias"))])


def assert_conserves(explanation: fastlrp.Explanation, rtol: float) -> None:
    """Sum of the input relevance per sample == sum of the starting relevance per sample."""
    n = explanation.relevance.shape[0]
    got = explanation.relevance.reshape(n, -1).sum(1)
    want = explanation.start.reshape(n, -1).sum(1)
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * want.abs().max().item())


def assert_backends_agree(model: nn.Module, x: torch.Tensor, target, rtol: float = 1e-9, **options):
    """native == reference (float64); returns the native explanation."""
    native = fastlrp.LRP(model, backend="native", **options).explain(x, target)
    assert "native" in native.backends.values(), "no layer ran natively"
    reference = fastlrp.LRP(model, backend="reference", **options).explain(x, target)
    scale = reference.relevance.abs().max().item()
    torch.testing.assert_close(native.relevance, reference.relevance, rtol=rtol, atol=rtol * scale)
    return native

