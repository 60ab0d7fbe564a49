"""Transformer layers (issue 14): AttnLRP and CP-LRP rules against their formulas, one attention
written three ways giving one relevance, splits and selections, the capture's fixes and errors."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fastlrp
from fastlrp import LRP, UnsupportedLayerError
from fastlrp.rules import AttnLRP, Epsilon, LayerNormIdentity, SoftmaxRule, Uniform

TINY = dict(epsilon=1e-12, stabilizer=1e-12)
F64 = torch.float64


def rand_(module, std=0.5):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)
    return module.double().eval()


class Attention(nn.Module):
    """Single-head self-attention written with matmul and softmax (each a layer of the graph), as
    ``F.scaled_dot_product_attention`` or as ``nn.MultiheadAttention``: the same function."""

    def __init__(self, form, width=6, heads=2):
        super().__init__()
        self.form, self.heads = form, heads
        self.mha = nn.MultiheadAttention(width, heads, batch_first=True)
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        if self.form == "module":
            y = self.mha(x, x, x, need_weights=False)[0]
        else:
            n, t, c = x.shape
            q, k, v = F.linear(x, self.mha.in_proj_weight, self.mha.in_proj_bias).chunk(3, dim=-1)
            q, k, v = (z.reshape(n, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
            if self.form == "sdpa":
                y = F.scaled_dot_product_attention(q, k, v)
            else:
                scores = q @ k.transpose(-2, -1) / (c // self.heads) ** 0.5
                y = torch.softmax(scores, dim=-1) @ v
            y = self.mha.out_proj(y.transpose(1, 2).reshape(n, t, c))
        return self.head(y[:, 0])


@pytest.mark.parametrize("composite", ["attnlrp", "cp_lrp"])
def test_attention_written_three_ways_gives_one_relevance(composite):
    """Graph-level layers (matmul, softmax, scaling) and whole blocks (sdpa, nn.MultiheadAttention,
    explained through their gradient forms) are the same rules."""
    torch.manual_seed(0)
    explicit = rand_(Attention("explicit"))
    x = torch.randn(2, 5, 6, dtype=F64)
    expected = LRP(explicit, composite, backend="reference", **TINY)(x, 1)
    assert expected.abs().sum() > 0
    for form in ("sdpa", "module"):
        other = Attention(form).double().eval()
        other.load_state_dict(explicit.state_dict())
        got = LRP(other, composite, backend="reference", **TINY)(x, 1)
        # the blocks stabilize once at their output, the graph form at every layer: 1e-12 apart
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-8 * expected.abs().max().item(), msg=form)


def test_cp_lrp_holds_attention_and_conserves():
    """CP-LRP: bias-free, the attention weights constant, every layer linear: relevance is conserved,
    and the query/key product receives none."""
    model = rand_(Attention("explicit"))
    for m in (model.mha, model.mha.out_proj, model.head):
        for name in ("in_proj_bias", "bias"):
            if getattr(m, name, None) is not None:
                nn.init.zeros_(getattr(m, name))
    x = torch.randn(3, 5, 6, dtype=F64)
    explainer = LRP(model, "cp_lrp", backend="reference", **TINY)
    scores = next(name for name in explainer.layer_names if "matmul" in name)
    explanation = explainer.explain(x, 2, layers=[scores])
    torch.testing.assert_close(explanation.relevance.sum((1, 2)), explanation.output[:, 2])
    assert explanation.layers.get(scores) is None or explanation.layers[scores].abs().max() == 0


def test_uniform_rule_splits_a_product_in_half():
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)

        def forward(self, x):
            return self.a(x) * self.b(x)

    model = rand_(Gated())
    x = torch.randn(3, 4, dtype=F64)
    explainer = LRP(model, "attnlrp", backend="reference", **TINY)
    assert isinstance(explainer.rules()["mul"], Uniform)
    explanation = explainer.explain(x, 1, layers=["a", "b"])
    half = explanation.start / 2
    torch.testing.assert_close(explanation.layers["a"], half)
    torch.testing.assert_close(explanation.layers["b"], half)


def test_layer_norm_identity_rule_formula():
    """R_in = x * J^T (R / y), J the layer norm's Jacobian with the standard deviation held constant:
    x_i * (w_i s_i - mean_j(w_j s_j)) / std, s = R / y."""
    model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Linear(6, 3))
    model = rand_(model)
    x = torch.randn(4, 5, dtype=F64)
    explainer = LRP(model, "attnlrp", backend="reference", **TINY)
    assert isinstance(explainer.rules()["1"], LayerNormIdentity)
    explanation = explainer.explain(x, 0, layers=["0", "1"])
    h, norm = model[0](x), model[1]
    y, r = norm(h), explanation.layers["1"]
    std = (h.var(-1, unbiased=False, keepdim=True) + norm.eps).sqrt()
    ws = norm.weight * r / y
    expected = h * (ws - ws.mean(-1, keepdim=True)) / std
    torch.testing.assert_close(explanation.layers["0"], expected)


def test_softmax_rule_in_the_graph():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.out = nn.Linear(4, 5), nn.Linear(5, 2)

        def forward(self, x):
            return self.out(F.softmax(self.fc(x), dim=-1))

    model = rand_(Net())
    x = torch.randn(3, 4, dtype=F64)
    explainer = LRP(model, "attnlrp", backend="reference", **TINY)
    name = next(n for n, rule in explainer.rules().items() if isinstance(rule, SoftmaxRule))
    explanation = explainer.explain(x, 1, layers=["fc", name])
    z, r = model.fc(x), explanation.layers[name]
    expected = z * (r - torch.softmax(z, -1) * r.sum(-1, keepdim=True))
    torch.testing.assert_close(explanation.layers["fc"], expected)


class Splits(nn.Module):
    """chunk, split, tensor_split, unbind, indexing and slicing, each output used."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 12, bias=False)
        self.out = nn.Linear(4, 2, bias=False)

    def forward(self, x):
        y = self.fc(x).reshape(x.shape[0], 4, 3)
        a, b = y.chunk(2, dim=1)
        c, d, e = y.split([1, 1, 1], dim=2)
        f, g = torch.tensor_split(y, 2, dim=1)
        rows = y.unbind(1)
        parts = [a.sum((1, 2)), b.sum((1, 2)), c.sum((1, 2)), (d + e).sum((1, 2)),
                 f.sum((1, 2)) + g[:, 0].sum(1), rows[2].sum(1) + y[:, 1:3, ::2].sum((1, 2))]
        return self.out(torch.stack(parts[:4], dim=1) + torch.stack(parts[2:], dim=1))


