"""The ``fastlrp bench`` run: every provider on every model and composite, one row each, then
the table and the result file. ``main`` takes ``bench/bench_lrp.py``'s command line; the
``--help`` text is the package's docstring.
"""
import argparse
import gc
import os
import sys
import time

import torch

from ...backends import NAMES as BACKEND_NAMES

from .harness import (RESULTS_DIR, Row, add_ratios, environment, format_table, peak_memory_bytes, synchronize,
                      time_fn, write_results)
from .providers import (CAVEATS, COMPOSITES, MODELS, VIDEO_MODELS, _torchvision, captum_provider, classify,
                        fastlrp_backends, fastlrp_provider, forward_provider, frozen_copy, gradient_provider,
                        zennit_provider)


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
            synchronize(args.device)
            row.setup_ms = (time.perf_counter() - t0) * 1e3
            call = lambda: fn(x, target)
            if args.memory:  # two untimed calls, so they double as warm-ups
                peak, out = peak_memory_bytes(call, args.device)
                row.peak_mem_mb = peak / 2**20
            else:
                out = call()
            check_output(row, out, x, reference)
            untimed_so_far = 2 if args.memory else 1
            timing = time_fn(call, args.device, warmup=max(args.warmup - untimed_so_far, 0),
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
    new_row = lambda composite, provider: Row(name, composite, provider, batch, size, args.dtype, args.device)
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
                                      backend=provider.split(":", 1)[1], model_name=name)
            record(new_row(composite, provider), cm, reference)
        if skip_note:  # keep the gap visible in the table rather than silently absent
            rows.append(new_row(composite, "fastlrp"))
            rows[-1].status, rows[-1].note = "unavailable", skip_note
    del model
    return rows


def add_arguments(p, machine_defaults=False):
    """The benchmark's options on parser ``p``. ``machine_defaults``: ``--device auto``, which
    takes the GPU preset where CUDA is present (``fastlrp bench``); otherwise the CPU run."""
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), metavar="MODEL",
                   help=f"torchvision models to time, random weights (any of {', '.join(MODELS)}; default: all)")
    p.add_argument("--composites", nargs="+", default=list(COMPOSITES), choices=list(COMPOSITES), metavar="NAME",
                   help=f"LRP composites to time (any of {', '.join(COMPOSITES)}; default: all)")
    p.add_argument("--providers", nargs="+", default=None,
                   help="subset of: fastlrp:<backend>[+save_memory] ... captum (default: all available); "
                        "zennit, forward and gradient always run as the baselines")
    # None: the preset's value (PRESETS), so --gpu --batch 128 keeps the 128
    p.add_argument("--batch", type=int, default=None, help="batch for image models (1; --gpu: 64)")
    p.add_argument("--size", type=int, default=None, help="height = width for image models (64; --gpu: 224)")
    p.add_argument("--video-batch", type=int, default=None, help="batch for r3d_18 (1; --gpu: 16)")
    p.add_argument("--video-size", type=int, default=None, help="height = width for r3d_18 (48; --gpu: 112)")
    p.add_argument("--frames", type=int, default=None, help="frames for r3d_18 (4; --gpu: 16)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"],
                   help="data type of the models and inputs: float32 (default), float64, float16 or bfloat16")
    if machine_defaults:
        p.add_argument("--device", default="auto",
                       help="auto (default: cuda with the --gpu preset where CUDA is present, else cpu), "
                            "cpu, cuda or cuda:N")
    else:
        p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--gpu", action="store_true",
                   help="GPU preset: cuda, batch 64 at 224x224, r3d_18 batch 16 at 16x112x112, "
                        "3 warm-ups, 10 repeats")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed calls before timing (1; --gpu: 3); at least 1, and 2 when memory is measured")
    p.add_argument("--repeats", type=int, default=None, help="timed calls (3; --gpu: 10)")
    p.add_argument("--cuda-events", action="store_true", help="time with CUDA events instead of the host clock")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak memory call")
    p.add_argument("--name", default="lrp",
                   help="first part of the result file's name, NAME-<device>-<date>-<time>.json (default: lrp)")
    p.add_argument("--out", default=None, help=f"directory for the JSON (default {RESULTS_DIR})")
    return p


PRESETS = {
    "cpu": dict(batch=1, size=64, video_batch=1, video_size=48, frames=4, warmup=1, repeats=3),
    "gpu": dict(batch=64, size=224, video_batch=16, video_size=112, frames=16, warmup=3, repeats=10),
}


def finish_args(args):
    """Apply the presets: ``--device auto`` and ``--gpu``."""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
        args.gpu = args.gpu or args.device == "cuda"
    if args.gpu:
        args.device = "cuda" if args.device == "cpu" else args.device
    for option, value in PRESETS["gpu" if args.gpu else "cpu"].items():
        if getattr(args, option, None) is None:  # an explicit option beats the preset
            setattr(args, option, value)
    args.warmup = max(args.warmup, 1)
    return args


def parse_args(argv=None):
    # the package's docstring (what is measured and how to run it) is the --help text
    p = argparse.ArgumentParser(description=sys.modules[__package__].__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    return finish_args(add_arguments(p).parse_args(argv))


def main(argv=None):
    """Run the benchmark with ``bench/bench_lrp.py``'s command line; returns the result file's path."""
    return run(parse_args(argv))


def check_providers(providers):
    """Every provider is ``captum`` or ``fastlrp:<backend>[+save_memory]``; anything else is a ValueError
    naming it, before any work (Zennit, forward and gradient run anyway as the baselines)."""
    for provider in providers:
        kind, _, backend = provider.partition(":")
        if provider != "captum" and (kind != "fastlrp" or backend.removesuffix("+save_memory") not in BACKEND_NAMES):
            raise ValueError(f"unknown provider {provider!r}; use captum or "
                             f"fastlrp:<backend>[+save_memory] with a backend of {', '.join(BACKEND_NAMES)} "
                             "(zennit, forward and gradient always run as the baselines)")


def run(args):
    """Run the benchmark for parsed (and finished) arguments; returns the result file's path."""
    _torchvision()  # fail in one line before any work when torchvision is missing
    fastlrp_providers, skip_note = fastlrp_backends(args.device)
    providers = args.providers or fastlrp_providers + ["captum"]
    check_providers(providers)
    if args.providers:
        skip_note = ""
    env = environment(args.device)
    print(f"device {env['device_name']}, torch {env['torch_version']}, threads {env['torch_threads']}, "
          f"commit {env['git_commit']} dirty={env['git_dirty']}", flush=True)
    if skip_note:
        print(skip_note, flush=True)
    rows = []
    for name in args.models:
        rows += bench_model(name, args, providers, skip_note)
    add_ratios(rows)
    env["load_average_at_end"] = os.getloadavg()
    config = {k: v for k, v in vars(args).items() if not callable(v)}  # the CLI adds its handler
    config["providers"] = providers
    path = write_results(args.name, rows, env, config, args.out)
    print()
    print(format_table(rows, memory=args.memory))
    print()
    if args.memory:  # the footnote explains a column that --no-memory leaves out
        print(f"memory: {env['memory_meaning']}")
    print("x grad: median time / median time of the plain input gradient, same model and batch, same run")
    print("x zennit: median time / Zennit's median time for the same composite, same run")
    print(f"wrote {path}")
    return path
