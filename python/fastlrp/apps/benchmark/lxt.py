"""LXT 2.1 (Achtibat et al.'s AttnLRP implementation) on torchvision ViTs, for the agreement tests and the
benchmark. LXT computes relevance as gradient x input with its rules switched into the backward pass
(``lxt.efficient``); its patches go on the layers of one model copy (the functions LXT's ``monkey_patch``
puts on the classes), so torch's classes are not touched for the rest of the process.
"""
import copy
import functools
import importlib
import importlib.util
import sys
import types
from pathlib import Path
from unittest import mock

from torch import nn


@functools.cache
def efficient_modules():
    """(rules, patches) of lxt.efficient. Its package __init__ also imports LXT's Hugging Face patches,
    which need transformers < 5 (transformers.modeling_attn_mask_utils); the two modules used here need
    only torch, so where the package import fails they are loaded from their files under a bare package
    entry that is removed again. ImportError where LXT is not installed."""
    try:
        return importlib.import_module("lxt.efficient.rules"), importlib.import_module("lxt.efficient.patches")
    except ImportError:
        spec = importlib.util.find_spec("lxt")
        if spec is None:
            raise
    root = Path(spec.origin).parent / "efficient"
    with mock.patch.dict(sys.modules):
        package = types.ModuleType("lxt.efficient")
        package.__path__ = [str(root)]
        sys.modules["lxt.efficient"] = package
        return importlib.import_module("lxt.efficient.rules"), importlib.import_module("lxt.efficient.patches")


def attnlrp_attention(self, query, key, value, *args, **kwargs):
    """LXT's attention wrapper for HF models (``wrap_attention_forward``) on nn.MultiheadAttention: the
    gradient into the queries and keys divided by 4, into the values by 2 (the uniform rule twice)."""
    divide = efficient_modules()[0].divide_gradient
    return self.original_forward(divide(query, 4), divide(key, 4), divide(value, 2), *args, **kwargs)


def cp_lrp_attention():
    """LXT's CP-LRP forward for nn.MultiheadAttention (attention weights held constant)."""
    return efficient_modules()[1].cp_multi_head_attention_forward


def patched(model: nn.Module, attention) -> nn.Module:
    """A copy of ``model`` with LXT's ViT patches on its instances: GELU identity rule, LayerNorm with the
    std held constant, and ``attention`` on nn.MultiheadAttention."""
    patches = efficient_modules()[1]
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, (nn.GELU, nn.MultiheadAttention)):
            module.original_forward = module.forward
        if isinstance(module, nn.GELU):
            module.forward = types.MethodType(patches.non_linear_forward, module)
        elif isinstance(module, nn.LayerNorm):
            module.forward = types.MethodType(patches.layer_norm_forward, module)
        elif isinstance(module, nn.MultiheadAttention):
            module.forward = types.MethodType(attention, module)
    return model


def relevance(model: nn.Module, x, target: int):
    """LXT's relevance: input x gradient of the target logit through the patched model."""
    x = x.clone().requires_grad_(True)
    out = model(x)
    out[:, target].sum().backward()
    return (x * x.grad).detach()
