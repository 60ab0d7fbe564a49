"""``fastlrp volume``: explain a NIfTI volume with a 3D network.

The input is [X, Y, Z] (one channel) or [X, Y, Z, C] (channels last, as NIfTI stores
them); the model sees [1, C, X, Y, Z]. The output NIfTI holds the relevance summed over
channels, float32 [X, Y, Z], with the input's affine and a copy of its header (data type
and intensity scaling updated), so it lies on the input in any viewer. A PNG shows three
orthogonal slices through the voxel of largest |relevance|.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from .. import models
from ... import viz
from ...extras import require
from .common import (Preprocessing, atomic_output, check_cmap, check_input_file, check_method, make_explainer,
                     refuse_input_as_output)
from .images import describe, scale_note

INTENSITY = ("zscore", "minmax", "none")


def read_volume(nib, path: Path):
    check_input_file(path, "a NIfTI file")
    try:
        image = nib.load(str(path))
        data = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as err:  # nibabel raises many types for a bad file; all mean "not readable"
        raise ValueError(f"cannot read {path} as NIfTI ({type(err).__name__}: {err}); "
                         "give a .nii or .nii.gz file") from None
    if data.ndim not in (3, 4):
        raise ValueError(f"{path} has shape {data.shape}; expected [X, Y, Z] or [X, Y, Z, C]")
    return image, data


def scale_intensity(data: np.ndarray, mode: str) -> np.ndarray:
    """Per channel: ``zscore`` (mean 0, std 1), ``minmax`` (into [0, 1]) or ``none``."""
    if mode == "none":
        return data
    axes = (0, 1, 2)
    # Statistics over the finite voxels: one NaN or Inf voxel must not turn the whole channel into
    # NaN (the pipeline names such voxels' volume in a warning or an error).
    finite = np.where(np.isfinite(data), data, np.nan)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN channel: its statistics stay NaN
        if mode == "zscore":
            std = np.nanstd(finite, axis=axes, keepdims=True)
            std = np.where(std > 0, std, 1.0)
            return ((data - np.nanmean(finite, axis=axes, keepdims=True)) / std).astype(np.float32)
        if mode == "minmax":
            low, high = np.nanmin(finite, axis=axes, keepdims=True), np.nanmax(finite, axis=axes, keepdims=True)
            return ((data - low) / np.where(high > low, high - low, 1.0)).astype(np.float32)
    raise ValueError(f"--intensity must be one of {INTENSITY}, got {mode!r}")


def slices_png(path: Path, volume: np.ndarray, relevance: np.ndarray, cmap: str = "bwr", alpha: float = 0.6,
               percentile: float | None = viz.DEFAULT_PERCENTILE, spacing: tuple = (1.0, 1.0, 1.0),
               title: str | None = None, target: str | None = None) -> tuple:
    """Write ``slices_figure`` to ``path`` (PNG); returns the voxel."""
    figure, voxel = slices_figure(volume, relevance, cmap, alpha, percentile, spacing, title, target)
    with atomic_output(path) as tmp:
        figure.savefig(tmp, format="png")
    return voxel


def slices_figure(volume: np.ndarray, relevance: np.ndarray, cmap: str = "bwr", alpha: float = 0.6,
                  percentile: float | None = viz.DEFAULT_PERCENTILE, spacing: tuple = (1.0, 1.0, 1.0),
                  title: str | None = None, target: str | None = None) -> tuple:
    """Three orthogonal slices through the voxel of largest |relevance|, each the grey volume
    under the relevance heatmap, side by side with titles and one labelled colour bar (one scale
    for the three panels, so they compare). ``spacing``: the voxel size along the three axes (the
    NIfTI header's zooms), so that anisotropic voxels are drawn in their true proportions.
    Returns (matplotlib Figure, the voxel)."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    magnitude = np.nan_to_num(np.abs(relevance), nan=0.0, posinf=0.0)  # NaN relevance of NaN input: not a peak
    centre = np.unravel_index(magnitude.argmax(), relevance.shape)
    if not np.isfinite(volume).all():
        volume = np.nan_to_num(volume, nan=0.0, posinf=0.0, neginf=0.0)
    if not np.isfinite(relevance).all():
        relevance = np.nan_to_num(relevance, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = np.percentile(volume, (1, 99))
    grey = np.clip((volume - low) / (high - low if high > low else 1.0), 0, 1)
    scale = viz.relevance_scale(relevance, percentile)
    spacing = tuple(float(s) if s and np.isfinite(s) and s > 0 else 1.0 for s in spacing)
    figure = Figure(figsize=(10, 3.9), dpi=100, layout="constrained")
    panels = figure.subplots(1, 3)
    for axis, panel in enumerate(panels):
        def plane(array):  # rotated so the slice's second axis runs up the picture
            return np.rot90(np.take(array, centre[axis], axis=axis))

        first, second = [a for a in range(3) if a != axis]  # after rot90: columns run along first, rows along second
        heat = viz.heatmap(plane(relevance), cmap=cmap, scale=scale)
        panel.imshow(viz.overlay(plane(grey), heat, alpha), interpolation="nearest",
                     aspect=spacing[second] / spacing[first])
        panel.set_title(f"axis {axis} = {centre[axis]}", fontsize=9)
        panel.axis("off")
    bar = figure.colorbar(ScalarMappable(norm=Normalize(-scale, scale), cmap=viz.colormap(cmap)), ax=list(panels),
                          shrink=0.8)
    bar.set_label(f"{viz.colour_meaning(cmap, target)}\n({scale_note(percentile)})", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    voxel = tuple(int(c) for c in centre)
    size = " x ".join(f"{s:g}" for s in spacing)
    figure.suptitle(f"{title + chr(10) if title else ''}slices through the peak |relevance| at voxel {voxel}; "
                    f"voxel size {size} (header units)", fontsize=10)
    return figure, voxel


def _same_output(a: Path, b: Path) -> bool:
    import os

    return os.path.realpath(a) == os.path.realpath(b)


def explain_volume(in_path, out_path, model_spec: str, weights=None, num_classes=None, composite=None,
                   target="pred", intensity="zscore", png=None, cmap="bwr", alpha=0.6,
                   percentile=viz.DEFAULT_PERCENTILE, device="auto", method="lrp", layer=None, passthrough=(),
                   method_options=None, nonfinite="warn", labels=None) -> dict:
    """Write the relevance of ``in_path`` as NIfTI to ``out_path`` and a slices PNG; return a summary.
    ``method``, ``layer``, ``passthrough``, ``method_options``, ``nonfinite``, ``percentile``, ``labels``:
    as ``explain_images``.
    A volume holding NaN or Inf is named in a warning (its relevance is NaN) or, under
    ``nonfinite="raise"``, stops the run before anything is written."""
    nib = require("nibabel", "volume")
    in_path, out_path = Path(in_path), Path(out_path)
    # Everything that can be checked without the model comes first.
    check_method(method, composite, layer, passthrough, method_options, nonfinite)
    check_cmap(cmap)
    if not out_path.name.endswith((".nii", ".nii.gz")):
        raise ValueError(f"--out {out_path} must end in .nii or .nii.gz")
    if not out_path.parent.exists():
        raise FileNotFoundError(f"folder {out_path.parent} for --out does not exist")
    if png is not None and not Path(png).parent.exists():
        raise FileNotFoundError(f"folder {Path(png).parent} for --png does not exist")
    png_path = Path(png) if png else out_path.with_name(out_path.name.split(".nii")[0] + "_slices.png")
    refuse_input_as_output(out_path, [in_path], "--out")
    refuse_input_as_output(png_path, [in_path], "--png")
    if _same_output(out_path, png_path):
        raise ValueError(f"--png {png_path} is the --out file; choose another --png")
    class_names = models.class_names(model_spec, labels)
    image, data = read_volume(nib, in_path)
    model = models.load_model(model_spec, weights, num_classes)
    spec = models.input_spec(model)
    models.check_spatial_dims(spec, (3,), "volume", "give a 3D network (first layer Conv3d)")
    channels = 1 if data.ndim == 3 else data.shape[3]
    models.check_channels(spec, channels, f"volume {in_path.name}",
                          "use a model whose first Conv3d takes that many channels")
    voxels = data if data.ndim == 4 else data[..., None]
    scaled = scale_intensity(voxels, intensity)
    dev = models.resolve_device(device)
    model = model.to(dev)
    explainer = make_explainer(model, composite, Preprocessing(), channels, method, layer, passthrough,
                               method_options, nonfinite,
                               "use --device cpu where the GPU is too small, or --method-option save_memory=True "
                               "for LRP, or a smaller (resampled or cropped) volume")
    x = torch.from_numpy(np.ascontiguousarray(scaled.transpose(3, 0, 1, 2)))[None].to(dev)
    if not np.isfinite(voxels).all():  # scaling keeps them; name the voxels, not only the volume
        bad = np.argwhere(~np.isfinite(voxels).all(3))
        where = f"{len(bad)} voxel(s), the first at {tuple(int(i) for i in bad[0])}"
        names = [f"volume {in_path} ({where})"]
    else:
        names = [f"volume {in_path}"]
    result = explainer.explain(x, None if target == "pred" else target, names=names)
    relevance = result.relevance[0].sum(0).detach().cpu().numpy().astype(np.float32)

    header = image.header.copy()
    header.set_data_dtype(np.float32)
    out_image = nib.Nifti1Image(relevance, image.affine, header)
    out_image.header.set_slope_inter(1.0, 0.0)  # the input's intensity scaling must not rescale relevance
    with atomic_output(out_path) as tmp:
        nib.save(out_image, str(tmp))

    logits = result.output[0]
    if logits.ndim != 1:
        raise ValueError(f"model output has shape {tuple(result.output.shape)}; volume needs [1, classes] logits")
    class_names = models.fit_class_names(class_names, logits.shape[0], explicit=labels is not None)
    explained = int(logits.argmax()) if target == "pred" else int(target)
    probability = float(logits.float().softmax(0)[explained])
    target_name = models.class_label(class_names, explained)
    title = (f"{in_path.name}, {describe(method, composite)}: {target_name} p={probability:.1%}, "
             f"logit {float(logits[explained]):.3g}")
    centre = slices_png(png_path, scaled[..., 0] if channels == 1 else scaled.mean(3), relevance, cmap, alpha,
                        percentile, tuple(image.header.get_zooms()[:3]), title, target_name)
    return {"out": str(out_path), "png": str(png_path), "shape": list(relevance.shape), "prediction":
            int(logits.argmax()), "prediction_name": models.class_label(class_names, int(logits.argmax())),
            "target": explained, "target_name": target_name, "target_probability": probability,
            "target_logit": float(logits[explained]), "relevance_sum": float(relevance.sum()),
            "peak_voxel": list(centre)}
