"""Benchmark LRP on torchvision models: fastlrp (every backend) against Zennit, Captum and the
plain input gradient, all in one run on one machine; plus the shared harness (timing, peak
memory, environment record, result rows) other benchmark scripts use.

    fastlrp bench                                   # defaults for this machine (GPU preset on CUDA)
    PYTHONPATH=python python bench/bench_lrp.py     # the same command line, from the source tree

Every figure the project quotes is a ratio taken in one run on one machine (DESIGN.md
section 7), so a result file carries the rows together with the device, the library
versions and the commit they were measured on. Models have random weights (weights=None:
a benchmark never downloads). Every provider starts from the same relevance, the target
logit (one-hot * output), for the same target.
"""
import argparse
import contextlib
import copy
import dataclasses
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path

import torch

# In a source checkout (python/fastlrp/ next to bench/) results go to bench/results, where the
# project keeps them; an installed package writes to ./fastlrp-bench-results instead.
REPO_ROOT = Path(__file__).resolve().parent.parent.parent
_IN_CHECKOUT = (REPO_ROOT / "bench").is_dir() and (REPO_ROOT / "python" / "fastlrp").is_dir()
RESULTS_DIR = REPO_ROOT / "bench" / "results" if _IN_CHECKOUT else Path("fastlrp-bench-results")

# What the memory column means, written into every result file so a number is never
# read without its definition.
MEMORY_MEANING = {
    "cuda": "peak CUDA memory allocated by torch during one warm call, above what was live "
            "before it (model, input and the previous call's leftovers excluded); "
            "torch.cuda.max_memory_allocated",
    "cpu": "peak bytes held by torch's CPU allocator during one warm call, above what was "
           "live before it; from torch.profiler allocation events. Excludes oneDNN/MKL "
           "scratch buffers and Python objects, so it is a lower bound on the process's growth",
}


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device, warmup=1, repeats=5, cuda_events=False):
    """Run fn warmup times untimed, then `repeats` times timed; return milliseconds.

    The median is the figure to quote (robust to a stray slow call); the min is what the
    code can do when nothing else interferes. On CUDA the host waits for the device
    before reading the clock, otherwise only the launch would be timed.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    use_events = cuda_events and torch.device(device).type == "cuda"
    for _ in range(repeats):
        if use_events:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "times_ms": times}


def _cpu_peak_bytes(fn):
    # The profiler reports every allocation and free of the CPU allocator with its size.
    # fn runs twice under it and only the second call is measured: a call often frees what
    # the previous one left behind (hook state, cached outputs), and a free is only
    # reported for a block allocated while the profiler was on.
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
        with record_function("fastlrp_bench_measured_call"):
            result = fn()

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    nodes = list(walk(prof.profiler.kineto_results.experimental_event_tree()))
    window = next(n for n in nodes if n.name == "fastlrp_bench_measured_call")
    allocations = sorted((n for n in nodes if n.tag == _EventType.Allocation
                          and n.extra_fields.device.type == "cpu"), key=lambda n: n.start_time_ns)
    current = peak = baseline = 0
    for node in allocations:
        if node.start_time_ns < window.start_time_ns:
            baseline = current = current + node.extra_fields.alloc_size
        elif node.start_time_ns <= window.end_time_ns:
            current += node.extra_fields.alloc_size
            peak = max(peak, current - baseline)
    return peak, result


def peak_memory_bytes(fn, device):
    """Run fn twice; return (peak extra memory of the second call, its result).

    See MEMORY_MEANING for what is counted. The first call is a warm-up, so lazily built
    caches (cuDNN workspaces, an explainer's first-call setup) do not inflate the figure.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return _cpu_peak_bytes(fn)
    fn()
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    result = fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - baseline, result


def _git(*args):
    if not _IN_CHECKOUT:
        return None
    try:
        return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module_name):
    # Installed metadata first (zennit has no __version__); fastlrp run from the source tree
    # has no metadata, so fall back to the module attribute.
    from importlib import metadata
    try:
        return metadata.version(module_name)
    except metadata.PackageNotFoundError:
        pass
    try:
        module = __import__(module_name)
    except Exception as exc:  # a broken install is a fact worth recording, not a crash
        return f"not importable: {type(exc).__name__}: {exc}"
    return getattr(module, "__version__", "unknown")


