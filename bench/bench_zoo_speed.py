"""Issue 14, item 8: LRP time over the input-gradient time on transformers (AttnLRP, CP-LRP; LXT for ViT)
and mobile nets (epsilon_plus, epsilon_gamma_box), against the rule's arithmetic floor.

    PYTHONPATH=python python bench/bench_zoo_speed.py --threads 1 --repeats 5 [--allocator reuse]

``--allocator reuse`` first calls fastlrp.reuse_freed_memory() (glibc keeps freed pages: no page faults
per call, as in the fastlrp command line); each row records the median kernel (system) time per call.

Every provider of a model runs once per round, in turn, so a slow patch of a shared machine hits them
alike; the ratio is the median over rounds of (provider time / gradient time in the same round).

The floor (CNN rules, native backend): per Conv/Linear layer, the multiply-adds of the convolutions the
rule's block form runs (the output, z where it is not the output, the transposed convolution), over the
gradient's two (forward, backward-data), summed over layers weighted by each layer's multiply-adds. It
assumes a transposed convolution costs its forward convolution and the element-wise work is free: the
docs/native.md "Speed" floor, computed for the model. For AttnLRP the floor is 1.0: the rules are the
gradient with element-wise changes.
"""
import argparse
import json
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))

import fastlrp  # noqa: E402
from fastlrp.apps.benchmark import harness  # noqa: E402
from fastlrp.backends.native import NativeBackend  # noqa: E402

TRANSFORMERS = {"vit_b_16": ("attnlrp", "cp_lrp"), "swin_t": ("attnlrp", "cp_lrp"),
                "convnext_tiny": ("attnlrp",), "mvit_v2_s": ("attnlrp",)}
MOBILE = {"efficientnet_b0": ("epsilon_plus", "epsilon_gamma_box"),
          "mobilenet_v3_large": ("epsilon_plus", "epsilon_gamma_box")}
VIDEO = {"mvit_v2_s": (16, 224)}  # frames, size: MViT-v2's input is fixed
RULE_OPTIONS = {"epsilon_gamma_box": dict(low=-3.0, high=3.0)}


def build(name):
    import torchvision
    model = getattr(torchvision.models.video if name in VIDEO else torchvision.models, name)(weights=None).eval()
    return model.requires_grad_(False)


def gradient_fn(model):
    def run(x, target):
        x = x.detach().requires_grad_()
        return torch.autograd.grad(model(x)[:, target].sum(), x)[0]
    return run


def lxt_fn(model):
    from fastlrp.apps.benchmark import lxt
    patched = lxt.patched(model, lxt.attnlrp_attention)
    return lambda x, target: lxt.relevance(patched, x, target)


def floor_ratio(explainer, x, target):
    """The rule's convolution work over the gradient's (module docstring)."""
    shapes = {}
    hooks = [layer.register_forward_hook(lambda m, i, o: shapes.__setitem__(m.site, (i[0].shape, o.shape)))
             for layer in explainer._affine]
    explainer(x, target)
    for h in hooks:
        h.remove()
    native, rule_work, gradient_work = NativeBackend(), 0.0, 0.0
    for layer in explainer._affine:
        if layer.site not in shapes:
            continue
        (x_shape, y_shape), op = shapes[layer.site], layer.op
        weight = layer.params()[0]
        macs = math.prod(y_shape) * math.prod(weight.shape[1:])  # per output element: C_in / groups x taps
        block = native.block(layer)
        parts = len(block.coefficients) * len(block.sample_modifiers)  # the block weight's extent in MACs
        transposed = len(block.coefficients) * len(block.modifiers)
        rule_work += macs * (1 + (0 if block.z_is_output else parts) + transposed)
        gradient_work += 2 * macs
    return rule_work / gradient_work


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(TRANSFORMERS) + list(MOBILE))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=224, help="image height = width (mobile nets use --mobile-size)")
    p.add_argument("--mobile-size", type=int, default=160)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--allocator", choices=("default", "reuse"), default="default",
                   help="reuse: fastlrp.reuse_freed_memory() first (glibc keeps freed pages; no page faults per "
                        "call), as the fastlrp command line does; default: glibc's own thresholds")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    if args.allocator == "reuse" and not fastlrp.reuse_freed_memory():
        p.error("--allocator reuse needs glibc")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = []
    for name in args.models:
        model = build(name)
        if name in VIDEO:
            frames, size = VIDEO[name]
            x = torch.randn(1, 3, frames, size, size)
        else:
            size = args.mobile_size if name in MOBILE else args.size
            x = torch.randn(args.batch, 3, size, size)
        with torch.no_grad():
            target = int(model(x[:1]).argmax())
        providers = {"gradient": gradient_fn(model)}
        floors = {}
        for composite in TRANSFORMERS.get(name) or MOBILE[name]:
            explainer = fastlrp.LRP(model, composite, backend="native", **RULE_OPTIONS.get(composite, {}))
            providers[f"fastlrp:{composite}"] = lambda x, t, e=explainer: e(x, t)
            floors[f"fastlrp:{composite}"] = 1.0 if name in TRANSFORMERS else floor_ratio(explainer, x, target)
        if name == "vit_b_16":
            try:
                providers["lxt:attnlrp"] = lxt_fn(model)
            except ImportError as exc:
                print(f"  LXT not available: {exc}")
        times = {k: [] for k in providers}
        system = {k: [] for k in providers}  # kernel time per call: mostly page faults of fresh memory
        for fn in providers.values():  # warm-up: one-time costs (caches, first allocations)
            fn(x, target)
        for _ in range(args.repeats):
            for key, fn in providers.items():
                start, kernel = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_stime
                fn(x, target)
                times[key].append(time.perf_counter() - start)
                system[key].append(resource.getrusage(resource.RUSAGE_SELF).ru_stime - kernel)
        grad = times["gradient"]
        for key, ts in times.items():
            ratios = [t / g for t, g in zip(ts, grad)]
            row = dict(model=name, provider=key, input=list(x.shape), median_ms=1e3 * statistics.median(ts),
                       min_ms=1e3 * min(ts), ratio_to_gradient=statistics.median(ratios),
                       ratio_min_over_min=min(ts) / min(grad), median_system_s=statistics.median(system[key]))
            if key in floors:
                row["floor"] = floors[key]
                row["ratio_to_floor"] = row["ratio_to_gradient"] / floors[key]
            if key.startswith("fastlrp:") and "lxt:attnlrp" in times and key == "fastlrp:attnlrp":
                row["ratio_to_lxt"] = statistics.median(t / u for t, u in zip(ts, times["lxt:attnlrp"]))
            results.append(row)
            extra = "".join(f"  {k} {row[k]:.2f}" for k in ("floor", "ratio_to_floor", "ratio_to_lxt") if k in row)
            print(f"{name:20s} {key:26s} {row['median_ms']:9.1f} ms  x grad {row['ratio_to_gradient']:.2f}{extra}"
                  f"  (system {row['median_system_s']:.2f} s)",
                  flush=True)
        del providers, model
    env = harness.environment("cpu")
    env["lxt_version"] = harness._version("lxt")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"zoo-speed-cpu-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(dict(environment=env, config=vars(args), rows=results), indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
