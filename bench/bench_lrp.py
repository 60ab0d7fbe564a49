"""Time LRP on torchvision models: fastlrp (every backend) against Zennit, Captum and the
plain input gradient, all in one run on one machine.

    PYTHONPATH=python python bench/bench_lrp.py            # small CPU run, ~6 minutes on 2 cores
    PYTHONPATH=python python bench/bench_lrp.py --gpu      # the GPU table (see bench/README.md)

Models have random weights (weights=None: a benchmark never downloads). Every provider
starts from the same relevance, the target logit (one-hot * output), for the same target.
"""
import argparse
import contextlib
import copy
import gc
import os
import sys
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

# fastlrp preset name -> (Zennit composite class name, rule options both take)
COMPOSITES = {
    "epsilon_plus": ("EpsilonPlus", {}),
    "epsilon_plus_flat": ("EpsilonPlusFlat", {}),
    "epsilon_alpha2_beta1": ("EpsilonAlpha2Beta1", {}),
    "epsilon_alpha2_beta1_flat": ("EpsilonAlpha2Beta1Flat", {}),
    "epsilon_gamma_box": ("EpsilonGammaBox", {"low": -3.0, "high": 3.0}),
    "excitation_backprop": ("ExcitationBackprop", {}),
}


def _video_block_canonizer():
    """Zennit's ResNetBasicBlockCanonizer, for torchvision's video BasicBlock.

    Zennit ships none: without it the in-place `out += residual` has no Sum module, takes
    the plain gradient, and every block doubles the relevance, so Zennit would compute
    something else than the composite's definition (Sum -> Norm) on r3d_18.
    """
    from torchvision.models.video.resnet import BasicBlock
    from zennit.canonizers import AttributeCanonizer
    from zennit.layer import Sum

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.conv2(self.conv1(x))
        return self.relu(self.canonizer_sum(torch.stack([residual, out], dim=-1)))

    return AttributeCanonizer(lambda name, module: {"forward": forward.__get__(module), "canonizer_sum": Sum()}
                              if isinstance(module, BasicBlock) else None)


def _zennit_canonizers(model_name):
    from zennit.canonizers import CompositeCanonizer, SequentialMergeBatchNorm
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer
    if model_name == "r3d_18":  # its BatchNorms follow their convs inside nn.Sequential
        return CompositeCanonizer([SequentialMergeBatchNorm(), _video_block_canonizer()])
    return {"vgg16": VGGCanonizer, "resnet50": ResNetCanonizer}[model_name]()


MODELS = {
    "vgg16": lambda: torchvision.models.vgg16(weights=None),
    "resnet50": lambda: torchvision.models.resnet50(weights=None),
    "r3d_18": lambda: torchvision.models.video.r3d_18(weights=None),
}
VIDEO_MODELS = {"r3d_18"}


# Rows whose provider runs but computes something else than the composite's definition;
# their times are comparable work, their relevances are not.
CAVEATS = {
    ("captum", "resnet50"): "Captum has no rule for the residual sums (plain gradient there)",
}


class Unsupported(Exception):
    """The provider cannot express this model or composite; recorded, not an error."""


def frozen_copy(model):
    # Every provider gets its own copy (Zennit canonizers and Captum rules modify the
    # model while attached) with parameters frozen, so no provider pays for weight grads.
    model = copy.deepcopy(model)
    model.requires_grad_(False)
    return model


def one_hot_logit(output, target):
    return output * torch.nn.functional.one_hot(target, output.shape[1]).to(output.dtype)


@contextlib.contextmanager
def forward_provider(model, **_):
    def run(x, target):
        with torch.no_grad():
            return model(x)
    yield run


@contextlib.contextmanager
def gradient_provider(model, **_):
    def run(x, target):
        x = x.detach().requires_grad_()
        logit = model(x).gather(1, target[:, None]).sum()
        return torch.autograd.grad(logit, x)[0]
    yield run


@contextlib.contextmanager
def fastlrp_provider(model, composite, backend, **_):
    import fastlrp
    explainer = fastlrp.LRP(model, composite=composite, backend=backend, **COMPOSITES[composite][1])
    yield explainer


