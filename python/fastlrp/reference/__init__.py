"""The oracle: pure-PyTorch LRP, one short function per rule and layer type.

Every fused kernel of fastlrp is tested against these functions, and the engine uses them
as its ``reference`` backend. They favour legibility over speed: each follows the rule's
formula as written in docs/rules.md (Zennit's definitions).
"""

from .affine import AffineOp
from .linear_rules import alpha_beta, epsilon, flat, gamma, wsquare, zbox, zplus
from .nonlinear import gated_product, maxpool_proportional, norm
from .stabilize import stabilize

__all__ = [
    "AffineOp",
    "alpha_beta",
    "epsilon",
    "flat",
    "gamma",
    "gated_product",
    "maxpool_proportional",
    "norm",
    "stabilize",
    "wsquare",
    "zbox",
    "zplus",
]
