"""The demo: explain generated images with the shipped CNN and write heatmap PNGs.

``run_demo`` does the work and returns a summary dict; ``format_summary`` turns that into
the report the ``fastlrp demo`` command prints. Everything runs on the CPU, offline, in a
few seconds.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ... import viz
from .data import CLASS_NAMES, make_dataset
from .model import load_demo_model

SCALE = 4  # 32x32 images are too small to look at; PNGs show them 4x enlarged
GAP = 4  # white pixels between an image and its heatmap
GRID_GAP = 12  # and between the pairs of the grid
GRID_COLUMNS = 4
ANALYSIS_SEED_OFFSET = 1  # the SpRAy images use seed + 1, so they are not the batch's


def prepare_out_dir(out_dir: str | Path) -> Path:
    """Create the output folder (and parents) if needed; return it as an absolute path.

    Raises OSError with a readable message when the path cannot be a folder.
    """
    path = Path(out_dir).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"output path {path} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise type(err)(f"cannot create output folder {path}: {err.strerror or err}") from None
    return path


def _composite_options(composite: str) -> dict:
    # Box rules need the input domain; the demo images live in [0, 1] unnormalised.
    return {"low": 0.0, "high": 1.0} if "box" in composite else {}


def _pair(image: torch.Tensor, relevance: torch.Tensor) -> tuple[np.ndarray, float]:
    """[H*S, 2*W*S + GAP, 3] uint8: the image, a white gap, the heatmap (colours saturating at the
    99.5th percentile of |R|); and that |R|."""
    scale = viz.relevance_scale(relevance.sum(0))
    left = viz.upscale(viz.image_to_uint8(image), SCALE)
    right = viz.upscale(viz.heatmap(relevance, scale=scale), SCALE)
    gap = np.full((left.shape[0], GAP, 3), 255, np.uint8)
    return np.concatenate([left, gap, right], axis=1), scale


def _labelled_pair(pair: np.ndarray, scale: float, record: dict) -> np.ndarray:
    """The pair under its title (index, true and predicted class, watermark, logit, sum of
    relevance) and above the labelled colour bar: a picture that reads without the docs."""
    mark = ", watermark" if record["has_watermark"] else ""
    titles = [f"#{record['index']} {record['true']}{mark} -> {record['pred']} (p={record['probability']:.0%})",
              f"explains {record['true']}: logit {record['target_logit']:.2f}, sum R {record['relevance_sum']:.2f}"]
    return viz.annotate(pair, titles, scale, "bwr", record["true"], "input | relevance (99.5th pct of |R|)",
                        min_width=pair.shape[1], size=10)


def run_demo(
    out_dir: str | Path = "fastlrp-demo",
    n: int = 8,
    composite: str = "epsilon_plus",
    seed: int = 0,
    report: bool = True,
    analysis_n: int = 128,
    **rule_options,
) -> dict:
    """Explain ``n`` generated images (their true class) and write PNGs to ``out_dir``.

    Writes ``image_XX.png`` (input next to heatmap) per image and ``grid.png`` with all of
    them, and with ``report`` the self-contained ``report.html`` (see ``demo.report``):
    several LRP composites and gradient baselines, the share of relevance on the watermark,
    pixel-flipping curves with their AOPC, and SpRAy clusters of ``analysis_n`` (>= 16) new
    class-1 images explained with ``composite``. Returns a summary: per image the true and predicted class, whether it carries the
    watermark, the target logit, the summed input relevance and the conservation error
    |sum R - logit| / |logit|; their maximum; the explanation time per image; and with
    ``report``, ``aopc`` ({method: AOPC}) and ``spray`` (per cluster: size, watermark fraction).
    ``rule_options`` go to ``fastlrp.LRP`` (e.g. ``zero_params="bias"``).

    The demo CNN has biases (batch norm folded into the convolutions brings them), and a
    rule lets a bias absorb its share of the relevance, so sum R falls short of the logit
    (by 16-85% on the default eight images with epsilon_plus); ``zero_params="bias"``
    conserves it exactly.
    """
    import fastlrp  # the engine; imported here so that fastlrp.apps.demo loads on its own

    from .report import MIN_ANALYSIS_N

    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if report and analysis_n < MIN_ANALYSIS_N:
        # SpRAy's neighbour graph and eigengap need a few dozen heatmaps to mean anything.
        raise ValueError(f"analysis_n must be at least {MIN_ANALYSIS_N}, got {analysis_n}")
    model = load_demo_model()
    start = time.perf_counter()
    # Built before the folder is made, so that a bad composite name leaves nothing behind.
    options = {**_composite_options(composite), **rule_options}
    explainer = fastlrp.LRP(model, composite=composite, **options)
    out = prepare_out_dir(out_dir)
    images, labels, marked = make_dataset(n, seed)

    # The first call pays one-off costs (allocations, lazy initialisation); time a second.
    explainer.explain(images[:1], labels[:1])
    setup_s = time.perf_counter() - start
    start = time.perf_counter()
    result = explainer.explain(images, labels)
    explain_s = time.perf_counter() - start

    relevance = result.relevance.detach()
    logits = result.output.detach()
    target_logit = logits.gather(1, labels[:, None]).squeeze(1)
    total = relevance.flatten(1).sum(1)
    error = (total - target_logit).abs() / target_logit.abs()
    pred = logits.argmax(1)

    probability = logits.softmax(1).gather(1, labels[:, None]).squeeze(1)
    tiles, records = [], []
    for i in range(n):
        pair, scale = _pair(images[i], relevance[i])
        record = {
            "index": i,
            "true": CLASS_NAMES[labels[i]],
            "pred": CLASS_NAMES[pred[i]],
            "has_watermark": bool(marked[i]),
            "target_logit": target_logit[i].item(),
            "probability": probability[i].item(),
            "relevance_sum": total[i].item(),
            "conservation_error": error[i].item(),
        }
        tile = _labelled_pair(pair, scale, record)
        record["png"] = str(viz.save_png(out / f"image_{i:02d}.png", tile))
        tiles.append(tile)
        records.append(record)
    grid = viz.save_png(out / "grid.png", viz.grid(tiles, columns=GRID_COLUMNS, gap=GRID_GAP))
    bias_free_error = None
    if "zero_params" not in rule_options:
        # The figure the biases hide: the same rules with the biases left out conserve the logit.
        bias_free = fastlrp.LRP(model, composite=composite, **options, zero_params="bias")(images, labels).detach()
        bias_free_error = ((bias_free.flatten(1).sum(1) - target_logit).abs() / target_logit.abs()).max().item()
    report_path, aopc, spray = None, None, None
    if report:
        from ..report import write_report
        from .report import (COMPOSITES, concept_section, demo_sections, explain_all, pixel_flipping_section,
                             spray_section)

        # The PNGs' explanation is one of the report's when made with the same options.
        same = not rule_options and options == dict(COMPOSITES).get(composite)
        maps = explain_all(model, images, labels, {f"LRP {composite}": relevance} if same else None)
        sections = demo_sections(model, images, labels, marked, records, maps, bias_free_error)
        flipping, aopc = pixel_flipping_section(model, images, labels, maps, marked, seed)
        # Other images than the batch's: a seed of their own, fixed by --seed.
        clusters, spray = spray_section(explainer, analysis_n, seed + ANALYSIS_SEED_OFFSET, f"LRP {composite}")
        concepts, _ = concept_section(explainer, analysis_n, seed + ANALYSIS_SEED_OFFSET)
        sections += [flipping, clusters, concepts]
        report_path = str(write_report(out / "report.html", "fastlrp demo: finding a Clever-Hans artefact", sections))

    return {
        "out_dir": str(out),
        "composite": composite,
        "seed": seed,
        "n": n,
        "images": records,
        "grid_png": str(grid),
        "report": report_path,
        "aopc": aopc,
        "spray": spray,
        "accuracy": (pred == labels).float().mean().item(),
        "max_conservation_error": error.max().item(),
        "bias_free_max_conservation_error": bias_free_error,
        "seconds_per_image": explain_s / n,
        "setup_seconds": setup_s,
    }


def format_summary(summary: dict) -> str:
    """The human-readable report of ``run_demo``'s summary."""
    lines = [
        f"wrote {summary['n'] + 1} PNGs to {summary['out_dir']}",
        f"composite {summary['composite']}, {summary['n']} generated images (seed {summary['seed']}), "
        "explaining the true class",
        f"{'#':>3}  {'true':<6} {'pred':<6} {'watermark':<9} {'logit':>8} {'sum R':>8}  conservation error",
    ]
    for r in summary["images"]:
        lines.append(
            f"{r['index']:>3}  {r['true']:<6} {r['pred']:<6} {'yes' if r['has_watermark'] else 'no':<9} "
            f"{r['target_logit']:>8.3f} {r['relevance_sum']:>8.3f}  {r['conservation_error']:.2e}"
        )
    lines += conservation_lines(summary)
    lines += [
        f"explanation time: {summary['seconds_per_image'] * 1e3:.2f} ms per image "
        f"(batch of {summary['n']}, CPU; first call and setup took {summary['setup_seconds']:.2f} s)",
    ]
    if summary.get("report"):
        lines.append(f"report: {summary['report']}")
    return "\n".join(lines)


def conservation_lines(summary: dict) -> list:
    """What the conservation error means: sum R is the part of the logit that reaches the pixels;
    the biases absorb the rest, and the bias-free rules show the logit conserved."""
    images = summary["images"]
    worst = max(images, key=lambda r: r["conservation_error"])
    errors = [r["conservation_error"] for r in images]
    lines = [
        f"max conservation error: {summary['max_conservation_error']:.2e} on image #{worst['index']} "
        f"(logit {worst['target_logit']:.2f}, sum R {worst['relevance_sum']:.2f}); error = |sum R - logit| / |logit|, "
        f"{min(errors):.0%} to {max(errors):.0%} here",
        "  not a fault: the network's biases (batch norm folded into its convolutions brings them) absorb their "
        "share of the relevance, so sum R is the part of the logit that reaches the pixels",
    ]
    if summary.get("bias_free_max_conservation_error") is not None:
        lines.append(f"  with the biases left out of the rules, fastlrp.LRP(..., zero_params=\"bias\"), the same images "
                     f"conserve the logit: max error {summary['bias_free_max_conservation_error']:.2e}")
    return lines