def environment(device):
    device = torch.device(device)
    env = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "git_commit": _git("rev-parse", "HEAD"),  # None before the first commit
        "git_dirty": bool(_git("status", "--porcelain")),
        "memory_meaning": MEMORY_MEANING[device.type],
        # Other processes on a shared machine skew absolute times (ratios less so).
        "load_average_at_start": os.getloadavg(),
    }
    for name in ("torch", "torchvision", "zennit", "captum", "fastlrp"):
        env[f"{name}_version"] = _version(name)
    try:
        import fastlrp
        env["fastlrp_build_info"] = fastlrp.build_info() if hasattr(fastlrp, "build_info") else None
    except Exception as exc:
        env["fastlrp_build_info"] = f"unavailable: {type(exc).__name__}: {exc}"
    return env


@dataclasses.dataclass
class Row:
    """One measurement, keyed by (model, composite, provider, batch, size, dtype, device)."""
    model: str
    composite: str          # "-" for forward and gradient rows
    provider: str           # forward, gradient, fastlrp:<backend>, zennit, captum
    batch: int
    size: str               # "HxW" for images, "TxHxW" for video
    dtype: str
    device: str
    status: str = "ok"      # ok, unsupported, error, unavailable (fastlrp not importable)
    median_ms: float | None = None
    min_ms: float | None = None
    peak_mem_mb: float | None = None
    ratio_to_grad: float | None = None   # median over the gradient row's median, same run
    ratio_to_zennit: float | None = None  # median over Zennit's median for the same composite
    setup_ms: float | None = None         # one-time cost: building the explainer, attaching hooks
    rel_err_vs_zennit: float | None = None  # ||R - R_zennit|| / ||R_zennit||, a sanity check only
    note: str = ""

    def key(self):
        return (self.model, self.composite, self.provider, self.batch, self.size, self.dtype, self.device)


def add_ratios(rows):
    """Fill ratio_to_grad and ratio_to_zennit from rows measured in the same run."""
    config = lambda r: (r.model, r.batch, r.size, r.dtype, r.device)
    grad = {config(r): r.median_ms for r in rows if r.provider == "gradient" and r.status == "ok"}
    zennit = {config(r) + (r.composite,): r.median_ms
              for r in rows if r.provider == "zennit" and r.status == "ok"}
    for r in rows:
        if r.status != "ok":
            continue
        if config(r) in grad:
            r.ratio_to_grad = r.median_ms / grad[config(r)]
        if r.provider != "zennit" and config(r) + (r.composite,) in zennit:
            r.ratio_to_zennit = r.median_ms / zennit[config(r) + (r.composite,)]
    return rows


def format_table(rows):
    def fmt(value, spec):
        return "" if value is None else format(value, spec)

    header = ["model", "batch", "size", "dtype", "composite", "provider", "median ms",
              "min ms", "x grad", "x zennit", "peak MB", "status"]
    lines = [[r.model, str(r.batch), r.size, r.dtype, r.composite, r.provider,
              fmt(r.median_ms, ".1f"), fmt(r.min_ms, ".1f"), fmt(r.ratio_to_grad, ".2f"),
              fmt(r.ratio_to_zennit, ".2f"), fmt(r.peak_mem_mb, ".1f"),
              f"{r.status}: {r.note}"[:70] if r.note else r.status] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h)
              for i, h in enumerate(header)]
    render = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([render(header), render(["-" * w for w in widths])] + [render(l) for l in lines])


def _slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def write_results(name, rows, env, config, out_dir=None):
    """Write bench/results/<name>-<device>-<date>.json and return its path."""
    out_dir = Path(out_dir) if out_dir else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    device = "cpu" if env["device"] == "cpu" else _slug(env["device_name"])
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"{name}-{device}-{stamp}.json"
    payload = {"benchmark": name, "environment": env, "config": config,
               "rows": [dataclasses.asdict(r) for r in rows]}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def _torchvision():
    from .extras import require
    return require("torchvision", "bench")


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


def densenet_batchnorm_pairs(model):
    """The conv -> batch norm pairs of a torchvision DenseNet: conv0 -> norm0 and, in every dense
    layer, conv1 -> norm2 (the other norms follow a concatenation). Zennit's
    SequentialMergeBatchNorm cannot be used: it pairs the last conv with norm5 and crashes."""
    pairs = [(["features.conv0"], "features.norm0")]
    pairs += [([name], name[: -len("conv1")] + "norm2") for name, _ in model.named_modules()
              if "denselayer" in name and name.endswith(".conv1")]
    return pairs


