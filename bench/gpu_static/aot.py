"""Ahead-of-time compiles of fastlrp's Triton kernels for real NVIDIA targets, on a machine without a GPU.

A launch is captured from the repository's own host launchers (``kernels/affine_lrp.launch_*``,
``kernels/pool_lrp.launch_*``) called on tensors of the 'meta' device, so the argument list,
Triton's specialization of it (ints equal to 1 become constants, 16-divisible ints and pointers are
marked) and the compile-time flags are exactly those a GPU run would use. It is then compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` per autotune config.

Reported per compile: registers, local memory (spills and stack: the bytes the driver reports as
``n_spills * 4`` at run time, read here from the cubin with the cuobjdump Triton ships), Triton's
shared memory and whether it fits the target's per-block limit, and for kernels with a K loop the
instruction mix of that loop in SASS (tensor-core instructions against everything else).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise RuntimeError("bench.gpu_static compiles for real GPUs: run it with TRITON_INTERPRET unset")

import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

# Per-block shared memory, opt-in maximum (bytes): A100 (sm_80) 163 KB, H100/H200 (sm_90) 227 KB.
SMEM_LIMIT = {80: 166912, 90: 232448}
# Dense tensor-core multiply-adds per clock per SM (A100; H100/H200), by operand precision.
MAC_PER_CLK_SM = {
    (80, "bf16"): 1024, (80, "fp16"): 1024, (80, "tf32"): 512, (80, "ieee"): 32,
    (90, "bf16"): 2048, (90, "fp16"): 2048, (90, "tf32"): 1024, (90, "ieee"): 64,
}


class Capture:
    """Stands in for ``wrap_triton``: records what a launcher passes to ``kernel[grid](...)``."""

    def __init__(self):
        self.launches = []  # (kernel, grid, args, kwargs)

    def __call__(self, kernel):
        launches = self.launches

        class _Launcher:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: launches.append((kernel, grid, args, kwargs))
        return _Launcher()


def jit_of(kernel) -> JITFunction:
    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def _bin_tool(name: str) -> str:
    """Triton's own copy of a CUDA binary tool (ptxas, cuobjdump, nvdisasm); no CUDA install needed."""
    from triton.backends.nvidia import compiler as nv
    path = Path(nv.__file__).parent / "bin" / name
    return str(path) if path.exists() else name


def compile_one(kernel, args, kwargs, config, arch: int):
    """Compile one launch for ``sm_<arch>`` with ``config`` (a triton.Config or None). Returns
    (compiled kernel, resource record)."""
    jit = jit_of(kernel)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kw = dict(kwargs)
    if config is not None:
        kw.update(config.all_kwargs())
    kw.setdefault("debug", False)
    kw.setdefault("instrumentation_mode", "")
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound_args, specialization, options = binder(*args, **kw)
    options, signature, constexprs, attrs = jit._pack_args(backend, kw, bound_args, specialization, options)
    src = ASTSource(jit, signature, constexprs, attrs)
    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True  # printed only when ptxas runs (not for a cached compile)
    start = time.time()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(src, target=target, options=options.__dict__)
    seconds = time.time() - start
    usage = resource_usage(compiled.asm["cubin"])
    return compiled, {
        "seconds": round(seconds, 1),
        "regs": usage["REG"],
        "local_bytes": usage["STACK"] + usage["LOCAL"],  # spills and stack frame, per thread
        "shared_bytes": int(compiled.metadata.shared),
        "smem_fits": int(compiled.metadata.shared) <= SMEM_LIMIT[arch],
        "num_warps": compiled.metadata.num_warps,
        "num_stages": compiled.metadata.num_stages,
        "int64_args": sorted(k for k, v in signature.items() if v == "i64"),
        "ptxas_warnings": [line for line in log.getvalue().splitlines() if "warning" in line.lower()],
    }


