"""The shared benchmark harness, now ``fastlrp.benchmark``; kept so benchmark scripts that
``import harness`` from this folder keep working."""
import sys
from pathlib import Path

try:
    from fastlrp import benchmark
except ImportError:  # run from the source tree without PYTHONPATH=python
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))
    from fastlrp import benchmark

from fastlrp.benchmark import (MEMORY_MEANING, RESULTS_DIR, REPO_ROOT, Row, add_ratios,  # noqa: E402,F401
                               environment, format_table, peak_memory_bytes, synchronize, time_fn, write_results)

__all__ = ["MEMORY_MEANING", "RESULTS_DIR", "REPO_ROOT", "Row", "add_ratios", "benchmark", "environment",
           "format_table", "peak_memory_bytes", "synchronize", "time_fn", "write_results"]
