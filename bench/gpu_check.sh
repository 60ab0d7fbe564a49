#!/usr/bin/env bash
# One command for the first GPU (issue 15; docs/gpu.md): build, GPU tests, bench, one JSON.
#
#   bench/gpu_check.sh              on a CUDA machine (H100/H200: within 8 minutes)
#   bench/gpu_check.sh --dry-run    here, on the CPU: every step but the GPU parts, at tiny sizes
#
# Steps: build fastlrp._C (CUDA for sm_80/sm_90) and link it into python/; the device, its capability
# and the native kernels' probe; the static Triton checks (CI subset); the GPU-marked tests and
# tests/triton on the device; bench/bench_lrp.py at batch 64 for resnet50, vgg16 and r3d_18 in float32
# and bfloat16, every fastlrp backend plus Zennit and the gradient. Writes
# bench/results/gpu-check-<device>-<date>.json (or --out FILE) and prints a short table last.
# Environment: PYTHON (default .venv/bin/python, else python3), FASTLRP_TRITON_TUNE (default 0 here:
# the Triton kernels run their first choosable config untuned, since autotuning benchmarks every config for every
# layer shape, minutes per model; set 1 to time the autotuned kernels), STEP_TIMEOUT (seconds, 300;
# STEP_TIMEOUT_DRY for --dry-run, 900).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=0
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    *) echo "usage: bench/gpu_check.sh [--dry-run] [--out FILE]" >&2; exit 2 ;;
  esac
  shift
done
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3)
export PYTHONPATH="$ROOT/python:$ROOT"
export FASTLRP_TRITON_TUNE=${FASTLRP_TRITON_TUNE:-0}
export FASTLRP_TRITON_CACHE=${FASTLRP_TRITON_CACHE:-$ROOT/build/gpu-check-choices.json}
STEP_TIMEOUT=${STEP_TIMEOUT:-300}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
: > "$WORK/steps.tsv"

step() {  # step NAME COMMAND...: run with a timeout, log its exit code and seconds, go on either way
  local name=$1; shift
  local start=$SECONDS
  echo "== $name: $*"
  timeout "$STEP_TIMEOUT" "$@" > "$WORK/$name.log" 2>&1
  local code=$?
  printf '%s\t%s\t%s\n' "$name" "$code" "$((SECONDS - start))" >> "$WORK/steps.tsv"
  tail -n 5 "$WORK/$name.log"
  return 0
}

if [ "$DRY" = 1 ]; then
  DEVICE=cpu
  BENCH_SIZES=(--device cpu --batch 1 --size 32 --video-batch 1 --video-size 32 --frames 4 --warmup 1 --repeats 1
               --no-memory)
  COMPOSITES=(epsilon_plus)
  PROVIDERS=(fastlrp:native)
  TESTS=(tests/test_gpu_fallback.py)
  STEP_TIMEOUT=${STEP_TIMEOUT_DRY:-900}  # a shared, loaded CPU: a bench step took 5 minutes here
  echo "dry run: no build (the extension in place is used), no GPU tests, CPU bench at tiny sizes"
else
  DEVICE=cuda
  BENCH_SIZES=(--gpu --batch 64 --cuda-events --warmup 3 --repeats 10)
  COMPOSITES=(epsilon_plus epsilon_gamma_box)
  PROVIDERS=(fastlrp:triton fastlrp:native fastlrp:reference)
  TESTS=(tests/triton tests/test_gpu_fallback.py tests/test_ops.py tests/test_native_engine.py -m "gpu or not gpu")
  export PY
  # the installed package's _C, linked into the source tree that PYTHONPATH points at
  step build bash -c '"$PY" -m pip install . -q &&
    ln -sf "$(cd / && PYTHONPATH= "$PY" -c "import fastlrp._C as c; print(c.__file__)")" python/fastlrp/'
fi

step device "$PY" - "$DEVICE" "$WORK/device.json" <<'PY'
import json, subprocess, sys
import torch
from fastlrp import _native
device = torch.device(sys.argv[1])
info = {"device": str(device), "torch": torch.__version__, "cuda_runtime": torch.version.cuda}
try:
    import triton
    info["triton"] = triton.__version__
except ImportError:
    info["triton"] = None
info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
info["dirty"] = bool(subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout.strip())
try:
    info["build"] = _native.build_info()
except ImportError as e:
    info["build"] = str(e)
if device.type == "cuda":
    info["name"] = torch.cuda.get_device_name(device)
    info["capability"] = list(torch.cuda.get_device_capability(device))
    info["native_cuda_kernels"] = _native.cuda_kernels_usable(device)
json.dump(info, open(sys.argv[2], "w"), indent=1)
print(json.dumps(info))
if device.type == "cuda" and not info["native_cuda_kernels"]:
    sys.exit(1)
PY

step static "$PY" -m bench.gpu_static.check --ci --jobs 4 --out "$WORK/static.json"
step tests "$PY" -m pytest -q -x "${TESTS[@]}"
for dtype in float32 bfloat16; do
  step "bench-$dtype" "$PY" bench/bench_lrp.py "${BENCH_SIZES[@]}" --dtype "$dtype" \
    --models resnet50 vgg16 r3d_18 --composites "${COMPOSITES[@]}" \
    --providers "${PROVIDERS[@]}" --name "bench-$dtype" --out "$WORK"
  for f in "$WORK"/bench-"$dtype"-*.json; do [ -e "$f" ] && mv "$f" "$WORK/bench-$dtype.json"; done
done

if [ -z "$OUT" ]; then
  NAME=$( [ "$DRY" = 1 ] && echo dry-run-cpu || "$PY" -c "import torch, re; \
print(re.sub(r'[^A-Za-z0-9]+', '-', torch.cuda.get_device_name()).strip('-').lower())" 2>/dev/null || echo cuda)
  OUT="bench/results/gpu-check-$NAME-$(date +%Y%m%d-%H%M%S).json"
fi
"$PY" -m bench.gpu_static.gpu_check_report "$WORK" "$OUT"
code=$?
echo "wrote $OUT"
exit $code
