#!/usr/bin/env bash
# The one-shot GPU check: every GPU-only check and measurement of fastsae in one call, on a bare
# machine without network (H200, Python 3.12, torch 2.11, triton 3.6), in about 8 minutes.
#
#   bench/gpu_check.sh [--tiny] [--wheels DIR] OUT_DIR
#
# Phases, each under its own timeout, each writing its results before the next starts:
#   a) install the wheels in DIR (default: ./wheels, if present) without network, build the CUDA
#      extension for sm_90 in the background (build.log)
#   b) every kernel against the reference on the GPU (junit.xml): bench/gpu/test_gpu_kernels.py
#      and tests/ops/test_kernels_gpu.py; then the sm_90 compile check of every config (compile.txt)
#   c) the TopK encoder: GEMM alone, mm + topk, fused, chunked (bf16, d 768/4096, d_sae 2^17/2^20,
#      B 4096/16384, k 32), TFLOP/s and fractions of the GEMM
#   d) a bf16 training step at d=768, d_sae=2^17, k=32, B=16384: fastsae, sparsify, SAELens, dense
#   e) the widest d_sae that trains at d=4096 (probes in fresh processes)
# OUT_DIR gets at most 8 files: summary.md, results.json, junit.xml, gpu_check.log, build.log,
# compile.txt (and results.json.tmp for an instant while it is rewritten).
#
# --tiny: the dry run on CPU (Triton interpreter, toy sizes, no install, no build); the test
# suite runs it so that this script never rots.
set -u -o pipefail

TINY=0
WHEELS=""
while [ $# -gt 1 ]; do
  case "$1" in
    --tiny) TINY=1; shift ;;
    --wheels) WHEELS="$2"; shift 2 ;;
    *) echo "usage: bench/gpu_check.sh [--tiny] [--wheels DIR] OUT_DIR" >&2; exit 2 ;;
  esac
done
[ $# -eq 1 ] || { echo "usage: bench/gpu_check.sh [--tiny] [--wheels DIR] OUT_DIR" >&2; exit 2; }
OUT="$(mkdir -p "$1" && cd "$1" && pwd)"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python3}"
LOG="$OUT/gpu_check.log"
: > "$LOG"
: > "$OUT/summary.md"
rm -f "$OUT/results.json"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if [ "$TINY" = 1 ]; then
  export FASTSAE_GPU_CHECK_TINY=1 TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  # phase timeouts (seconds): a b c d e
  T_A=60 T_B=300 T_C=120 T_D=200 T_E=200 T_PROC=180  # generous: shared CPUs are slow
else
  T_A=150 T_B=150 T_C=150 T_D=120 T_E=90 T_PROC=45
fi
START=$(date +%s)
FAILED=""

log() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# phase NAME TIMEOUT CMD...: run CMD under its timeout, log its output, note a failure
phase() {
  local name="$1" limit="$2"; shift 2
  log "phase $name (timeout ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  if [ $rc -ne 0 ]; then
    FAILED="$FAILED $name"
    [ $rc -eq 124 ] && log "phase $name TIMED OUT after ${limit}s" || log "phase $name failed (exit $rc)"
  else
    log "phase $name done"
  fi
  return 0
}