def test_splits_and_selections_carry_relevance_to_every_output():
    model = rand_(Splits())
    x = torch.randn(3, 6, dtype=F64)
    explanation = LRP(model, "attnlrp", backend="reference", **TINY).explain(x, 1, layers=["fc"])
    # every path is linear and bias-free: all of the logit arrives at the input
    torch.testing.assert_close(explanation.relevance.sum(1), explanation.output[:, 1])
    # relevance at fc's output equals the Epsilon rule of the whole linear map after it, per element
    leaf = model.fc(x).detach().requires_grad_(True)
    y = leaf.reshape(3, 4, 3)
    a, b = y.chunk(2, 1)
    c, d, e = y.split([1, 1, 1], 2)
    f, g = torch.tensor_split(y, 2, 1)
    rows = y.unbind(1)
    parts = [a.sum((1, 2)), b.sum((1, 2)), c.sum((1, 2)), (d + e).sum((1, 2)),
             f.sum((1, 2)) + g[:, 0].sum(1), rows[2].sum(1) + y[:, 1:3, ::2].sum((1, 2))]
    hidden = torch.stack(parts[:4], 1) + torch.stack(parts[2:], 1)
    logit = model.out(hidden)[:, 1]
    (grad,) = torch.autograd.grad(logit.sum(), leaf)
    torch.testing.assert_close(explanation.layers["fc"], leaf.detach() * grad)


