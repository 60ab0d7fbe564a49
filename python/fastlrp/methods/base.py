"""The interface every attribution method shares with ``fastlrp.LRP``:
``method = Method(model, **options)``, then ``method(x, target)`` returns the relevance and
``method.explain(x, target)`` the relevance with what else the method reports."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .._common.model_view import eval_view, training_warning
from .._common.validate import check_input, check_model
from ._common import Attribution


class AttributionMethod:
    """Base class: validates options at construction, then explains batches.

    ``target`` is what ``fastlrp.LRP`` takes: a class index, one index per sample, a weight
    tensor broadcast to the output, a callable returning such weights, or None (the class each
    sample is predicted as). It is resolved once on the clean input.

    The model is run through ``fastlrp._common.model_view.eval_view``: a fresh eval-mode view per
    call, sharing the parameters. The user's model is never switched to eval mode, never has its
    ``requires_grad`` flags changed and never carries a hook, so a method may run while another
    thread trains or explains the same model. Gradients are taken with respect to the input only.
    """

    name = ""

    def __init__(self, model: nn.Module):
        check_model(model)
        self.model = model

    def __call__(self, x: torch.Tensor, target=None) -> torch.Tensor:
        return self.explain(x, target).relevance

    def explain(self, x: torch.Tensor, target=None) -> Attribution:
        check_input(self.model, x)
        message = training_warning(self.model)
        if message is not None:
            warnings.warn(message, stacklevel=2)
        return self._explain(eval_view(self.model), x.detach(), target)

    def _explain(self, model: nn.Module, x: torch.Tensor, target) -> Attribution:
        """The method itself, on ``model`` (the eval-mode view) and the detached batch ``x``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in vars(self).items()
                            if k != "model" and not k.startswith("_"))
        return f"{type(self).__name__}({options})"
