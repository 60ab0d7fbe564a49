"""Influence functions (Koh & Liang 2017): which training points a test prediction rests on.

    result = influence(model, F.cross_entropy, train_x, train_y, test_x, test_y, weight_decay=1e-2)
    result.most_helpful(5)   # training points whose removal would raise the test loss most
    result.most_harmful(5)   # ... and lower it most

The model's training objective is taken to be L(theta) = 1/n sum_i loss(z_i; theta) + weight_decay/2 |theta|^2
at a minimum theta. Removing training point z_j moves the minimum, to first order, by
1/n H^-1 grad loss(z_j), with H the Hessian of L; the loss on a test point z then changes by

    score(z, z_j) = 1/n grad loss(z)^T H^-1 grad loss(z_j)        (Koh & Liang 2017, Eq. 2 with eps = -1/n)

A positive score means removing z_j would raise the test loss: z_j helps the prediction; a negative
score marks a harmful point. H^-1 v is computed exactly (the full Hessian by ``torch.func``, for
models up to a few thousand parameters, or for a chosen subset such as the last layer) or estimated by
LiSSA (Agarwal et al. 2017), a truncated Neumann series over mini-batch Hessian-vector products.

The model is read, never changed, not even transiently: ``torch.func.functional_call`` runs an
eval-mode view of it (``fastlrp._common.model_view.eval_view``, with its own parameter dicts, as
functional_call swaps tensors in them) on detached copies of its parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from .._common.model_view import eval_view
from .._common.validate import check_callable, check_model, choice, number

METHODS = ("exact", "lissa")


@dataclass
class Influence:
    """What ``influence`` returns."""

    scores: torch.Tensor
    """[n_test, n_train]: predicted change of each test point's loss if the training point were
    removed (positive: the training point helps that prediction)."""
    inverse_hvp: torch.Tensor
    """[n_test, P]: H^-1 grad loss(z_test) for each test point."""
    parameters: tuple
    """Names of the parameters the influence is taken over."""
    method: str

    def most_helpful(self, k: int, test: int = 0) -> torch.Tensor:
        """Indices of the ``k`` training points whose removal would raise test point ``test``'s loss most."""
        return self._top(k, test, largest=True)

    def most_harmful(self, k: int, test: int = 0) -> torch.Tensor:
        """Indices of the ``k`` training points whose removal would lower test point ``test``'s loss most."""
        return self._top(k, test, largest=False)

    def _top(self, k, test, largest):
        n_test, n_train = self.scores.shape
        if not isinstance(k, int) or not 1 <= k <= n_train:
            raise ValueError(f"k must be an int between 1 and the {n_train} training points, got {k!r}")
        if not isinstance(test, int) or not -n_test <= test < n_test:
            raise ValueError(f"test must index one of the {n_test} test points, got {test!r}")
        return self.scores[test].topk(k, largest=largest).indices


def influence(
    model: nn.Module,
    loss_fn: Callable,
    train_inputs: torch.Tensor,
    train_targets: torch.Tensor,
    test_inputs: torch.Tensor,
    test_targets: torch.Tensor,
    *,
    parameters: Sequence[str] | None = None,
    weight_decay: float = 0.0,
    damping: float = 0.0,
    method: str = "exact",
    max_exact_parameters: int = 5000,
    lissa_depth: int = 500,
    lissa_repeats: int = 1,
    lissa_batch_size: int | None = None,
    lissa_scale: float | None = None,
    chunk_size: int | None = 256,
    seed: int = 0,
) -> Influence:
    """Influence of every training point on the loss of every test point (Koh & Liang 2017).

    ``loss_fn(output, target)``: the training loss of a batch (mean or sum; it is called on one sample
    at a time), e.g. ``torch.nn.functional.cross_entropy``. The model must be trained (near a minimum
    of the objective in the module docstring) for the scores to mean anything.

    ``parameters``: names of the parameters to take the influence over (default: all that require
    grad); the others are held fixed, as Koh & Liang do with all but the last layer of a deep net.
    ``weight_decay``: the L2 term of the training objective, part of H. ``damping``: added to H's
    diagonal, needed where H is not positive definite (a non-convex model off its minimum).

    ``method="exact"`` forms H (at most ``max_exact_parameters`` parameters) and solves with its Cholesky
    factor. ``method="lissa"``: H^-1 v ~ 1/s sum_{j<depth} (I - (H + damping I)/s)^j v over Hessians of
    random mini-batches of ``lissa_batch_size`` points (all points if None), averaged over
    ``lissa_repeats`` runs; s = ``lissa_scale`` must exceed H's largest eigenvalue and defaults to 1.5x a
    power-iteration estimate of it. ``chunk_size`` bounds how many per-sample gradients are formed at once.
    """
    check_model(model)
    check_callable(loss_fn, "loss_fn", "(output, target) -> loss")
    choice("method", method, METHODS)
    weight_decay, damping = number("weight_decay", weight_decay), number("damping", damping)
    _check_pair(train_inputs, train_targets, "train")
    _check_pair(test_inputs, test_targets, "test")

    named = dict(model.named_parameters())
    if parameters is None:
        parameters = [name for name, p in named.items() if p.requires_grad]
    else:
        parameters = list(parameters)
        unknown = [name for name in parameters if name not in named]
        if unknown:
            raise ValueError(f"parameters {unknown} are not parameters of {type(model).__name__}; "
                             f"names are {list(named)[:12]}")
    if not parameters:
        raise ValueError("parameters selects no parameter to take the influence over")
    chosen = {name: named[name].detach().clone() for name in parameters}
    fixed = {name: t.detach() for name, t in list(model.named_parameters()) + list(model.named_buffers())
             if name not in chosen}
    shapes = [(name, t.shape, t.numel()) for name, t in chosen.items()]
    theta = torch.cat([t.reshape(-1) for t in chosen.values()])
    n = train_inputs.shape[0]
    view = eval_view(model, own_tensor_dicts=True)

    def unflatten(flat):
        out, offset = {}, 0
        for name, shape, size in shapes:
            out[name] = flat[offset:offset + size].reshape(shape)
            offset += size
        return out

    def sample_loss(flat, x, y):
        output = functional_call(view, {**fixed, **unflatten(flat)}, (x[None],))
        return loss_fn(output, y[None])

    def objective(flat, xs, ys):
        outputs = functional_call(view, {**fixed, **unflatten(flat)}, (xs,))
        # Mean of the per-sample losses: the same value whether loss_fn reduces by mean or sum.
        losses = vmap(lambda o, y: loss_fn(o[None], y[None]))(outputs, ys)
        return losses.mean() + 0.5 * weight_decay * flat.pow(2).sum()

    per_sample_grad = vmap(grad(sample_loss), in_dims=(None, 0, 0), chunk_size=chunk_size)

    train_grads = per_sample_grad(theta, train_inputs, train_targets)  # [n, P]
    test_grads = per_sample_grad(theta, test_inputs, test_targets)  # [T, P]
    if method == "exact":
        if theta.numel() > max_exact_parameters:
            raise ValueError(f"the exact Hessian over {theta.numel()} parameters is too large "
                             f"(max_exact_parameters={max_exact_parameters}); choose fewer parameters= "
                             "(e.g. the last layer) or method='lissa'")
        # Reverse over reverse: no forward-mode AD, which not every op supports.
        hessian = jacrev(grad(objective), chunk_size=chunk_size)(theta, train_inputs, train_targets)
        hessian = 0.5 * (hessian + hessian.T) + damping * torch.eye(theta.numel(), dtype=theta.dtype,
                                                                     device=theta.device)
        chol, info = torch.linalg.cholesky_ex(hessian)
        if info != 0:
            raise ValueError("the Hessian of the training objective is not positive definite (is the model "
                             "trained to a minimum?); pass damping > 0 or a larger weight_decay")
        inverse_hvp = torch.cholesky_solve(test_grads.T, chol).T
    else:
        inverse_hvp = _lissa(objective, theta, train_inputs, train_targets, test_grads, damping,
                             lissa_depth, lissa_repeats, lissa_batch_size, lissa_scale, seed)

    scores = inverse_hvp @ train_grads.T / n
    return Influence(scores.detach(), inverse_hvp.detach(), tuple(parameters), method)


