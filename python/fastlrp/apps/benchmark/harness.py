"""The benchmark harness: timing, peak memory, the environment record, result rows, the
table and the JSON result file. ``fastlrp bench`` (``runner``) and the scripts in ``bench/``
build on it; it knows nothing of LRP.
"""
import dataclasses
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
from pathlib import Path

import torch

from ...backends.timing import times_ms

# In a source checkout (python/fastlrp/apps/benchmark/ below a folder holding bench/) results go
# to bench/results, where the project keeps them; an installed package writes to
# ./fastlrp-bench-results instead.
REPO_ROOT = Path(__file__).resolve().parents[4]
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
    before reading the clock, otherwise only the launch would be timed. The clock is the
    core's (``fastlrp.backends.timing.times_ms``), which the Triton speed choice uses too.
    """
    times = times_ms(fn, device, warmup, repeats, cuda_events)
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


def format_table(rows, memory: bool = True):
    """The rows as an aligned text table; ``memory=False`` leaves out the peak-memory column."""
    def fmt(value, spec):
        return "" if value is None else format(value, spec)

    header = ["model", "batch", "size", "dtype", "composite", "provider", "median ms",
              "min ms", "x grad", "x zennit", "peak MB", "status"]
    lines = [[r.model, str(r.batch), r.size, r.dtype, r.composite, r.provider,
              fmt(r.median_ms, ".1f"), fmt(r.min_ms, ".1f"), fmt(r.ratio_to_grad, ".2f"),
              fmt(r.ratio_to_zennit, ".2f"), fmt(r.peak_mem_mb, ".1f"),
              f"{r.status}: {r.note}"[:70] if r.note else r.status] for r in rows]
    if not memory:
        column = header.index("peak MB")
        header = header[:column] + header[column + 1:]
        lines = [line[:column] + line[column + 1:] for line in lines]
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
