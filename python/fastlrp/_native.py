"""Access to the compiled extension fastlrp._C, which a source checkout may lack."""

from __future__ import annotations


def _load():
    try:
        from . import _C
    except ImportError as err:
        return None, err
    return _C, None


_C, _IMPORT_ERROR = _load()


def build_info() -> dict:
    """How fastlrp._C was compiled: version, compiler, OpenMP, CUDA architectures.

    Raises ImportError with the reason when the extension is not built (a source tree on
    PYTHONPATH instead of an installed package)."""
    if _C is None:
        raise ImportError(f"fastlrp._C is not built ({_IMPORT_ERROR}); install the package with "
                          "'pip install .' to compile it")
    info = dict(_C.build_info())
    info["cuda_devices"] = _C.cuda_device_count() if info["cuda"] else 0
    return info


# The CUDA kernels are built for sm_80 and sm_90 (CMakeLists.txt, FASTLRP_CUDA_ARCHITECTURES; sm_90's PTX
# also serves newer GPUs). Older GPUs have no image to run: their layers take the PyTorch formulas.
MIN_CUDA_CAPABILITY = (8, 0)
_CUDA_USABLE: dict = {}


def cuda_kernels_usable(device) -> bool:
    """Whether fastlrp._C's CUDA kernels run on ``device`` (a torch.device of type cuda): built with
    CUDA, compute capability >= 8.0, and a probe kernel from the same binary launched there once.
    Where not, one warning says why and the ops use their PyTorch fallback."""
    import torch
    if _C is None or not getattr(_C, "has_cuda_kernels", False):
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    known = _CUDA_USABLE.get(index)
    if known is not None:
        return known
    capability = tuple(torch.cuda.get_device_capability(index))
    if capability < MIN_CUDA_CAPABILITY:
        reason = (f"compute capability {capability[0]}.{capability[1]} is below "
                  f"{MIN_CUDA_CAPABILITY[0]}.{MIN_CUDA_CAPABILITY[1]}, the oldest fastlrp._C is built for")
    elif torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return True  # no probe inside a graph capture (it synchronizes); probed after the capture
    elif not _C.cuda_probe_kernel(index):
        reason = "a probe kernel from fastlrp._C failed to launch there"
    else:
        reason = None
    usable = _CUDA_USABLE[index] = reason is None
    if reason:
        import warnings
        warnings.warn(f"fastlrp: the native CUDA kernels are off for cuda:{index} ({reason}); its layers use "
                      "the PyTorch formulas (correct, slower)", RuntimeWarning, stacklevel=2)
    return usable
