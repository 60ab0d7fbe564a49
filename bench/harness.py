"""The shared benchmark harness, which lives in the package as ``fastlrp.apps.benchmark.harness``;
this file stays so that benchmark scripts here can keep doing ``import harness``."""
import sys
from pathlib import Path

try:
    from fastlrp.apps import benchmark
except ImportError:  # run from the source tree without PYTHONPATH=python
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))
    from fastlrp.apps import benchmark

from fastlrp.apps.benchmark.harness import (MEMORY_MEANING, RESULTS_DIR, REPO_ROOT, Row,  # noqa: E402,F401
                                            add_ratios, environment, format_table, peak_memory_bytes,
                                            synchronize, time_fn, write_results)

__all__ = ["MEMORY_MEANING", "RESULTS_DIR", "REPO_ROOT", "Row", "add_ratios", "benchmark", "environment",
           "format_table", "peak_memory_bytes", "synchronize", "time_fn", "write_results"]
