"""What the command-line pipelines share: input scaling, the explainer, targets, image files,
progress bars."""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Kinetics-400 statistics, with which torchvision's video classifiers (r3d_18, ...) were trained.
KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)
NORMALIZE = ("auto", "imagenet", "kinetics", "none")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass(frozen=True)
class Preprocessing:
    """Pixels in [0, 1] -> model input: optional square resize, then (x - mean) / std."""

    size: int | None = None
    mean: tuple | None = None
    std: tuple | None = None

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels``: a batch [N, C, H, W] (or of clips [N, C, T, H, W]: frames resized alike) in
        [0, 1]. The batch axis is required: the channel axis must be the second one."""
        x = pixels
        if x.ndim < 4:
            raise ValueError(f"Preprocessing takes a batch [N, C, H, W] or [N, C, T, H, W], got shape "
                             f"{tuple(x.shape)}")
        if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            lead = x.shape[:-2]
            x = F.interpolate(x.reshape(-1, 1, *x.shape[-2:]), size=(self.size, self.size), mode="bilinear",
                              align_corners=False, antialias=True).reshape(*lead, self.size, self.size)
        if self.mean is not None:
            shape = (1, -1) + (1,) * (x.ndim - 2)
            mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).reshape(shape)
            std = torch.tensor(self.std, dtype=x.dtype, device=x.device).reshape(shape)
            x = (x - mean) / std
        return x

    def box_bounds(self, channels: int) -> dict:
        """ZBox's low/high: the images of pixels 0 and 1 under this scaling, per channel."""
        if self.mean is None:
            return {"low": 0.0, "high": 1.0}
        mean, std = torch.tensor(self.mean), torch.tensor(self.std)
        return {"low": (-mean / std)[:channels], "high": ((1 - mean) / std)[:channels]}


def _is_torchvision_video_model(model_spec: str) -> bool:
    if ":" in model_spec:
        return False
    try:
        import torchvision
    except ImportError:
        return False
    return model_spec in torchvision.models.list_models(module=torchvision.models.video)


def preprocessing(size: int | None, normalize: str, model_spec: str, channels: int) -> Preprocessing:
    """``normalize``: ``imagenet``, ``kinetics``, ``none`` or ``auto`` (the statistics torchvision's
    3-channel models were trained with: Kinetics-400 for its video models, ImageNet for the others;
    none for user factories)."""
    if normalize not in NORMALIZE:
        raise ValueError(f"--normalize must be one of {', '.join(NORMALIZE)}, got {normalize!r}")
    if normalize == "auto":
        if ":" in model_spec or channels != 3:
            normalize = "none"
        else:
            normalize = "kinetics" if _is_torchvision_video_model(model_spec) else "imagenet"
    if normalize in ("imagenet", "kinetics"):
        if channels != 3:
            raise ValueError(f"--normalize {normalize} needs 3 channels, the model takes {channels}; "
                             "use --normalize none")
        if normalize == "kinetics":
            return Preprocessing(size, KINETICS_MEAN, KINETICS_STD)
        return Preprocessing(size, IMAGENET_MEAN, IMAGENET_STD)
    return Preprocessing(size)


# --- the explainer: LRP or any other method of fastlrp.methods ---------------------------

CAM_METHODS = ("cam", "gradcam", "gradcam++")
# Methods the LRP engine runs: they trace the model and take passthrough=.
ENGINE_METHODS = ("lrp", "deep_taylor", "guided_backprop", "deconvnet")


@dataclass
class Explained:
    """What the pipelines read from an explanation: ``relevance`` [N, C, *spatial] (C = 1 for the
    CAM methods, whose maps have no channels) and the model's ``output``."""

    relevance: torch.Tensor
    output: torch.Tensor


NONFINITE = ("warn", "raise")


def is_out_of_memory(err: BaseException) -> bool:
    """True for the allocator's out-of-memory failures: CUDA's OutOfMemoryError, and the CPU's
    RuntimeError (\"DefaultCPUAllocator: not enough memory\", \"out of memory\")."""
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(err, oom_type):
        return True
    if not isinstance(err, RuntimeError):
        return False
    text = str(err)
    return "out of memory" in text or "not enough memory" in text or "DefaultCPUAllocator" in text


