"""The Triton tests run on the CPU through Triton's interpreter unless a CUDA device is present.

TRITON_INTERPRET is set by tests/conftest.py, the first file pytest imports, because it must be set
before triton is first imported (by torch, while other test modules are collected). Set
TRITON_INTERPRET=0 yourself to force compiled kernels."""
