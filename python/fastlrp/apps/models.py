"""Load the model a command explains, and check the data fits its first layer.

Shared by ``fastlrp explain``, ``video``, ``volume`` and ``dataset``. A model is named by

- a torchvision model name (``resnet18``, ``vgg16``, ``r3d_18``, ...): built with random
  weights (nothing is ever downloaded), then ``--weights`` loaded into it; without
  ``--weights`` a RandomWeightsWarning says the explanations are of an untrained net;
- or ``module:function``, a factory the user writes: called with no arguments (or with
  ``num_classes=`` when given) and returning an ``nn.Module``; ``module`` is imported
  from the current folder or the Python path.

Weights are a state dict read with ``torch.load(weights_only=True)``, which never runs
code from the file; a checkpoint dict holding it under ``state_dict`` or ``model``, and
the ``module.`` prefix that DistributedDataParallel adds, are accepted as well.
"""

from __future__ import annotations

import importlib
import os
import pickle
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..extras import require


class RandomWeightsWarning(UserWarning):
    """The model has random weights: its explanations say nothing about a trained net."""


@dataclass(frozen=True)
class InputSpec:
    """What the model's first layer takes: ``spatial_dims`` 1, 2 or 3 for a convolution (0 for
    a linear layer), ``channels`` (in_channels / in_features), and the layer's name."""

    spatial_dims: int
    channels: int
    layer: str


def is_factory(spec: str) -> bool:
    return ":" in spec


def torchvision_classifiers() -> list:
    """Names of torchvision's image and video classifiers."""
    torchvision = require("torchvision", "vision")
    models = torchvision.models
    return sorted(set(models.list_models(module=models)) | set(models.list_models(module=models.video)))


def _build_torchvision(name: str, num_classes: int | None) -> nn.Module:
    torchvision = require("torchvision", "vision")
    known = torchvision_classifiers()
    if name not in known:
        close = [k for k in known if name.lower().replace("-", "_") in k][:5]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown model {name!r}{hint}; give a torchvision classifier name such as resnet18 "
                         "or r3d_18, or your own factory as module:function")
    options = {} if num_classes is None else {"num_classes": num_classes}
    return torchvision.models.get_model(name, weights=None, **options)


def _build_from_factory(spec: str, num_classes: int | None) -> nn.Module:
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise ValueError(f"model factory {spec!r} must look like module:function, e.g. mymodels:make_net")
    # A console script does not have the current folder on sys.path; users expect `mymodels`
    # next to them to be found, as `python -m` would.
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"cannot import {module_name!r} for model factory {spec!r} ({err}); run from the folder "
                         "that holds it or add that folder to PYTHONPATH") from None
    factory = getattr(module, function_name, None)
    if not callable(factory):
        raise ValueError(f"module {module_name!r} has no function {function_name!r} (model factory {spec!r})")
    model = factory() if num_classes is None else factory(num_classes=num_classes)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_SAVE_HINT = "--weights takes a state dict, saved with torch.save(model.state_dict(), FILE)"


def check_weights_file(path: str | Path) -> Path:
    """``path`` if it is an existing file, else a one-line error naming --weights."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"weights file {path} does not exist (check --weights)")
    if not path.is_file():
        raise IsADirectoryError(f"--weights {path} is a folder; give the file written by "
                                "torch.save(model.state_dict(), FILE)")
    return path


def _unreadable_weights(path: Path, err: Exception) -> ValueError:
    """One line for what torch.load(weights_only=True) refused, without its advice to load with
    weights_only=False (which would run code from the file) and without terminal colour codes."""
    text = " ".join(_ANSI.sub("", str(err)).split())
    pickled = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if pickled:
        return ValueError(f"cannot read weights {path}: it holds a pickled {pickled.group(1)} (e.g. a whole model "
                          f"saved with torch.save(model)), not a state dict; in Python, load it and save "
                          f"model.state_dict() instead. {_SAVE_HINT}")
    return ValueError(f"cannot read weights {path}: it is not a state dict (not a file torch.save wrote, or "
                      f"cut short). {_SAVE_HINT}")


def read_state_dict(path: str | Path) -> dict:
    """A state dict from ``path`` via ``torch.load(weights_only=True)``; one-line errors."""
    path = check_weights_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, UnicodeDecodeError, AttributeError,
            ImportError, TypeError, IndexError, KeyError) as err:
        raise _unreadable_weights(path, err) from None
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"--weights {path} holds no state dict of tensors ({type(state).__name__}); {_SAVE_HINT}")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_model(spec: str, weights: str | Path | None = None, num_classes: int | None = None) -> nn.Module:
    """The model named by ``spec`` with ``weights`` loaded, on the CPU, in eval mode. The weights
    file is read first, so a wrong file is reported before a large model is built."""
    state = None if weights is None else read_state_dict(weights)
    model = _build_from_factory(spec, num_classes) if is_factory(spec) else _build_torchvision(spec, num_classes)
    if state is not None:
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            detail = " ".join(str(err).split())
            raise ValueError(f"weights in {weights} do not fit model {spec}: {detail[:400]}; check --model "
                             "and --num-classes") from None
    elif not is_factory(spec):
        warnings.warn(f"{spec} has random weights (no --weights given): its heatmaps explain an untrained "
                      "network", RandomWeightsWarning, stacklevel=2)
    return model.eval()


_CONV_DIMS = ((nn.Conv1d, 1), (nn.Conv2d, 2), (nn.Conv3d, 3))


def input_spec(model: nn.Module) -> InputSpec | None:
    """What the first weighted layer (in registration order) takes, or None if there is none."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            return InputSpec(0, module.in_features, name)
        for conv_type, dims in _CONV_DIMS:
            if isinstance(module, conv_type):
                return InputSpec(dims, module.in_channels, name)
    return None


