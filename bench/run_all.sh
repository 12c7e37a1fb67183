#!/usr/bin/env bash
# Runs every benchmark in bench/ and appends one dated section to bench/RESULTS.md: machine, commit, versions,
# then each script's table verbatim. On a machine without CUDA the scripts run their CPU parts and say that the
# GPU figures are missing; nothing is invented. Usage: bash bench/run_all.sh [PYTHON]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${1:-${PYTHON:-.venv/bin/python}}
[ -x "$PY" ] || PY=python3
OUT=bench/RESULTS.md
tmp=$(mktemp)
{
  echo
  echo "## $(date -u +%Y-%m-%dT%H:%MZ) — commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo '+dirty')"
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
  echo
  echo "### GPU kernel tests (tests/test_gpu_kernels.py: bf16 vs fp32 references, no host sync, CUDA graph)"
  echo
  echo '```'
  if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    TRITON_INTERPRET=0 timeout 1200 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py 2>&1 | tail -n 15
  else
    echo "skipped: no CUDA device (GPU figures missing)"
  fi
  echo '```'
  for b in bench/bench_routing.py bench/bench_grouped_gemm.py bench/bench_kd_loss.py bench/bench_step.py; do
    echo
    echo "### $(basename "$b")"
    echo
    echo '```'
    if [ -f "$b" ]; then
      PYTHONPATH=. timeout 1800 "$PY" "$b" 2>&1 | grep -v -E "^(Writing|Loading) " || echo "(exit code $?)"
    else
      echo "(missing: $b)"
    fi
    echo '```'
  done
} | tee "$tmp"
cat "$tmp" >> "$OUT"
rm -f "$tmp"
echo "appended to $OUT"
