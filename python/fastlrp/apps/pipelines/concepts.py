"""``fastlrp concepts``: the most relevant concepts (channels) of a layer for an image, or for the
images of a folder, with their conditional heatmaps; for a folder also the reference samples of every
channel over the folder (relevance and activation maximization), kept in an HDF5 file, and a concept
atlas per image that shows them. Under torchrun each process scores its share of the folder and rank 0
merges, as in ``fastlrp dataset``.

Writes into OUT: ``<stem>_concepts.png`` (the atlas) per explained image, ``concepts.json`` (each
image's top channels with their relevance shares; for a folder each of those channels' reference
images), and for a folder ``scores.h5`` (``fastlrp.concepts.score_dataset``'s layout).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ... import concepts
from .. import models
from .common import (IMAGE_SUFFIXES, Preprocessing, atomic_output, check_method, chunks, convert_fix,
                     image_channels, load_image, preprocessing, progress)
from .dataset import common_size, distributed_context, scan


def explain_concepts(source, model_spec: str, layer: str, weights=None, num_classes=None, composite=None,
                     target="pred", size=None, normalize="auto", convert=None, out_dir="fastlrp-concepts",
                     top: int = 4, refs: int = 4, atlases: int = 4, batch_size: int = 16, device="auto",
                     passthrough=()) -> dict:
    """Concepts of ``layer`` for the image ``source`` or the images of the folder ``source``."""
    from ..demo.run import prepare_out_dir

    check_method("lrp", composite, None, passthrough, None, "warn")
    source = Path(source).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist")
    if source.is_dir():
        root = source
        paths, _, _ = scan(root)
        hw = common_size(root, paths, size)
    else:
        if source.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"{source} is not an image ({', '.join(IMAGE_SUFFIXES)}) or a folder")
        root, paths, hw = source.parent, [source.name], None
    model = models.load_model(model_spec, weights, num_classes)
    spec = models.input_spec(model)
    models.check_spatial_dims(spec, (2,), "concepts", "give an image classifier")
    channels = spec.channels if spec else 3
    models.check_channels(spec, image_channels(root / paths[0], convert), str(root / paths[0]),
                          convert_fix(channels))
    prep = preprocessing(size, normalize, model_spec, channels)
    shown = Preprocessing(size)  # the same resizing, no normalization: what the pictures show
    dev = models.resolve_device(device)
    import fastlrp

    composite = composite or "epsilon_plus"
    options = prep.box_bounds(channels) if "box" in composite else {}
    explainer = fastlrp.LRP(model.to(dev), composite, passthrough=tuple(passthrough or ()), **options)
    if layer not in explainer.layer_names:
        raise ValueError(f"--layer {layer!r} is not a layer of the explainer; layers are e.g. "
                         f"{', '.join(explainer.layer_names[-8:])}")
    wanted = None if target == "pred" else int(target)

    def pixels(indices):
        return torch.cat([shown(load_image(root / paths[k], channels)[None]) for k in indices])

    def inputs(indices):
        return prep(torch.cat([load_image(root / paths[k], channels)[None] for k in indices])).to(dev)

    out = prepare_out_dir(out_dir)
    references = None
    rank = 0
    if source.is_dir():
        rank, world, local_rank = distributed_context()
        if dev.type == "cuda" and world > 1:
            explainer = fastlrp.LRP(model.to(torch.device("cuda", local_rank)), composite,
                                    passthrough=tuple(passthrough or ()), **options)
            dev = torch.device("cuda", local_rank)
        own = [items for i, items in enumerate(chunks(list(range(len(paths))), batch_size)) if i % world == rank]
        bar = progress(own, desc="concepts" if world == 1 else f"concepts rank {rank} of {world}", unit="batch",
                       disable=None if rank == 0 else True)
        batches = ((items, inputs(items), wanted) for items in bar)  # each rank reads only its own images
        concepts.score_dataset(explainer, batches, layer, out / "scores.h5", shard=False)
        if rank != 0:
            return {"rank": rank}
        references = concepts.top_references(out / "scores.h5", layer, k=refs)
    records = []
    for k in range(min(atlases, len(paths)) if source.is_dir() else 1):
        x = inputs([k])
        atlas = concepts.concept_atlas(explainer, x, layer, references, inputs if references else None,
                                       wanted, k=top, refs=refs, pictures=pixels if references else None,
                                       picture=pixels([k]))
        picture = out / f"{Path(paths[k]).stem}_concepts.png"
        figure = concepts.plot_concept_atlas(atlas)
        with atomic_output(picture) as tmp:
            figure.savefig(tmp, format="png", dpi=120)
        import matplotlib.pyplot as plt

        plt.close(figure)
        entry = {"path": paths[k], "target": atlas.target, "atlas": str(picture),
                 "concepts": [{"layer": layer, "channel": c.channels[0], "share": share}
                              for c, share in zip(atlas.conditions, atlas.shares)]}
        if references is not None:
            for item in entry["concepts"]:
                index, _ = references.top(item["channel"])
                item["references"] = [paths[i] for i in index.tolist()]
        records.append(entry)
    summary = {"source": str(source), "layer": layer, "composite": composite, "images": records,
               "scores": str(out / "scores.h5") if source.is_dir() else None}
    with atomic_output(out / "concepts.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1))
    return summary
