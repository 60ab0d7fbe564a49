"""Shared pieces of the Triton tests: poisoned outputs, layouts, tolerances."""

import pytest
import torch

triton = pytest.importorskip("triton")

from fastlrp.ops import triton_ops  # noqa: E402  (after the importorskip)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(not triton_ops.triton_supports(torch.device(DEVICE), torch.float32),
                                   reason="the Triton kernels cannot run here (no triton, or TRITON_INTERPRET=0 "
                                          "without a GPU)")


@pytest.fixture
def poisoned(monkeypatch):
    """Every op output starts as NaN, so an element a kernel forgets to write shows."""
    original = triton_ops._new_output

    def poisoned_output(shape, like, memory_format):
        return original(shape, like, memory_format).fill_(float("nan"))
    monkeypatch.setattr(triton_ops, "_new_output", poisoned_output)


def channels_last(t):
    if t.ndim == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if t.ndim == 5:
        return t.contiguous(memory_format=torch.channels_last_3d)
    return t


def relative_error(got, expected):
    assert torch.isfinite(got).all(), "non-finite values (an unwritten or wrong element)"
    return ((got.double() - expected.double()).norm() / expected.double().norm().clamp(min=1e-30)).item()


# float32: IEEE products in the kernels (TF32 off); float16: checked against PyTorch's own error
FLOAT32_RTOL = 1e-5
