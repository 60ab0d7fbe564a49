"""Time LRP on torchvision models: fastlrp (every backend) against Zennit, Captum and the
plain input gradient, all in one run on one machine.

    PYTHONPATH=python python bench/bench_lrp.py            # small CPU run, ~6 minutes on 2 cores
    PYTHONPATH=python python bench/bench_lrp.py --gpu      # the GPU table (see bench/README.md)

The work is done by ``fastlrp.apps.benchmark`` (also behind ``fastlrp bench``); this script keeps
the command line that bench/README.md documents, and adds the mobile and grouped-convolution
models (depthwise, grouped 1x1 and grouped 3x3 convolutions; docs/native.md, "Speed"):

    PYTHONPATH=python python bench/bench_lrp.py --models mobilenet_v3_large efficientnet_b0 \
        shufflenet_v2_x1_0 regnet_y_400mf resnext50_32x4d --composites epsilon_plus epsilon_gamma_box \
        --providers fastlrp:native --batch 8 --size 224 --no-memory
"""
import sys
from pathlib import Path

try:
    from fastlrp.apps import benchmark
except ImportError:  # run from the source tree without PYTHONPATH=python
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))
    from fastlrp.apps import benchmark

from fastlrp.apps.benchmark import providers  # noqa: E402


def _torchvision_model(name):
    return lambda: getattr(providers._torchvision().models, name)(weights=None)


DEFAULT_MODELS = list(providers.MODELS)  # the documented default run stays as it was
# Models with grouped convolutions, run when named with --models (Zennit has no canonizer for them
# here: its rows read "error")
GROUPED_MODELS = ["mobilenet_v3_large", "mobilenet_v3_small", "efficientnet_b0", "shufflenet_v2_x1_0",
                  "regnet_y_400mf", "resnext50_32x4d"]
for _name in GROUPED_MODELS:
    providers.MODELS.setdefault(_name, _torchvision_model(_name))

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--models" not in argv:
        argv = ["--models", *DEFAULT_MODELS, *argv]
    benchmark.main(argv)
