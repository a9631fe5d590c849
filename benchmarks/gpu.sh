#!/usr/bin/env bash
# Every GPU check in one go, within a 7-minute budget on one H100 (GPU_BUDGET_S; each part gets what is left,
# up to its own cap, so a slow part cannot eat the whole budget). In order:
#   1. the CUDA tests (pytest -m gpu): compiled flex forward + backward vs math with document masks, sliding
#      window and soft-caps; bf16 autocast with gradient checkpointing; compiled block mask == eager at 8 × 4096;
#   2. benchmarks/gpu_checks.py: a gemma-2-2b-shape student step (bf16, compiled flex forward + backward,
#      gradient checkpointing): tokens/s and peak memory; the document block mask at 8 × 4096 compiled vs
#      eager; stage-one targets at batch 1 vs 8 compared byte for byte; compiled graphs over capture batch
#      sizes 1 .. CAPTURE_BATCH + 1 (the last batch padded); the head at the 27B's shape before / after
#      issue 21's fix (peak / one float32 chunk buffer, target ≤ 1.8);
#   3. benchmarks/head_memory.py: stage one's head peak memory at chunk 2048 × vocab 256000;
#   4. benchmarks/gpu_checks.py --only data_wait: real 2B optimizer steps at grad_accum 16 × batch 2 × 4096 fed by
#      the streaming reader from a synthetic cache of the recipe's shape: the share of a step spent waiting for data;
#   5. the teacher (gemma-2-2b, gemma-2-9b at SEQ_LEN 4096) and student-step (2B) benchmarks.
# A failing or overrunning part does not stop the next; the script exits 1 if any failed. JSON in $WORK/bench.
#   benchmarks/gpu.sh          on a GPU
#   benchmarks/gpu.sh --toy    parts 1-3 at toy sizes on the CPU (checks the script runs; measures nothing)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
WORK=${WORK:-runs/gpu}
TOY=""
[ "${1:-}" = "--toy" ] && TOY="--toy"
BUDGET=${GPU_BUDGET_S:-420}
failed=()

# part NAME CAP_SECONDS COMMAND...: one part under min(CAP, budget left); SIGINT first, so Python says where it was.
part() {
  local name=$1 cap=$2 start=$SECONDS
  shift 2
  local limit=$((BUDGET - SECONDS < cap ? BUDGET - SECONDS : cap))
  echo; echo "=== $name (limit ${limit} s): $*"
  if [ "$limit" -lt 10 ]; then
    failed+=("$name (skipped: the ${BUDGET} s budget is spent)")
    return
  fi
  timeout --signal=INT --kill-after=15 "$limit" "$@" || failed+=("$name (exit $?)")
  echo "=== $name took $((SECONDS - start)) s"
}

if [ -z "$TOY" ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

part "pytest -m gpu" 120 "$PY" -m pytest -q -m gpu tests
part "gpu_checks" 240 "$PY" -m benchmarks.gpu_checks --work "$WORK" $TOY
part "data wait" 120 "$PY" -m benchmarks.gpu_checks --work "$WORK" --only data_wait $TOY
if [ -z "$TOY" ]; then
  part "head_memory" 45 "$PY" -m benchmarks.head_memory --vocab 256000 --chunk 2048
  part "teacher + student benchmarks" 300 "$PY" -m benchmarks.run --gpu --work "$WORK" --only teacher student
else
  part "head_memory" 60 "$PY" -m benchmarks.head_memory --vocab 4096 --chunk 256
fi

echo
if [ ${#failed[@]} -gt 0 ]; then
  printf 'FAILED: %s\n' "${failed[@]}"
  exit 1
fi
echo "all GPU checks passed in $SECONDS s; JSON in $WORK/bench"