@contextlib.contextmanager
def zennit_provider(model, composite, model_name, **_):
    import zennit.composites
    from zennit.attribution import Gradient
    cls_name, options = COMPOSITES[composite]
    zcomposite = getattr(zennit.composites, cls_name)(canonizers=[_zennit_canonizers(model_name)], **options)
    # Hooks and canonizers are attached once, outside the timed calls, as a user would.
    with Gradient(model=model, composite=zcomposite) as attributor:
        yield lambda x, target: attributor(x, attr_output=lambda out: one_hot_logit(out, target))[1]


def _captum_rules(composite):
    from captum.attr._utils.lrp_rules import Alpha1_Beta0_Rule, EpsilonRule
    # Captum has Epsilon, Gamma, Alpha1Beta0 (= ZPlus) and Identity only: no ZBox, no
    # AlphaBeta(2, 1), no Flat. It merges no BatchNorm and its MaxPool uses Epsilon, so even
    # where it runs its numbers are close to, not equal to, Zennit's.
    if composite == "epsilon_plus":
        return lambda m: (Alpha1_Beta0_Rule() if isinstance(m, torch.nn.modules.conv._ConvNd)
                          else EpsilonRule(1e-6) if isinstance(m, torch.nn.Linear) else None)
    if composite == "excitation_backprop":
        return lambda m: (Alpha1_Beta0_Rule()
                          if isinstance(m, (torch.nn.modules.conv._ConvNd, torch.nn.Linear)) else None)
    raise Unsupported(f"Captum has no rules for {composite} (it lacks ZBox, AlphaBeta(2,1) and Flat)")


@contextlib.contextmanager
def captum_provider(model, composite, **_):
    from captum.attr import LRP
    rule_for = _captum_rules(composite)
    lrp = LRP(model)

    def run(x, target):
        # Captum deletes every module's `rule` (the user's too) at the end of attribute(),
        # so later calls would silently fall back to its default Epsilon: set them each call.
        for module in model.modules():
            rule = rule_for(module)
            if rule is not None:
                module.rule = rule
        return lrp.attribute(x.detach().requires_grad_(), target=target)
    # Captum also attaches its hooks inside every attribute() call: part of its call time.
    yield run


def classify(provider, exc):
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    if isinstance(exc, Unsupported):
        return "unsupported", str(exc)
    if provider == "captum" and ("no rule defined" in text or "not supported" in text.lower()):
        return "unsupported", text
    return "error", text


def check_output(row, out, x, reference):
    """Cheap sanity checks, so a fast but broken provider stands out in the table."""
    if row.provider == "forward":
        return
    if out.shape != x.shape:
        raise RuntimeError(f"relevance shape {tuple(out.shape)} != input shape {tuple(x.shape)}")
    if not torch.isfinite(out).all():
        row.note = "non-finite values in the relevance"
    if reference is not None:
        out, reference = out.double(), reference.double()  # float32 norms overflow on huge relevances
        row.rel_err_vs_zennit = ((out - reference).norm() / reference.norm().clamp_min(1e-30)).item()


def measure(row, provider_cm, x, target, args, reference=None):
    """Fill row with timing and memory of provider_cm's callable; errors become the row's status."""
    try:
        t0 = time.perf_counter()
        with provider_cm as fn:
            harness.synchronize(args.device)
            row.setup_ms = (time.perf_counter() - t0) * 1e3
            call = lambda: fn(x, target)
            if args.memory:  # two untimed calls, so they double as warm-ups
                peak, out = harness.peak_memory_bytes(call, args.device)
                row.peak_mem_mb = peak / 2**20
            else:
                out = call()
            check_output(row, out, x, reference)
            untimed_so_far = 2 if args.memory else 1
            timing = harness.time_fn(call, args.device, warmup=max(args.warmup - untimed_so_far, 0),
                                     repeats=args.repeats, cuda_events=args.cuda_events)
            row.median_ms, row.min_ms = timing["median_ms"], timing["min_ms"]
            return out.detach() if row.provider == "zennit" else None
    except Exception as exc:  # one broken provider must not stop the table
        row.status, row.note = classify(row.provider, exc)
        return None
    finally:
        gc.collect()
        if torch.device(args.device).type == "cuda":
            torch.cuda.empty_cache()


def fastlrp_backends():
    try:
        import fastlrp
        fastlrp.LRP  # the engine may not exist yet
        return [f"fastlrp:{b}" for b in fastlrp.available_backends()], ""
    except Exception as exc:
        return [], f"fastlrp not usable: {type(exc).__name__}: {exc}"