class Explainer:
    """One interface over ``fastlrp.LRP`` and ``fastlrp.methods``: ``explain(x, target)``.

    Two safety nets around the method:

    - samples holding NaN or Inf are named (by ``names`` where the pipeline gives them) in a
      warning, or stop the run with a ValueError under ``nonfinite="raise"``;
    - a batch that does not fit in memory is split in halves until the parts fit; the size that
      worked is kept for the following batches (``batch_limit``) and reported once as a warning.
      Samples are explained independently, so the parts give the unsplit batch's result. When a
      single sample does not fit, a ValueError names ``memory_hint`` (the option that lowers memory).
    """

    def __init__(self, method: str, impl, nonfinite: str = "warn", memory_hint: str = ""):
        if nonfinite not in NONFINITE:
            raise ValueError(f"--nonfinite must be one of {', '.join(NONFINITE)}, got {nonfinite!r}")
        self.method = method
        self.impl = impl
        self.nonfinite = nonfinite
        self.memory_hint = memory_hint
        self.batch_limit: int | None = None  # largest batch known to fit, once one did not

    def _check_finite(self, x: torch.Tensor, names) -> None:
        if x.numel() == 0 or x.device.type == "meta":
            return
        bad = (~torch.isfinite(x.reshape(x.shape[0], -1)).all(1)).nonzero().flatten().tolist()
        if not bad:
            return
        labels = [str(names[k]) if names is not None and k < len(names) else f"sample {k}" for k in bad]
        shown = ", ".join(labels[:5]) + (f" and {len(labels) - 5} more" if len(labels) > 5 else "")
        if self.nonfinite == "raise":
            raise ValueError(f"{shown}: input holds NaN or Inf, so its relevance cannot be finite; clean the "
                             "input, or pass --nonfinite warn to write the non-finite relevance anyway")
        warnings.warn(f"{shown}: input holds NaN or Inf, so its relevance is not finite (NaN); clean the input, "
                      "or pass --nonfinite raise to stop on such input", stacklevel=3)

    def _run(self, x: torch.Tensor, target):
        with warnings.catch_warnings():
            # the engine's own non-finite warning repeats ours in the library's terms
            warnings.filterwarnings("ignore", message=".*contain NaN or Inf")
            result = self.impl.explain(x, target)
        relevance = result.relevance
        if relevance.ndim == x.ndim - 1:  # a CAM map [N, *spatial]: give it a channel axis
            relevance = relevance.unsqueeze(1)
        return relevance.detach(), result.output.detach()

    def _free(self, x: torch.Tensor) -> None:
        if x.device.type == "cuda":
            torch.cuda.empty_cache()

    def _split_run(self, x: torch.Tensor, target, size: int):
        """(relevance, output) of ``x`` explained ``size`` samples at a time, halving on OOM."""
        n = x.shape[0]
        while True:
            try:
                parts = []
                for start in range(0, n, size):
                    part_target = target
                    if isinstance(target, torch.Tensor) and target.ndim > 0 and target.shape[0] == n:
                        part_target = target[start:start + size]
                    parts.append(self._run(x[start:start + size], part_target))
                break
            except Exception as err:
                if not is_out_of_memory(err):
                    raise
                parts = None
                self._free(x)
                if size == 1:
                    detail = " ".join(str(err).split())[:160]
                    raise ValueError(f"a single {self.method} input of shape {tuple(x.shape[1:])} does not fit in "
                                     f"memory on {x.device} ({detail}); {self.memory_hint or 'use smaller inputs'}"
                                     ) from None
                size = (size + 1) // 2  # halves, rounded up: 7 -> 4 -> 2 -> 1
        if size < n and size != self.batch_limit:
            warnings.warn(f"a batch of {n} did not fit in memory on {x.device}; explained {size} at a time "
                          "(the result is the same; a smaller --batch-size skips the retries)", stacklevel=4)
        if size < n:
            self.batch_limit = size
        if len(parts) == 1:
            return parts[0]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def explain(self, x: torch.Tensor, target=None, names=None) -> Explained:
        """``names``: a label per sample (a file, a frame range) for the non-finite message."""
        self._check_finite(x, names)
        n = x.shape[0] if x.ndim else 1
        size = min(n, self.batch_limit) if self.batch_limit else n
        relevance, output = self._split_run(x, target, max(size, 1))
        return Explained(relevance, output)

    def __call__(self, x: torch.Tensor, target=None, names=None) -> torch.Tensor:
        return self.explain(x, target, names).relevance


