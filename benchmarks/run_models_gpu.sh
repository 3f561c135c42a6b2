#!/usr/bin/env bash
# Model-level benchmarks (benchmarks/models.py) on one GPU: the most important cases first, all
# stages sharing one time budget, every result appended to $OUT/models.json as soon as measured.
#
#   OUT=/some/dir bash benchmarks/run_models_gpu.sh              # stages 1..8 in order until BUDGET is spent
#   OUT=/some/dir PREVIOUS=old/models.json bash benchmarks/run_models_gpu.sh   # continue an earlier run
#   bash benchmarks/run_models_gpu.sh 2 3                         # only these stages
#
# Environment: OUT (results folder; default ./bench-out), BUDGET (seconds for everything; default
# 540, inside a 10-minute command limit), PREVIOUS (an earlier models.json: its good rows are kept
# and not measured again), PYTHON (default python3), EXTRA (more models.py arguments, e.g.
# "--layers 2"). Writes models.json, models.log, models.md (tables) and, where matplotlib is
# installed, models_speedup.png and models_memory.png.
#
# Stages (each contender of a stage in its own process, one process per model and contender):
#   1  8B-shaped Llama (4 layers), r=384, bf16 base + fp32 adapters: inference and training step
#   2  the same, all-bf16
#   3  the same as 1 at r=16
#   4  stage 1's cases with torch.compile on dora_fused's one-graph trace (inductor_polyfill)
#   5  r=384, fp32 adapters: gradient accumulation (4 micro-batches), gradient checkpointing
#   6  Qwen2-VL-7B-shaped (4 layers, 4 vision blocks), image + text: inference and training step
#   7  the remaining ranks and dtypes (r=64; r=16 and r=64 all-bf16)
#   8  all 32 layers: inference and training with checkpointing (peak memory of the full model)
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-bench-out}
BUDGET=${BUDGET:-540}
EXTRA=${EXTRA:-}
RESULTS=$OUT/models.json
LOG=$OUT/models.log
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
if [ -n "${PREVIOUS:-}" ] && [ ! -e "$RESULTS" ]; then cp "$PREVIOUS" "$RESULTS"; fi
DEADLINE=$(($(date +%s) + BUDGET))

# dora_fused itself, where the image lacks it (no network there: no build isolation, no dependencies)
$PYTHON -c "import dora_fused" 2>/dev/null || $PYTHON -m pip install -q --no-deps --no-build-isolation -e . || exit 1

ALL=dora_fused,inductor,peft_eager,lora_inductor,merged
L=llama8b
declare -A CASES=(
  [1]="$L-r384-fp32ad-infer,$L-r384-fp32ad-train"
  [2]="$L-r384-bf16-infer,$L-r384-bf16-train"
  [3]="$L-r16-fp32ad-infer,$L-r16-fp32ad-train"
  [4]="$L-r384-fp32ad-infer,$L-r384-fp32ad-train"
  [5]="$L-r384-fp32ad-train-accum4,$L-r384-fp32ad-train-gc"
  [6]="qwen2vl7b-r384-fp32ad-infer,qwen2vl7b-r384-fp32ad-train"
  [7]="$L-r64-*,$L-r16-bf16-*"
  [8]="$L-full-*"
)
declare -A WHO=(
  [1]=$ALL [2]=$ALL [3]=$ALL [4]=inductor_polyfill [5]=dora_fused,inductor,peft_eager,lora_inductor
  [6]=$ALL [7]=$ALL [8]=peft_eager,dora_fused,inductor,lora_inductor
)

STAGES=("$@")
if [ ${#STAGES[@]} -eq 0 ]; then STAGES=(1 2 3 4 5 6 7 8); fi
for stage in "${STAGES[@]}"; do
  left=$((DEADLINE - $(date +%s)))
  if [ "$left" -lt 30 ]; then
    echo "== stage $stage not started: time budget spent" | tee -a "$LOG"
    continue
  fi
  echo "== stage $stage ($left s left): ${CASES[$stage]} × ${WHO[$stage]}" | tee -a "$LOG"
  # shellcheck disable=SC2086  # EXTRA is a list of arguments
  $PYTHON benchmarks/models.py --out "$RESULTS" --resume --time-budget "$left" \
    --cases "${CASES[$stage]}" --contenders "${WHO[$stage]}" $EXTRA 2>&1 | tee -a "$LOG"
done

$PYTHON benchmarks/models_table.py "$RESULTS" --out "$OUT/models.md" && cat "$OUT/models.md"
$PYTHON benchmarks/plot_models.py "$RESULTS" --out "$OUT/models" || echo "no plots (matplotlib missing?)"
