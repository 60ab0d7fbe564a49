"""The embedded demo: a synthetic dataset with a Clever-Hans watermark, a small CNN whose
trained weights ship with the package, and ``run_demo``, which explains a batch with LRP
and writes heatmaps (``fastlrp demo`` on the command line)."""

from .data import CLASS_NAMES, make_dataset
from .model import DemoCNN, load_demo_model
from .run import format_summary, run_demo

__all__ = ["CLASS_NAMES", "DemoCNN", "format_summary", "load_demo_model", "make_dataset", "run_demo"]
