"""The demo's HTML report: predictions, heatmaps of several LRP composites next to gradient
baselines, how much relevance each method puts on the watermark, pixel-flipping curves with
their AOPC, and SpRAy clusters of many class-1 heatmaps.

``demo_sections`` returns a list of ``(title, html)`` sections (see ``fastlrp.apps.report``);
``pixel_flipping_section`` and ``spray_section`` return one more each, with their numbers,
and ``run_demo`` appends them before ``write_report``.
"""

from __future__ import annotations

import html

import numpy as np
import torch

from ... import viz
from ..report import Section, image_html, table_html
from .data import CLASS_NAMES, WATERMARK_CLASS, WATERMARK_SIZE, make_dataset, watermark_mask

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


def explain_all(model, images: torch.Tensor, labels: torch.Tensor, known: dict | None = None) -> dict:
    """{method name: relevance [N, 3, H, W]} for the LRP composites and the gradient baselines;
    ``known`` maps already computed (same names) are taken as they are."""
    import fastlrp

    maps = {}
    for name, options in COMPOSITES:
        key = f"LRP {name}"
        maps[key] = known[key] if known and key in known else \
            fastlrp.LRP(model, composite=name, **options)(images, labels).detach()
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


STRONGEST = 20  # pixels (2% of a 32x32 image) whose relevance is "the strongest evidence" of a heatmap


def strongest_evidence(relevance: torch.Tensor, k: int = STRONGEST) -> tuple[list, list]:
    """Per image (channels summed): the share of negative relevance among its ``k`` pixels of
    largest |R| (above one half, the heatmap's strongest evidence speaks against the explained
    class), and the share of its positive relevance that lies outside those pixels."""
    flat = relevance.sum(1).flatten(1)
    top = flat.abs().topk(min(k, flat.shape[1]), dim=1).indices
    strongest = flat.gather(1, top)
    negative = strongest.clamp(max=0).abs().sum(1) / strongest.abs().sum(1).clamp(min=1e-30)
    positive = flat.clamp(min=0)
    outside = 1 - positive.gather(1, top).sum(1) / positive.sum(1).clamp(min=1e-30)
    return negative.tolist(), outside.tolist()


