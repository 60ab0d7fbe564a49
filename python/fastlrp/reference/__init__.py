"""The oracle: pure-PyTorch LRP, short and readable.

Every fused kernel of fastlrp is tested against these functions, and the engine runs them as its
``reference`` backend. They favour legibility over speed: ``linear_relevance`` executes a rule's
declaration (``Rule.form()``) as written in docs/rules.md (Zennit's definitions); the parameter-free
layers have one function each; ``attention`` holds the transformer rules (AttnLRP, CP-LRP).
"""

from .affine import AffineOp
from .attention import block_relevance, softmax_relevance, uniform_relevance
from .linear_rules import linear_relevance
from .nonlinear import gated_product, maxpool_proportional, norm
from .stabilize import stabilize

__all__ = ["AffineOp", "block_relevance", "softmax_relevance", "uniform_relevance", "gated_product", "linear_relevance", "maxpool_proportional", "norm", "stabilize"]
