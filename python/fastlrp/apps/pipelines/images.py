"""``fastlrp explain``: heatmaps and overlays for image files, next to a JSON of predictions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import models
from ... import viz
from .common import (atomic_output, check_cmap, check_method, chunks, convert_fix, image_channels, load_image,
                     make_explainer, pixel_limit, preprocessing, progress, refuse_input_as_output, target_indices)

TOP_K = 5


def _unique_stems(paths: list) -> list:
    # Same file names from different folders must not overwrite each other's outputs.
    seen, stems = {}, []
    for path in paths:
        stem = Path(path).stem
        count = seen.get(stem, 0)
        seen[stem] = count + 1
        stems.append(stem if count == 0 else f"{stem}-{count}")
    return stems


def render(pixels: torch.Tensor, relevance: torch.Tensor, cmap: str, alpha: float,
           percentile: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Heatmap and overlay (uint8 [H, W, 3]) at the resolution of ``pixels`` [C, H, W].

    Relevance computed on a resized input is resized back (bilinear; the sum over pixels
    is not kept, the picture is) so the overlay sits on the original image.
    """
    rel = relevance.detach().float().sum(0, keepdim=True)
    if rel.shape[-2:] != pixels.shape[-2:]:
        rel = F.interpolate(rel[None], size=pixels.shape[-2:], mode="bilinear", align_corners=False)[0]
    heat = viz.heatmap(rel[0], cmap=cmap, percentile=percentile)
    grey = pixels.mean(0) if pixels.shape[0] == 3 else pixels[0]  # colour would fight the heatmap's
    return heat, viz.overlay(grey, heat, alpha)


def explain_images(paths: list, model_spec: str, weights=None, num_classes=None, composite=None,
                   target="pred", size=None, normalize="auto", convert=None, out_dir="fastlrp-explain",
                   cmap="bwr", alpha=0.6, percentile=None, batch_size=8, device="auto", method="lrp",
                   layer=None, passthrough=(), method_options=None, nonfinite="warn", max_pixels=None) -> dict:
    """Explain each image file; write ``<stem>_heatmap.png``, ``<stem>_overlay.png`` and
    ``predictions.json`` to ``out_dir``; return what the JSON holds.

    ``method``: ``lrp`` (with ``composite``, default epsilon_plus) or another name of
    ``fastlrp.methods.names()`` with ``method_options``; ``layer`` for the CAM methods;
    ``passthrough``: layer types or module names without an LRP rule (``fastlrp.LRP``'s option);
    ``nonfinite``: ``warn`` or ``raise`` on input holding NaN or Inf; ``max_pixels``: the largest
    image (width x height) opened, 0 for no limit (default: Pillow's decompression-bomb guard)."""
    with pixel_limit(max_pixels):
        return _explain_images(paths, model_spec, weights, num_classes, composite, target, size, normalize,
                               convert, out_dir, cmap, alpha, percentile, batch_size, device, method, layer,
                               passthrough, method_options, nonfinite)


def _write_png(path: Path, pixels: np.ndarray) -> Path:
    with atomic_output(path) as tmp:
        viz.save_png(tmp, pixels)
    return path


def _explain_images(paths, model_spec, weights, num_classes, composite, target, size, normalize, convert, out_dir,
                    cmap, alpha, percentile, batch_size, device, method, layer, passthrough, method_options,
                    nonfinite) -> dict:
    from ..demo.run import prepare_out_dir

    paths = [Path(p) for p in paths]
    # Everything that can be checked without the model comes first: a typo fails at once.
    check_method(method, composite, layer, passthrough, method_options, nonfinite)
    check_cmap(cmap)
    found = [image_channels(path, convert) for path in paths]
    model = models.load_model(model_spec, weights, num_classes)
    spec = models.input_spec(model)
    models.check_spatial_dims(spec, (2,), "explain", "for video models use `fastlrp video`, for volumes "
                              "`fastlrp volume`")
    channels = spec.channels if spec else 3
    for path, count in zip(paths, found):
        models.check_channels(spec, count, str(path), convert_fix(channels))
    prep = preprocessing(size, normalize, model_spec, channels)
    dev = models.resolve_device(device)
    model = model.to(dev)
    explainer = make_explainer(model, composite, prep, channels, method, layer, passthrough, method_options,
                               nonfinite, "pass a smaller --size, or --method-option save_memory=True for LRP")
    out = prepare_out_dir(out_dir)

    records = [None] * len(paths)  # filled by position: size groups can reorder a batch
    stems = _unique_stems(paths)
    for stem in stems:  # an output named like an input image would overwrite it
        for kind in ("heatmap", "overlay"):
            refuse_input_as_output(out / f"{stem}_{kind}.png", paths, "--out")
    refuse_input_as_output(out / "predictions.json", paths, "--out")
    bar = progress(total=len(paths), desc="explain", unit="img")
    for batch in chunks(list(enumerate(zip(paths, stems))), batch_size):
        images = [load_image(p, channels) for _, (p, _) in batch]
        # Images of different sizes cannot share a batch unless --size makes them equal.
        prepared = [prep(image[None]) for image in images]
        groups = {}
        for k, x in enumerate(prepared):
            groups.setdefault(tuple(x.shape), []).append(k)
        for members in groups.values():
            x = torch.cat([prepared[k] for k in members]).to(dev)
            result = explainer.explain(x, None if target == "pred" else target,
                                       names=[str(batch[k][1][0]) for k in members])
            logits = result.output
            if logits.ndim != 2:
                raise ValueError(f"model output has shape {tuple(logits.shape)}; explain needs [N, classes] logits")
            classes = target_indices(target, logits)
            probabilities = logits.float().softmax(1)
            for j, k in enumerate(members):
                position, (path, stem) = batch[k]
                heat, over = render(images[k], result.relevance[j].cpu(), cmap, alpha, percentile)
                heat_path = _write_png(out / f"{stem}_heatmap.png", heat)
                over_path = _write_png(out / f"{stem}_overlay.png", over)
                top = probabilities[j].topk(min(TOP_K, logits.shape[1]))
                records[position] = {
                    "path": str(path),
                    "prediction": int(logits[j].argmax()),
                    "target": int(classes[j]),
                    "target_logit": float(logits[j, classes[j]]),
                    "relevance_sum": float(result.relevance[j].sum()),
                    "top": [{"class": int(c), "probability": float(p), "logit": float(logits[j, c])}
                            for p, c in zip(top.values, top.indices)],
                    "heatmap": heat_path.name,
                    "overlay": over_path.name,
                }
            bar.update(len(members))
    bar.close()
    summary = {"model": model_spec, "weights": None if weights is None else str(weights), "method": method,
               "composite": (composite or "epsilon_plus") if method == "lrp" else None, "target": target,
               "out_dir": str(out), "images": records}
    with atomic_output(out / "predictions.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    summary["json"] = str(out / "predictions.json")
    return summary