def exceptions_html(records: list, relevance: torch.Tensor, method: str, k: int = STRONGEST) -> str:
    """A paragraph on the images whose heatmap contradicts the summary ("mostly positive evidence
    on the object"), with the numbers that say why; empty when none does."""
    negative, outside = strongest_evidence(relevance, k)
    logits = sorted(r["target_logit"] for r in records)
    lowest, median = logits[0], logits[len(logits) // 2]
    notes = []
    for record, against, spread in zip(records, negative, outside):
        if against <= 0.5:
            continue
        rank = ", the lowest of the batch" if record["target_logit"] == lowest else ""
        sure = f", p={record['probability']:.0%}" if "probability" in record else ""
        weak = " is weak and scattered" if record["target_logit"] < median and spread > 0.5 else ""
        notes.append(
            f"<li><b>#{record['index']}</b> ({html.escape(record['true'])}, predicted {html.escape(record['pred'])}"
            f"{sure}): {against:.0%} of the relevance on its {k} strongest pixels is negative: the evidence "
            f"the heatmap shows most clearly speaks <em>against</em> {html.escape(record['true'])}. What speaks for "
            f"it{weak}: logit {record['target_logit']:.2f}{rank}, sum of relevance "
            f"{record['relevance_sum']:.2f}, and {spread:.0%} of the positive relevance lies outside those "
            "pixels.</li>")
    if not notes:
        return ""
    return (f"<p><b>Not every image fits that summary.</b> With {html.escape(method)}, these heatmaps contradict it. "
            "They are not a fault of LRP: a heatmap shows the network's decision as it is, and here the network "
            "decides on thin evidence while the most salient pixels argue the other way:</p><ul>"
            + "".join(notes) + "</ul>")


def conservation_html(records: list, bias_free_error: float | None) -> str:
    """Why sum R is smaller than the logit in the predictions table."""
    errors = [r["conservation_error"] for r in records]
    text = (f"<p class='note'>The sum of relevance is the part of the logit that reaches the pixels. The network's "
            f"biases (batch norm folded into its convolutions brings them) absorb the rest: here sum R falls short "
            f"of the logit by {min(errors):.0%} to {max(errors):.0%} (|sum R - logit| / |logit|).")
    if bias_free_error is not None:
        text += (" With the biases left out of the rules, <code>fastlrp.LRP(..., zero_params=\"bias\")</code>, "
                 f"the same images conserve the logit (largest error {bias_free_error:.1e}).")
    return text + "</p>"


def demo_sections(model, images: torch.Tensor, labels: torch.Tensor, marked: torch.Tensor,
                  records: list, maps: dict | None = None, bias_free_error: float | None = None) -> list[Section]:
    """The report's sections for the demo batch (``records`` as in run_demo's summary;
    ``maps`` as from ``explain_all``, computed here when not given; ``bias_free_error``: the
    largest conservation error of the bias-free rules, quoted next to the table)."""
    maps = explain_all(model, images, labels) if maps is None else maps
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
    if records and "conservation_error" in records[0]:
        predictions += conservation_html(records, bias_free_error)

    heatmaps = (_heatmap_grid(images, maps, records) if len(images) else None)
    heatmap_html = (
        "<p>Each row: the input, then one heatmap per method (colour scaled per map to its 99.5th percentile "
        "of |R|). On most images LRP's composites give crisp, mostly positive evidence on the object and, on "
        "watermarked crosses, a hot spot in the bottom-right corner; the gradient baselines are noisier and "
        "signed at random (the gradient says how the output would change, not what contributed).</p>"
        + image_html(heatmaps, "heatmaps of every method")
        + image_html(viz.legend(1.0, "bwr", 320, "the true class", "each map scaled to its own 99.5th pct of |R| = 1"),
                     "colour bar")
        + exceptions_html(records, next(iter(maps.values())), next(iter(maps))))

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


# --- pixel flipping --------------------------------------------------------------------

RANDOM = "random order"  # the baseline row: patches flipped in an order no explanation chose
# Patches of 4x4 pixels, 4 of the 64 per step up to half the image, blurred rather than
# greyed out (a flat grey patch is itself a new feature the CNN may react to).
FLIP_OPTIONS = {"patch_size": 4, "steps": 8, "max_fraction": 0.5, "perturbation": "blur"}
# Every curve costs (steps + 1) forward passes per image: two LRP composites and the
# gradient baseline keep the demo within its time.
FLIP_METHODS = ("LRP epsilon_plus", "LRP epsilon_gamma_box", "gradient")
PLOT_INCHES, PLOT_DPI = (6.4, 4.0), 100  # the embedded plot is 640 x 400 pixels


def flipping_curves(model, images: torch.Tensor, labels: torch.Tensor, maps: dict, seed: int = 0) -> dict:
    """{method: most-relevant-first PerturbationCurve} for the maps of ``FLIP_METHODS`` (all maps
    where none of them is present), and the random-order baseline."""
    from ...metrics import pixel_flipping

    chosen = {name: maps[name] for name in FLIP_METHODS if name in maps} or maps
    curves = {name: pixel_flipping(model, images, relevance, labels, seed=seed, **FLIP_OPTIONS)
              for name, relevance in chosen.items()}
    # The relevance only breaks ties here; the order is random.
    first = next(iter(maps.values()))
    curves[RANDOM] = pixel_flipping(model, images, first, labels, order="random", seed=seed, **FLIP_OPTIONS)
    return curves


def _curves_figure(curves: dict):
    # A bare Figure, not pyplot: no global state, no GUI backend, nothing printed.
    from matplotlib.figure import Figure

    figure = Figure(figsize=PLOT_INCHES, dpi=PLOT_DPI)
    ax = figure.add_subplot()
    for name, curve in curves.items():
        style = {"color": "black", "linestyle": "--"} if name == RANDOM else {"marker": "o", "markersize": 3}
        ax.plot(curve.fractions.numpy() * 100, curve.mean().numpy(), label=name, **style)
    ax.set_xlabel("% of the image blurred (most relevant 4x4 patches first)")
    ax.set_ylabel("logit of the true class (mean over images)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figure.subplots_adjust(left=0.12, right=0.97, top=0.95, bottom=0.13)
    return figure


def first_patch_on_watermark(relevance: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Per image, whether the patch pixel flipping perturbs first touches the watermark."""
    from ...metrics import patch_ranks

    ranks, _ = patch_ranks(relevance, FLIP_OPTIONS["patch_size"], "most_relevant_first",
                           torch.Generator().manual_seed(seed))
    return ((ranks == 0) & watermark_mask(relevance.shape[-1])).flatten(1).any(1)


def pixel_flipping_section(model, images: torch.Tensor, labels: torch.Tensor, maps: dict, marked: torch.Tensor,
                           seed: int = 0) -> tuple[Section, dict]:
    """The pixel-flipping section and {method: AOPC} (the random baseline included)."""
    from ..report import figure_html

    curves = flipping_curves(model, images, labels, maps, seed)
    scores = {name: curve.aopc() for name, curve in curves.items()}
    baseline = scores[RANDOM]
    rows = [[name, value, value - baseline] for name, value in sorted(scores.items(), key=lambda kv: -kv[1])]
    best = max((n for n in scores if n != RANDOM), key=scores.get)
    marked = marked.bool()
    on_mark = int(first_patch_on_watermark(maps[best][marked], seed).sum()) if marked.any() else 0
    picks = (f"; on {on_mark} of the {int(marked.sum())} watermarked crosses, the first patch it blurs lies on "
             "the watermark" if marked.any() else "")
    body = (
        "<p><b>Pixel flipping</b> asks whether a heatmap points at what the network actually uses. Each "
        "image is cut into 4x4-pixel patches; the patches the method calls most relevant are blurred "
        "first, four more at every step, up to half of the image, and after each step the network scores "
        "the image again. If the heatmap is right, the logit of the true class falls fast: the curve "
        "drops steeply at the left. The dashed line blurs patches in random order, the bar every method "
        "should clear. <b>AOPC</b> (area over the perturbation curve) is the mean drop of the logit over "
        f"the steps: larger is better. On these {len(images)} images, {html.escape(best)} has the "
        f"largest AOPC ({scores[best]:.2f}, random order: {baseline:.2f}){picks}.</p>"
        + figure_html(_curves_figure(curves), "pixel-flipping curves", dpi=PLOT_DPI, tight=False)
        + table_html(["method", "AOPC (logit drop, mean over steps)", "AOPC minus random order"], rows))
    return ("Pixel flipping: do the heatmaps point at what the network uses?", body), scores


# --- SpRAy -----------------------------------------------------------------------------

MIN_ANALYSIS_N = 16
# Heatmaps pooled to 4x4 blocks of 8x8 pixels (the watermark falls into one block), a sparse
# 5-nearest-neighbour graph, and the eigengap choosing among up to 8 clusters.
SPRAY_OPTIONS = {"pooled_size": 4, "n_neighbors": 5, "max_clusters": 8}
# A cluster "looks at the watermark" when its mean heatmap puts this much of its positive
# relevance on the watermark's 16 pixels (1.6% of the image).
WATERMARK_STRATEGY_SHARE = 0.15


def analysis_set(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` class-1 ("cross") images: the generator balances classes, so 2n images hold exactly n."""
    images, labels, marked = make_dataset(2 * n, seed)
    keep = labels == WATERMARK_CLASS
    return images[keep], labels[keep], marked[keep]


def spray_section(explainer, n: int, seed: int, method: str, batch_size: int = 256) -> tuple[Section, dict]:
    """Explain ``n`` new class-1 images with ``explainer`` and cluster the heatmaps with SpRAy.

    Returns the section and a summary: per cluster its size, the fraction of its images that carry
    the watermark, and the share of its mean heatmap's positive relevance on the watermark."""
    from ...analysis.spray import spray

    if n < MIN_ANALYSIS_N:
        raise ValueError(f"analysis_n must be at least {MIN_ANALYSIS_N}, got {n}")
    images, labels, marked = analysis_set(n, seed)
    relevance = torch.cat([explainer(x, y).detach() for x, y in zip(images.split(batch_size), labels.split(batch_size))])
    result = spray(relevance, seed=seed, **SPRAY_OPTIONS)

    marked_np = marked.numpy()
    sizes = result.cluster_sizes()
    fraction = [float(marked_np[result.labels == k].mean()) for k in range(result.n_clusters)]
    share = watermark_share(torch.from_numpy(result.prototypes)[:, None]).tolist()
    strategy = [s >= WATERMARK_STRATEGY_SHARE for s in share]
    clusters = [{"size": int(sizes[k]), "watermark_fraction": fraction[k], "prototype_watermark_share": share[k],
                 "watermark_strategy": strategy[k]} for k in range(result.n_clusters)]

    tiles = [viz.upscale(viz.heatmap(p, percentile=99.5), SCALE) for p in result.prototypes]
    captions = [f"#{k} n={sizes[k]} WM {fraction[k]:.0%}" for k in range(result.n_clusters)]  # fits 96 px
    picture = viz.grid(tiles, captions, columns=min(4, len(tiles)), gap=8)
    rows = [[k, c["size"], f"{c['watermark_fraction']:.0%}", f"{c['prototype_watermark_share']:.0%}",
             "watermark" if c["watermark_strategy"] else "shape"] for k, c in enumerate(clusters)]

    on_mark = [k for k in range(result.n_clusters) if strategy[k]]
    covered = int(sum(sizes[k] for k in on_mark))
    unmarked = ~marked_np
    # Where the images without the watermark went: honest about how clean the split is.
    clean = [k for k in range(result.n_clusters) if not strategy[k]]
    unmarked_in_clean = int(sum((unmarked & (result.labels == k)).sum() for k in clean))
    if on_mark:
        purity = float(marked_np[np.isin(result.labels, on_mark)].mean())
        verdict = (
            f"<p><b>SpRAy finds the watermark strategy.</b> {len(on_mark)} of the {result.n_clusters} clusters "
            f"(cluster{'s' if len(on_mark) > 1 else ''} {', '.join(map(str, on_mark))}; {covered} of {n} images) "
            f"have a mean heatmap with a hot spot on the watermark (at least {WATERMARK_STRATEGY_SHARE:.0%} of "
            f"its positive relevance on {WATERMARK_SIZE}x{WATERMARK_SIZE} corner pixels); {purity:.0%} of their "
            f"images carry the watermark. ")
        verdict += (
            f"Of the {int(unmarked.sum())} crosses without the watermark, {unmarked_in_clean} fall into the "
            f"clusters whose mean heatmap shows only the shape.</p>" if clean else
            f"No cluster is free of the corner hot spot: SpRAy does not separate the {int(unmarked.sum())} crosses "
            "without the watermark in this run; they sit among the watermark clusters and dilute them (another "
            "--seed or a larger --analysis-n may split them off).</p>")
    else:
        verdict = ("<p>No cluster's mean heatmap has a hot spot on the watermark in this run: SpRAy does not "
                   "separate the watermark strategy here (try another --seed or a larger --analysis-n).</p>")
    body = (
        f"<p><b>SpRAy</b> (spectral relevance analysis) looks for the distinct strategies a network uses "
        f"for one class. {n} new {CLASS_NAMES[WATERMARK_CLASS]} images ({int(marked_np.sum())} with the "
        f"watermark, {int(unmarked.sum())} without) were explained with {html.escape(method)}; their heatmaps, "
        f"pooled to 4x4 blocks, were linked to their {SPRAY_OPTIONS['n_neighbors']} nearest neighbours and "
        f"clustered spectrally, the eigengap choosing {result.n_clusters} cluster(s) (at most "
        f"{SPRAY_OPTIONS['max_clusters']}). The generator knows which images carry the watermark, so each "
        f"cluster's watermark fraction says which strategy it is. Below: the mean heatmap of each cluster.</p>"
        + verdict + image_html(picture, "SpRAy cluster mean heatmaps")
        + table_html(["cluster", "images", "fraction with watermark", "mean heatmap: share on the watermark",
                      "looks at"], rows)
        + "<p class='note'>Several watermark clusters usually differ by where the cross lies in the image; "
          "what they share is the hot corner.</p>")
    summary = {"n": n, "seed": seed, "n_clusters": result.n_clusters, "eigenvalues": result.eigenvalues.tolist(),
               "clusters": clusters}
    return ("SpRAy: the strategies behind \"cross\"", body), summary


CONCEPT_LAYER = "relu4"  # the residual block's output, 16x16: fine enough to tell the corner from the shape


def concept_section(explainer, n: int, seed: int, k: int = 4, refs: int = 6) -> tuple[Section, dict]:
    """The concept atlas of a watermarked "cross": the ``k`` most relevant channels of ``CONCEPT_LAYER``,
    their conditional heatmaps, and their ``refs`` reference images by relevance among ``n`` new images
    (Concept Relevance Propagation, fastlrp.concepts). Returns the section and, per channel, its share,
    the share of its heatmap on the watermark and the fraction of its references that carry it."""
    import importlib.util
    import tempfile
    from pathlib import Path

    from ...concepts import concept_atlas, plot_concept_atlas, reference_samples
    from ..report import figure_html

    title = "Concepts: which channels carry the watermark"
    if importlib.util.find_spec("h5py") is None or importlib.util.find_spec("matplotlib") is None:
        return (title, '<p>Needs h5py and matplotlib: pip install "fastlrp[analysis]".</p>'), {}
    images, _, marked = make_dataset(n, seed)
    with tempfile.TemporaryDirectory() as tmp:
        references = reference_samples(explainer, images, CONCEPT_LAYER, Path(tmp) / "scores.h5", k=refs,
                                       batch_size=256)
    # The watermarked image whose heatmap leans on the watermark the most: which channels carry that?
    candidates = images[marked]
    pick = int(watermark_share(explainer(candidates, WATERMARK_CLASS)).argmax())
    atlas = concept_atlas(explainer, candidates[pick:pick + 1], CONCEPT_LAYER, references, images, WATERMARK_CLASS,
                          k=k, refs=refs)
    on_mark = watermark_share(atlas.heatmaps[:, None]).tolist()
    concepts = []
    for condition, share, mark in zip(atlas.conditions, atlas.shares, on_mark):
        index, _ = references.top(condition.channels[0])
        concepts.append({"channel": condition.channels[0], "share": share, "heatmap_on_watermark": mark,
                         "references_watermarked": float(marked[index].float().mean())})
    best = max(concepts, key=lambda c: c["heatmap_on_watermark"])
    # called a watermark concept when most of its heatmap and of its references show the watermark
    found = best["heatmap_on_watermark"] >= 0.5 and best["references_watermarked"] >= 0.5
    figure = plot_concept_atlas(atlas, CLASS_NAMES)
    import matplotlib.pyplot as plt

    picture = figure_html(figure, "concept atlas")
    plt.close(figure)
    rows = [[c["channel"], f"{c['share']:.0%}", f"{c['heatmap_on_watermark']:.0%}",
             f"{c['references_watermarked']:.0%}"] for c in concepts]
    body = (
        f"<p>One forward and one batched backward pass give a heatmap per channel of <code>{CONCEPT_LAYER}</code>, "
        "each conditioned on that channel alone (Concept Relevance Propagation, Achtibat et al. 2023). Each row of "
        "the atlas is one of the most relevant channels for this watermarked cross: its conditional heatmap, its "
        f"share of the layer's relevance, and the regions of the {refs} images (of {n} new ones, "
        f"{float(marked.float().mean()):.0%} watermarked) where it carries the most relevance.</p>"
        + picture
        + table_html(["channel", "share of the layer's relevance", "its heatmap on the watermark",
                      "its reference images with the watermark"], rows)
        + f"<p><b>Channel {best['channel']}</b> puts {best['heatmap_on_watermark']:.0%} of its positive relevance "
        f"on the watermark's {WATERMARK_SIZE}x{WATERMARK_SIZE} pixels, and "
        f"{best['references_watermarked']:.0%} of its reference images carry the watermark"
        + (": a watermark concept the model learned.</p>" if found else
           "; no channel here is clearly a watermark concept by these numbers.</p>"))
    return (title, body), {"layer": CONCEPT_LAYER, "concepts": concepts,
                           "watermark_concept": best["channel"] if found else None}
