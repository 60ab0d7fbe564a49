"""Which composite for networks with depthwise convolutions and linear bottlenecks? Measures, per
candidate, conservation (input relevance / explained logit) and pixel-flipping AOPC on a
MobileNetV3-small trained on the demo's synthetic shapes, and conservation on bias-free random
MobileNetV3 / ShuffleNet v2 / EfficientNet-B0 (docs/audit.md has the results and the choice).

    OMP_NUM_THREADS=1 PYTHONPATH=python python bench/audit_composites.py [--train-seconds 240]
"""
import argparse
import json
import time

import torch
import torchvision
from torch import nn

import fastlrp
from fastlrp.apps.benchmark.harness import RESULTS_DIR, environment
from fastlrp.apps.demo.data import make_dataset
from fastlrp.audit import audit, bias_free_copy
from fastlrp.engine.relevance_layers import AffineLayer
from fastlrp.metrics.perturbation import aopc, pixel_flipping


def conv_sites(model):
    """(depthwise conv names, names of convs whose input the graph cannot prove non-negative),
    the first convolution excluded (it reads the image)."""
    explainer = fastlrp.LRP(model, "epsilon_plus")
    convs = [(site, layer) for site, layer in explainer._sites.items()
             if isinstance(layer, AffineLayer) and isinstance(layer.module, nn.Conv2d)]
    depthwise = {site for site, layer in convs if layer.module.groups > 1}
    signed = {site for site, layer in convs[1:] if not layer.nonnegative_input}
    return depthwise, signed


def candidates(model, low, high):
    depthwise, signed = conv_sites(model)
    eps, gamma = fastlrp.Epsilon(), fastlrp.Gamma(0.25)
    return {
        "epsilon_plus": ("epsilon_plus", {}),
        "epsilon_gamma_box": ("epsilon_gamma_box", {"low": low, "high": high}),
        "epsilon_plus, Epsilon on depthwise": ("epsilon_plus", {"name_map": {s: eps for s in depthwise}}),
        "epsilon_plus, Epsilon on depthwise and signed-input convs":
            ("epsilon_plus", {"name_map": {s: eps for s in depthwise | signed}}),
        "epsilon_plus, Gamma on depthwise and signed-input convs":
            ("epsilon_plus", {"name_map": {s: gamma for s in depthwise | signed}}),
    }


def small_mobilenet(num_classes=2):
    """torchvision's MobileNetV3 with a five-block configuration: depthwise 3x3/5x5 convolutions,
    linear bottlenecks, squeeze-and-excitation, ReLU and hardswish; about 60k parameters."""
    from torchvision.models.mobilenetv3 import InvertedResidualConfig, MobileNetV3
    setting = [InvertedResidualConfig(*row, width_mult=1.0) for row in [
        (16, 3, 16, 16, True, "RE", 2, 1), (16, 3, 48, 24, False, "RE", 2, 1), (24, 3, 64, 24, False, "RE", 1, 1),
        (24, 5, 96, 40, True, "HS", 2, 1), (40, 5, 120, 40, True, "HS", 1, 1)]]
    return MobileNetV3(setting, last_channel=128, num_classes=num_classes)


def train_mobile(seconds, seed=0):
    torch.manual_seed(seed)
    model = small_mobilenet()
    images, labels, _ = make_dataset(4000, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    start, step = time.time(), 0
    model.train()
    while time.time() - start < seconds:
        for idx in torch.randperm(len(images)).split(64):
            loss = nn.functional.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if time.time() - start > seconds:
                break
    # MobileNetV3's batch norms average with momentum 0.01: after a short training their running
    # statistics are still near the initial ones; recompute them as plain averages
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        for idx in torch.arange(len(images)).split(256):
            model(images[idx])
    return model.eval(), step


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--train-seconds", type=float, default=240)
    p.add_argument("--samples", type=int, default=64)
    args = p.parse_args()
    results = {"environment": environment("cpu"), "trained": {}, "random_bias_free": {}}

    model, steps = train_mobile(args.train_seconds)
    images, labels, _ = make_dataset(1000, seed=1)
    with torch.no_grad():
        logits = model(images)
    correct = logits.argmax(1) == labels
    accuracy = correct.double().mean().item()
    x, target = images[correct][:args.samples], labels[correct][:args.samples]
    results["trained"]["model"] = {"name": "small_mobilenet() (torchvision MobileNetV3, five blocks)",
                                   "train_steps": steps, "val_accuracy": accuracy, "samples": len(x)}
    print(f"trained {steps} steps, accuracy {accuracy:.3f}", flush=True)
    x64, model64 = x.double(), model.double()
    start = model64(x64).gather(1, target[:, None]).squeeze(1)
    rand = pixel_flipping(model64, x64, torch.rand_like(x64), target, patch_size=2, steps=16, max_fraction=0.5)
    results["trained"]["random order AOPC"] = aopc(rand)
    for name, (preset, options) in candidates(model64, 0.0, 1.0).items():
        explainer = fastlrp.LRP(model64, preset, **options)
        relevance = explainer(x64, target)
        ratio = relevance.sum((1, 2, 3)) / start
        morf = pixel_flipping(model64, x64, relevance, target, patch_size=2, steps=16, max_fraction=0.5)
        lerf = pixel_flipping(model64, x64, relevance, target, patch_size=2, steps=16, max_fraction=0.5,
                              order="least_relevant_first")
        row = {"conservation_mean": ratio.mean().item(), "conservation_min": ratio.min().item(),
               "conservation_max": ratio.max().item(), "aopc_morf": aopc(morf), "aopc_lerf": aopc(lerf)}
        results["trained"][name] = row
        print(name, {k: round(v, 4) for k, v in row.items()}, flush=True)

    tv = torchvision.models
    zoo = {"mobilenet_v3_small": tv.mobilenet_v3_small, "shufflenet_v2_x1_0": tv.shufflenet_v2_x1_0,
           "efficientnet_b0": tv.efficientnet_b0}
    for net, make in zoo.items():
        torch.manual_seed(0)
        model = bias_free_copy(make(num_classes=10).double(), torch.randn(4, 3, 64, 64, dtype=torch.float64))
        x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
        target = model(x).argmax(1)
        results["random_bias_free"][net] = {}
        for name, (preset, options) in candidates(model, -3.0, 3.0).items():
            a = audit(fastlrp.LRP(model, preset, **options), x, target)
            totals = a.totals()
            row = {"conservation": a.input / a.start, "vanished": totals["vanished"] / a.start,
                   "vanished_neurons": totals["vanished_neurons"], "stabilizer": totals["stabilizer"] / a.start}
            results["random_bias_free"][net][name] = row
            print(net, name, {k: round(v, 4) for k, v in row.items()}, flush=True)

    path = RESULTS_DIR / f"audit-composites-cpu-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