def _zennit_canonizers(model_name, model):
    from zennit.canonizers import CompositeCanonizer, NamedMergeBatchNorm, SequentialMergeBatchNorm
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer
    if model_name == "r3d_18":  # its BatchNorms follow their convs inside nn.Sequential
        return CompositeCanonizer([SequentialMergeBatchNorm(), _video_block_canonizer()])
    if model_name == "densenet121":
        return NamedMergeBatchNorm(densenet_batchnorm_pairs(model))
    return {"vgg16": VGGCanonizer, "resnet50": ResNetCanonizer}[model_name]()


MODELS = {
    "vgg16": lambda: _torchvision().models.vgg16(weights=None),
    "resnet50": lambda: _torchvision().models.resnet50(weights=None),
    "densenet121": lambda: _torchvision().models.densenet121(weights=None),
    "r3d_18": lambda: _torchvision().models.video.r3d_18(weights=None),
}
VIDEO_MODELS = {"r3d_18"}
# DenseNet calls F.relu and F.adaptive_avg_pool2d; Zennit's hooks see only modules, so these
# keep their gradient there. The same choice for fastlrp keeps the two computing one thing.
FASTLRP_OPTIONS = {"densenet121": {"functional_rules": False}}


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
def fastlrp_provider(model, composite, backend, model_name=None, **_):
    """``backend`` is a backend name, optionally with ``+save_memory`` (e.g. ``native+save_memory``)."""
    import fastlrp
    backend, _, flag = backend.partition("+")
    if flag not in ("", "save_memory"):
        raise ValueError(f"unknown fastlrp provider option {flag!r}; known: save_memory")
    explainer = fastlrp.LRP(model, composite=composite, backend=backend, save_memory=flag == "save_memory",
                            **COMPOSITES[composite][1], **FASTLRP_OPTIONS.get(model_name, {}))
    yield explainer


@contextlib.contextmanager
def zennit_provider(model, composite, model_name, **_):
    import zennit.composites
    from zennit.attribution import Gradient
    cls_name, options = COMPOSITES[composite]
    zcomposite = getattr(zennit.composites, cls_name)(canonizers=[_zennit_canonizers(model_name, model)], **options)
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
    if isinstance(exc, ImportError):  # zennit or captum not installed: a gap, not a failure
        return "unavailable", f"{text}; pip install \"fastlrp[bench]\""
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


def fastlrp_backends(device="cpu"):
    try:
        import fastlrp
        fastlrp.LRP  # the engine may not exist yet
        return [f"fastlrp:{b}" for b in fastlrp.available_backends(device)], ""
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
    new_row = lambda composite, provider: Row(name, composite, provider, batch, size,
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
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--composites", nargs="+", default=list(COMPOSITES), choices=list(COMPOSITES))
    p.add_argument("--providers", nargs="+", default=None,
                   help="subset of: fastlrp:<backend>[+save_memory] ... captum (default: all available); "
                        "zennit, forward and gradient always run as the baselines")
    # None: the preset's value (PRESETS), so --gpu --batch 128 keeps the 128
    p.add_argument("--batch", type=int, default=None, help="batch for image models (1; --gpu: 64)")
    p.add_argument("--size", type=int, default=None, help="height = width for image models (64; --gpu: 224)")
    p.add_argument("--video-batch", type=int, default=None, help="batch for r3d_18 (1; --gpu: 16)")
    p.add_argument("--video-size", type=int, default=None, help="height = width for r3d_18 (48; --gpu: 112)")
    p.add_argument("--frames", type=int, default=None, help="frames for r3d_18 (4; --gpu: 16)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
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
    p.add_argument("--name", default="lrp", help="result file prefix")
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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return finish_args(add_arguments(p).parse_args(argv))


def main(argv=None):
    """Run the benchmark with ``bench/bench_lrp.py``'s command line; returns the result file's path."""
    return run(parse_args(argv))


def run(args):
    """Run the benchmark for parsed (and finished) arguments; returns the result file's path."""
    _torchvision()  # fail in one line before any work when torchvision is missing
    fastlrp_providers, skip_note = fastlrp_backends(args.device)
    providers = args.providers or fastlrp_providers + ["captum"]
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
    print(format_table(rows))
    print(f"\nmemory: {env['memory_meaning']}")
    print("x grad: median time / median time of the plain input gradient, same model and batch, same run")
    print("x zennit: median time / Zennit's median time for the same composite, same run")
    print(f"wrote {path}")
    return path
