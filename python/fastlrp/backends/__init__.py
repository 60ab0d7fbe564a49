"""Backends: the ways a relevance layer can run (docs/design.md, "Backends").

An explainer holds an ordered list (``chain(name)``): ``triton`` -> [triton, native, reference],
``native`` -> [native, reference], ``reference`` -> [reference]. Per layer and call the first backend
that supports the layer for its inputs runs it; ``Explanation.backends`` tells which ran where.
"""

from __future__ import annotations

import functools
import os

import torch

from .. import ops
from ..ops import triton_ops
from .base import Backend, ReferenceBackend, RuleFunction
from .native import NativeBackend

NAMES = ("native", "triton", "reference")


@functools.lru_cache(maxsize=None)
def chain(name: str) -> tuple:
    """The ordered backends an explainer with backend ``name`` tries per layer."""
    reference = ReferenceBackend()
    if name == "reference":
        return (reference,)
    native = NativeBackend()
    if name == "native":
        return (native, reference)
    if name == "triton":
        from .triton import TritonBackend  # imports Triton: only for this backend
        return (TritonBackend(native), native, reference)
    raise ValueError(f"unknown backend {name!r}; known: {list(NAMES)}")


def available_backends(device: torch.device | str | None = None) -> list:
    """Backends that can run on ``device`` (default: the CPU), fastest first.

    ``native``: fastlrp._C's fused kernels and the block-form rules (needs the compiled
    extension with kernels for the device). ``triton``: the fully fused Triton kernels (CUDA with
    Triton installed; listed after native until measured on GPUs, see docs/triton.md; on the CPU
    it runs only when asked for, under ``TRITON_INTERPRET=1``). ``reference``: the pure-PyTorch
    oracle, always there."""
    device = torch.device("cpu" if device is None else device)
    names = ["native"] if ops.native_supports(device, torch.float32) else []
    if device.type == "cuda" and triton_ops.kernels_available():
        names.append("triton")
    return names + ["reference"]


def choose(requested: str | None) -> str:
    """The backend name for an explainer: ``requested``, else ``FASTLRP_BACKEND``, else the fastest
    available on the CPU; a clear error where it cannot run here."""
    source = "backend=" if requested else "FASTLRP_BACKEND"
    name = requested or os.environ.get("FASTLRP_BACKEND") or available_backends()[0]
    if name not in NAMES:
        raise ValueError(f"unknown backend {name!r} (from {source}); known: {list(NAMES)}")
    if name == "native" and not ops.native_supports(torch.device("cpu"), torch.float32):
        raise ValueError(f"backend 'native' (from {source}) needs the compiled extension fastlrp._C, which is not "
                         "built here (install the package with 'pip install .'); use backend='reference'")
    if name == "triton" and not triton_ops.kernels_available():
        raise ValueError(f"backend 'triton' (from {source}) needs the triton package, which is not installed "
                         "here; use backend='native' or 'reference'")
    return name


__all__ = ["Backend", "NativeBackend", "ReferenceBackend", "RuleFunction", "NAMES", "available_backends",
           "chain", "choose"]
