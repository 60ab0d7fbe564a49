"""The interface every attribution method shares with ``fastlrp.LRP``:
``method = Method(model, **options)``, then ``method(x, target)`` returns the attribution and
``method.explain(x, target)`` the attribution with what else the method reports."""

from __future__ import annotations

import torch
from torch import nn

from ._common import Attribution, check_input, check_model, frozen


class AttributionMethod:
    """Base class: validates options at construction, then explains batches.

    ``target`` is what ``fastlrp.LRP`` takes: a class index, one index per sample, a weight
    tensor broadcast to the output, a callable returning such weights, or None (the class each
    sample is predicted as). It is resolved once on the clean input.
    """

    name = ""

    def __init__(self, model: nn.Module):
        check_model(model)
        self.model = model

    def __call__(self, x: torch.Tensor, target=None) -> torch.Tensor:
        return self.explain(x, target).attribution

    def explain(self, x: torch.Tensor, target=None) -> Attribution:
        check_input(self.model, x)
        with frozen(self.model):
            return self._explain(x.detach(), target)

    def _explain(self, x: torch.Tensor, target) -> Attribution:
        raise NotImplementedError

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in vars(self).items()
                            if k != "model" and not k.startswith("_"))
        return f"{type(self).__name__}({options})"