def method_names() -> list:
    from ...methods import names

    return names()


def check_method(method: str = "lrp", composite: str | None = None, layer: str | None = None,
                 passthrough: Sequence = (), method_options: dict | None = None, nonfinite: str = "warn") -> None:
    """One-line errors for a method name and the options given with it, before any model is built."""
    from ... import composites

    if nonfinite not in NONFINITE:
        raise ValueError(f"--nonfinite must be one of {', '.join(NONFINITE)}, got {nonfinite!r}")
    if method not in method_names():
        raise ValueError(f"unknown --method {method!r}; choose one of {', '.join(method_names())}")
    if composite is not None:
        if method != "lrp":
            raise ValueError(f"--composite applies to --method lrp only, not {method}; drop --composite")
        if composite not in composites.names():
            raise ValueError(f"unknown composite {composite!r} (--composite); choose one of {', '.join(composites.names())}")
    if layer is not None and method not in CAM_METHODS:
        raise ValueError(f"--layer applies to --method {', '.join(CAM_METHODS)}, not {method}; drop --layer")
    if passthrough and method not in ENGINE_METHODS:
        raise ValueError(f"--passthrough applies to the methods the LRP engine runs ({', '.join(ENGINE_METHODS)}), "
                         f"not {method}, which needs no rule per layer; drop --passthrough")


def resolve_passthrough(model, items: Sequence) -> tuple:
    """Command-line pass-through entries as ``fastlrp.LRP(passthrough=...)`` takes them.

    An entry is a module name of the model (``layer1.0.gn``), the class name of layers in it
    (``GroupNorm``), a ``torch.nn`` class name, ``module:Class`` for a class of your own, or an
    op name (``softmax``) as the engine's error names it; several may be joined by commas."""
    import importlib

    from torch import nn

    names = {name for name, _ in model.named_modules() if name}
    types_in_model: dict = {}
    for module in model.modules():
        types_in_model.setdefault(type(module).__name__, set()).add(type(module))
    resolved = []
    for item in (part.strip() for entry in items or () for part in str(entry).split(",")):
        if not item:
            continue
        if item in names:
            resolved.append(item)
        elif item in types_in_model:
            resolved.extend(sorted(types_in_model[item], key=lambda t: t.__module__))
        elif ":" in item:
            module_name, _, class_name = item.partition(":")
            try:
                cls = getattr(importlib.import_module(module_name), class_name)
            except (ImportError, AttributeError) as err:
                raise ValueError(f"--passthrough {item}: cannot find class {class_name!r} in module "
                                 f"{module_name!r} ({err}); give module:Class, a layer type or a module name") from None
            if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
                raise ValueError(f"--passthrough {item} is not an nn.Module class; give a layer type or a module name")
            resolved.append(cls)
        elif isinstance(getattr(nn, item, None), type) and issubclass(getattr(nn, item), nn.Module):
            resolved.append(getattr(nn, item))
        else:
            resolved.append(item)  # an op name such as softmax: the engine matches it while tracing
    return tuple(resolved)


