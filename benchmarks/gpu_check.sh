#!/usr/bin/env bash
# GPU readiness check for one NVIDIA GPU, at most ~8 minutes: one table (benchmarks/bench_gpu.py).
#   bash benchmarks/gpu_check.sh            # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --dry-run  # tiny sizes on the CPU: the same code path
# On the lent device machine the project runs from the copied tree: PYTHONPATH=. and its
# python3 (CUDA PyTorch); MONAI and the other missing packages travel as wheels in .whl/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH=".:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
if [ "${1:-}" != "--dry-run" ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec timeout 480 "$PY" benchmarks/bench_gpu.py "$@" ${OUT:+--json "$OUT/gpu.json"}
