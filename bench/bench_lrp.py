"""Time LRP on torchvision models: fastlrp (every backend) against Zennit, Captum and the
plain input gradient, all in one run on one machine.

    PYTHONPATH=python python bench/bench_lrp.py            # small CPU run, ~6 minutes on 2 cores
    PYTHONPATH=python python bench/bench_lrp.py --gpu      # the GPU table (see bench/README.md)

The work is done by ``fastlrp.apps.benchmark`` (also behind ``fastlrp bench``); this script keeps
the command line that bench/README.md documents.
"""
import sys
from pathlib import Path

try:
    from fastlrp.apps import benchmark
except ImportError:  # run from the source tree without PYTHONPATH=python
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))
    from fastlrp.apps import benchmark

if __name__ == "__main__":
    benchmark.main()
