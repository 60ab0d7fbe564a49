"""Reference samples of concepts over a dataset: the samples in which a channel carries the most
relevance (relevance maximization, Achtibat et al. 2023) or has the largest activation (activation
maximization over real samples), and the image regions that show the concept.

One explanation per batch gives every channel's score at once; the scores go to an HDF5 file through
``fastlrp.analysis.HeatmapStore`` (one row per sample: [2, C], relevance share and peak activation),
so datasets larger than memory stream through, and the top-k per channel are read back in chunks.
Under torchrun (a ``torch.distributed`` process group is initialized) each rank scores samples
r, r + w, ... into its own file and rank 0 merges them, as ``fastlrp dataset`` does.

Scores follow zennit-crp's defaults: relevance is the channel's relevance summed over positions
divided by the sum of |relevance| over the layer's channels (``max_target="sum"``, ``abs_norm``);
activation is the channel's largest value over positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..analysis.storage import HeatmapStore
from .._common.targets import class_indices
from .._common.validate import check_tensor, positive_int
from .conditions import Condition
from .heatmaps import conditional_heatmaps, explainer_for
from .relevance import channel_relevance, shares

BY = ("relevance", "activation")


@dataclass
class ConceptReferences:
    """The ``k`` reference samples of every channel of ``layer``: dataset indices [C, k], best first."""

    layer: str
    path: Path
    relevance_indices: torch.Tensor
    relevance_scores: torch.Tensor
    activation_indices: torch.Tensor
    activation_scores: torch.Tensor

    def top(self, channel: int, by: str = "relevance") -> tuple:
        """(dataset indices [k], scores [k]) of ``channel``'s reference samples, best first."""
        if by not in BY:
            raise ValueError(f"by must be one of {BY}, got {by!r}")
        if not 0 <= channel < self.relevance_indices.shape[0]:
            raise ValueError(f"channel {channel} out of range for {self.relevance_indices.shape[0]} channels")
        if by == "relevance":
            return self.relevance_indices[channel], self.relevance_scores[channel]
        return self.activation_indices[channel], self.activation_scores[channel]


def _batches(data, target, batch_size: int):
    """(dataset indices, x, target) per batch of a tensor or of an iterable of (x, target) batches."""
    if isinstance(data, torch.Tensor):
        for start in range(0, data.shape[0], batch_size):
            stop = min(start + batch_size, data.shape[0])
            t = target[start:stop] if isinstance(target, torch.Tensor) and target.ndim > 0 else target
            yield torch.arange(start, stop), data[start:stop], t
        return
    if target is not None:
        raise ValueError("target goes inside the batches when data is an iterable of (x, target)")
    start = 0
    for batch in data:
        if len(batch) == 3:  # (dataset indices, x, target)
            yield torch.as_tensor(batch[0]).long(), batch[1], batch[2]
            continue
        x, t = batch
        yield torch.arange(start, start + x.shape[0]), x, t
        start += x.shape[0]


def _rank_world() -> tuple:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def score_dataset(model, data, layer: str, path, target=None, *, batch_size: int = 32, shard: bool = True,
                  composite="epsilon_plus", **rule_options) -> Path:
    """Score every channel of ``layer`` on every sample of ``data`` (a tensor [N, ...] with ``target``
    alongside: None for the prediction, an int or one index per sample; or an iterable of (x, target)
    or (dataset indices, x, target) batches) into the HDF5 file ``path``. Returns the path.

    Under torch.distributed each rank takes batches r, r + w, ...; ``shard=False``: ``data`` holds
    this rank's batches already (with their dataset indices), so none are read only to be skipped."""
    explainer = explainer_for(model, composite, **rule_options)
    if layer not in explainer.layer_names:
        raise KeyError(f"layer {layer!r} is not a layer of the explainer; names are explainer.layer_names")
    positive_int("batch_size", batch_size)
    path = Path(path)
    rank, world = _rank_world()
    own = path if world == 1 else path.with_name(f"{path.name}.part{rank}-of-{world}")
    with HeatmapStore(own, "w") as store:
        for i, (index, x, t) in enumerate(_batches(data, target, batch_size)):
            if shard and i % world != rank:
                continue
            check_tensor("x", x, ndim_min=2)
            result = explainer.explain(x, t, layers=[layer])
            if layer not in result.layers:
                raise ValueError(f"no relevance reaches layer {layer!r}")
            relevance, activation = result.layers[layer], result.activations[layer]
            scores = torch.stack([shares(channel_relevance(relevance)),
                                  activation.flatten(2).amax(2) if activation.ndim > 2 else activation], 1)
            output = result.output.reshape(result.output.shape[0], -1)
            explained = class_indices(output, t)
            store.append(scores.float(), index=index, predictions=output.argmax(1), targets=explained)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        if rank == 0:
            _merge([path.with_name(f"{path.name}.part{r}-of-{world}") for r in range(world)], path)
        dist.barrier()
    return path