def test_shape_arithmetic_is_not_a_layer():
    """n_h * n_w of ints read from x.shape used to become a tensor-product layer."""
    class Patches(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 2, stride=2), nn.Linear(4, 2)

        def forward(self, x):
            n, _, h, w = x.shape
            torch._assert(h == 8, "wrong height")
            y = self.conv(x).reshape(n, 4, (h // 2) * (w // 2))
            return self.fc(y.mean(-1))

    model = rand_(Patches())
    relevance = LRP(model, backend="reference")(torch.randn(2, 3, 8, 8, dtype=F64), 0)
    assert relevance.shape == (2, 3, 8, 8) and torch.isfinite(relevance).all()


def test_functional_max_pool_with_positional_kernel_size():
    """F.max_pool2d(x, 3, 2) (inception_v3) keeps its kernel size."""
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(F.max_pool2d(F.relu(self.conv(x)), 3, 2).mean((2, 3)))

    functional = rand_(Functional())
    module = nn.Sequential(functional.conv, nn.ReLU(), nn.MaxPool2d(3, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                           functional.fc)
    x = torch.randn(2, 3, 11, 11, dtype=F64)
    got = LRP(functional, "epsilon_plus", maxpool="proportional", backend="reference")(x, 1)
    expected = LRP(module, "epsilon_plus", maxpool="proportional", backend="reference")(x, 1)
    torch.testing.assert_close(got, expected)


def test_op_without_rule_names_module_and_source_line():
    class Block(nn.Module):
        def forward(self, x):
            return torch.exp(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.block = nn.Linear(3, 3), Block()

        def forward(self, x):
            return self.block(self.fc(x))

    with pytest.raises(UnsupportedLayerError) as err:
        LRP(Net())
    message = str(err.value)
    assert "exp() has no LRP rule" in message and "block (Block)" in message
    assert "test_transformers.py" in message and "return torch.exp(x)" in message


def test_scaling_by_a_number_passes_relevance_under_attnlrp_only():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2, bias=False)

        def forward(self, x):
            return self.fc(x) * 4.0

    model = rand_(Scaled())
    x = torch.randn(2, 3, dtype=F64)
    attn = LRP(model, "attnlrp", backend="reference", **TINY).explain(x, 0)
    torch.testing.assert_close(attn.relevance.sum(1), attn.output[:, 0])
    zennit = LRP(model, "epsilon_plus", backend="reference", epsilon=1e-12).explain(x, 0)  # the gradient, as Zennit
    torch.testing.assert_close(zennit.relevance.sum(1), 4 * zennit.output[:, 0])


def tiny_vit():
    model = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2,
                                                 hidden_dim=8, mlp_dim=16, num_classes=4)
    return rand_(model, 0.3)


def test_default_composite_by_model():
    vit = LRP(tiny_vit())
    rules = vit.rules()
    assert isinstance(rules["encoder.layers.encoder_layer_0.self_attention"], AttnLRP)
    assert isinstance(rules["conv_proj"], Epsilon)
    cnn = LRP(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    assert type(cnn.rules()["0"]).__name__ == "ZPlus"  # epsilon_plus
    convnext_like = nn.Sequential(nn.Conv2d(3, 4, 1), torchvision.models.convnext.LayerNorm2d(4))
    assert fastlrp.engine.defaults.default_composite(convnext_like) == "attnlrp"


@pytest.mark.parametrize("v2", [False, True])
def test_swin_explains_and_model_is_unchanged(v2):
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2
    extra = dict(block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2) if v2 else {}
    model = rand_(SwinTransformer(patch_size=[2, 2], embed_dim=8, depths=[2, 1], num_heads=[2, 2],
                                  window_size=[2, 2], num_classes=3, **extra), 0.3)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 12, 12, dtype=F64)
    explanations = {c: LRP(model, c, backend="reference").explain(x, 1) for c in ("attnlrp", "cp_lrp")}
    assert model.training and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    for e in explanations.values():
        assert torch.isfinite(e.relevance).all() and e.relevance.abs().sum() > 0
    assert not torch.allclose(explanations["attnlrp"].relevance, explanations["cp_lrp"].relevance)
    with torch.no_grad():
        torch.testing.assert_close(explanations["attnlrp"].output, model.eval()(x))
