"""Time conditional heatmaps (Concept Relevance Propagation) for many concepts on ResNet-50 (random
weights), in one run on one machine:

* fastlrp.concepts.conditional_heatmaps with all conditions in one call (batched passes),
* the same conditions as separate explanations (one conditional_heatmaps call each),
* zennit-crp's CondAttribution.generate (one forward of `--crp-batch` copies, a backward pass per
  batch of conditions), with zennit's EpsilonPlus and ResNet canonizer.

    PYTHONPATH=python python bench/bench_concepts.py                        # 64 conditions, 224x224, CPU
    PYTHONPATH=python python bench/bench_concepts.py --conditions 16 --size 112

The conditions are channels 0..K-1 of layer4's output for the predicted class. Each row runs once
after a warm-up call with one condition (building the explainer's caches); the ratios are taken in
this one run. The largest difference between fastlrp's and zennit-crp's heatmaps, relative to
zennit-crp's largest value, is recorded as a sanity check (float32, so not zero).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

LAYER, CRP_LAYER = "layer4.2.relu#2", "layer4"  # the same tensor: the last block's output


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conditions", type=int, default=64)
    p.add_argument("--size", type=int, default=224, help="height = width")
    p.add_argument("--device", default="cpu")
    p.add_argument("--crp-batch", type=int, default=16, help="zennit-crp's generate(batch_size=)")
    p.add_argument("--skip-separate", action="store_true")
    p.add_argument("--skip-crp", action="store_true")
    p.add_argument("--name", default="concepts", help="result file prefix")
    p.add_argument("--out", default=None, help="directory for the JSON (default bench/results)")
    return p.parse_args(argv)


def timed(fn):
    harness.synchronize(ARGS.device)
    start = time.perf_counter()
    value = fn()
    harness.synchronize(ARGS.device)
    return value, 1000 * (time.perf_counter() - start)


def main(argv=None):
    global ARGS
    ARGS = args = parse_args(argv)
    import fastlrp
    from fastlrp.concepts import channel_conditions, conditional_heatmaps

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval().to(args.device)
    x = torch.rand(1, 3, args.size, args.size, device=args.device)
    with torch.no_grad():
        target = int(model(x).argmax(1))
    conditions = channel_conditions(LAYER, args.conditions, target)
    key = dict(model="resnet50", composite="epsilon_plus", batch=1, size=f"{args.size}x{args.size}",
               dtype="float32", device=str(args.device))
    rows, times = [], {}

    explainer = fastlrp.LRP(model, "epsilon_plus")
    conditional_heatmaps(explainer, x, conditions[:1])  # warm-up: caches, layer shapes
    batched, times["batched"] = timed(lambda: conditional_heatmaps(explainer, x, conditions))
    rows.append(harness.Row(provider="fastlrp concepts, one call", median_ms=times["batched"],
                            min_ms=times["batched"], note=f"{args.conditions} conditions", **key))
    print(f"batched  {times['batched']:.0f} ms", flush=True)
    if not args.skip_separate:
        _, times["separate"] = timed(lambda: [conditional_heatmaps(explainer, x, [c]) for c in conditions])
        rows.append(harness.Row(provider="fastlrp, one call per condition", median_ms=times["separate"],
                                min_ms=times["separate"], note=f"{args.conditions} calls", **key))
        print(f"separate {times['separate']:.0f} ms", flush=True)
    difference = None
    if not args.skip_crp:
        try:
            from crp.attribution import CondAttribution
            from zennit.composites import EpsilonPlus
            from zennit.torchvision import ResNetCanonizer
        except ImportError as err:
            rows.append(harness.Row(provider="zennit-crp", status="unavailable", note=str(err), **key))
        else:
            crp_model = torchvision.models.resnet50(weights=None).eval().to(args.device)
            crp_model.load_state_dict(model.state_dict())
            attribution = CondAttribution(crp_model)
            composite = EpsilonPlus(canonizers=[ResNetCanonizer()])
            crp_conditions = [{CRP_LAYER: [c], "y": [target]} for c in range(args.conditions)]

            def run_crp():
                data = x.clone().requires_grad_(True)
                return torch.cat([r.heatmap for r in attribution.generate(
                    data, crp_conditions, composite, batch_size=args.crp_batch, verbose=False)])

            heat, times["zennit-crp"] = timed(run_crp)
            difference = (heat - batched.heatmaps[0]).abs().max().item() / heat.abs().max().item()
            rows.append(harness.Row(provider="zennit-crp generate", median_ms=times["zennit-crp"],
                                    min_ms=times["zennit-crp"], note=f"batch_size={args.crp_batch}", **key))
            print(f"crp      {times['zennit-crp']:.0f} ms", flush=True)
    ratios = {f"{name} / batched": t / times["batched"] for name, t in times.items() if name != "batched"}
    print(harness.format_table(rows, memory=False))
    print(json.dumps(ratios, indent=1), "max |crp - fastlrp| / max |crp|:", difference)
    path = harness.write_results(args.name, rows, harness.environment(args.device),
                                 {**vars(args), "layer": LAYER, "ratios": ratios,
                                  "max_abs_difference_to_crp_relative": difference}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
