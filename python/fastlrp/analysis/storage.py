"""Heatmaps of a whole dataset in one HDF5 file, written and read in chunks (needs h5py,
from the ``analysis`` extra), so that SpRAy and other analyses run on more heatmaps than fit
in memory.

Layout of the file: a float dataset ``heatmaps`` [N, *shape] chunked along N, and optional
per-sample 1-D datasets (``targets``, ``labels``, ...) of the same length N.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from .._common.optional import require

HEATMAPS = "heatmaps"


def _to_numpy(array, name: str) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    if isinstance(array, np.ndarray):
        return array
    raise TypeError(f"{name} must be a torch.Tensor or a numpy array, got {type(array).__name__}")


class HeatmapStore:
    """An HDF5 file of heatmaps. ``HeatmapStore(path, "w")`` creates (or truncates) one,
    ``"a"`` appends to it, ``"r"`` (default) reads it; use it as a context manager or call
    ``close()``.

        with HeatmapStore("heat.h5", "w") as store:
            for x, y in loader:
                store.append(explainer(x, y).sum(1), targets=y)
        with HeatmapStore("heat.h5") as store:
            for start, chunk in store.chunks(1024): ...
    """

    def __init__(self, path: str | Path, mode: str = "r", *, chunk_rows: int = 256, dtype: str = "float32"):
        if mode not in ("r", "a", "w"):
            raise ValueError(f"mode must be 'r', 'a' or 'w', got {mode!r}")
        if not isinstance(chunk_rows, int) or chunk_rows < 1:
            raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
        h5py = require("h5py", "analysis", "storing heatmaps in HDF5")
        self.path = Path(path)
        if mode == "r" and not self.path.exists():
            raise FileNotFoundError(f"no heatmap store at {self.path}")
        self._file = h5py.File(self.path, mode)
        self.chunk_rows = chunk_rows
        self.dtype = np.dtype(dtype)
        if mode == "r" and HEATMAPS not in self._file:
            self._file.close()
            raise ValueError(f"{self.path} holds no '{HEATMAPS}' dataset; it was not written by HeatmapStore")

    # -- writing --------------------------------------------------------------------------
    def append(self, heatmaps, **columns) -> None:
        """Add a batch of heatmaps [B, *shape] and, optionally, per-sample columns of length B."""
        heat = _to_numpy(heatmaps, "heatmaps")
        if heat.ndim < 2:
            raise ValueError(f"heatmaps must be [B, ...] with at least one dimension per heatmap, "
                             f"got shape {heat.shape}")
        if HEATMAPS not in self._file:
            self._file.create_dataset(HEATMAPS, shape=(0,) + heat.shape[1:], maxshape=(None,) + heat.shape[1:],
                                      dtype=self.dtype, chunks=(min(self.chunk_rows, max(len(heat), 1)),)
                                      + heat.shape[1:])
        data = self._file[HEATMAPS]
        if data.shape[1:] != heat.shape[1:]:
            raise ValueError(f"heatmaps of shape {heat.shape[1:]} do not match the store's {data.shape[1:]}")
        old = data.shape[0]
        if set(columns) != set(self.columns) and old > 0:
            raise ValueError(f"columns {sorted(columns)} differ from those already stored {self.columns}")
        arrays = {}
        for name, values in columns.items():
            values = _to_numpy(values, name).reshape(-1)
            if len(values) != len(heat):
                raise ValueError(f"column {name!r} has {len(values)} entries for {len(heat)} heatmaps")
            arrays[name] = values
        data.resize(old + len(heat), axis=0)
        data[old:] = heat.astype(self.dtype, copy=False)
        for name, values in arrays.items():
            if name not in self._file:
                self._file.create_dataset(name, shape=(0,), maxshape=(None,), dtype=values.dtype,
                                          chunks=(max(self.chunk_rows, 1),))
            self._file[name].resize(old + len(values), axis=0)
            self._file[name][old:] = values

    # -- reading --------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._file[HEATMAPS].shape[0] if HEATMAPS in self._file else 0

    @property
    def shape(self) -> tuple:
        """The shape of one heatmap."""
        return tuple(self._file[HEATMAPS].shape[1:]) if HEATMAPS in self._file else ()

    @property
    def columns(self) -> list:
        return sorted(name for name in self._file if name != HEATMAPS)

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Heatmaps [start:stop] as a numpy array."""
        return self._file[HEATMAPS][start:stop]

    def column(self, name: str) -> np.ndarray:
        """A whole per-sample column (they are small: one number per heatmap)."""
        if name not in self.columns:
            raise KeyError(f"no column {name!r} in {self.path}; columns are {self.columns}")
        return self._file[name][:]

    def chunks(self, chunk_size: int = 1024) -> Iterator[tuple[int, np.ndarray]]:
        """(start, heatmaps[start:start + chunk_size]) over the whole store."""
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        for start in range(0, len(self), chunk_size):
            yield start, self.read(start, start + chunk_size)

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_heatmaps(path: str | Path, explainer: Callable, data, target=None, *, batch_size: int = 64,
                   sum_channels: bool = True) -> Path:
    """Explain a dataset batch by batch and store the heatmaps (and targets) in a new HDF5 file.

    data: a tensor [N, C, ...] (``target`` alongside: an int or one index per sample) or an
        iterable of (x, target) batches, e.g. a DataLoader.
    sum_channels: store [N, H, W] heatmaps (relevance summed over channels), as SpRAy uses them.
    Returns the path."""
    if not callable(explainer):
        raise TypeError(f"explainer must be a callable (x, target) -> relevance, got {type(explainer).__name__}")
    if isinstance(data, torch.Tensor):
        n = data.shape[0]
        if isinstance(target, torch.Tensor) and target.ndim > 0:
            if target.shape[0] != n:
                raise ValueError(f"target must have one entry per sample ({n}), got shape {tuple(target.shape)}")
            batches = zip(data.split(batch_size), target.split(batch_size))
        else:
            batches = ((xs, target) for xs in data.split(batch_size))
    else:
        if target is not None:
            raise ValueError("target goes inside the batches when data is an iterable of (x, target)")
        batches = data
    with HeatmapStore(path, "w") as store:
        for x, t in batches:
            relevance = explainer(x, t).detach()
            heat = relevance.sum(1) if sum_channels else relevance
            columns = {}
            if t is not None:
                t = torch.as_tensor(t).reshape(-1)
                columns["targets"] = t.expand(len(x)) if t.numel() == 1 else t
            store.append(heat.float(), **columns)
    return Path(path)
