"""Adapters for model libraries whose models are not plain one-tensor modules (docs/integrations.md).

- ``fastlrp.integrations.huggingface``: ``transformers`` models from input embeddings or pixels;
- ``fastlrp.integrations.timm``: ``prepare(model)``, a view of a timm model that fastlrp computes exactly;
- ``fastlrp.integrations.concrete_trace``: tracing for one example input, with shapes fixed;
- ``one_input(model)`` (here): for models whose forward takes optional extra arguments.

MONAI's networks need no adapter.
"""

from __future__ import annotations

from torch import nn


class OneInput(nn.Module):
    """``model(x)`` as a module whose forward takes exactly one tensor: for models whose forward has
    optional arguments (timm's VisionTransformer: ``forward(x, attn_mask=None)``), which torch.fx
    would make into further graph inputs. Its training flag is the model's."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.training = model.training  # this wrapper's own flag only: the model is not touched

    def forward(self, x):
        return self.model(x)


def one_input(model: nn.Module) -> nn.Module:
    """``OneInput(model)``: see there."""
    return OneInput(model)
