"""Triton kernels of fastlrp, installed as ``fastlrp.kernels``.

Each kernel module holds private ``@triton.jit`` functions and their host launchers;
``fastlrp.ops`` registers them as custom torch ops. Triton is imported lazily so that
importing fastlrp stays cheap and works where Triton is absent.
"""

import importlib.util


def triton_available() -> bool:
    """True when Triton can be imported in this environment."""
    return importlib.util.find_spec("triton") is not None
