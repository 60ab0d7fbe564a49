"""Class activation maps at a chosen layer: CAM, Grad-CAM and Grad-CAM++.

The result has the layer's spatial shape [N, *spatial] (``upsample=True``: the input's spatial
shape, by (bi/tri)linear interpolation). Formulas and citations in docs/methods.md."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._common.layers import find_module
from ._common import Attribution, score, target_weights
from .base import AttributionMethod

_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _last_of(model, types, what):
    names = [name for name, m in model.named_modules() if isinstance(m, types)]
    if not names:
        raise ValueError(f"the model has no {'/'.join(t.__name__ for t in types)} module; pass {what}=...")
    return names[-1]


class _LayerMap(AttributionMethod):
    """Shared by the CAM family: record the layer's output (and its gradient) in one pass.
    The hook goes on the layer of the eval-mode view, never on the user's module."""

    needs_gradient = True

    def __init__(self, model, layer=None, upsample: bool = False, relu: bool = True):
        super().__init__(model)
        layer = _last_of(model, _CONVOLUTIONS, "layer") if layer is None else layer
        self.layer = find_module(model, layer)[0]
        self.upsample = bool(upsample)
        self.relu = bool(relu)

    def _activations(self, model, x, target):
        captured = {}

        def keep(module, inputs, output):
            if not isinstance(output, torch.Tensor) or output.ndim < 3:
                raise ValueError(f"layer={self.layer!r} ({type(module).__name__}) outputs "
                                 f"{getattr(output, 'shape', type(output).__name__)}; CAM methods need a "
                                 "spatial feature map [N, C, *spatial]")
            captured["activation"] = output

        handle = model.get_submodule(self.layer).register_forward_hook(keep)
        try:
            with torch.set_grad_enabled(self.needs_gradient):
                leaf = x.detach().requires_grad_(self.needs_gradient)
                output = model(leaf)
                if "activation" not in captured:
                    raise ValueError(f"layer={self.layer!r} was not called in the model's forward pass")
                activation = captured["activation"]
                weights = target_weights(output.detach(), target)
                explained = score(output, weights)
                grad = None
                if self.needs_gradient:
                    (grad,) = torch.autograd.grad(explained.sum(), activation)
        finally:
            handle.remove()
        return activation.detach(), grad, output.detach(), weights, explained.detach()

    def _finish(self, cam, x, output, explained):
        if self.relu:
            cam = cam.clamp(min=0)
        if self.upsample:
            if x.ndim < 3:
                raise ValueError("upsample=True needs a spatial input [N, C, *spatial]")
            mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[cam.ndim - 1]
            cam = F.interpolate(cam.unsqueeze(1), size=x.shape[2:], mode=mode, align_corners=False).squeeze(1)
        return Attribution(cam, output, explained)


class CAM(_LayerMap):
    """Class activation mapping (Zhou et al. 2016) for models that end in global average
    pooling and a linear classifier: M(i, j) = sum_k w_ck A_k(i, j).

    layer: the feature map that is pooled (name or module; default the last convolution).
    classifier: the linear layer after the pooling (default the model's last nn.Linear).
    relu: clamp the map at zero (default False: mean(M) + bias is the class logit).
    """

    name = "cam"
    needs_gradient = False

    def __init__(self, model, layer=None, classifier=None, upsample: bool = False, relu: bool = False):
        super().__init__(model, layer, upsample, relu)
        classifier = _last_of(model, (nn.Linear,), "classifier") if classifier is None else classifier
        self.classifier, self._classifier = find_module(model, classifier, "classifier")
        if not isinstance(self._classifier, nn.Linear):
            raise ValueError(f"classifier={self.classifier!r} must be an nn.Linear, "
                             f"got {type(self._classifier).__name__}")

    def _explain(self, model, x, target):
        activation, _, output, weights, explained = self._activations(model, x, target)
        if output.ndim != 2 or weights.shape[1] != self._classifier.out_features:
            raise ValueError(f"CAM needs the classifier={self.classifier!r} to produce the output "
                             f"[N, {self._classifier.out_features}]; the model outputs {tuple(output.shape)}")
        if activation.shape[1] != self._classifier.in_features:
            raise ValueError(f"layer={self.layer!r} has {activation.shape[1]} channels but "
                             f"classifier={self.classifier!r} takes {self._classifier.in_features} features; "
                             "CAM needs global average pooling between them")
        channel_weights = weights @ self._classifier.weight.to(weights.dtype)  # [N, K]: target's row(s)
        cam = torch.einsum("nk,nk...->n...", channel_weights, activation)
        return self._finish(cam, x, output, explained)


class GradCAM(_LayerMap):
    """Grad-CAM (Selvaraju et al. 2017): M = ReLU(sum_k alpha_k A_k) with
    alpha_k = mean over positions of d y / d A_k.

    layer: name or module whose output is the feature map (default the last convolution).
    relu: clamp at zero (default True, as the paper).
    """

    name = "gradcam"

    def _explain(self, model, x, target):
        activation, grad, output, _, explained = self._activations(model, x, target)
        alpha = grad.flatten(2).mean(2)
        cam = torch.einsum("nk,nk...->n...", alpha, activation)
        return self._finish(cam, x, output, explained)


class GradCAMPlusPlus(_LayerMap):
    """Grad-CAM++ (Chattopadhay et al. 2018, eq. 19) with the exponential of the score, so that
    higher derivatives are powers of the first, g = d y / d A:

        a_kij = g_kij^2 / (2 g_kij^2 + g_kij^3 * S_k),   S_k = sum_ab A_kab (channel k's activation
        summed over all positions; the gradient is *not* inside that sum),
        w_k = sum_ij a_kij ReLU(g_kij),   M = ReLU(sum_k w_k A_k).

    The common factor exp(y) is dropped; coefficients that are 0/0 (g = 0) are 0. Options as
    GradCAM.
    """

    name = "gradcam++"

    def _explain(self, model, x, target):
        activation, grad, output, _, explained = self._activations(model, x, target)
        spatial = tuple(range(2, activation.ndim))
        g2 = grad.square()
        channel_sum = activation.sum(spatial, keepdim=True)       # S_k: [N, K, 1, ...]
        denominator = 2 * g2 + g2 * grad * channel_sum
        # g = 0 makes the coefficient 0/0; it multiplies ReLU(g) = 0, so 0 is the natural value
        defined = denominator != 0
        alpha = torch.where(defined, g2 / torch.where(defined, denominator, torch.ones_like(denominator)), 0)
        channel_weights = (alpha * grad.clamp(min=0)).flatten(2).sum(2)
        cam = torch.einsum("nk,nk...->n...", channel_weights, activation)
        return self._finish(cam, x, output, explained)
