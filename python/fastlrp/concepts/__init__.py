"""Concept-level explanations: Concept Relevance Propagation (Achtibat et al., Nature Machine
Intelligence 2023). See docs/concepts.md.

    from fastlrp.concepts import Condition, conditional_heatmaps
    result = conditional_heatmaps(model, x, [Condition("layer4", c) for c in range(64)], target=3)
    result.heatmaps          # [N, 64, H, W]: one heatmap per channel of layer4
"""

from .conditions import Condition, as_condition, channel_conditions, group_conditions
from .heatmaps import ConditionalHeatmaps, conditional_heatmaps

__all__ = ["Condition", "ConditionalHeatmaps", "as_condition", "channel_conditions", "conditional_heatmaps",
           "group_conditions"]
