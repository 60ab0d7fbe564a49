"""Per-call state and the checks that keep an explainer safe to share between threads.

* ``Call``: what one ``explain()`` needs besides the inputs (backend list, memory mode, the layers
  whose relevance to keep) and what it collects (those tensors, the backend each layer ran on).
  It is made per call and reached through a context variable, so nothing of a call is ever written
  on the layers, which every thread shares.
* ``TraceLock``: torch.fx patches ``nn.Module.__call__`` process-wide while it traces; explanations
  (readers) and builds (writers) therefore exclude each other, and explanations run concurrently.
* ``ParameterWatch``: cached folded and block weights are rebuilt when a source tensor changed,
  including by ``.data`` edits, which do not bump autograd's version counter (docs/design.md).
"""

from __future__ import annotations

import contextvars
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass
class Call:
    backends: tuple
    save_memory: bool = False
    taps: frozenset = frozenset()
    captured: dict = field(default_factory=dict)
    """Relevance at the output of each tapped layer."""
    activations: dict = field(default_factory=dict)
    """The output of each tapped layer."""
    used: dict = field(default_factory=dict)
    """The backend that ran each layer (by layer name)."""
    conditions: dict = field(default_factory=dict)
    """Concept conditioning: the relevance arriving at a named layer's output is multiplied by its mask."""
    outputs: dict = field(default_factory=dict)
    """The output of each conditioned layer, still in the autograd graph (a backward pass may start there)."""


_CURRENT: contextvars.ContextVar = contextvars.ContextVar("fastlrp_call", default=None)


def current_call() -> Call:
    call = _CURRENT.get()
    if call is None:
        raise RuntimeError("a fastlrp relevance layer ran outside an explanation; call the explainer "
                           "(LRP(model)(x, target)) instead of its graph module")
    return call


@contextmanager
def active(call: Call):
    token = _CURRENT.set(call)
    try:
        yield call
    finally:
        _CURRENT.reset(token)


class TraceLock:
    """Many readers (explanations) or one writer (a torch.fx trace)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False

    @contextmanager
    def reading(self):
        with self._cond:
            while self._writing:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def writing(self):
        with self._cond:
            while self._writing or self._readers:
                self._cond.wait()
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


TRACE_LOCK = TraceLock()

_PROBE_LENGTH = 1021  # prime: a stride of the weight layout rarely lines up with it
# Tensors up to this many elements are weighted by one dot product with the pattern repeated (two
# torch calls per tensor; per-tensor overhead dominated the watch on small nets: 8.6 ms a call on
# MobileNetV3-L's 266 tensors with the matrix form below). 4 MiB per device and dtype.
_TILED_LENGTH = _PROBE_LENGTH * 1024
_PROBES: dict = {}


def _probe(device, dtype, length: int = _PROBE_LENGTH) -> torch.Tensor:
    """The fixed pattern (period 1021, values in [0.5, 1.5)), ``length`` elements long."""
    key = (device, dtype, length)
    if key not in _PROBES:
        generator = torch.Generator().manual_seed(1021)
        pattern = torch.rand(_PROBE_LENGTH, generator=generator, dtype=torch.float64) + 0.5
        _PROBES[key] = pattern.repeat(length // _PROBE_LENGTH).to(device, dtype)
    return _PROBES[key]


def fingerprint(t: torch.Tensor) -> torch.Tensor:
    """A number that changes when any element of ``t`` changes value: the sum of its elements
    weighted by a fixed pattern that depends on the position (so swaps and permutations show too).
    One read of the tensor, as a dot or matrix-vector product on its device."""
    flat = t.detach().reshape(-1)
    if flat.element_size() < 4:  # half precision would round small edits away and overflow
        flat = flat.float()
    n = flat.numel()
    if n <= _TILED_LENGTH:
        return torch.dot(flat, _probe(flat.device, flat.dtype, _TILED_LENGTH)[:n]).to(torch.float64)
    probe = _probe(flat.device, flat.dtype)
    whole = n - n % _PROBE_LENGTH
    weighted = flat[whole:] @ probe[:n - whole]
    if whole:
        weighted = weighted + (probe @ flat[:whole].view(-1, _PROBE_LENGTH).T).sum()
    return weighted.to(torch.float64)


class ParameterWatch:
    """Tells, once per call, which layers' source tensors changed since the last call.

    ``sources[i]()`` gives the tensors layer i's cached weights derive from (asked anew each call, so a
    replaced parameter shows). A change is a new tensor
    object, storage, version, dtype or device, or a change of its fingerprint (which catches
    ``.data`` edits). The fingerprints of all tensors on one device are read back together: one
    synchronization per device and call."""

    def __init__(self, sources: list):
        self.sources = sources
        self._last: list | None = None
        self._lock = threading.Lock()

    def changed(self) -> list:
        """Indices of the layers whose sources changed (all of them on the first call)."""
        current = self._snapshot()
        with self._lock:
            last, self._last = self._last, current
        if last is None:
            return list(range(len(self.sources)))
        return [i for i, (a, b) in enumerate(zip(last, current)) if a != b]

    def _snapshot(self) -> list:
        groups = [[t for t in source() if t is not None] for source in self.sources]
        by_device: dict = {}
        for i, group in enumerate(groups):
            for j, t in enumerate(group):
                by_device.setdefault(t.device, []).append((i, j, t))
        values = [[None] * len(group) for group in groups]
        with torch.no_grad():
            for device, entries in by_device.items():
                if device.type == "meta":  # no values to read: identity and version only
                    prints = [None] * len(entries)
                else:
                    prints = torch.stack([fingerprint(t) for _, _, t in entries]).tolist()
                for (i, j, t), fp in zip(entries, prints):
                    values[i][j] = (id(t), t.data_ptr(), t._version, t.dtype, tuple(t.shape), fp)
        return values


class WeightBudget:
    """The bytes of derived weights (folded batch norms, block weights, kernel tables) an explainer may
    keep between calls; ``None``: no limit. What does not fit is built again in each call."""

    def __init__(self, limit: int | None):
        self.limit, self.used = limit, 0
        self._lock = threading.Lock()

    @property
    def spent(self) -> bool:
        return self.limit is not None and self.used >= self.limit

    def take(self, size: int) -> bool:
        if self.limit is None:
            return True
        with self._lock:
            if self.used + size > self.limit:
                return False
            self.used += size
            return True

    def give(self, size: int) -> None:
        if self.limit is not None:
            with self._lock:
                self.used -= size