def _lissa(objective, theta, xs, ys, vectors, damping, depth, repeats, batch_size, scale, seed):
    """LiSSA (Agarwal et al. 2017): h_0 = v, h_j = v + (I - (H_j + damping I)/s) h_{j-1}, H^-1 v ~ h/s."""
    for name, value in (("lissa_depth", depth), ("lissa_repeats", repeats)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    n = xs.shape[0]
    if batch_size is not None and (not isinstance(batch_size, int) or not 1 <= batch_size <= n):
        raise ValueError(f"lissa_batch_size must be None or an int between 1 and {n}, got {batch_size!r}")

    point = theta.detach().requires_grad_(True)
    full_gradient = None

    def hvp(xb, yb, v):
        """H v for each row of v [T, P] on the points (xb, yb), by double backward."""
        nonlocal full_gradient
        with torch.enable_grad():
            if xb is xs and full_gradient is not None:
                gradient = full_gradient  # the full-batch graph is built once and reused
            else:
                (gradient,) = torch.autograd.grad(objective(point, xb, yb), point, create_graph=True)
                if xb is xs:
                    full_gradient = gradient
            return torch.stack([torch.autograd.grad(gradient, point, row, retain_graph=True)[0] for row in v])

    if scale is None:
        scale = 1.5 * _largest_eigenvalue(lambda v: hvp(xs, ys, v[None])[0], theta, seed) + damping
    elif not scale > 0:
        raise ValueError(f"lissa_scale must be > 0, got {scale!r}")
    g = torch.Generator().manual_seed(seed)
    total = torch.zeros_like(vectors)
    for _ in range(repeats):
        h = vectors.clone()
        for _ in range(depth):
            if batch_size is None:
                xb, yb = xs, ys
            else:
                pick = torch.randperm(n, generator=g)[:batch_size].to(xs.device)
                xb, yb = xs[pick], ys[pick]
            h = vectors + h - (hvp(xb, yb, h) + damping * h) / scale
            if not torch.isfinite(h).all():
                raise ValueError(f"LiSSA diverged: lissa_scale={scale:g} must exceed the Hessian's largest "
                                 "eigenvalue; pass a larger one")
        total += h / scale
    return total / repeats


def _largest_eigenvalue(matvec, theta, seed, iterations: int = 30) -> float:
    """Power iteration for the Hessian's largest eigenvalue (by magnitude)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(theta.shape, generator=g, dtype=torch.float64).to(theta)
    v = v / v.norm()
    value = 0.0
    for _ in range(iterations):
        w = matvec(v)
        value = float(torch.dot(v, w))
        norm = w.norm()
        if norm == 0:
            break
        v = w / norm
    return abs(value)


def _check_pair(inputs, targets, which):
    if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError(f"{which}_inputs and {which}_targets must be tensors")
    if inputs.shape[0] != targets.shape[0] or inputs.shape[0] == 0:
        raise ValueError(f"{which}_inputs ({inputs.shape[0]} samples) and {which}_targets "
                         f"({targets.shape[0]}) must have the same, non-zero, number of samples")
