"""Time every attribution method of fastlrp.methods on ResNet-50 (random weights), next to the
plain input gradient of the same model and batch, in one run on one machine.

    PYTHONPATH=python python bench/bench_methods.py                  # small CPU run, 64x64
    PYTHONPATH=python python bench/bench_methods.py --size 224 --device cuda --repeats 5

Each method runs with the options in METHOD_OPTIONS (small sampling budgets, so the table is
about the cost per forward/backward pass; scale n_samples/steps to your needs: the cost is
linear in them). The `x grad` column is the method's time over the gradient row's.
"""
import argparse
import sys
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

# method -> options; budgets are recorded with every row
METHOD_OPTIONS = {
    "gradient": {},
    "sensitivity": {},
    "gradient_x_input": {},
    "smoothgrad": {"n_samples": 8, "batch_size": 8},
    "integrated_gradients": {"steps": 16, "batch_size": 16},
    "guided_backprop": {},
    "deconvnet": {},
    "deep_taylor": {"input_rule": "zb", "low": -3.0, "high": 3.0},
    "lrp": {"composite": "epsilon_plus"},
    "occlusion": {"window": 16, "batch_size": 16},
    "meaningful_perturbation": {"steps": 10},
    "cam": {"layer": "layer4"},
    "gradcam": {"layer": "layer4"},
    "gradcam++": {"layer": "layer4"},
    "lime": {"n_samples": 32, "n_segments": 16, "batch_size": 16},
    "kernel_shap": {"n_samples": 32, "n_segments": 16, "batch_size": 16},
}


def gradient_baseline(model):
    def run(x, target):
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            out = model(leaf)
            return torch.autograd.grad(out.gather(1, target[:, None]).sum(), leaf)[0]
    return run


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHOD_OPTIONS), choices=list(METHOD_OPTIONS))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, default=64, help="height = width")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--name", default="methods", help="result file prefix")
    p.add_argument("--out", default=None, help="directory for the JSON (default bench/results)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        import fastlrp
    except ImportError as exc:
        sys.exit(f"fastlrp is not importable ({exc}); run with PYTHONPATH=python")
    dtype = getattr(torch, args.dtype)
    model = torchvision.models.resnet50(weights=None).eval().to(args.device, dtype)
    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device, dtype=dtype)
    with torch.no_grad():
        target = model(x).argmax(1)
    key = dict(model="resnet50", batch=args.batch, size=f"{args.size}x{args.size}", dtype=args.dtype,
               device=str(args.device))
    rows = []

    def measure(provider, fn, note=""):
        row = harness.Row(composite="-", provider=provider, note=note, **key)
        try:
            timing = harness.time_fn(lambda: fn(x, target), args.device, args.warmup, args.repeats)
            row.median_ms, row.min_ms = timing["median_ms"], timing["min_ms"]
        except Exception as exc:  # recorded in the table, the other methods still run
            row.status, row.note = "error", f"{type(exc).__name__}: {exc}"
        rows.append(row)
        print(f"{provider:32s} {row.status:6s} {row.median_ms or float('nan'):10.1f} ms", flush=True)

    measure("gradient", gradient_baseline(model))
    for name in args.methods:
        options = METHOD_OPTIONS[name]
        try:
            method = fastlrp.methods.get(name, model, **options)
        except Exception as exc:
            rows.append(harness.Row(composite="-", provider=f"method:{name}", status="error",
                                    note=f"{type(exc).__name__}: {exc}", **key))
            continue
        measure(f"method:{name}", method, note=", ".join(f"{k}={v}" for k, v in options.items()))
    harness.add_ratios(rows)
    print(harness.format_table(rows))
    path = harness.write_results(args.name, rows, harness.environment(args.device),
                                 {**vars(args), "method_options": METHOD_OPTIONS}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
