"""Concept-level explanations: Concept Relevance Propagation (Achtibat et al., Nature Machine
Intelligence 2023). See docs/concepts.md.

    from fastlrp.concepts import Condition, channel_conditions, conditional_heatmaps
    result = conditional_heatmaps(model, x, channel_conditions("layer4.2.relu#2", 64), target=3)
    result.heatmaps          # [N, 64, H, W]: one input heatmap per channel
"""

from .conditions import Condition, as_condition, channel_conditions, group_conditions
from .heatmaps import ConditionalHeatmaps, conditional_heatmaps
from .relevance import ConceptNode, LayerConcepts, channel_relevance, concept_hierarchy, concept_relevance, shares
from .references import ConceptReferences, reference_regions, reference_samples, score_dataset, top_references
from .atlas import ConceptAtlas, concept_atlas, plot_concept_atlas

__all__ = [
    "Condition", "ConditionalHeatmaps", "ConceptAtlas", "ConceptNode", "ConceptReferences", "LayerConcepts",
    "as_condition", "channel_conditions", "channel_relevance", "concept_atlas", "concept_hierarchy",
    "concept_relevance", "conditional_heatmaps", "group_conditions", "plot_concept_atlas", "reference_regions",
    "reference_samples", "score_dataset", "shares", "top_references",
]
