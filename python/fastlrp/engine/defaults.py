"""The composite ``LRP(model)`` uses when the caller names none.

Convolutional networks get Zennit's ``epsilon_plus``. Models with attention or with layer norms
(ViT, Swin, MaxViT, MViT, ConvNeXt) get ``attnlrp`` (Achtibat et al., ICML 2024): its softmax,
bilinear and normalization rules are the ones derived for these blocks; ``epsilon_plus`` has no
rule for them. docs/rules.md says what each composite maps.
"""

from __future__ import annotations

from torch import nn

from .. import layers


def default_composite(view: nn.Module) -> str:
    """The preset name for ``view`` (the user's model or an eval view of it; only read)."""
    for module in view.modules():
        if isinstance(module, layers.Attention + layers.Normalization) or "Attention" in type(module).__name__:
            return "attnlrp"
    return "epsilon_plus"
