"""The reference for linear layers: a rule's declaration (``fastlrp.linear_form``) executed as written.

K modified forward passes z_g = sum_p f(m_p(x); W_p, b_p), a stabilized division per group
s_g = c_g * mask_g * R / stab(z_g), and R_in = sum_p m_p(x) * f^T(s_g(p); W_p). The transposed passes
f^T are taken by autograd on the modified forward passes, as Zennit does, so this stays a direct
transcription of the formulas in docs/rules.md.
"""

from __future__ import annotations

import torch

from ..linear_form import LinearForm, modified_input
from .affine import AffineOp
from .stabilize import stabilize


def linear_relevance(op: AffineOp, form: LinearForm, x: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None, relevance: torch.Tensor) -> torch.Tensor:
    """Relevance at the input of the linear layer ``op`` (parameters ``weight``, ``bias``) under the
    rule declared by ``form``, given the ``relevance`` at its output."""
    inputs = [modified_input(p.input, x, form.bounds).detach().requires_grad_(True) for p in form.parts]
    weights = [p.weight.apply(weight) for p in form.parts]
    with torch.enable_grad():
        outputs = [op(inp, w, p.bias.apply(bias)) for inp, w, p in zip(inputs, weights, form.parts)]
    with torch.no_grad():
        output = op(x, weight, bias) if form.uses_mask else None
        shares = []
        for g, group in enumerate(form.groups):
            z = sum(out.detach() for out, p in zip(outputs, form.parts) if p.group == g)
            s = group.coefficient * relevance / stabilize(z, form.stabilizer)
            if group.mask != "none":
                s = s * ((output > 0) if group.mask == "positive" else (output < 0)).to(s.dtype)
            shares.append(s)
    grads = torch.autograd.grad(outputs, inputs, [shares[p.group] for p in form.parts])
    return sum(inp.detach() * g for inp, g in zip(inputs, grads))
