"""The transformer layers on the native backend (backends/attnlrp.py): the AttnLRP and CP-LRP rules
recorded in the forward pass with torch's fused attention and normalization kernels give the
reference's relevance (which reruns each block with written-out forms), the model's own output, and
run each block once."""

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.video.mvit import MSBlockConfig, MViT

from fastlrp import LRP
from fastlrp.rules import AttnLRP, LayerNormIdentity, SoftmaxRule, Uniform
from test_transformers import Attention, rand_, tiny_vit

F64 = torch.float64
TRANSFORMER_RULES = (AttnLRP, LayerNormIdentity, SoftmaxRule, Uniform)


class MaskedAttention(nn.Module):
    """scaled_dot_product_attention with a causal mask, a float or boolean mask, grouped keys and
    values (GQA), then an RMSNorm."""

    def __init__(self, mask, width=8, heads=4, kv_heads=2, length=5):
        super().__init__()
        self.mask, self.heads, self.kv_heads = mask, heads, kv_heads
        # float: added to the scores; boolean: True may attend (no row fully masked)
        self.register_buffer("float_mask", torch.linspace(-1, 1, length * length).reshape(length, length))
        self.register_buffer("bool_mask", torch.ones(length, length, dtype=torch.bool).tril())
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width * kv_heads // heads)
        self.norm = nn.RMSNorm(width)
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        n, t, c = x.shape
        q = self.q(x).reshape(n, t, self.heads, c // self.heads).transpose(1, 2)
        k, v = self.kv(x).chunk(2, -1)
        k = k.reshape(n, t, self.kv_heads, c // self.heads).transpose(1, 2)
        v = v.reshape(n, t, self.kv_heads, c // self.heads).transpose(1, 2)
        options = dict(enable_gqa=True)
        if self.mask == "causal":
            options["is_causal"] = True
        else:
            options["attn_mask"] = self.float_mask if self.mask == "float" else self.bool_mask
        y = F.scaled_dot_product_attention(q, k, v, **options)
        return self.head(self.norm(y.transpose(1, 2).reshape(n, t, c))[:, -1])


MIXER_CALLS = []


@torch.fx.wrap
def mixer(x, weight):
    """A function the trace keeps whole (a block under AttnLRP) that counts its calls."""
    MIXER_CALLS.append(1)
    scores = torch.softmax(x @ x.transpose(-2, -1), -1)
    return F.gelu(scores @ x) @ weight


@torch.fx.wrap
def add_into(x, y):
    x.add_(y * y)
    return x


class CausalExplicit(nn.Module):
    """Causal attention written with matmul, a -inf mask and softmax: the softmax rule's masked logits."""

    def __init__(self, width=6, length=5):
        super().__init__()
        self.qkv, self.head = nn.Linear(width, 3 * width), nn.Linear(width, 3)
        self.register_buffer("mask", torch.full((length, length), float("-inf")).triu(1))

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        weights = torch.softmax(q @ k.transpose(-2, -1) + self.mask, dim=-1)
        return self.head((weights @ v)[:, -1])


class MaskedMultihead(nn.Module):
    """nn.MultiheadAttention with a boolean attention mask and a float key padding mask, or causal."""

    def __init__(self, causal, width=6, length=5):
        super().__init__()
        self.causal = causal
        self.mha, self.head = nn.MultiheadAttention(width, 2, batch_first=True), nn.Linear(width, 3)
        self.register_buffer("attn_mask", torch.ones(length, length, dtype=torch.bool).triu(1))
        self.register_buffer("padding", torch.tensor([[0.0, 0.0, 0.0, -1.5, 0.0], [0.0, -0.5, 0.0, 0.0, 0.0]]))

    def forward(self, x):
        if self.causal:
            y = self.mha(x, x, x, attn_mask=self.attn_mask, is_causal=True, need_weights=False)[0]
        else:
            y = self.mha(x, x, x, attn_mask=self.attn_mask, key_padding_mask=self.padding, need_weights=False)[0]
        return self.head(y[:, -1])


def tiny_convnext():
    return rand_(ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=3), 0.3)


def tiny_swin(v2=False):
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2
    extra = dict(block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2) if v2 else {}
    return rand_(SwinTransformer(patch_size=[2, 2], embed_dim=8, depths=[2, 1], num_heads=[2, 2],
                                 window_size=[2, 2], num_classes=3, **extra), 0.3)


def tiny_mvit():
    """MViT-v2's pooled attention with relative positions (_add_rel_pos writes into its input)."""
    blocks = [MSBlockConfig(1, 8, 8, [3, 3, 3], [3, 3, 3], [1, 1, 1], [1, 2, 2]),
              MSBlockConfig(2, 8, 16, [3, 3, 3], [3, 3, 3], [1, 2, 2], [1, 1, 1])]
    model = MViT((16, 16), 4, blocks, residual_pool=True, residual_with_cls_embed=False, rel_pos_embed=True,
                 proj_after_attn=True, num_classes=3, patch_embed_kernel=(3, 3, 3), patch_embed_stride=(2, 2, 2),
                 patch_embed_padding=(1, 1, 1))
    return rand_(model, 0.3)


class Handoffs(nn.Module):
    """Gradient-form layers feeding each other directly, each output also read by a layer in relevance
    form (a sum): q k^T into a kept-whole block, the block into the softmax, the softmax into the
    product with v (backends/base.py, gradient handles)."""

    def __init__(self, width=6, length=5):
        super().__init__()
        self.qkv, self.head = nn.Linear(width, 3 * width), nn.Linear(width + length, 3)
        self.weight = nn.Parameter(torch.randn(length, length))

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = q @ k.transpose(-2, -1)
        mixed = mixer(scores, self.weight)
        weights = torch.softmax(mixed, dim=-1)
        return self.head(torch.cat([weights @ v, weights + mixed + scores], -1)[:, -1])


MODELS = {
    "explicit": (lambda: rand_(Attention("explicit")), (2, 5, 6)),
    "sdpa": (lambda: rand_(Attention("sdpa")), (2, 5, 6)),
    "explicit_causal": (lambda: rand_(CausalExplicit()), (2, 5, 6)),
    "handoffs": (lambda: rand_(Handoffs()), (2, 5, 6)),
    "multihead": (lambda: rand_(Attention("module")), (2, 5, 6)),
    "multihead_masked": (lambda: rand_(MaskedMultihead(causal=False)), (2, 5, 6)),
    "multihead_causal": (lambda: rand_(MaskedMultihead(causal=True)), (2, 5, 6)),
    "causal_gqa_rmsnorm": (lambda: rand_(MaskedAttention("causal")), (2, 5, 8)),
    "float_mask": (lambda: rand_(MaskedAttention("float")), (2, 5, 8)),
    "bool_mask": (lambda: rand_(MaskedAttention("bool")), (2, 5, 8)),
    "vit": (tiny_vit, (2, 3, 16, 16)),
    "convnext": (tiny_convnext, (2, 3, 32, 32)),
    "swin": (tiny_swin, (2, 3, 12, 12)),
    "swin_v2": (lambda: tiny_swin(v2=True), (2, 3, 12, 12)),
    "mvit": (tiny_mvit, (2, 3, 4, 16, 16)),
}


@pytest.mark.parametrize("composite", ["attnlrp", "cp_lrp"])
@pytest.mark.parametrize("name", list(MODELS))
def test_native_equals_reference(name, composite):
    torch.manual_seed(0)
    build, shape = MODELS[name]
    model = build()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(*shape, dtype=F64)
    explainer = LRP(model, composite, backend="native")
    native = explainer.explain(x, 1)
    reference = LRP(model, composite, backend="reference").explain(x, 1)
    transformer_sites = [site for site, rule in explainer.rules().items() if isinstance(rule, TRANSFORMER_RULES)]
    assert transformer_sites and all(native.backends[site] == "native" for site in transformer_sites)
    assert native.relevance.abs().sum() > 0 and torch.isfinite(native.relevance).all()
    torch.testing.assert_close(native.relevance, reference.relevance, rtol=1e-9,
                               atol=1e-9 * reference.relevance.abs().max().item())
    with torch.no_grad():
        torch.testing.assert_close(native.output, model(x), rtol=1e-12, atol=1e-12)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", ["handoffs", "mvit", "explicit_causal"])
def test_gradient_handles_skip_conversions_and_keep_every_layers_relevance(name, monkeypatch):
    """Where a gradient-form layer feeds another, the gradient passes as it is (fewer g -> x * g
    conversions than with the handles withdrawn), the relevance is the reference's, and the relevance
    recorded at every layer (taps withdraw the handles there) is the reference's too."""
    from fastlrp.backends import attnlrp
    torch.manual_seed(0)
    build, shape = MODELS[name]
    model = build()
    x = torch.randn(*shape, dtype=F64)
    conversions = []
    entry = attnlrp._GradientToRelevance.apply
    monkeypatch.setattr(attnlrp._GradientToRelevance, "apply", lambda *a: conversions.append(1) or entry(*a))
    explainer = LRP(model, "attnlrp", backend="native")
    with_handles = explainer(x, 1)
    used = len(conversions)
    handle_of = attnlrp.handle_of
    monkeypatch.setattr(attnlrp, "handle_of", lambda t: None)
    conversions.clear()
    without = explainer(x, 1)
    assert used < len(conversions)
    monkeypatch.setattr(attnlrp, "handle_of", handle_of)
    reference = LRP(model, "attnlrp", backend="reference")
    expected = reference.explain(x, 1, layers=reference.layer_names)
    for got in (with_handles, without):
        torch.testing.assert_close(got, expected.relevance, rtol=1e-9, atol=1e-9 * expected.relevance.abs().max().item())
    tapped = explainer.explain(x, 1, layers=explainer.layer_names)
    assert set(tapped.layers) == set(expected.layers)
    for site, r in expected.layers.items():
        torch.testing.assert_close(tapped.layers[site], r, rtol=1e-9, atol=1e-9 * (r.abs().max().item() + 1e-300),
                                   msg=site)


@pytest.mark.parametrize("name", ["handoffs", "mvit"])
def test_outputs_with_handles_are_freed_after_the_call(name, monkeypatch):
    """Handles are attributes of layer outputs; an output its own node saves must not hold that node
    through its handle (a cycle through autograd's C++ side: every call leaked its tensors)."""
    import gc
    import weakref
    from fastlrp.backends import attnlrp
    torch.manual_seed(0)
    build, shape = MODELS[name]
    explainer = LRP(build(), "attnlrp", backend="native")
    x = torch.randn(*shape, dtype=F64)
    outputs = []
    offer = attnlrp.offer_handle
    monkeypatch.setattr(attnlrp, "offer_handle",
                        lambda output, handle: outputs.extend([weakref.ref(output), weakref.ref(handle)])
                        or offer(output, handle))
    explainer(x, 1)
    gc.collect()
    assert outputs and [r() for r in outputs if r() is not None] == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_follows_reference_in_low_precision(dtype):
    torch.manual_seed(1)
    model = tiny_vit().to(dtype)
    x = torch.randn(3, 3, 16, 16, dtype=dtype)
    native = LRP(model, backend="native")(x, 2)
    exact = LRP(model.double(), backend="reference")(x.double(), 2)
    assert native.dtype == dtype
    scale = exact.abs().max().item()
    tolerance = {torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype]
    assert (native.double() - exact).abs().max().item() < tolerance * scale


def test_each_block_runs_once():
    """The native path records the rule in the forward pass; the reference reruns the block in its rule."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight, self.head = nn.Parameter(torch.randn(4, 4)), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(mixer(x, self.weight)[:, 0])

    model = rand_(Net())
    x = torch.randn(2, 3, 4, dtype=F64)
    for backend, expected in (("native", 1), ("reference", 2)):
        explainer = LRP(model, "attnlrp", backend=backend)
        MIXER_CALLS.clear()
        explainer(x, 0)
        assert len(MIXER_CALLS) == expected, backend


def test_block_may_write_into_its_input():
    """A wrapped helper that adds in place into its input (MViT's _add_rel_pos): the native path gives it
    a copy (an in-place write into the view it would otherwise get is an autograd error)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x):
            return self.head(add_into(self.a(x), self.b(x)))

    model = rand_(Net())
    x = torch.randn(4, 3, dtype=F64)
    native = LRP(model, "attnlrp", backend="native").explain(x, 1)
    reference = LRP(model, "attnlrp", backend="reference").explain(x, 1)
    torch.testing.assert_close(native.relevance, reference.relevance)
    with torch.no_grad():
        torch.testing.assert_close(native.output, model(x))


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("q_thw,k_thw,heads,dim,table_rows", [
    ((2, 4, 4), (2, 2, 2), 2, 8, (7, 7, 3)),      # pooled keys
    ((3, 5, 5), (3, 5, 5), 1, 6, (11, 9, 5)),     # tables resized (interpolated) to the distances
    ((2, 2, 3), (1, 4, 6), 3, 4, (7, 11, 3)),     # queries coarser than keys, one key frame
])
def test_lighter_add_rel_pos_is_torchvisions(dtype, q_thw, k_thw, heads, dim, table_rows):
    """backends/helpers.add_rel_pos: torchvision's values bit for bit, without writing into the scores,
    and the same gradient for the scores and q (the native path runs it; the reference runs torchvision's)."""
    from torchvision.models.video import mvit

    from fastlrp.backends import helpers
    assert helpers.lighter_version(mvit._add_rel_pos) is helpers.add_rel_pos
    torch.manual_seed(3)
    n, m = 1 + math.prod(q_thw), 1 + math.prod(k_thw)
    scores = torch.randn(2, heads, n, m, dtype=dtype, requires_grad=True)
    q = torch.randn(2, heads, n, dim, dtype=dtype, requires_grad=True)
    tables = [torch.randn(rows, dim, dtype=dtype) for rows in table_rows]
    kept = scores.detach().clone()
    expected = mvit._add_rel_pos(scores.clone(), q, q_thw, k_thw, *tables)
    got = helpers.add_rel_pos(scores, q, q_thw, k_thw, *tables)
    assert torch.equal(scores.detach(), kept)
    assert torch.equal(got, expected)
    grad = torch.randn_like(expected)
    for e, g in zip(torch.autograd.grad(expected, (scores, q), grad), torch.autograd.grad(got, (scores, q), grad)):
        tolerance = 1e-12 if dtype == F64 else 1e-5  # sums in another order
        torch.testing.assert_close(g, e, rtol=tolerance, atol=tolerance * e.abs().max().item())


def test_native_mvit_runs_the_lighter_helper(monkeypatch):
    from fastlrp.backends import helpers
    calls = []
    lighter = helpers.add_rel_pos
    monkeypatch.setattr(helpers, "_LIGHTER", {key: lambda *a: calls.append(1) or lighter(*a)
                                              for key in helpers._LIGHTER})
    torch.manual_seed(0)
    build, shape = MODELS["mvit"]
    model = build()
    x = torch.randn(*shape, dtype=F64)
    native = LRP(model, "attnlrp", backend="native")(x, 1)
    assert len(calls) == len(model.blocks)  # one per attention block
    reference = LRP(model, "attnlrp", backend="reference")(x, 1)
    torch.testing.assert_close(native, reference, rtol=1e-9, atol=1e-9 * reference.abs().max().item())
