#!/usr/bin/env bash
# Runs the benchmarks in bench/ and appends one dated section to bench/RESULTS.md: machine, commit, versions,
# then each stage's output verbatim. On a machine without CUDA the scripts run their CPU parts and say that the
# GPU figures are missing; nothing is invented.
#
# Usage: [PYTHON=python3] [STAGE_TIMEOUT=s] bash bench/run_all.sh [STAGE ...]
#   stages, in this order by default: compile tests routing kd_loss attention grouped_gemm sweep step
#     compile       bench/compile_sm90.py: registers, spills, shared memory of every kernel for sm_90 (no GPU)
#     tests         tests/test_gpu_kernels.py + test_gpu_attention.py + grouped GEMM's CUDA test, compiled (GPU only): bf16 vs fp32 references, no host sync, graph
#     routing, kd_loss, attention, grouped_gemm, step   bench/bench_<stage>.py
#     sweep         bench/bench_grouped_gemm.py --sweep (GPU): candidate block sizes against the dense matmul
#   STAGE_TIMEOUT bounds each stage (default 1800 s); a stage that runs out says so and the next one starts.
#   Where $OUT is set (the device machine), the section is also written to $OUT/RESULTS.section.md, since
#   the working tree there does not come back.
#
# On a lent H200 (one `run` is at most 600 s, 30 min of device time per session), two calls cover the kernels:
#   COMMIT=<hash> PYTHON=python3 STAGE_TIMEOUT=280 bash bench/run_all.sh compile tests routing kd_loss
#   COMMIT=<hash> PYTHON=python3 STAGE_TIMEOUT=280 bash bench/run_all.sh attention   (bench_attention.py: its own call)
#   COMMIT=<hash> PYTHON=python3 STAGE_TIMEOUT=270 bash bench/run_all.sh grouped_gemm sweep
# then append each $OUT/RESULTS.section.md to bench/RESULTS.md here and commit it. `step --scale gpu` writes
# ~40 GB of random HF weights first: a call of its own, if the lease has time left.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || command -v "$PY" >/dev/null || PY=python3
LIMIT=${STAGE_TIMEOUT:-1800}
STAGES=("$@")
[ ${#STAGES[@]} -gt 0 ] || STAGES=(compile tests routing kd_loss attention grouped_gemm sweep step)
for s in "${STAGES[@]}"; do
  case $s in compile|tests|routing|kd_loss|attention|grouped_gemm|sweep|step) ;;
    *) echo "unknown stage '$s': choose from compile tests routing kd_loss attention grouped_gemm sweep step" >&2; exit 2 ;;
  esac
done
RESULTS=bench/RESULTS.md
tmp=$(mktemp)

stage() {  # stage TITLE COMMAND...: one fenced block with the command's output, bounded by $LIMIT
  local title=$1; shift
  echo
  echo "### $title"
  echo
  echo '```'
  PYTHONPATH=. timeout "$LIMIT" "$@" 2>&1 | grep -v -E "^(Writing|Loading) |UserWarning|warn_once"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 124 ] && echo "(stopped after STAGE_TIMEOUT=${LIMIT} s)"
  [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && echo "(exit code $rc)"
  echo '```'
}

{
  echo
  if git rev-parse --git-dir >/dev/null 2>&1; then
    commit="$(git rev-parse --short HEAD)$(git diff --quiet || echo '+dirty')"
  else
    commit=${COMMIT:-unknown}  # a copied tree without .git (the device machine): pass COMMIT=<hash>
  fi
  echo "## $(date -u +%Y-%m-%dT%H:%MZ) — commit $commit — stages: ${STAGES[*]}"
  echo
  "$PY" - <<'PYEOF'
import platform, torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = "not installed"
try:
    import transformers; hv = transformers.__version__
except ImportError:
    hv = "not installed"
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU only: GPU figures missing)"
print(f"- machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads; GPU: {gpu}")
print(f"- torch {torch.__version__}, triton {tv}, transformers {hv}, python {platform.python_version()}")
PYEOF
  has_cuda=0
  "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" && has_cuda=1
  for s in "${STAGES[@]}"; do
    case $s in
      compile) stage "compile_sm90.py (static: Triton's sm_90 build of every kernel)" "$PY" bench/compile_sm90.py ;;
      tests)
        if [ $has_cuda = 1 ]; then
          stage "GPU kernel tests (tests/test_gpu_kernels.py: bf16 vs fp32 references, no host sync, CUDA graph)" \
            env TRITON_INTERPRET=0 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py \
            tests/test_gpu_attention.py tests/test_grouped_gemm.py::test_cuda_matches_ref_without_host_sync
        else
          printf '\n### GPU kernel tests (tests/test_gpu_kernels.py)\n\n```\nskipped: no CUDA device (GPU figures missing)\n```\n'
        fi ;;
      sweep) stage "bench_grouped_gemm.py --sweep" "$PY" bench/bench_grouped_gemm.py --sweep ;;
      *) stage "bench_$s.py" "$PY" "bench/bench_$s.py" ;;
    esac
  done
} | tee "$tmp"
cat "$tmp" >> "$RESULTS"
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then cp "$tmp" "$OUT/RESULTS.section.md"; fi
rm -f "$tmp"
echo "appended to $RESULTS"
