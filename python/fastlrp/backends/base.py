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

import sys
import threading

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


# Reusing the gradient a backward receives. A backward that turns an incoming relevance or gradient into
# a tensor of the same shape may write the result into the incoming tensor where nothing else holds it:
# no second score-sized or activation-sized tensor, and on the CPU none of the page faults a fresh large
# block costs (docs/native.md, "Memory reuse on CPU"). autograd hands a backward a tensor that only it
# held, often a view of one (the gradient of a reshape or of a batched matmul); a tensor still held
# elsewhere has a second owner in one of three places, each checked:
#   - C++ (another node's input buffer, a saved tensor): the reference counts of the tensor and its base;
#   - another tensor on its memory (a view, a detached copy kept by a tap): the storage's count;
#   - Python (a hook that kept the tensor object): the objects' reference counts, against the counts a
#     backward sees for a gradient nobody keeps, measured once on this interpreter.
_UNSHARED_PYTHON_REFERENCES: dict = {}  # view or not -> (references to the gradient, to its base)
_calibration = threading.local()
_calibration_lock = threading.Lock()
_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def reusable(grad) -> bool:
    """Whether ``grad``, an argument of the calling backward, is held by nothing else (so the backward
    may write its result into it): a CPU tensor, or a view covering all of its base. Call it from the
    backward itself, with the argument as it came."""
    if not (type(grad) is torch.Tensor and grad.device.type == "cpu" and not grad.requires_grad
            and grad._use_count() == 1) or torch.compiler.is_compiling() or _functorch_wrapped(grad):
        return False
    base = grad._base
    # the storage's holders: grad, its base (a view), and the storage object made here to ask
    if torch._C._storage_Use_Count(grad.untyped_storage()._cdata) != (2 if base is None else 3):
        return False
    # a view's base: held by the view and by the Python object made here to ask
    if base is not None and not (base._base is None and base._use_count() == 2 and base.numel() == grad.numel()
                                 and base.data_ptr() == grad.data_ptr()):
        return False
    references = (sys.getrefcount(grad), 0 if base is None else sys.getrefcount(base))
    if getattr(_calibration, "running", False):
        _UNSHARED_PYTHON_REFERENCES[base is not None] = references
        return False
    expected = _unshared_python_references(base is not None)
    return references[0] <= expected[0] and references[1] <= expected[1]


class _Calibration(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        reusable(grad)
        return grad


def _unshared_python_references(view: bool) -> tuple:
    with _calibration_lock:
        if not _UNSHARED_PYTHON_REFERENCES:
            with torch.enable_grad():
                x = torch.zeros(2, 2, requires_grad=True)
                _calibration.running = True
                try:
                    (_Calibration.apply(x * 1.0) * 2.0).sum().backward()  # a gradient of its own
                    (_Calibration.apply(x * 1.0).reshape(4) * 2.0).sum().backward()  # a view of one
                finally:
                    _calibration.running = False
        # where a probe's gradient looked shared: never reuse
        return _UNSHARED_PYTHON_REFERENCES.get(view, (0, 0))


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