# ---------------------------------------------------------------- (a) install, build
install_wheels() {
  local dir="${WHEELS:-$REPO/wheels}"
  if [ ! -d "$dir" ]; then echo "no wheel directory $dir: the peers already installed (or absent) are used"; return 0; fi
  # --no-deps per wheel: the machine's torch/triton stay as they are; the dependencies are in DIR too
  "$PY" -m pip install --no-index --no-deps --find-links "$dir" "$dir"/*.whl
}
BUILD_PID=""
if [ "$TINY" = 1 ]; then
  log "phase a: --tiny, no wheels installed, no CUDA build"
  echo "tiny dry run: no build" > "$OUT/build.log"
else
  phase a "$T_A" install_wheels
  log "building fastsae._C for sm_90 in the background (build.log)"
  ( FASTSAE_CUDA_ARCHITECTURES=90 "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 ) &
  BUILD_PID=$!
fi
"$PY" -m bench.gpu.phases env --out "$OUT" >> "$LOG" 2>&1 || FAILED="$FAILED env"

# ---------------------------------------------------------------- (b) correctness
wait_build() {
  [ -n "$BUILD_PID" ] || return 0
  log "waiting for the CUDA build (pid $BUILD_PID)"
  wait "$BUILD_PID" && log "CUDA build done" || { log "CUDA build FAILED (see build.log)"; FAILED="$FAILED build"; }
  BUILD_PID=""
  "$PY" -m bench.gpu.phases env --out "$OUT" >> "$LOG" 2>&1 || true  # now with the extension
}
if [ "$TINY" = 1 ]; then  # nothing builds: one pytest run
  phase b "$T_B" "$PY" -m pytest -q -p no:cacheprovider bench/gpu/test_gpu_kernels.py --junitxml="$OUT/junit.xml"
else
  # the kernel tests that do not need the extension run while it builds; the rest after
  phase b1 "$T_B" "$PY" -m pytest -q -p no:cacheprovider bench/gpu/test_gpu_kernels.py tests/ops/test_kernels_gpu.py \
    -k "not backward and not training_step and not implementation_table" --junitxml="$OUT/junit.xml"
  wait_build
  phase b2 "$T_B" "$PY" -m pytest -q -p no:cacheprovider bench/gpu/test_gpu_kernels.py \
    -k "backward or training_step or implementation_table" --junitxml="$OUT/junit-b2.xml"
  "$PY" - "$OUT" >> "$LOG" 2>&1 <<'PYEOF' || true
# one junit.xml: the second run's suite appended to the first's
import sys, xml.etree.ElementTree as ET
out = sys.argv[1]
try:
    a, b = ET.parse(f"{out}/junit.xml"), ET.parse(f"{out}/junit-b2.xml")
    root = a.getroot()
    for suite in b.getroot().iter("testsuite"):
        root.append(suite)
    a.write(f"{out}/junit.xml")
except (OSError, ET.ParseError) as e:
    print("junit merge:", e)
PYEOF
fi
rm -f "$OUT/junit-b2.xml"
"$PY" - "$OUT" >> "$LOG" 2>&1 <<'PYEOF' || true
import sys, xml.etree.ElementTree as ET
from bench.gpu import record
out = sys.argv[1]
cases = []
for case in ET.parse(f"{out}/junit.xml").getroot().iter("testcase"):
    state = "failed" if case.find("failure") is not None or case.find("error") is not None else \
        "skipped" if case.find("skipped") is not None else "passed"
    cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "state": state})
n = {s: sum(c["state"] == s for c in cases) for s in ("passed", "failed", "skipped")}
bad = "\n".join(f"- {c['test']}" for c in cases if c["state"] == "failed")
record(out, "kernels", {"counts": n, "cases": cases},
       f"## (b) kernels against the reference: {n['passed']} passed, {n['failed']} failed, {n['skipped']} skipped\n\n"
       + (bad or "no failure"))
PYEOF
if [ "$TINY" = 1 ]; then  # slow on CPU; make test-triton36 and tests/ops/test_kernels_bench.py run it
  log "compile check: skipped in --tiny"
else
  phase compile 120 env -u TRITON_INTERPRET "$PY" bench/kernels_sm90_compile.py --jobs 16 --out "$OUT/compile.txt"
fi

# ---------------------------------------------------------------- (c) (d) (e) measurements
phase c "$T_C" "$PY" -m bench.gpu.phases encoder --out "$OUT"
phase d "$T_D" "$PY" -m bench.gpu.phases step --out "$OUT" --timeout "$T_PROC"
phase e "$T_E" "$PY" -m bench.gpu.phases widest --out "$OUT" --timeout "$T_PROC"

END=$(( $(date +%s) - START ))
{
  echo "## Run"
  echo
  echo "total ${END}s; phases failed or timed out:${FAILED:- none}"
} >> "$OUT/summary.md"
log "done in ${END}s; failed:${FAILED:- none}"
[ -z "$FAILED" ]
