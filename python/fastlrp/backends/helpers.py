"""Lighter versions of model helpers that torch.fx keeps whole, for the gradient-form blocks
(backends/attnlrp.py).

A wrapped helper is explained as one block: the native backend runs it once in the forward pass and
lets autograd take its gradient. Some helpers are written for inference and cost autograd far more
than their arithmetic. MViT-v2's ``_add_rel_pos`` (torchvision) adds the decomposed relative
positions (Li et al., "MViTv2", CVPR 2022) in place into a slice of the attention scores. The block
first has to copy its input. Autograd then records the in-place slice update, and its backward makes
five score-sized tensors; on MViT-v2-S the largest are 75 MiB each.

A lighter version here computes the same values with the same operations in the same order. It
does not write into its inputs, and its backward is the helper's gradient written out. The reference
backend keeps running the model's own helper, so tests compare the two
(tests/test_native_transformers.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _axis_table(table: torch.Tensor, q_size: int, k_size: int) -> torch.Tensor:
    """The embedding row of every (query, key) pair along one axis, (q_size, k_size, dim): the table is
    resized linearly to 2 max(q, k) - 1 rows, and the distance between positions is measured on the
    finer of the two grids."""
    rows = 2 * max(q_size, k_size) - 1
    if table.shape[0] != rows:
        table = F.interpolate(table.permute(1, 0).unsqueeze(0), size=rows, mode="linear").squeeze(0).permute(1, 0)
    q_ratio, k_ratio = max(k_size / q_size, 1.0), max(q_size / k_size, 1.0)
    distance = (torch.arange(q_size)[:, None] * q_ratio
                - (torch.arange(k_size)[None, :] + (1.0 - k_size)) * k_ratio)
    return table[distance.long()]


class _AddAxisTerms(torch.autograd.Function):
    """scores + (h + w) + t on the query-key block (rows and columns from 1: the class token is
    left out), each term broadcast over the key axes it does not depend on. Out of place. The output
    is built one query frame at a time, so only one frame of the summed terms exists at once.
    Backward: the scores' gradient is the output's; each term's gradient is the output's summed over
    the two key axes the term is broadcast along."""

    @staticmethod
    def forward(ctx, scores, h, w, t):
        batch, heads, q_t, q_h, q_w, _ = h.shape
        k_t, k_h, k_w = t.shape[-1], h.shape[-1], w.shape[-1]
        out = torch.empty_like(scores, memory_format=torch.contiguous_format)
        out[:, :, :1].copy_(scores[:, :, :1])
        out[:, :, 1:, :1].copy_(scores[:, :, 1:, :1])
        grid = (batch, heads, q_t, q_h, q_w, k_t, k_h, k_w)
        source, target = scores.contiguous()[:, :, 1:, 1:].view(grid), out[:, :, 1:, 1:].view(grid)
        for frame in range(q_t):
            terms = (h[:, :, frame, :, :, None, :, None] + w[:, :, frame, :, :, None, None, :]
                     + t[:, :, frame, :, :, :, None, None])
            torch.add(source[:, :, frame], terms, out=target[:, :, frame])
        ctx.grid = grid
        return out

    @staticmethod
    def backward(ctx, grad):
        g = grad[:, :, 1:, 1:].reshape(ctx.grid)  # (batch, heads, q_t, q_h, q_w, k_t, k_h, k_w); a view if it can
        need_scores, need_h, need_w, need_t = ctx.needs_input_grad
        over_w = g.sum(7) if need_h or need_t else None  # one pass over the scores for h and t
        return (grad if need_scores else None,
                over_w.sum(5) if need_h else None,
                g.sum((5, 6)) if need_w else None,
                over_w.sum(6) if need_t else None)


def add_rel_pos(attn: torch.Tensor, q: torch.Tensor, q_thw: tuple, k_thw: tuple, rel_pos_h: torch.Tensor,
                rel_pos_w: torch.Tensor, rel_pos_t: torch.Tensor) -> torch.Tensor:
    """torchvision's MViT ``_add_rel_pos``, out of place: the attention scores plus q's products with
    the height, width and time embeddings of each query-key distance."""
    (q_t, q_h, q_w), (k_t, k_h, k_w) = q_thw, k_thw
    table_h, table_w = _axis_table(rel_pos_h, q_h, k_h), _axis_table(rel_pos_w, q_w, k_w)
    table_t = _axis_table(rel_pos_t, q_t, k_t)
    batch, heads, _, dim = q.shape
    r_q = q[:, :, 1:].reshape(batch, heads, q_t, q_h, q_w, dim)
    along_h = torch.einsum("bythwc,hkc->bythwk", r_q, table_h)
    along_w = torch.einsum("bythwc,wkc->bythwk", r_q, table_w)
    # time as torchvision computes it: one batched product per query frame
    by_frame = r_q.permute(2, 0, 1, 3, 4, 5).reshape(q_t, batch * heads * q_h * q_w, dim)
    along_t = torch.matmul(by_frame, table_t.transpose(1, 2)).transpose(0, 1)
    along_t = along_t.view(batch, heads, q_h, q_w, q_t, k_t).permute(0, 1, 4, 2, 3, 5)
    return _AddAxisTerms.apply(attn, along_h, along_w, along_t)


_LIGHTER = {("torchvision.models.video.mvit", "_add_rel_pos"): add_rel_pos}


def lighter_version(fn):
    """The lighter version of a wrapped helper, or None where there is none."""
    return _LIGHTER.get((getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)))
