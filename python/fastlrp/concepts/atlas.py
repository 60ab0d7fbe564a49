"""A concept atlas for one prediction: the most relevant concepts of a layer, each with its
conditional heatmap, its share of the layer's relevance and the regions of its reference samples.

    atlas = concept_atlas(model, x[i:i + 1], "layer4", references, dataset)
    plot_concept_atlas(atlas).savefig("atlas.png")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .._common.optional import require
from .._common.validate import check_tensor, positive_int
from .conditions import Condition
from .heatmaps import conditional_heatmaps, explainer_for
from .references import ConceptReferences, reference_regions
from .relevance import concept_relevance


@dataclass
class ConceptAtlas:
    image: torch.Tensor
    """[C, H, W]: the explained input."""
    target: int
    conditions: list
    shares: list
    """Each concept's share of the layer's relevance."""
    heatmaps: torch.Tensor
    """[k, H, W]: each concept's conditional heatmap."""
    patches: torch.Tensor | None
    """[k, refs, C, s, s]: regions of each concept's reference samples (None without references)."""
    by: str = "relevance"


def concept_atlas(model, x: torch.Tensor, layer: str, references: ConceptReferences | None = None,
                  samples: torch.Tensor | Callable | None = None, target=None, k: int = 4, refs: int = 4, *,
                  by: str = "relevance", patch_size: int = 32, pictures: Callable | None = None,
                  picture: torch.Tensor | None = None, composite="epsilon_plus", **rule_options) -> ConceptAtlas:
    """The ``k`` most relevant channels of ``layer`` for the prediction on ``x`` ([1, ...]): their
    conditional heatmaps and shares, and, given ``references`` and ``samples`` (the dataset as a tensor,
    or a callable from a list of dataset indices to a tensor), ``refs`` reference regions each.
    ``pictures`` (indices -> images) and ``picture`` (for ``x``): what to show when the model's input
    is normalized (default: the input itself)."""
    explainer = explainer_for(model, composite, **rule_options)
    check_tensor("x", x, ndim_min=4)
    positive_int("k", k)
    positive_int("refs", refs)
    if (references is None) != (samples is None):
        raise ValueError("give references and samples together (or neither)")
    if target is None:
        target = int(explainer.explain(x, None).output.argmax(1)[0])
    top = concept_relevance(explainer, x, target, layers=[layer], k=k)[layer]
    conditions = [Condition(layer, c, target) for c in top.channels]
    heat = conditional_heatmaps(explainer, x, conditions, target).heatmaps[0]
    patches = None
    if references is not None:
        load = samples if callable(samples) else (lambda index: samples[index])
        rows = []
        for c, condition in zip(top.channels, conditions):
            index, _ = references.top(c, by)
            chosen = index[:refs].tolist()
            shown = None if pictures is None else pictures(chosen)
            # a reference region shows the concept for the sample's own prediction, as zennit-crp does
            crops, _ = reference_regions(explainer, load(chosen).to(x), Condition(layer, c), by=by,
                                         size=patch_size, pictures=shown)
            rows.append(crops)
        patches = torch.stack(rows)
    shown = x[0] if picture is None else picture.reshape(picture.shape[-3:])
    return ConceptAtlas(shown.detach(), target, conditions, top.shares, heat, patches, by)


def plot_concept_atlas(atlas: ConceptAtlas, class_names=None):
    """A matplotlib figure: the input, then one row per concept (conditional heatmap with its share,
    then its reference regions)."""
    require("matplotlib", "analysis", "plotting a concept atlas")
    import matplotlib.pyplot as plt

    from ..viz import heatmap, image_to_uint8

    k = len(atlas.conditions)
    refs = 0 if atlas.patches is None else atlas.patches.shape[1]
    cols = 2 + refs
    fig, axes = plt.subplots(k, cols, figsize=(1.8 * cols, 1.8 * k), squeeze=False)
    name = class_names[atlas.target] if class_names else atlas.target
    for row, (condition, share) in enumerate(zip(atlas.conditions, atlas.shares)):
        axes[row, 0].imshow(image_to_uint8(atlas.image))
        axes[row, 0].set_title(f"class {name}" if row == 0 else "", fontsize=8)
        axes[row, 1].imshow(heatmap(atlas.heatmaps[row]))
        axes[row, 1].set_title(f"{condition.layer}:{condition.channels[0]}  {100 * share:.0f}%", fontsize=8)
        for j in range(refs):
            axes[row, 2 + j].imshow(image_to_uint8(atlas.patches[row, j]))
            if row == 0 and j == 0:
                axes[row, 2 + j].set_title(f"reference ({atlas.by})", fontsize=8, loc="left")
        for ax in axes[row]:
            ax.axis("off")
    fig.tight_layout()
    return fig