def make_explainer(model, composite: str | None, prep: Preprocessing, channels: int, method: str = "lrp",
                   layer: str | None = None, passthrough: Sequence = (), method_options: dict | None = None,
                   nonfinite: str = "warn", memory_hint: str = "") -> Explainer:
    """The pipelines' explainer: ``fastlrp.LRP`` with ``composite`` (default epsilon_plus) for
    ``method="lrp"``, else the method of ``fastlrp.methods`` with ``method_options``; CAM maps are
    upsampled to the input, box bounds come from the scaling."""
    import fastlrp
    from ... import methods
    from ...engine import UnsupportedLayerError

    check_method(method, composite, layer, passthrough, method_options, nonfinite)
    options = dict(method_options or {})
    resolved = resolve_passthrough(model, passthrough)
    if resolved:
        options["passthrough"] = resolved
    if method == "lrp":
        composite = composite or "epsilon_plus"
        if "box" in composite:  # box rules need the input domain, which the scaling decides
            options = {**prep.box_bounds(channels), **options}
        options.setdefault("nonfinite", nonfinite)
        build = lambda: fastlrp.LRP(model, composite=composite, **options)  # noqa: E731
    else:
        if method == "deep_taylor" and options.get("input_rule", "zb") == "zb":
            options = {**prep.box_bounds(channels), **options}
        if method in CAM_METHODS:
            options["upsample"] = True  # a map over the input's pixels, which is what every pipeline draws
            if layer is not None:
                options["layer"] = layer
        build = lambda: methods.get(method, model, **options)  # noqa: E731
    try:
        return Explainer(method, build(), nonfinite, memory_hint)
    except UnsupportedLayerError:
        raise
    except TypeError as err:
        # An option the method (or LRP preset) does not take; tracing failures stay as they are.
        if not method_options or "could not trace" in str(err):
            raise
        raise ValueError(f"--method-option: {' '.join(str(err).split())}") from None


def parse_method_options(items: Sequence) -> dict:
    """``KEY=VALUE`` strings as keyword arguments; a value is a Python literal (a number, True,
    None, a quoted string) or else the plain string."""
    import ast

    options = {}
    for item in items or ():
        key, sep, text = str(item).partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise ValueError(f"--method-option {item!r} must look like KEY=VALUE, e.g. steps=32")
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            value = text.strip()
        options[key] = value
    return options


def parse_target(text: str, allow_label: bool = False):
    """``pred`` (the predicted class), ``label`` (dataset labels, where allowed) or a class index."""
    if text == "pred" or (allow_label and text == "label"):
        return text
    try:
        index = int(text)
    except ValueError:
        choices = "pred, label or a class index" if allow_label else "pred or a class index"
        raise ValueError(f"--target must be {choices}, got {text!r}") from None
    if index < 0:
        raise ValueError(f"--target must be a class index >= 0, got {index}")
    return index