def bench_model(name, args, providers, skip_note):
    video = name in VIDEO_MODELS
    batch = args.video_batch if video else args.batch
    shape = (args.frames, args.video_size, args.video_size) if video else (args.size, args.size)
    size = "x".join(map(str, shape))
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = MODELS[name]().eval().to(device=args.device, dtype=dtype)
    x = torch.randn(batch, 3, *shape, device=args.device, dtype=dtype)
    with torch.no_grad():
        target = model(x).argmax(1)  # one target per sample, the same for every provider
    new_row = lambda composite, provider: harness.Row(name, composite, provider, batch, size,
                                                      args.dtype, args.device)
    rows = []

    def record(row, provider_cm, reference=None):
        rows.append(row)
        out = measure(row, provider_cm, x, target, args, reference)
        if row.status == "ok":
            row.note = "; ".join(filter(None, [row.note, CAVEATS.get((row.provider, name), "")]))
        print(f"  {name} {row.composite} {row.provider}: {row.status} "
              f"{'' if row.median_ms is None else f'{row.median_ms:.1f} ms'} {row.note[:120]}", flush=True)
        return out

    record(new_row("-", "forward"), forward_provider(frozen_copy(model)))
    record(new_row("-", "gradient"), gradient_provider(frozen_copy(model)))
    for composite in args.composites:
        reference = record(new_row(composite, "zennit"),
                           zennit_provider(frozen_copy(model), composite=composite, model_name=name))
        for provider in providers:
            if provider == "captum":
                cm = captum_provider(frozen_copy(model), composite=composite)
            else:
                cm = fastlrp_provider(frozen_copy(model), composite=composite,
                                      backend=provider.split(":", 1)[1])
            record(new_row(composite, provider), cm, reference)
        if skip_note:  # keep the gap visible in the table rather than silently absent
            rows.append(new_row(composite, "fastlrp"))
            rows[-1].status, rows[-1].note = "unavailable", skip_note
    del model
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--composites", nargs="+", default=list(COMPOSITES), choices=list(COMPOSITES))
    p.add_argument("--providers", nargs="+", default=None,
                   help="subset of: fastlrp:<backend> ... captum (default: all available); "
                        "zennit, forward and gradient always run as the baselines")
    p.add_argument("--batch", type=int, default=1, help="batch for image models")
    p.add_argument("--size", type=int, default=64, help="height = width for image models")
    p.add_argument("--video-batch", type=int, default=1, help="batch for r3d_18")
    p.add_argument("--video-size", type=int, default=48, help="height = width for r3d_18")
    p.add_argument("--frames", type=int, default=4, help="frames for r3d_18")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--gpu", action="store_true",
                   help="GPU preset: cuda, batch 64 at 224x224, r3d_18 batch 16 at 16x112x112, "
                        "3 warm-ups, 10 repeats")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed calls before timing; at least 1, and 2 when memory is measured")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cuda-events", action="store_true", help="time with CUDA events instead of the host clock")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak memory call")
    p.add_argument("--name", default="lrp", help="result file prefix")
    p.add_argument("--out", default=None, help="directory for the JSON (default bench/results)")
    args = p.parse_args(argv)
    if args.gpu:
        args.device = "cuda" if args.device == "cpu" else args.device
        args.batch, args.size, args.video_batch, args.video_size, args.frames = 64, 224, 16, 112, 16
        args.warmup, args.repeats = 3, 10
    args.warmup = max(args.warmup, 1)
    return args


def main(argv=None):
    args = parse_args(argv)
    fastlrp_providers, skip_note = fastlrp_backends()
    providers = args.providers or fastlrp_providers + ["captum"]
    if args.providers:
        skip_note = ""
    env = harness.environment(args.device)
    print(f"device {env['device_name']}, torch {env['torch_version']}, threads {env['torch_threads']}, "
          f"commit {env['git_commit']} dirty={env['git_dirty']}", flush=True)
    if skip_note:
        print(skip_note, flush=True)
    rows = []
    for name in args.models:
        rows += bench_model(name, args, providers, skip_note)
    harness.add_ratios(rows)
    env["load_average_at_end"] = os.getloadavg()
    config = {k: v for k, v in vars(args).items()}
    config["providers"] = providers
    path = harness.write_results(args.name, rows, env, config, args.out)
    print()
    print(harness.format_table(rows))
    print(f"\nmemory: {env['memory_meaning']}")
    print("x grad: median time / median time of the plain input gradient, same model and batch, same run")
    print("x zennit: median time / Zennit's median time for the same composite, same run")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
