"""The thin layer between the engine and the compiled kernels: torch custom ops
(``torch.ops.fastlrp.*``) over fastlrp._C, their fake implementations, and the backend choice."""

from .lrp_ops import (IDENTITY, MASK_NEGATIVE, MASK_NONE, MASK_POSITIVE, NEGATIVE, ONE, POSITIVE, TENSOR, combine,
                      native_supports, pool_relevance, softmax_relevance, stabilize_divide,
                      sum_relevance)

__all__ = ["stabilize_divide", "combine", "pool_relevance", "sum_relevance", "softmax_relevance", "native_supports",
           "MASK_NONE", "MASK_POSITIVE", "MASK_NEGATIVE", "IDENTITY", "POSITIVE", "NEGATIVE", "ONE", "TENSOR"]
