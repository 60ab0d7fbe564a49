"""fastlrp's AttnLRP and CP-LRP against LXT 2.1 (Achtibat et al.'s implementation), in float64.

LXT computes relevance as gradient x input with its rules switched into the backward pass
(``lxt.efficient``); ``fastlrp.apps.benchmark.lxt`` puts its patches on the layers of one model copy
(shared with the benchmark). LXT's efficient rules have no stabilizer (linear layers keep their gradient, LRP-0);
fastlrp stabilizes each rule with epsilon = 1e-6 by default, so the comparison sets epsilon and the
stabilizer to 1e-12: that is the one convention between the two, pinned by
``test_default_stabilizer_is_the_only_difference``.
"""

import pytest
import torch
import torchvision

import fastlrp

lxt_functional = pytest.importorskip("lxt.explicit.functional", reason="LXT is not installed (pip install lxt==2.1)")

from fastlrp.apps.benchmark import lxt  # noqa: E402

lxt_rules, lxt_patches = lxt.efficient_modules()
lxt_patched, lxt_relevance, _attnlrp_attention = lxt.patched, lxt.relevance, lxt.attnlrp_attention

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
