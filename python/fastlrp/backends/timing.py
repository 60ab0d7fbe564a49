"""Which of two ways to run a layer is faster on this device: measured once per layer shape and
device, kept in memory and on disk (``choice_cache_path()``), never measured while traced or captured.

Used by the Triton backend to choose between its fused kernels and the native path per layer."""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Callable

import torch

_LOCK = threading.Lock()
_CHOICES: dict | None = None


def choice_cache_path() -> Path:
    """Where measured choices are kept: ``FASTLRP_TRITON_CACHE`` or ~/.cache/fastlrp/triton_choices.json."""
    env = os.environ.get("FASTLRP_TRITON_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fastlrp" / "triton_choices.json"


def reset_choices() -> None:
    """Forget the choices held in memory (they are read again from ``choice_cache_path()``)."""
    global _CHOICES
    with _LOCK:
        _CHOICES = None


def _load_choices() -> dict:
    global _CHOICES
    if _CHOICES is None:
        try:
            _CHOICES = json.loads(choice_cache_path().read_text())
        except (OSError, ValueError):
            _CHOICES = {}
    return _CHOICES


def _save_choices() -> None:
    path = choice_cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(_CHOICES, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home: the choice still holds for this process


def device_key(device: torch.device) -> str:
    import triton
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return f"{name}|torch {torch.__version__}|triton {triton.__version__}"


def times_ms(fn: Callable[[], object], device, warmup: int = 1, repeats: int = 5,
             cuda_events: bool = True) -> list:
    """Times of ``repeats`` calls of ``fn()`` in milliseconds on ``device``, after ``warmup`` untimed calls
    (which compile, autotune and fill caches). On CUDA: events recorded on that device's current
    stream (not the current device's), or, with ``cuda_events=False``, wall time after synchronizing
    the device; elsewhere wall time."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        if cuda and cuda_events:
            with torch.cuda.device(device):
                stream = torch.cuda.current_stream(device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(stream)
                fn()
                end.record(stream)
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize(device)
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int = 1, repeats: int = 5) -> float:
    """Median of ``times_ms``: the figure the speed choice compares."""
    return statistics.median(times_ms(fn, device, warmup, repeats))


def prefers_first(key: str, device: torch.device, run_first, run_second, mode_variable: str = "FASTLRP_TRITON_CHOICE",
                  names: tuple = ("triton", "native")) -> bool:
    """Whether ``run_first`` (Triton) beats ``run_second`` (native) for the layer shape ``key``.

    The environment variable ``FASTLRP_TRITON_CHOICE``: ``measure`` (default: time both once per shape
    and device), ``triton`` or ``native`` (always). Off CUDA, or with no second way, the first runs
    (the interpreter, in tests). While compiled or captured into a CUDA graph nothing is timed: a
    cached choice, else the second (which needs no autotuning inside the capture)."""
    mode = os.environ.get(mode_variable, "measure")
    if mode not in ("measure",) + names:
        raise ValueError(f"{mode_variable} must be 'measure', {names[0]!r} or {names[1]!r}, got {mode!r}")
    if mode != "measure":
        return mode == names[0]
    if device.type != "cuda" or run_second is None:
        return True
    if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
        return _load_choices().get(device_key(device), {}).get(key, names[1]) == names[0]
    with _LOCK:
        table = _load_choices().setdefault(device_key(device), {})
        if key not in table:
            first, second = median_ms(run_first, device), median_ms(run_second, device)
            table[key] = names[0] if first <= second else names[1]
            _save_choices()
        return table[key] == names[0]
