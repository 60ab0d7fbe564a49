"""The Triton tests run on the CPU through Triton's interpreter unless a CUDA device is present.

TRITON_INTERPRET must be set before Triton decorates the kernels, so it is set here, when
pytest imports this file (before any test module imports fastlrp.ops.triton_ops); the rest of
the suite never imports Triton. Set TRITON_INTERPRET=0 yourself to force compiled kernels."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
