"""fastlrp's AttnLRP and CP-LRP against LXT 2.1 (Achtibat et al.'s implementation), in float64.

LXT computes relevance as gradient x input with its rules switched into the backward pass
(``lxt.efficient``); its patches are applied here to the layers of one model instance (the same
functions LXT's ``monkey_patch`` puts on the classes, without touching torch's classes for the rest of
the test session). LXT's efficient rules have no stabilizer (linear layers keep their gradient, LRP-0);
fastlrp stabilizes each rule with epsilon = 1e-6 by default, so the comparison sets epsilon and the
stabilizer to 1e-12: that is the one convention between the two, pinned by
``test_default_stabilizer_is_the_only_difference``.
"""

import copy
import importlib
import importlib.util
import sys
import types
from pathlib import Path
from unittest import mock

import pytest
import torch
import torchvision
from torch import nn

import fastlrp

lxt_functional = pytest.importorskip("lxt.explicit.functional", reason="LXT is not installed (pip install lxt==2.1)")


def _lxt_efficient():
    """(rules, patches) of lxt.efficient. Its package __init__ also imports LXT's Hugging Face patches, which
    need transformers < 5 (transformers.modeling_attn_mask_utils); the two modules used here need only
    torch, so where the package import fails they are loaded from their files under a bare package entry
    that is removed again."""
    try:
        return importlib.import_module("lxt.efficient.rules"), importlib.import_module("lxt.efficient.patches")
    except ImportError:
        pass
    root = Path(importlib.util.find_spec("lxt").origin).parent / "efficient"
    with mock.patch.dict(sys.modules):
        package = types.ModuleType("lxt.efficient")
        package.__path__ = [str(root)]
        sys.modules["lxt.efficient"] = package
        return importlib.import_module("lxt.efficient.rules"), importlib.import_module("lxt.efficient.patches")


lxt_rules, lxt_patches = _lxt_efficient()

TINY = 1e-12  # LXT's efficient rules are LRP-0: no stabilizer


def tiny_vit():
    model = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=16, mlp_dim=32, num_classes=5)
    with torch.no_grad():  # torchvision zero-initializes the head
        for p in model.heads.parameters():
            p.normal_()
        model.encoder.pos_embedding.normal_()
        model.class_token.normal_()
    return model.double().eval()


def _attnlrp_attention(self, query, key, value, *args, **kwargs):
    """LXT's attention wrapper for HF models (``wrap_attention_forward``) on nn.MultiheadAttention: the
    gradient into the queries and keys divided by 4, into the values by 2 (the uniform rule twice)."""
    d = lxt_rules.divide_gradient
    return self.original_forward(d(query, 4), d(key, 4), d(value, 2), *args, **kwargs)


def lxt_patched(model, attention):
    """A copy of ``model`` with LXT's ViT patches on its instances: GELU identity rule, LayerNorm with the
    std held constant, and ``attention`` on nn.MultiheadAttention."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, (nn.GELU, nn.MultiheadAttention)):
            module.original_forward = module.forward
        if isinstance(module, nn.GELU):
            module.forward = types.MethodType(lxt_patches.non_linear_forward, module)
        elif isinstance(module, nn.LayerNorm):
            module.forward = types.MethodType(lxt_patches.layer_norm_forward, module)
        elif isinstance(module, nn.MultiheadAttention):
            module.forward = types.MethodType(attention, module)
    return model


def lxt_relevance(model, x, target):
    x = x.clone().requires_grad_(True)
    out = model(x)
    out[:, target].sum().backward()
    return (x * x.grad).detach()


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("composite, attention", [("cp_lrp", lxt_patches.cp_multi_head_attention_forward),
                                                  ("attnlrp", _attnlrp_attention)])
def test_vit_matches_lxt(composite, attention, backend):
    model = tiny_vit()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    expected = lxt_relevance(lxt_patched(model, attention), x, 2)
    got = fastlrp.LRP(model, composite, backend=backend, epsilon=TINY, stabilizer=TINY)(x, 2)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())


def test_vit_default_composite_is_attnlrp():
    model = tiny_vit()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    explainer = fastlrp.LRP(model, backend="reference", epsilon=TINY, stabilizer=TINY)
    expected = lxt_relevance(lxt_patched(model, _attnlrp_attention), x, 1)
    torch.testing.assert_close(explainer(x, 1), expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())


def test_default_stabilizer_is_the_only_difference():
    """With fastlrp's default epsilon (1e-6) the relevance moves away from LXT's by about epsilon / |z|:
    more than rounding, far less than the relevance."""
    model = tiny_vit()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    expected = lxt_relevance(lxt_patched(model, _attnlrp_attention), x, 0)
    got = fastlrp.LRP(model, "attnlrp", backend="reference")(x, 0)
    gap = ((got - expected).abs().max() / expected.abs().max()).item()
    assert 1e-12 < gap < 1e-3


def test_softmax_rule_matches_lxt():
    x = torch.randn(4, 3, 7, dtype=torch.float64)
    x[0, 0, :2] = float("-inf")  # a masked logit
    relevance = torch.randn(4, 3, 7, dtype=torch.float64)
    leaf = x.clone().requires_grad_(True)
    s = lxt_functional.softmax(leaf, -1)
    (expected,) = torch.autograd.grad(s, leaf, relevance)
    got = fastlrp.reference.softmax_relevance(x, torch.softmax(x, -1), relevance, -1)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_uniform_matmul_matches_lxt():
    """The uniform rule on a matmul. Conventions differ only in the stabilizer: LXT's explicit matmul divides
    R by 2 z + epsilon (whatever the sign of z), fastlrp by z + epsilon * sign(z); with a negligible epsilon
    both are R / (2 z) split between the factors."""
    a, b = torch.randn(2, 4, 5, dtype=torch.float64), torch.randn(2, 5, 3, dtype=torch.float64)
    relevance = torch.randn(2, 4, 3, dtype=torch.float64)
    la, lb = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    out = lxt_functional.matmul(la, lb, epsilon=1e-30)
    expected = torch.autograd.grad(out, (la, lb), relevance)
    got = fastlrp.reference.uniform_relevance(torch.matmul, [a, b], [True, True], relevance, 1e-30)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
