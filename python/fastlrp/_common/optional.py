"""Optional dependencies: import them where a feature needs them, or fail in one line that names
the extra to install."""

from __future__ import annotations

import importlib

# where the pip package is not named as the module it provides
_PACKAGES = {"sklearn": "scikit-learn", "skimage": "scikit-image"}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message says which extra brings it."""


def require(module: str, extra: str, purpose: str | None = None):
    """Import and return ``module``, or raise MissingExtraError naming ``pip install "fastlrp[extra]"``.

    ``purpose`` (e.g. "the t-SNE embedding of SpRAy") says in the message what needed it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        if purpose is None:
            message = f"this needs the Python package {module!r}, which is not installed ({err})"
        else:
            package = _PACKAGES.get(module.split(".")[0], module.split(".")[0])
            message = f"{purpose} needs {package} (module {module!r}), which is not installed ({err})"
        raise MissingExtraError(f'{message}; install it with: pip install "fastlrp[{extra}]"') from None
