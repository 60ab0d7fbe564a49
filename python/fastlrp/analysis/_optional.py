"""Imports of the optional dependencies, with an error that names the extra to install."""

from __future__ import annotations

import importlib

EXTRA = "analysis"


def require(module: str, purpose: str):
    """Import ``module`` or raise ImportError saying which extra provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        package = {"sklearn": "scikit-learn"}.get(module.split(".")[0], module.split(".")[0])
        raise ImportError(f"{purpose} needs {package}, which is part of fastlrp's optional '{EXTRA}' extra: "
                          f"pip install 'fastlrp[{EXTRA}]' (or pip install {package})") from err
