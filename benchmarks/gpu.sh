#!/usr/bin/env bash
# Every GPU check in one go (< 5 minutes on one H100): the CUDA-only tests (flex attention vs math), then the
# GPU benchmarks at the real Gemma 2 shapes. Prints a summary; JSON lands in runs/gpu/bench/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$PY" -m pytest -q -m gpu tests
"$PY" -m benchmarks.run --gpu --work runs/gpu --only teacher student "$@"
