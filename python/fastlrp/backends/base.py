"""The backend protocol (docs/design.md, "Backends").

A backend is one way to run a relevance layer. The engine asks each backend of the explainer's
ordered list, per layer and per call, whether it ``supports`` the layer for these inputs (their
device, dtype and shape, the layer's form); the first that does runs it. A layer is a
``fastlrp.engine.relevance_layers.RelevanceLayer``; its ``kind`` ("affine", "norm", "maxpool",
"elementwise", "gated_product") selects the backend's methods ``supports_<kind>``,
``forward_<kind>`` (optional: a fused forward) and ``relevance_<kind>`` (the backward rule). The
reference backend runs every layer by its own ``reference_relevance``: the oracle and the fallback.
"""

from __future__ import annotations

import torch


class Backend:
    """Base class: subclasses add ``supports_<kind>`` and ``relevance_<kind>`` (and ``forward_<kind>``
    where the forward pass itself differs) for the layer kinds they accelerate."""

    name = "backend"

    def available(self, device: torch.device) -> bool:
        """Whether this backend can run anything on ``device`` in this installation."""
        return True

    def supports(self, layer, inputs: tuple) -> bool:
        check = getattr(self, f"supports_{layer.kind}", None)
        return check is not None and bool(check(layer, inputs))

    def forward(self, layer, inputs: tuple) -> torch.Tensor:
        """The layer's output, with this backend's relevance rule as its backward."""
        fused = getattr(self, f"forward_{layer.kind}", None)
        if fused is not None:
            return fused(layer, inputs)
        return RuleFunction.apply(layer, self, *inputs)

    def relevance(self, layer, saved: tuple, shapes: list, relevance: torch.Tensor) -> tuple:
        """Relevance at each input of ``layer`` (None for an input that receives none)."""
        return getattr(self, f"relevance_{layer.kind}")(layer, saved, shapes, relevance)

    def __repr__(self) -> str:
        return f"<fastlrp backend {self.name!r}>"


# Gradient handles. A layer whose backward turns the relevance at its output into a gradient (the
# transformer layers in gradient form) may attach to its output a *handle*: another tensor of the same
# values on the same autograd node, where a gradient g stands for the relevance output * g. A consumer
# in gradient form takes the handle as its input and hands it g as it is, instead of turning g into
# relevance (x * g) for the producer to turn back (R / stab(y)): one pass over the tensor, not two.
# Exact with any mix of consumers: autograd sums what the output and its handle receive, and both
# conversions are linear in the relevance. Only the tensor the producer returned carries its handle
# (a view or reshape of it is a new tensor without one).
_HANDLE = "_fastlrp_gradient_handle"


def offer_handle(output: torch.Tensor, handle: torch.Tensor) -> torch.Tensor:
    setattr(output, _HANDLE, handle)
    return output


def handle_of(t) -> torch.Tensor | None:
    return getattr(t, _HANDLE, None) if isinstance(t, torch.Tensor) else None


def withdraw_handle(output) -> None:
    """All relevance must reach ``output`` itself (a hook or a mask there has to see it)."""
    if handle_of(output) is not None:
        setattr(output, _HANDLE, None)


class RuleFunction(torch.autograd.Function):
    """forward: ``layer.compute(*inputs)``; backward: ``backend.relevance(layer, saved inputs, R)``.

    Everything the backward pass needs is kept on ``ctx``: nothing is read from shared objects or
    from the calling thread, so concurrent calls and autograd's worker threads are safe."""

    @staticmethod
    def forward(ctx, layer, backend, *inputs):
        ctx.layer, ctx.backend = layer, backend
        saved = inputs if layer.saves_inputs else ()
        ctx.save_for_backward(*(t if isinstance(t, torch.Tensor) else None for t in saved))
        ctx.numbers = [None if isinstance(t, torch.Tensor) else t for t in saved]  # inputs read from shapes
        ctx.shapes = [getattr(t, "shape", None) for t in inputs]  # None: a number (a scale read from a shape)
        return layer.compute(*inputs)

    @staticmethod
    def backward(ctx, relevance):
        saved = tuple(n if t is None else t for t, n in zip(ctx.saved_tensors, ctx.numbers))
        return (None, None, *ctx.backend.relevance(ctx.layer, saved, ctx.shapes, relevance))


class ReferenceBackend(Backend):
    """``fastlrp.reference``: pure PyTorch, every layer, every dtype and device."""

    name = "reference"

    def supports(self, layer, inputs) -> bool:
        return True

    def relevance(self, layer, saved, shapes, relevance) -> tuple:
        return layer.reference_relevance(saved, shapes, relevance)
