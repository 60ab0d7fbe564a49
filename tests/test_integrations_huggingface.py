"""Hugging Face ``transformers`` models (extra ``fastlrp[huggingface]``) built from tiny configs with
random weights (nothing downloaded): BERT for sequence classification, GPT-2 and LLaMA causal language
models explained at their input embeddings, a ViT image classifier. float64, one short sequence."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastlrp
from fastlrp.integrations.concrete_trace import concrete_trace
from integrations_checks import assert_backends_agree, assert_unchanged, snapshot

transformers = pytest.importorskip("transformers")
from fastlrp.integrations import huggingface as hf  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32,
        "vocab_size": 60, "max_position_embeddings": 32}


def _zero_biases(model):
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.endswith("bias"):
                p.zero_()
    return model


def _bert(**config):
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(
        transformers.BertConfig(**TINY, num_labels=3, **config)).double().eval()


def _gpt2(**config):
    torch.manual_seed(1)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=16, n_layer=2, n_head=2, vocab_size=60, n_positions=32, bos_token_id=0, eos_token_id=0,
        **config)).double().eval()


def _llama(**config):
    torch.manual_seed(2)
    return transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**TINY, num_key_value_heads=1, **config)).double().eval()


IDS = torch.tensor([[5, 17, 3, 42, 8, 23]])
LANGUAGE_MODELS = {"bert": _bert, "gpt2": _gpt2, "llama": _llama}


@pytest.mark.parametrize("name", list(LANGUAGE_MODELS))
def test_language_model_from_embeddings(name):
    model = LANGUAGE_MODELS[name]()
    before = snapshot(model)
    traced = hf.embedding_model(model, IDS)
    embeds = hf.input_embeddings(model, IDS)
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    expected = logits[:, -1] if hf.is_decoder(model) else logits
    torch.testing.assert_close(traced(embeds), expected)  # the traced module is the model
    assert fastlrp.engine.defaults.default_composite(traced) == "attnlrp"
    target = 7 if hf.is_decoder(model) else 1  # a next token, a class
    result = assert_backends_agree(traced, embeds, target)
    assert result.relevance.shape == embeds.shape and torch.isfinite(result.relevance).all()
    per_token = hf.token_relevance(result.relevance)
    assert per_token.shape == IDS.shape and per_token.abs().sum() > 0
    assert_unchanged(model, before)


def test_decoder_conserves_without_biases():
    """CP-LRP (attention weights held constant) with the biases zeroed and 1e-12 stabilizers and norm eps:
    LLaMA's relevance at the embeddings sums to the next-token logit (measured 2.7e-10 relative)."""
    model = _zero_biases(_llama(rms_norm_eps=1e-12))
    traced = hf.embedding_model(model, IDS)
    result = fastlrp.LRP(traced, "cp_lrp", zero_params="bias", epsilon=1e-12, stabilizer=1e-12).explain(
        hf.input_embeddings(model, IDS), 7)
    torch.testing.assert_close(result.relevance.sum(), result.start.sum(), rtol=1e-7, atol=0)


def test_bert_conserves_down_to_the_embedding_sum():
    """BERT adds constant position and token-type embeddings to the word embeddings; that sum's Norm rule
    gives the constants their share, so conservation is checked where the three are summed (measured
    3e-10 relative under CP-LRP, bias-free, 1e-12 stabilizers and norm eps)."""
    model = _zero_biases(_bert(layer_norm_eps=1e-12))
    traced = hf.embedding_model(model, IDS)
    explainer = fastlrp.LRP(traced, "cp_lrp", zero_params="bias", epsilon=1e-12, stabilizer=1e-12)
    graph = explainer.graph_module
    norm = next(node for node in graph.graph.nodes if node.op == "call_module"
                and graph.get_submodule(node.target).site == "model.bert.embeddings.LayerNorm")
    embedding_sum = graph.get_submodule(norm.args[0].target).site  # the sum the embeddings' norm reads
    assert embedding_sum.startswith("add")
    result = explainer.explain(hf.input_embeddings(model, IDS), 1, layers=[embedding_sum])
    torch.testing.assert_close(result.layers[embedding_sum].sum(), result.start.sum(), rtol=1e-7, atol=0)
    assert not torch.isclose(result.relevance.sum(), result.start.sum(), rtol=1e-3)  # the constants' share


def test_attention_mask_is_fixed_into_the_module():
    model = _bert()
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    traced = hf.embedding_model(model, IDS, attention_mask=mask)
    embeds = hf.input_embeddings(model, IDS)
    with torch.no_grad():
        torch.testing.assert_close(traced(embeds), model(input_ids=IDS, attention_mask=mask).logits)
    relevance = hf.token_relevance(fastlrp.LRP(traced)(embeds, 1))
    assert torch.isfinite(relevance).all()
    # padding is not attended to: its relevance is the relevance its embedding gets in its own row only,
    # which never reaches the [CLS] position the classifier reads
    assert relevance[0, 4:].abs().max() <= 1e-12 * relevance.abs().max()


def test_vit_image_classifier():
    torch.manual_seed(3)
    config = transformers.ViTConfig(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=32, num_labels=3)
    model = transformers.ViTForImageClassification(config).double().eval()
    before = snapshot(model)
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    traced = hf.image_model(model, x)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(pixel_values=x).logits)
    result = assert_backends_agree(traced, x, 2)
    assert result.relevance.shape == x.shape and torch.isfinite(result.relevance).all()
    assert_unchanged(model, before)


def test_bad_inputs_are_named():
    model = _bert()
    with pytest.raises(TypeError, match="input_ids"):
        hf.embedding_model(model, IDS.double())
    with pytest.raises(ValueError, match="attention_mask"):
        hf.embedding_model(model, IDS, attention_mask=torch.ones(1, 4))
    with pytest.raises(TypeError, match="PreTrainedModel"):
        hf.embedding_model(nn.Linear(2, 2), IDS)
    with pytest.raises(ValueError, match="relevance"):
        hf.token_relevance(torch.zeros(6, 16))


class _BranchOnInput(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x


class _NumberFromInput(nn.Module):
    def forward(self, x):
        return x / x.abs().max().item()


class _BranchOnShape(nn.Module):
    def forward(self, x):
        n, length = x.shape[:2]
        return x[:, : length - 1].reshape(n, -1) if length > 2 else x


def test_concrete_trace_fixes_shapes_and_refuses_input_branches():
    x = torch.randn(2, 4, 3)
    traced = concrete_trace(_BranchOnShape(), x)
    torch.testing.assert_close(traced(x), _BranchOnShape()(x))
    with pytest.raises(TypeError, match="branches on a value computed from its input"):
        concrete_trace(_BranchOnInput(), x)
    with pytest.raises(TypeError, match=r"reads a number from its input \(.item\(\)\)"):
        concrete_trace(_NumberFromInput(), x)


def test_traced_module_sees_weight_updates():
    """The traced module shares the model's parameters, GPT-2's Conv1D weights through a transposed view."""
    model = _gpt2()
    traced = hf.embedding_model(model, IDS)
    embeds = hf.input_embeddings(model, IDS)
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.weight.mul_(-0.5)
        model.transformer.h[1].mlp.c_fc.bias.add_(0.25)
        expected = model(input_ids=IDS).logits[:, -1]
        torch.testing.assert_close(traced(embeds), expected)
