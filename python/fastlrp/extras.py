"""Optional dependencies: import them where a command needs them, or fail in one line that
names the extra to install."""

from __future__ import annotations

import importlib


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message says which extra brings it."""


def require(module: str, extra: str):
    """Import and return ``module``, or raise MissingExtraError naming ``pip install "fastlrp[extra]"``."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(f"this needs the Python package {module!r}, which is not installed ({err}); "
                                f'install it with: pip install "fastlrp[{extra}]"') from None