def check_channels(spec: InputSpec | None, channels: int, source: str, fix: str) -> None:
    """Raise a one-line ValueError when ``source`` has another channel count than the model takes."""
    if spec is None or spec.spatial_dims == 0 or spec.channels == channels:
        return
    raise ValueError(f"{source} has {channels} channel{'s' * (channels != 1)} but the model's first layer "
                     f"{spec.layer or '(root)'} expects {spec.channels}; {fix}")


def check_spatial_dims(spec: InputSpec | None, wanted: tuple, what: str, fix: str) -> None:
    """Raise when the model's first convolution is not of a kind ``what`` can feed."""
    if spec is not None and spec.spatial_dims not in wanted:
        kind = "a linear layer" if spec.spatial_dims == 0 else f"a Conv{spec.spatial_dims}d"
        raise ValueError(f"the model's first layer {spec.layer} is {kind}; {what} needs "
                         f"{' or '.join(f'Conv{d}d' for d in wanted)} input; {fix}")


def resolve_device(name: str) -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name} asked for but CUDA is not available here; use --device cpu")
    return device


# --- class names -------------------------------------------------------------------------

@dataclass(frozen=True)
class ClassNames:
    """Names of a model's output classes and where they came from (for predictions.json)."""

    names: tuple
    source: str

    def __call__(self, index: int) -> str:
        return self.names[index]


def read_labels(path: str | Path) -> tuple:
    """Class names from ``--labels FILE``: a JSON list, a JSON object {index: name} (indices 0..K-1),
    or plain text with one name per line (blank lines at the end ignored). One-line errors."""
    import json

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--labels {path} does not exist or is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"--labels {path} is not UTF-8 text; give one class name per line, or JSON") from None
    stripped = text.strip()
    if stripped.startswith(("[", "{")):
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as err:
            raise ValueError(f"--labels {path} looks like JSON but does not parse ({err})") from None
        if isinstance(data, dict):
            try:
                by_index = {int(k): str(v) for k, v in data.items()}
            except ValueError:
                raise ValueError(f"--labels {path}: JSON object keys must be class indices 0..K-1") from None
            if sorted(by_index) != list(range(len(by_index))):
                raise ValueError(f"--labels {path}: JSON object keys must be the class indices 0..{len(by_index) - 1}, "
                                 "each once")
            names = tuple(by_index[k] for k in range(len(by_index)))
        elif isinstance(data, list):
            names = tuple(str(v) for v in data)
        else:
            raise ValueError(f"--labels {path}: JSON must be a list of names or an object {{index: name}}")
    else:
        names = tuple(line.strip() for line in stripped.splitlines())
    if not names:
        raise ValueError(f"--labels {path} holds no class names")
    return names


def torchvision_class_names(spec: str) -> ClassNames | None:
    """The categories torchvision ships in the metadata of a model's weights (ImageNet-1k for image
    classifiers, Kinetics-400 for video ones); nothing is downloaded. None for factories and models
    without such metadata."""
    if is_factory(spec):
        return None
    try:
        import torchvision

        weights = list(torchvision.models.get_model_weights(spec))
    except (ImportError, ValueError, KeyError):
        return None
    for entry in weights:
        categories = entry.meta.get("categories")
        if categories:
            return ClassNames(tuple(categories), f"torchvision {type(entry).__name__}.{entry.name} categories")
    return None


def class_names(spec: str, labels: str | Path | None = None) -> ClassNames | None:
    """Names for the model's classes: ``--labels FILE`` when given, else torchvision's categories
    for a torchvision model name, else None (the pipelines then show class indices). Whether the
    count fits the model's output is checked by ``fit_class_names`` once the output is known."""
    if labels is not None:
        return ClassNames(read_labels(labels), f"--labels {labels}")
    return torchvision_class_names(spec)


def fit_class_names(names: ClassNames | None, classes: int, explicit: bool) -> ClassNames | None:
    """``names`` when it has one name per output class. Otherwise an error for ``--labels`` (the
    user's file does not fit) and None for torchvision's categories (e.g. under --num-classes)."""
    if names is None or len(names.names) == classes:
        return names
    if explicit:
        raise ValueError(f"{names.source} holds {len(names.names)} class names but the model gives {classes} "
                         "outputs; give one name per class, in class-index order")
    return None


def class_label(names: ClassNames | None, index: int) -> str:
    """``name`` for a class, or ``class 7`` without names."""
    return names(index) if names is not None else f"class {index}"
