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
