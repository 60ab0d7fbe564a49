"""Optional dependencies: ``require(module, extra)`` imports a module or fails in one line that
names the extra to install. The implementation lives in ``fastlrp._common.optional``."""

from ._common.optional import MissingExtraError, require

__all__ = ["MissingExtraError", "require"]