def _merge(parts: list, path: Path) -> None:
    tmp = path.with_name(path.name + ".merging")
    with HeatmapStore(tmp, "w") as merged:
        for part in parts:
            with HeatmapStore(part) as store:
                columns = {name: store.column(name) for name in store.columns}
                for start, chunk in store.chunks():
                    stop = start + len(chunk)
                    merged.append(chunk, **{name: values[start:stop] for name, values in columns.items()})
    tmp.replace(path)
    for part in parts:
        part.unlink()


def top_references(path, layer: str, k: int = 8, chunk_size: int = 4096) -> ConceptReferences:
    """The ``k`` best samples per channel by relevance and by activation, read from a score file in
    chunks (a running top-k, so the file need not fit in memory)."""
    positive_int("k", k)
    best = {by: None for by in BY}
    with HeatmapStore(path) as store:
        index = store.column("index")
        for start, chunk in store.chunks(chunk_size):
            scores = torch.from_numpy(np.asarray(chunk))  # [B, 2, C]
            rows = torch.from_numpy(index[start:start + len(chunk)]).long()
            for j, by in enumerate(BY):
                values = scores[:, j].T  # [C, B]
                ids = rows.expand(values.shape[0], -1)
                if best[by] is not None:
                    values = torch.cat([best[by][0], values], 1)
                    ids = torch.cat([best[by][1], ids], 1)
                top = values.topk(min(k, values.shape[1]), dim=1)
                best[by] = (top.values, ids.gather(1, top.indices))
    if best["relevance"] is None:
        raise ValueError(f"{path} holds no scores")
    return ConceptReferences(layer, Path(path), best["relevance"][1], best["relevance"][0],
                             best["activation"][1], best["activation"][0])


def reference_samples(model, data, layer: str, path, target=None, k: int = 8, *, batch_size: int = 32,
                      composite="epsilon_plus", **rule_options) -> ConceptReferences:
    """``score_dataset`` then ``top_references``: the ``k`` reference samples of every channel of
    ``layer`` by relevance and by activation, with the scores kept in ``path``."""
    explainer = explainer_for(model, composite, **rule_options)
    score_dataset(explainer, data, layer, path, target, batch_size=batch_size)
    return top_references(path, layer, k)


def reference_regions(model, x: torch.Tensor, concept: Condition, target=None, *, by: str = "relevance",
                      size: int = 32, fraction: float = 0.3, pictures: torch.Tensor | None = None,
                      composite="epsilon_plus", **rule_options):
    """The region of each sample of ``x`` ([k, C, H, W], a concept's reference samples) that shows
    ``concept``: the bounding box of the pixels where its conditional heatmap (``by="relevance"``) or
    its channel's upsampled activation (``by="activation"``) reaches ``fraction`` of the sample's
    maximum, cropped and resized to ``size`` x ``size``. Returns (patches [k, C, size, size], boxes
    [k, 4] as (top, left, bottom, right)). ``pictures``: what to crop instead of ``x`` (the images before
    the model's normalization, same height and width)."""
    explainer = explainer_for(model, composite, **rule_options)
    check_tensor("x", x, ndim_min=4)
    if by not in BY:
        raise ValueError(f"by must be one of {BY}, got {by!r}")
    if by == "relevance":
        maps = conditional_heatmaps(explainer, x, [concept], target).heatmaps[:, 0].clamp(min=0)
    else:
        result = explainer.explain(x, target, layers=[concept.layer])
        activation = result.activations[concept.layer]
        mask = concept.mask(activation.shape[1], activation).reshape(1, -1, *([1] * (activation.ndim - 2)))
        maps = F.interpolate((activation * mask).sum(1, keepdim=True), size=x.shape[-2:], mode="bilinear",
                             align_corners=False)[:, 0]
    patches, boxes = [], []
    if pictures is not None and tuple(pictures.shape[-2:]) != tuple(x.shape[-2:]):
        raise ValueError(f"pictures {tuple(pictures.shape)} must have the height and width of x {tuple(x.shape)}")
    for image, heat in zip(x if pictures is None else pictures.to(x.device), maps):
        top, left, bottom, right = _box(heat, fraction)
        crop = image[:, top:bottom, left:right]
        patches.append(F.interpolate(crop[None], size=(size, size), mode="bilinear", align_corners=False)[0])
        boxes.append((top, left, bottom, right))
    return torch.stack(patches).detach(), torch.tensor(boxes)


def _box(heat: torch.Tensor, fraction: float) -> tuple:
    """Bounding box of heat >= fraction * max (the whole image when nothing is positive)."""
    h, w = heat.shape
    peak = heat.max()
    if not peak > 0:
        return 0, 0, h, w
    rows, cols = (heat >= fraction * peak).nonzero(as_tuple=True)
    top, bottom = rows.min().item(), rows.max().item() + 1
    left, right = cols.min().item(), cols.max().item() + 1
    # at least a quarter of the image's side, so one-pixel hot spots keep some context
    side = max(h, w) // 4
    if bottom - top < side:
        top = max(0, min(h - side, (top + bottom - side) // 2)); bottom = top + side
    if right - left < side:
        left = max(0, min(w - side, (left + right - side) // 2)); right = left + side
    return top, left, bottom, right