def target_indices(target, logits: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """One class index per sample for the explainer."""
    n, classes = logits.shape[0], logits.shape[1]
    if target == "pred":
        return logits.argmax(1)
    if target == "label":
        if labels is None or (labels < 0).any():
            raise ValueError("--target label needs an ImageFolder (one subfolder per class); use --target pred")
        return labels.to(logits.device)
    if target >= classes:
        raise ValueError(f"--target {target} is out of range: the model has {classes} classes")
    return torch.full((n,), target, dtype=torch.long, device=logits.device)


def convert_fix(model_channels: int) -> str:
    """The advice for an image whose channel count does not fit the model."""
    mode = {1: "L", 3: "RGB"}.get(model_channels)
    if mode is None:
        return f"use a model whose first layer takes 1 (grey) or 3 (RGB) channels, not {model_channels}"
    return f"pass --convert {mode} to convert the images, or use a model built for them"


def image_channels(path: Path, convert: str | None) -> int:
    """Channels an image file gives: 1 for grey, 3 for colour (alpha is dropped). Opens the file
    (its header only) even with ``convert``, so a missing or damaged file is named early."""
    with _open(path) as image:
        found = 1 if image.mode in ("1", "L", "I", "I;16", "F") else 3
    if convert is not None:
        return 1 if convert == "L" else 3
    return found


def check_input_file(path: Path, what: str) -> Path:
    """``path`` if it is an existing file; else FileNotFoundError / IsADirectoryError naming ``what``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not {what}")
    return path


# --- files: never overwrite an input, never leave half an output ----------------------------

def _same_file(a: Path, b: Path) -> bool:
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)  # also through symlinks, hard links and relative paths
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def refuse_input_as_output(out: Path, inputs: Sequence, flag: str = "--out") -> None:
    """ValueError when ``out`` is one of ``inputs`` (the same file by any path): writing it would
    destroy the input while it is being read."""
    for source in inputs:
        if _same_file(out, source):
            raise ValueError(f"{flag} {out} is the input file {source}; writing it would destroy the input: "
                             f"choose another {flag}")


def temporary_name(path: Path) -> Path:
    """A name next to ``path`` (same folder, so the final rename is atomic; same suffix, so
    writers that pick the format from it still do)."""
    path = Path(path)
    return path.with_name(f".{path.name}.fastlrp-{os.getpid()}-partial{''.join(path.suffixes[-2:])}"
                          if path.suffixes else f".{path.name}.fastlrp-{os.getpid()}-partial")


@contextlib.contextmanager
def atomic_output(path: Path):
    """Yields a temporary path in ``path``'s folder to write to; on success it replaces ``path``
    in one rename, on failure it is removed and an earlier ``path`` is left as it was."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _damaged(path: Path, err: Exception) -> ValueError:
    detail = " ".join(str(err).split()) or type(err).__name__
    return ValueError(f"cannot read image {path} ({detail}): the file is cut short or damaged; replace it or "
                      "leave it out")


def _too_large(path: Path, err: Exception) -> ValueError:
    return ValueError(f"image {path} is too large to open safely ({' '.join(str(err).split())}); if the file is "
                      "trusted, allow it with --max-pixels N (N at least its width x height, 0 for no limit)")


@contextlib.contextmanager
def pixel_limit(max_pixels: int | None):
    """Pillow's decompression-bomb limit set to ``max_pixels`` (0: none) for the block; None keeps
    Pillow's default. The limit Pillow errors at is twice its MAX_IMAGE_PIXELS: set it to half."""
    from PIL import Image

    if max_pixels is None:
        yield
        return
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None if max_pixels == 0 else max(1, max_pixels // 2)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the user allowed this size
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _open(path: Path):
    from PIL import Image, UnidentifiedImageError

    path = check_input_file(path, "an image file")
    try:
        return Image.open(path)
    except Image.DecompressionBombError as err:
        raise _too_large(path, err) from None
    except UnidentifiedImageError:
        raise ValueError(f"cannot read {path}: not an image file Pillow understands (PNG, JPEG, ...)") from None
    except (OSError, SyntaxError, EOFError) as err:  # Pillow's "Truncated File Read" and kin name no file
        if isinstance(err, (FileNotFoundError, IsADirectoryError, PermissionError)):
            raise
        raise _damaged(path, err) from None


def load_image(path: Path, channels: int) -> torch.Tensor:
    """[C, H, W] float32 in [0, 1] with C = ``channels`` (1: grey, 3: RGB)."""
    from PIL import Image

    try:
        with _open(path) as image:
            pixels = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
    except ValueError:
        raise
    except Image.DecompressionBombError as err:
        raise _too_large(path, err) from None
    except (OSError, SyntaxError, EOFError) as err:
        if isinstance(err, (FileNotFoundError, IsADirectoryError, PermissionError)):
            raise
        raise _damaged(path, err) from None
    tensor = torch.from_numpy(pixels)
    return tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1).contiguous()


def check_cmap(cmap) -> None:
    """A one-line error naming --cmap for a colour map neither fastlrp nor matplotlib knows."""
    from ... import viz

    try:
        viz.colormap(cmap)
    except (ValueError, KeyError) as err:
        raise ValueError(f"--cmap: {' '.join(str(err).split())}") from None


def progress(iterable=None, **options):
    """A tqdm progress bar on stderr, hidden when stderr is not a terminal."""
    from tqdm.auto import tqdm

    options.setdefault("disable", None)
    options.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **options)


def chunks(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]
