"""Hugging Face ``transformers`` models as one-tensor models that ``fastlrp.LRP`` explains.

fastlrp explains a module with one tensor input and one tensor output. A ``transformers`` model
takes ``input_ids`` (integers: no relevance flows into them) and returns a ``ModelOutput``, and its
code slices and branches on shapes, which torch.fx cannot trace symbolically. The adapters here
trace the model for one example (``concrete_trace``: shapes and the attention mask fixed to it) into
a module that takes a float tensor and returns logits:

Layers of ``transformers``' own classes that compute what a torch layer computes (LLaMA's RMS norm,
GPT-2's ``Conv1D``) stand in the traced module as that torch layer, sharing the parameters.

- ``embedding_model(model, input_ids)``: input ``inputs_embeds`` [N, L, D] (the word embeddings;
  position and token-type embeddings are added inside, as in the model), output the classification
  logits [N, C] for ``*ForSequenceClassification`` models, or the next-token logits at the last
  position [N, V] for causal language models;
- ``image_model(model, pixel_values)``: input ``pixel_values``, output the logits (ViT-style image
  classifiers).

Relevance per token: ``token_relevance(relevance)`` sums the embedding dimension.

    model = BertForSequenceClassification(config).eval()
    embeds = input_embeddings(model, input_ids)
    explainer = fastlrp.LRP(embedding_model(model, input_ids), composite="attnlrp")
    per_token = token_relevance(explainer(embeds, target=1))          # [N, L]

The traced module accepts inputs of the example's shape only (batch size and length included) and
keeps the attention mask given here; build one per shape. It shares the model's parameters (weight
updates are seen) and never changes the model.
"""

from __future__ import annotations

import torch
from torch import nn

from .concrete_trace import concrete_trace


def _check_model(model) -> None:
    if not isinstance(model, nn.Module) or not hasattr(model, "get_input_embeddings"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")


def _config(model, name, default=None):
    return getattr(getattr(model, "config", None), name, default)


def is_decoder(model: nn.Module) -> bool:
    """Whether ``model`` is a causal language model (its logits are per position over the vocabulary)."""
    return type(model).__name__.endswith("ForCausalLM") or type(model).__name__.endswith("LMHeadModel")


def input_embeddings(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The word embeddings of ``input_ids`` [N, L] -> [N, L, D]: the input ``embedding_model`` takes."""
    _check_model(model)
    if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point() or input_ids.ndim != 2:
        raise TypeError(f"input_ids must be an integer tensor [batch, length], got "
                        f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} "
                        f"{tuple(getattr(input_ids, 'shape', ()))}")
    with torch.no_grad():
        return model.get_input_embeddings()(input_ids).detach()


class _FromEmbeddings(nn.Module):
    """model(inputs_embeds=e) -> logits (classifiers) or the last position's logits (decoders)."""

    def __init__(self, model: nn.Module, attention_mask, decoder: bool):
        super().__init__()
        self.model = model
        self.attention_mask = attention_mask
        self.decoder = decoder

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        options = {"use_cache": False} if self.decoder else {}
        if self.attention_mask is not None:
            options["attention_mask"] = self.attention_mask
        logits = self.model(inputs_embeds=inputs_embeds, return_dict=True, **options).logits
        return logits[:, -1] if self.decoder else logits


class _FromPixels(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values, return_dict=True).logits


def _standard_layer(module: nn.Module):
    """torch's own layer for a ``transformers`` layer that computes the same function from the same
    parameters, so that the composite's rule for it applies; None for any other module.

    - RMS norms of LLaMA-style models (``LlamaRMSNorm``: x / sqrt(mean(x^2) + eps) * weight): ``nn.RMSNorm``
      with the same weight;
    - GPT-2's ``Conv1D`` (x @ W + b, W stored [in, out]): ``nn.Linear`` whose weight is W transposed,
      a view of the same memory (in-place weight updates are seen);
    - activation classes (``NewGELUActivation``, ``GELUActivation``, ...): the torch activation that
      gives the same values.

    Accepted only where both give the same output on a random input (Gemma's norm, with (1 + weight),
    is left alone)."""
    weight = getattr(module, "weight", None)
    if weight is None and not any(True for _ in module.parameters()) and "Activation" in type(module).__name__:
        return _standard_activation(module)
    if not isinstance(weight, nn.Parameter) or isinstance(module, (nn.RMSNorm, nn.Linear)):
        return None
    kind = type(module).__name__
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if kind.endswith("RMSNorm") and weight.ndim == 1 and isinstance(eps, float):
        standard = nn.RMSNorm(weight.shape[0], eps=eps, device=weight.device, dtype=weight.dtype)
        standard.weight = weight  # the same parameter
    elif kind == "Conv1D" and weight.ndim == 2:
        standard = nn.Linear(weight.shape[0], weight.shape[1], bias=getattr(module, "bias", None) is not None,
                             device="meta")
        standard.weight = nn.Parameter(weight.t(), requires_grad=weight.requires_grad)  # shares memory
        if standard.bias is not None:
            standard.bias = module.bias
    else:
        return None
    probe = torch.randn(2, 3, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight)
    with torch.no_grad():
        same = torch.allclose(standard(probe), module(probe), rtol=1e-5, atol=1e-6)
    return standard if same else None


def _standard_activation(module: nn.Module):
    """torch's activation module computing what a ``transformers`` activation class computes
    (``NewGELUActivation`` is GELU's tanh approximation, ``GELUActivation`` GELU), checked on a probe."""
    probe = torch.linspace(-6.0, 6.0, 97, dtype=torch.float64)
    with torch.no_grad():
        expected = module(probe)
        for candidate in (nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU(), nn.ReLU(), nn.Tanh(), nn.Sigmoid()):
            if torch.allclose(candidate(probe), expected, rtol=1e-12, atol=1e-12):
                return candidate
    return None


def embedding_model(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """A module ``inputs_embeds -> logits`` traced from ``model`` for inputs shaped like ``input_ids``'s
    embeddings (see the module docstring). ``attention_mask`` [N, L] (1: attend, 0: padding) is fixed
    into the module; None attends to every token."""
    _check_model(model)
    embeds = input_embeddings(model, input_ids)
    if attention_mask is not None:
        attention_mask = torch.as_tensor(attention_mask, device=input_ids.device)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; "
                             f"it must be input_ids' shape {tuple(input_ids.shape)}")
    wrapper = _FromEmbeddings(model, attention_mask, is_decoder(model))
    return concrete_trace(wrapper, embeds, substitute=_standard_layer)


def image_model(model: nn.Module, pixel_values: torch.Tensor):
    """A module ``pixel_values -> logits`` traced from an image classifier (``ViTForImageClassification``)
    for inputs shaped like ``pixel_values``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point():
        raise TypeError("pixel_values must be a float tensor [batch, channels, height, width]")
    return concrete_trace(_FromPixels(model), pixel_values, substitute=_standard_layer)


def token_relevance(relevance: torch.Tensor) -> torch.Tensor:
    """Relevance per token [N, L] from the relevance of the embeddings [N, L, D] (sum over D)."""
    if relevance.ndim != 3:
        raise ValueError(f"relevance must have shape [batch, length, embedding], got {tuple(relevance.shape)}")
    return relevance.sum(-1)
