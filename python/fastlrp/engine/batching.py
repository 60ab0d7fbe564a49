"""Explaining a batch that does not fit: split it in halves until the parts fit, then join the parts.

Every rule works sample by sample, so the joined result equals the unsplit one up to the rounding of
batch-size-dependent kernels (float32: ~1e-7 relative)."""

from __future__ import annotations

import torch

_OOM_TEXTS = ("out of memory", "not enough memory", "DefaultCPUAllocator: can't allocate")


def is_out_of_memory(err: BaseException) -> bool:
    """torch's CUDA out-of-memory error, or the CPU allocator's RuntimeError."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and any(text in str(err) for text in _OOM_TEXTS)


def target_part(target, start: int, stop: int, batch: int):
    """The part of ``target`` that belongs to samples start:stop (per-sample indices or weights are
    sliced; a class index, a shared weight row, a callable or None apply to every part as they are)."""
    if isinstance(target, torch.Tensor) and target.ndim >= 1 and target.shape[0] == batch and batch > 1:
        return target[start:stop]
    return target


def join(parts: list, explanation_type):
    """One explanation from the explanations of consecutive parts of a batch."""
    def cat(name):
        return torch.cat([getattr(p, name) for p in parts])

    def cat_dicts(name):
        names = [k for k in getattr(parts[0], name) if all(k in getattr(p, name) for p in parts)]
        return {k: torch.cat([getattr(p, name)[k] for p in parts]) for k in names}
    backends = {}
    for p in parts:
        backends.update(p.backends)
    return explanation_type(cat("relevance"), cat("output"), cat("start"), cat_dicts("layers"),
                            cat_dicts("activations"), backends)
