"""Static GPU checks in CI, without a GPU: the Triton kernels compiled ahead of time for sm_90 and sm_80
(bench/gpu_static, the CI subset; the full sweep is a bench command, docs/gpu.md).

Runs in a subprocess because the test session sets TRITON_INTERPRET=1, under which Triton builds no
compilable kernels. Fails on a compile error, a ptxas warning, or a config the autotuner may choose (or the
untuned path may run) that spills, needs more shared memory than the target has, or whose K loop is over
the issue target (issue/MMA <= 2)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def _nvidia_tools_present() -> bool:
    try:
        from triton.backends.nvidia import compiler
    except ImportError:
        return False
    return all((Path(compiler.__file__).parent / "bin" / tool).exists() for tool in ("ptxas", "cuobjdump", "nvdisasm"))


@pytest.mark.skipif(not _nvidia_tools_present(), reason="this Triton has no NVIDIA backend tools (ptxas, cuobjdump)")
def test_triton_kernels_compile_for_sm90_and_sm80_within_their_limits(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "python"), str(ROOT)])
    env.setdefault("TRITON_CACHE_DIR", str(Path.home() / ".cache" / "fastlrp" / "triton-aot"))
    out = tmp_path / "static.json"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_static.check", "--ci", "--jobs", "2", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    summary, records = result["summary"], result["records"]
    assert summary["failures"] == [], "\n".join(summary["failures"])
    assert proc.returncode == 0, proc.stdout[-3000:]
    kinds = {(r["arch"], r["kernel"]) for r in records}
    assert {(90, "forward"), (90, "pool"), (80, "forward")} <= kinds
    assert all(r["status"] == "ok" and r["regs"] > 0 for r in records)
    gemms = [r for r in records if r["kernel"] != "pool"]
    for variant in {(r["arch"], r["variant"]) for r in gemms}:  # each variant keeps a config the tuner may pick
        assert any(r.get("choosable") for r in gemms if (r["arch"], r["variant"]) == variant), variant
    for r in gemms:
        if r.get("choosable"):
            assert r["local_bytes"] == 0 and r["smem_fits"], r["id"]
    # the forward kernel's K loop uses the tensor cores on sm_90 (wgmma), read from SASS
    hopper = [r for r in gemms if r["arch"] == 90]
    assert all(r["k_loop"] and r["k_loop"]["mma"] > 0 for r in hopper)
    # no config the tuner may pick, or the untuned path may run, is over the issue target (issue/MMA <= 2);
    # the safe tile only where nothing else is choosable: the signed-input Gamma takes 64x64x32 on 8 warps
    # on sm_90, the others 64x64x32 on 4 warps
    from fastlrp.kernels import affine_lrp
    for r in gemms:
        assert r.get("choosable") or not r.get("untuned"), r["id"]
        if r.get("choosable") and r["launched"]:
            assert r["estimate"]["issue_over_mma"] <= 2.0, (r["id"], r["estimate"])
    untuned = {(r["arch"], r["variant"]): affine_lrp.CONFIG_SHAPES[r["config"]] for r in gemms if r.get("untuned")}
    assert untuned[(90, "r50_3x3s1_64/gamma/nn0")] == (64, 64, 32, 8, 3)
    assert untuned[(90, "r50_3x3s2_128/zplus/nn1")] == untuned[(90, "r50_fc_2048/epsilon/nn0")] == (64, 64, 32, 4, 4)