def resource_usage(cubin: bytes) -> dict:
    """REG, STACK, SHARED, LOCAL of the cubin's kernel, from ``cuobjdump --dump-resource-usage``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_bin_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {k: int(fields.get(k, 0)) for k in ("REG", "STACK", "SHARED", "LOCAL")}


def sass_of(compiled) -> str:
    from triton.tools.disasm import get_sass
    with contextlib.redirect_stderr(io.StringIO()):
        return get_sass(compiled.asm["cubin"])


def _instructions(sass: str):
    """[(label or None, instruction)] for both nvdisasm formats (addresses or .L labels)."""
    rows = []
    for line in sass.splitlines():
        s = line.strip()
        m = re.match(r"^\.?(L\w+):\s*$", s)
        if m:
            rows.append((m.group(1), None))
            continue
        m = re.search(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", s)
        if m:
            rows.append((f"0x{int(m.group(1), 16):x}", m.group(2)))
            continue
        if "\t" in line and line.rstrip().endswith(";"):
            rows.append((None, line.split("\t", 1)[1].strip().rstrip(";")))
    return rows


def _opcode(text: str) -> str:
    return re.sub(r"^@!?U?P[T\d]+\s+", "", text).split()[0].split(".")[0]


_INT = ("IMAD", "IADD3", "ISETP", "LOP3", "LEA", "SHF", "IABS", "SEL", "VIADD", "IMNMX", "VIMNMX", "PLOP3", "I2F",
        "F2I", "MOV", "PRMT", "IMUL", "SGXT", "BMSK", "I2FP", "IDIV", "IMAD.WIDE", "UIADD3", "UIMAD", "ULOP3",
        "USHF", "UMOV", "ULEA", "UISETP", "USEL")
_FP = ("FADD", "FMUL", "FFMA", "FSEL", "FSETP", "FMNMX", "F2FP", "HMNMX2", "HADD2", "HMUL2", "HFMA2", "MUFU",
       "F2F", "FCHK")
_MMA = ("HGMMA", "HMMA")


def _loops(rows):
    """[(start, end)] row ranges of the loops: a branch back to an earlier label."""
    where = {label: i for i, (label, text) in enumerate(rows) if label is not None}
    loops = []
    for i, (_, text) in enumerate(rows):
        if not text:
            continue
        m = re.search(r"\bBRA\s+(?:`?\(?\.?)?(L\w+|0x[0-9a-f]+)", text)
        if m and m.group(1) in where and where[m.group(1)] < i:
            loops.append((where[m.group(1)], i))
    return loops


def _mix(body) -> dict:
    ops = Counter(_opcode(t) for t in body)
    shapes = Counter()
    for t in body:
        m = re.search(r"HGMMA\.(\d+)x(\d+)x(\d+)", t)
        if m:
            shapes[("wg", int(m.group(1)) * int(m.group(2)) * int(m.group(3)))] += 1
        m = re.search(r"HMMA\.(16816|1688|16832)\b", t)
        if m:
            shapes[("w", {"16816": 2048, "1688": 1024, "16832": 4096}[m.group(1)])] += 1
    return {
        "instructions": len(body),
        "mma": sum(ops[o] for o in _MMA),
        "mma_macs": [[kind, macs, n] for (kind, macs), n in shapes.items()],
        "global_loads": ops["LDG"] + ops["LDGSTS"],
        "local_ldst": ops["LDL"] + ops["STL"],
        "shared_ldst": ops["LDS"] + ops["STS"] + ops["LDSM"],
        "int_alu": sum(ops[o] for o in _INT),
        "fp_alu": sum(ops[o] for o in _FP),
        "top": ops.most_common(8),
    }


def k_loop(sass: str) -> dict | None:
    """The instruction mix of the K loop: the largest innermost loop (a backward branch with no loop
    inside) holding tensor-core instructions, i.e. one K step of a GEMM kernel for every warp of the
    program. Where a loop encloses it (the forward kernel's tap loop), ``per_outer`` is what that loop
    adds once per iteration around the K loop (index and mask set-up, the pipeline's prologue)."""
    rows = _instructions(sass)
    texts = [t for _, t in rows]

    def body(loop):
        return [t for t in texts[loop[0]:loop[1] + 1] if t]

    with_mma = [lp for lp in _loops(rows) if any(_opcode(t) in _MMA for t in body(lp))]
    innermost = [lp for lp in with_mma if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in with_mma)]
    if not innermost:
        return None
    inner = max(innermost, key=lambda lp: len(body(lp)))
    result = _mix(body(inner))
    around = [o for o in with_mma if o != inner and o[0] <= inner[0] and inner[1] <= o[1]]
    if around:
        outer = min(around, key=lambda lp: lp[1] - lp[0])
        result["per_outer"] = _mix(body(outer))
        result["per_outer"]["instructions"] -= result["instructions"]
    return result


def issue_over_mma(loop: dict, num_warps: int, arch: int, precision: str) -> dict | None:
    """Per K step of one program: the clocks to issue every warp's loop body (4 warp instructions
    per clock per SM) over the clocks the tensor cores need for the loop's multiply-adds. Above 1,
    instruction issue, not the tensor cores, bounds the loop."""
    if not loop or not loop["mma_macs"]:
        return None
    macs = 0
    for kind, macs_one, n in loop["mma_macs"]:
        issuers = max(num_warps // 4, 1) if kind == "wg" else num_warps  # warpgroup vs per-warp MMA
        macs += macs_one * n * issuers
    mma_clk = macs / MAC_PER_CLK_SM[(arch, precision)]
    issue_clk = loop["instructions"] * num_warps / 4
    out = {"macs": macs, "mma_clk": round(mma_clk, 1), "issue_clk": round(issue_clk, 1),
           "issue_over_mma": round(issue_clk / mma_clk, 2)}
    if "per_outer" in loop:  # issue clocks the enclosing (tap) loop adds per iteration
        out["outer_issue_clk"] = round(loop["per_outer"]["instructions"] * num_warps / 4, 1)
    return out
