"""Static GPU checks of the Triton kernels, on a CPU: compile what the engine can launch for sm_80 and
sm_90, per dtype and autotune config, and judge it (docs/gpu.md, "Static checks").

    PYTHONPATH=python:. python -m bench.gpu_static.check --ci             # the CI subset (tests/test_gpu_static.py)
    PYTHONPATH=python:. python -m bench.gpu_static.check --full --jobs 2 \\
        --out bench/results/gpu-static-full.json --report bench/results/gpu-static-full.md

Fails (exit 1, and lists why) on: a compile error; a ptxas warning; a config the autotuner may choose
(``affine_lrp.choosable``: the same rule the run-time pruning applies) whose shared memory is over the
target's limit or which spills more than ``affine_lrp.MAX_SPILL_BYTES``; a kernel variant with no such
config. Writes one JSON record per compile.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

os.environ.pop("TRITON_INTERPRET", None)  # the kernels' config lists depend on it

from . import aot, cases  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# The CI subset's configs (indices into affine_lrp.CONFIG_SHAPES): 64x64x32 on 4 warps (the workhorse and first
# untuned choice), on 8 warps (where the 4-warp tiles spill) and the safe tile.
CI_CONFIGS = [0, 4, 5]
ISSUE_TARGET = 2.0  # issue/MMA of a K loop the issue sets as the target (docs/gpu.md): a choosable config over it fails


def precision(dtype_name: str, tf32: bool) -> str:
    return {"bfloat16": "bf16", "float16": "fp16"}.get(dtype_name, "tf32" if tf32 else "ieee")


def _configs():
    import triton
    from fastlrp.kernels import affine_lrp
    return [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in affine_lrp.CONFIG_SHAPES]


def parse_tile(text: str) -> tuple:
    """"64x32x32w4s3" -> (64, 32, 32, 4, 3): BM x BN x BK, warps, stages."""
    m = re.fullmatch(r"(\d+)x(\d+)x(\d+)w(\d+)s(\d+)", text)
    if not m:
        raise SystemExit(f"--tiles: {text!r} is not BMxBNxBKwWsS (e.g. 64x32x32w4s3)")
    return tuple(int(v) for v in m.groups())


def use_tiles(shapes):
    """Probe other tiles: the config list (and the weights' K padding, which follows the largest BK) become
    ``shapes`` in this process and the compile workers it forks. Config indices then index ``shapes``."""
    from fastlrp.kernels import affine_lrp
    affine_lrp.CONFIG_SHAPES = tuple(shapes)
    affine_lrp._MAX_BK = max(shape[2] for shape in shapes)


def _id(task: dict) -> str:
    return "|".join(str(task[k]) for k in ("arch", "dtype", "kernel", "variant", "config") if k in task)


def compile_task(task: dict) -> dict:
    """One compile: an affine launch (variant, which, config) or a pool kernel, for one arch and dtype."""
    rec = dict(task, id=_id(task))
    try:
        dtype = DTYPES[task["dtype"]]
        config = None
        if task["kernel"] == "pool":
            kernel, _, args, kwargs = dict(cases.pool_launches(dtype))[task["variant"]]
        else:
            layer, rule, nonneg, *layout = task["variant"].split("/")
            launches = cases.affine_launches(cases.representative_layers()[layer], rule, nonneg == "nn1", dtype,
                                             task["tf32"], channels_last=layout == ["cl"])
            kernel, _, args, kwargs = launches[0 if task["kernel"] == "forward" else 1]
            # on CUDA the relevance op never launches the fused relevance kernel (docs/gpu.md): reported only
            rec["launched"] = (task["kernel"] == "forward"
                               and cases.launched_by_engine(cases.representative_layers()[layer]))
            config = _configs()[task["config"]]
            rec["tile"] = config.all_kwargs()
        compiled, info = aot.compile_one(kernel, args, kwargs, config, task["arch"])
        rec.update(info, status="ok")
        if config is not None:
            loop = aot.k_loop(aot.sass_of(compiled))
            rec["k_loop"] = loop
            rec["estimate"] = aot.issue_over_mma(loop, info["num_warps"], task["arch"],
                                                 precision(task["dtype"], task["tf32"]))
    except Exception as e:  # noqa: BLE001  (reported as a failure)
        rec.update(status="error", error=f"{type(e).__name__}: {e}"[:2000], trace=traceback.format_exc()[-2000:])
    return rec


def tasks(archs, dtypes, variants, configs, tf32: bool, pools: bool, kernels=("forward", "relevance"),
          layouts=("",)):
    """``layouts``: "" (contiguous) and/or "cl" (channels-last), appended to the variant's name."""
    out = []
    for arch in archs:
        for dtype in dtypes:
            base = dict(arch=arch, dtype=dtype, tf32=tf32 and dtype == "float32")
            if pools:
                out += [dict(base, kernel="pool", variant=name) for name in
                        ("maxpool_share", "maxpool_inputs", "adaptive_share", "adaptive_inputs", "sum2")]
            for layer, rule, nonneg in variants:
                for layout in layouts:
                    name = f"{layer}/{rule}/nn{int(nonneg)}" + (f"/{layout}" if layout else "")
                    out += [dict(base, kernel=which, variant=name, config=c) for which in kernels for c in configs]
    return out


def judge(records) -> list:
    """The failures, as lines: compile errors, ptxas warnings, and per affine kernel variant the
    configs the run-time rule lets the autotuner choose (``affine_lrp.choosable``, marked ``choosable``;
    the first of them, in the list's order, runs untuned: marked ``untuned``) that are over the limits:
    shared memory, spills, or a K loop over the issue target (or no such config at all). Judged among
    the configs compiled: a subset of the list is judged as if the others did not exist."""
    from fastlrp.kernels import affine_lrp
    failures = []
    for r in records:
        if r["status"] != "ok":
            failures.append(f"{r['id']}: compile failed: {r['error'][:300]}")
        elif r["ptxas_warnings"]:
            failures.append(f"{r['id']}: ptxas warnings: {r['ptxas_warnings'][:3]}")
    groups = {}
    for r in records:
        if r["kernel"] != "pool" and r["status"] == "ok":
            groups.setdefault((r["arch"], r["dtype"], r["kernel"], r["variant"]), []).append(r)
    for (arch, dtype, kernel, variant), recs in sorted(groups.items()):
        by_config = {r["config"]: r for r in recs}
        resources = lambda c: (by_config[c]["local_bytes"], by_config[c]["shared_bytes"])  # noqa: E731
        tier = lambda c: affine_lrp.shape_tier(affine_lrp.CONFIG_SHAPES[c])  # noqa: E731
        chosen = affine_lrp.choosable(sorted(by_config), resources, aot.SMEM_LIMIT[arch], tier)
        by_config[affine_lrp.untuned_config(sorted(by_config), resources, aot.SMEM_LIMIT[arch], tier)]["untuned"] = True
        for c in chosen:
            r = by_config[c]
            r["choosable"] = True
            if not r["launched"]:
                continue  # the engine runs this layer natively: reported, not judged
            if not r["smem_fits"]:
                failures.append(f"{r['id']}: choosable but needs {r['shared_bytes']} B shared memory "
                                f"(sm_{arch} limit {aot.SMEM_LIMIT[arch]})")
            if r["local_bytes"] > affine_lrp.MAX_SPILL_BYTES:
                failures.append(f"{r['id']}: no config without spills; the best spills {r['local_bytes']} B/thread")
            ratio = (r.get("estimate") or {}).get("issue_over_mma")
            ieee = r["dtype"] == "float32" and not r.get("tf32")  # the Triton backend runs these natively
            if ratio is not None and ratio > ISSUE_TARGET and not ieee:
                failures.append(f"{r['id']}: choosable with a K loop over the issue target: issue/MMA {ratio} > "
                                f"{ISSUE_TARGET}")
    return failures


def _choice(r) -> str:
    if r["kernel"] == "pool":
        return ""
    if not r.get("launched", True):
        return "not launched" if r["kernel"] == "relevance" else "native layer"
    return "yes" if r.get("choosable") else "no"


def report_md(records) -> str:
    """Registers, local (spill) bytes, shared memory and the K loop's issue/MMA per compile."""
    lines = ["| target | dtype | kernel | variant | config | regs | local B | smem B | choosable | "
             "K-loop instr | MMA instr | issue/MMA | tap-loop issue clk |", "|" + "---|" * 13]
    for r in records:
        if r["status"] != "ok":
            lines.append(f"| sm_{r['arch']} | {r['dtype']} | {r['kernel']} | {r['variant']} | {r.get('config', '')} "
                         f"| error | | | | | | | |")
            continue
        loop, est = r.get("k_loop") or {}, r.get("estimate") or {}
        tile = r.get("tile")
        cfg = "" if tile is None else (f"{r['config']}: {tile['BM']}x{tile['BN']}x{tile['BK']} "
                                       f"w{tile['num_warps']} s{tile['num_stages']}")
        lines.append(f"| sm_{r['arch']} | {r['dtype']}{'-tf32' if r.get('tf32') else ''} | {r['kernel']} | "
                     f"{r['variant']} | {cfg} | {r['regs']} | {r['local_bytes']} | {r['shared_bytes']} | "
                     f"{_choice(r)} | "
                     f"{loop.get('instructions', '')} | {loop.get('mma', '')} | {est.get('issue_over_mma', '')} | "
                     f"{est.get('outer_issue_clk', '')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from fastlrp.kernels import affine_lrp
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--ci", action="store_true", help="the CI subset: the forward kernel's 64x64x32 (4 and 8 "
                      "warps) and safe configs of the CI variants on sm_90 bfloat16, of the signed-input Gamma on sm_80 "
                      "float32 (TF32), and the pooling kernels")
    mode.add_argument("--full", action="store_true", help="every variant, config, dtype, and sm_80/sm_90")
    ap.add_argument("--arch", type=int, nargs="+", default=None)
    ap.add_argument("--dtype", nargs="+", default=None, choices=sorted(DTYPES))
    ap.add_argument("--ieee", action="store_true", help="float32 with IEEE products (TF32 off: the engine then "
                    "runs float32 layers natively, so this is a report, not a check)")
    ap.add_argument("--only", default=None, help="variants whose name holds this text")
    ap.add_argument("--configs", type=int, nargs="+", default=None, help="config indices (default: all)")
    ap.add_argument("--model-set", action="store_true", help="the variants the performance model needs "
                    "(cases.MODEL_VARIANTS) instead of cases.VARIANTS")
    ap.add_argument("--signed-set", action="store_true", help="the four-product variants (cases.SIGNED_VARIANTS) "
                    "and the Linear layer instead of cases.VARIANTS")
    ap.add_argument("--tiles", nargs="+", default=None, metavar="BMxBNxBKwWsS",
                    help="probe: compile these tile shapes instead of affine_lrp.CONFIG_SHAPES (e.g. 64x32x32w4s3)")
    ap.add_argument("--kernels", nargs="+", default=["forward", "relevance"], choices=["forward", "relevance"],
                    help="which affine kernels (the relevance kernel is not launched on CUDA: reported only)")
    ap.add_argument("--layouts", nargs="+", default=["contiguous"], choices=["contiguous", "channels_last"])
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--log", default=None, help="JSON-lines file each record is appended to as it completes; "
                    "records already there are not compiled again")
    ap.add_argument("--out", default=None, help="JSON file for the records")
    ap.add_argument("--report", default=None, help="markdown table file")
    a = ap.parse_args(argv)
    if a.tiles:
        use_tiles([parse_tile(t) for t in a.tiles])
    if a.ci:
        # the forward kernel only: on CUDA the relevance op never launches the fused relevance kernel
        plan = (tasks([90], ["bfloat16"], cases.CI_VARIANTS, CI_CONFIGS, False, True, ("forward",))
                + tasks([80], ["float32"], cases.CI_VARIANTS[:1], CI_CONFIGS, True, False, ("forward",)))
    else:
        variants = (cases.MODEL_VARIANTS if a.model_set else
                    cases.SIGNED_VARIANTS + [("r50_fc_2048", "epsilon", False)] if a.signed_set else cases.VARIANTS)
        variants = variants if a.only is None else [v for v in variants if a.only in "/".join(map(str, v))]
        configs = a.configs if a.configs is not None else list(range(len(affine_lrp.CONFIG_SHAPES)))
        layouts = ["cl" if layout == "channels_last" else "" for layout in a.layouts]
        plan = tasks(a.arch or [90, 80], a.dtype or ["bfloat16", "float16", "float32"], variants, configs, not a.ieee,
                     a.only is None and not a.model_set and not a.signed_set, a.kernels, layouts)
    start = time.time()
    done = {}
    if a.log and Path(a.log).exists():
        for line in Path(a.log).read_text().splitlines():
            r = json.loads(line)
            done[r["id"]] = r
    todo = [t for t in plan if _id(t) not in done]
    log = open(a.log, "a") if a.log else None
    records = [done[_id(t)] for t in plan if _id(t) in done]
    with ProcessPoolExecutor(max(a.jobs, 1)) as pool:
        for r in pool.map(compile_task, todo):
            records.append(r)
            if log:
                log.write(json.dumps(r, default=str) + "\n")
                log.flush()
    failures = judge(records)
    over = [r["id"] for r in records if r.get("choosable") and r.get("launched")
            and (r.get("estimate") or {}).get("issue_over_mma", 0) > ISSUE_TARGET]
    summary = {"compiles": len(records), "ok": sum(r["status"] == "ok" for r in records),
               "failures": failures, "choosable_over_issue_target": over, "seconds": round(time.time() - start, 1),
               "triton": __import__("triton").__version__, "torch": torch.__version__}
    if a.out:
        Path(a.out).write_text(json.dumps({"summary": summary, "records": records}, indent=1, default=str))
    if a.report:
        Path(a.report).write_text(report_md(records))
    print(report_md(records))
    print(json.dumps({k: v for k, v in summary.items() if k != "failures"}))
    for f in failures:
        print("FAIL", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
