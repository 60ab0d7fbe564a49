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


def resize_relevance(pixels: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """Relevance [C, h, w] summed over channels to [H, W], the size of ``pixels`` [C, H, W].

    Relevance computed on a resized input is resized back (bilinear; the sum over pixels is
    not kept, the picture is) so the overlay sits on the original image."""
    rel = relevance.detach().float().sum(0, keepdim=True)
    if rel.shape[-2:] != pixels.shape[-2:]:
        rel = F.interpolate(rel[None], size=pixels.shape[-2:], mode="bilinear", align_corners=False)[0]
    return rel[0]


def scale_note(percentile: float | None) -> str:
    """How the colour scale was chosen, for legends."""
    if percentile is None or percentile >= 100:
        return "colours saturate at the largest |R|"
    return f"colours saturate at the {percentile:g}th percentile of |R|"


def render(pixels: torch.Tensor, relevance: torch.Tensor, cmap: str, alpha: float,
           percentile: float | None) -> tuple[np.ndarray, np.ndarray, float]:
    """Heatmap and overlay (uint8 [H, W, 3]) at the resolution of ``pixels`` [C, H, W], and the
    |R| at which their colours saturate (the ``percentile``-th percentile of |R|; None: the max)."""
    rel = resize_relevance(pixels, relevance)
    scale = viz.relevance_scale(rel, percentile)
    heat = viz.heatmap(rel, cmap=cmap, scale=scale)
    grey = pixels.mean(0) if pixels.shape[0] == 3 else pixels[0]  # colour would fight the heatmap's
    return heat, viz.overlay(grey, heat, alpha), scale


def describe(method: str, composite: str | None) -> str:
    """``LRP epsilon_plus`` or the method's name, for titles."""
    return f"LRP {composite or 'epsilon_plus'}" if method == "lrp" else method


def titles(file_name: str, how: str, target: dict, prediction: dict) -> list:
    """The lines above an explained image: file and method, the explained class with its scores,
    the prediction when it is another class."""
    same = prediction["class"] == target["class"]
    lines = [f"{file_name}: {how}",
             f"explains {target['name']}{' (predicted)' if same else ''}: p={target['probability']:.1%}, "
             f"logit {target['logit']:.3g}"]
    if not same:
        lines.append(f"predicted {prediction['name']}: p={prediction['probability']:.1%}")
    return lines


READABLE = 256  # labelled pictures smaller than this are enlarged to it (nearest neighbour) for the eye
LABELLED_WIDTH = 340  # wide enough for the title and legend lines under a small picture


def labelled(picture: np.ndarray, lines: list, scale: float, cmap, target_name: str, percentile) -> np.ndarray:
    """The PNG a person reads: ``picture`` (enlarged by an integer factor when small) with its
    title lines above and the labelled colour bar below."""
    factor = max(1, READABLE // max(picture.shape[:2]))
    return viz.annotate(viz.upscale(picture, factor), lines, scale, cmap, target_name, scale_note(percentile),
                        min_width=LABELLED_WIDTH)


def explain_images(paths: list, model_spec: str, weights=None, num_classes=None, composite=None,
                   target="pred", size=None, normalize="auto", convert=None, out_dir="fastlrp-explain",
                   cmap="bwr", alpha=0.6, percentile=viz.DEFAULT_PERCENTILE, batch_size=8, device="auto",
                   method="lrp", layer=None, passthrough=(), method_options=None, nonfinite="warn",
                   max_pixels=None, labels=None, plain=False) -> dict:
    """Explain each image file; write ``<stem>_heatmap.png``, ``<stem>_overlay.png`` and
    ``predictions.json`` to ``out_dir``; return what the JSON holds.

    ``method``: ``lrp`` (with ``composite``, default epsilon_plus) or another name of
    ``fastlrp.methods.names()`` with ``method_options``; ``layer`` for the CAM methods;
    ``passthrough``: layer types or module names without an LRP rule (``fastlrp.LRP``'s option);
    ``nonfinite``: ``warn`` or ``raise`` on input holding NaN or Inf; ``max_pixels``: the largest
    image (width x height) opened, 0 for no limit (default: Pillow's decompression-bomb guard).
    ``percentile``: colours saturate at this percentile of |R| (None or 100: the maximum).
    ``labels``: a file of class names (``models.read_labels``); torchvision models default to the
    categories of their weights, others to class indices. The PNGs carry a title (file, method,
    explained class with probability and logit, the prediction) and a labelled colour bar;
    ``plain``: the bare pixels instead, at the image's resolution."""
    with pixel_limit(max_pixels):
        return _explain_images(paths, model_spec, weights, num_classes, composite, target, size, normalize,
                               convert, out_dir, cmap, alpha, percentile, batch_size, device, method, layer,
                               passthrough, method_options, nonfinite, labels, plain)


def _write_png(path: Path, pixels: np.ndarray) -> Path:
    with atomic_output(path) as tmp:
        viz.save_png(tmp, pixels)
    return path


SCORES = ("probability: softmax of the model's outputs over all classes; logit: the model's raw output "
          "for the class (the relevance LRP distributes)")


def _explain_images(paths, model_spec, weights, num_classes, composite, target, size, normalize, convert, out_dir,
                    cmap, alpha, percentile, batch_size, device, method, layer, passthrough, method_options,
                    nonfinite, labels, plain) -> dict:
    from ..demo.run import prepare_out_dir

    paths = [Path(p) for p in paths]
    # Everything that can be checked without the model comes first: a typo fails at once.
    check_method(method, composite, layer, passthrough, method_options, nonfinite)
    check_cmap(cmap)
    names = models.class_names(model_spec, labels)
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
    how = describe(method, composite)

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
            names = models.fit_class_names(names, logits.shape[1], explicit=labels is not None)
            classes = target_indices(target, logits)
            probabilities = logits.float().softmax(1)

            def scored(j, c):
                return {"class": int(c), "name": models.class_label(names, int(c)),
                        "probability": float(probabilities[j, c]), "logit": float(logits[j, c])}

            for j, k in enumerate(members):
                position, (path, stem) = batch[k]
                heat, over, scale = render(images[k], result.relevance[j].cpu(), cmap, alpha, percentile)
                explained, predicted = scored(j, classes[j]), scored(j, logits[j].argmax())
                if not plain:
                    lines = titles(path.name, how, explained, predicted)
                    heat, over = (labelled(picture, lines, scale, cmap, explained["name"], percentile)
                                  for picture in (heat, over))
                heat_path = _write_png(out / f"{stem}_heatmap.png", heat)
                over_path = _write_png(out / f"{stem}_overlay.png", over)
                top = probabilities[j].topk(min(TOP_K, logits.shape[1]))
                records[position] = {
                    "path": str(path),
                    "prediction": predicted["class"],
                    "prediction_name": predicted["name"],
                    "prediction_probability": predicted["probability"],
                    "target": explained["class"],
                    "target_name": explained["name"],
                    "target_probability": explained["probability"],
                    "target_logit": explained["logit"],
                    "relevance_sum": float(result.relevance[j].sum()),
                    "colour_scale": scale,
                    "top": [scored(j, c) for c in top.indices],
                    "heatmap": heat_path.name,
                    "overlay": over_path.name,
                }
            bar.update(len(members))
    bar.close()
    summary = {"model": model_spec, "weights": None if weights is None else str(weights), "method": method,
               "composite": (composite or "epsilon_plus") if method == "lrp" else None, "target": target,
               "class_names": names.source if names is not None else None, "scores": SCORES,
               "colour_scale": scale_note(percentile) + "; colour_scale per image is that |R|",
               "out_dir": str(out), "images": records}
    with atomic_output(out / "predictions.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    summary["json"] = str(out / "predictions.json")
    return summary
