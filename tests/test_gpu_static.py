"""Static GPU checks in CI, without a GPU: the Triton kernels compiled ahead of time for sm_90 and sm_80
(bench/gpu_static, the CI subset; the full sweep is a bench command, docs/gpu.md).

Runs in a subprocess because the test session sets TRITON_INTERPRET=1, under which Triton builds no
compilable kernels. Fails on a compile error, a ptxas warning, or a config the autotuner may choose that
spills or needs more shared memory than the target has."""

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
    assert {(90, "forward"), (90, "relevance"), (90, "pool"), (80, "forward"), (80, "relevance")} <= kinds
    for r in records:
        assert r["status"] == "ok" and r["regs"] > 0
        if r["kernel"] != "pool":
            assert r["choosable"] and r["local_bytes"] == 0 and r["smem_fits"]
    # the GEMM kernels' K loops use the tensor cores on sm_90 (wgmma), and the counts are read from SASS
    hopper = [r for r in records if r["arch"] == 90 and r["kernel"] != "pool"]
    assert all(r["k_loop"] and r["k_loop"]["mma"] > 0 for r in hopper)
