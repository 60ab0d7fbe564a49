"""The demo's HTML report: predictions, heatmaps of several LRP composites next to gradient
baselines, and how much relevance each method puts on the watermark.

``demo_sections`` returns a list of ``(title, html)`` sections (see ``fastlrp.report``);
other analyses append theirs to the list before ``write_report``.
"""

from __future__ import annotations

import html

import numpy as np
import torch

from .. import viz
from ..report import Section, image_html, table_html
from .data import WATERMARK_SIZE, watermark_mask

SCALE = 3  # 32x32 pictures enlarged for the eye
# LRP presets shown, with the rule options the demo's [0, 1] images need.
COMPOSITES = (("epsilon_plus", {}), ("epsilon_alpha2_beta1", {}), ("epsilon_gamma_box", {"low": 0.0, "high": 1.0}),
              ("excitation_backprop", {}))


def gradient_maps(model, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """The baselines: the input gradient of the target logit (sensitivity) and gradient x input."""
    x = images.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        (grad,) = torch.autograd.grad(logits.gather(1, labels[:, None]).sum(), x)
    return {"gradient": grad.detach(), "gradient x input": (grad * images).detach()}


def explain_all(model, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """{method name: relevance [N, 3, H, W]} for the LRP composites and the gradient baselines."""
    import fastlrp

    maps = {}
    for name, options in COMPOSITES:
        maps[f"LRP {name}"] = fastlrp.LRP(model, composite=name, **options)(images, labels).detach()
    maps.update(gradient_maps(model, images, labels))
    return maps


def watermark_share(relevance: torch.Tensor) -> torch.Tensor:
    """Per image, the share of positive relevance that lies on the watermark's pixels."""
    positive = relevance.sum(1).clamp(min=0)  # [N, H, W]
    mask = watermark_mask(relevance.shape[-1]).to(relevance.device)
    total = positive.flatten(1).sum(1)
    return torch.where(total > 0, positive[:, mask].sum(1) / total.clamp(min=1e-30), torch.zeros_like(total))


def _heatmap_grid(images, maps: dict, records: list) -> np.ndarray:
    tiles, labels = [], []
    for i, record in enumerate(records):
        tiles.append(viz.upscale(viz.image_to_uint8(images[i]), SCALE))
        mark = " +WM" if record["has_watermark"] else ""
        labels.append(f"#{i} {record['true']}->{record['pred']}{mark}")
        for name, relevance in maps.items():
            tiles.append(viz.upscale(viz.heatmap(relevance[i], percentile=99.5), SCALE))
            labels.append(name.replace("LRP ", "").replace("_", " ")[:22])
    return viz.grid(tiles, labels, columns=1 + len(maps), gap=6)


def demo_sections(model, images: torch.Tensor, labels: torch.Tensor, marked: torch.Tensor,
                  records: list) -> list[Section]:
    """The report's sections for the demo batch (``records`` as in run_demo's summary)."""
    maps = explain_all(model, images, labels)
    side = images.shape[-1]
    area = WATERMARK_SIZE**2 / side**2
    shares = {name: watermark_share(rel) for name, rel in maps.items()}
    watermarked = marked.bool()

    intro = (
        f"<p>The demo CNN was trained on generated images of disks and crosses. In the training data, "
        f"most crosses carry a small checkerboard <em>watermark</em> in the bottom-right corner and no disk "
        f"does: a shortcut the network can learn instead of the shapes (a Clever-Hans artefact). Below, "
        f"{len(images)} new images are explained for their true class. Red is relevance for the class, "
        f"blue against it; <b>+WM</b> marks images with the watermark.</p>")

    rows = [[r["index"], r["true"], r["pred"], "yes" if r["has_watermark"] else "no", r["target_logit"],
             r["relevance_sum"]] for r in records]
    predictions = intro + table_html(["#", "true", "predicted", "watermark", "target logit", "sum of LRP relevance"],
                                     rows)

    heatmaps = (_heatmap_grid(images, maps, records) if len(images) else None)
    heatmap_html = (
        "<p>Each row: the input, then one heatmap per method (colour scaled per map to its 99.5th percentile "
        "of |R|). LRP's composites give crisp, mostly positive evidence on the object and, on watermarked "
        "crosses, a hot spot in the bottom-right corner; the gradient baselines are noisier and signed at "
        "random (the gradient says how the output would change, not what contributed).</p>"
        + image_html(heatmaps, "heatmaps of every method") + "<p class='note'>colour map bwr: "
        + image_html(viz.colorbar("bwr", 200, 10), "colour bar") + " negative - 0 - positive</p>")

    def mean(values, where):
        return float(values[where].mean()) if where.any() else float("nan")

    share_rows = [[name, mean(s, watermarked), mean(s, ~watermarked)] for name, s in shares.items()]
    lrp_names = [n for n in shares if n.startswith("LRP")]
    best = max(lrp_names, key=lambda n: mean(shares[n], watermarked))
    found = mean(shares[best], watermarked)
    if watermarked.any():
        verdict = (
            f"<p><b>The watermark is found.</b> On watermarked images, {html.escape(best)} puts "
            f"{found:.0%} of the positive relevance on the watermark's {WATERMARK_SIZE}x{WATERMARK_SIZE} "
            f"pixels, which cover {area:.1%} of the image ({found / area:.0f} times their share of the area). "
            f"The network uses the corner, not only the shape, to say \"cross\": a shortcut that would fail on "
            f"crosses without the mark or fire on disks with it.</p>")
    else:
        verdict = "<p>No image of this batch carries the watermark; run with more images (--n) to see it.</p>"
    watermark_html = verdict + table_html(
        ["method", "share of positive relevance on the watermark (watermarked images)",
         "same pixels, images without watermark"], share_rows)
    return [("Predictions", predictions), ("Heatmaps: LRP composites and gradient baselines", heatmap_html),
            ("The Clever-Hans artefact", watermark_html)]
