"""Benchmark LRP on torchvision models: fastlrp (every backend) against Zennit, Captum and the
plain input gradient, all in one run on one machine; plus the shared harness (timing, peak
memory, environment record, result rows) other benchmark scripts use.

    fastlrp bench                                   # defaults for this machine (GPU preset on CUDA)
    PYTHONPATH=python python bench/bench_lrp.py     # the same command line, from the source tree

Every figure the project quotes is a ratio taken in one run on one machine (docs/design.md,
section 8), so a result file carries the rows together with the device, the library
versions and the commit they were measured on. Models have random weights (weights=None:
a benchmark never downloads). Every provider starts from the same relevance, the target
logit (one-hot * output), for the same target.
"""
# This docstring is also the --help text of `fastlrp bench` and bench/bench_lrp.py.
# Split by job: harness (timing, memory, environment record, rows, result files), providers
# (models, composites, each library's way of computing the relevance) and runner (the
# command line and the run itself).
from .harness import (MEMORY_MEANING, REPO_ROOT, RESULTS_DIR, Row, add_ratios, environment, format_table,
                      peak_memory_bytes, synchronize, time_fn, write_results)
from .providers import COMPOSITES, MODELS, VIDEO_MODELS, densenet_batchnorm_pairs
from .runner import PRESETS, add_arguments, bench_model, finish_args, main, measure, parse_args, run

__all__ = ["COMPOSITES", "MEMORY_MEANING", "MODELS", "PRESETS", "REPO_ROOT", "RESULTS_DIR", "Row", "VIDEO_MODELS",
           "add_arguments", "add_ratios", "bench_model", "densenet_batchnorm_pairs", "environment", "finish_args",
           "format_table", "main", "measure", "parse_args", "peak_memory_bytes", "run", "synchronize", "time_fn",
           "write_results"]
