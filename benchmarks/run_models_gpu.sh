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
# "--layers 2"), PARALLEL (processes at once, default 4: compiles overlap, timed calls never do).
# Writes models.json, models.log, models.md (tables) and, where matplotlib is installed,
# models_speedup.png and models_memory.png.
#
# Stages (one process per model and contender). The stages other than 4 and 8 run as one
# models.py call, so that processes of different stages share batches:
#   1  8B-shaped Llama (4 layers), r=384, bf16 base + fp32 adapters: inference and training step
#   2  the same, all-bf16
#   3  the same as 1 at r=16
#   4  stage 1's cases with torch.compile on dora_fused's one-graph trace (inductor_polyfill)
#   5  r=384, fp32 adapters: gradient accumulation (4 micro-batches), gradient checkpointing
#   6  Qwen2-VL-7B-shaped (4 layers, 4 vision blocks), image + text: inference and training step
#   7  r=64 with fp32 adapters, r=16 all-bf16 (the merged model is the same at every rank: not rerun)
#   8  all 32 layers, each decoder layer compiled on its own (--compile-scope block), one process at
#      a time: inference and training with checkpointing (time and peak memory of the full model)
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
  [7]="$L-r64-fp32ad-*,$L-r16-bf16-*"
  [8]="$L-full-*"
)
declare -A WHO=(
  [1]=$ALL [2]=$ALL [3]=$ALL [4]=inductor_polyfill [5]=dora_fused,inductor,peft_eager,lora_inductor
  [6]=$ALL [7]=dora_fused,inductor,peft_eager,lora_inductor [8]=peft_eager,dora_fused,inductor,lora_inductor
)
PARALLEL=${PARALLEL:-4}

run() {  # run <label> <cases> <contenders> <more models.py arguments...>
  local label=$1 cases=$2 who=$3 left
  shift 3
  left=$((DEADLINE - $(date +%s)))
  if [ "$left" -lt 30 ]; then
    echo "== $label not started: time budget spent" | tee -a "$LOG"
    return
  fi
  echo "== $label ($left s left): $cases × $who" | tee -a "$LOG"
  # shellcheck disable=SC2086  # EXTRA is a list of arguments
  $PYTHON benchmarks/models.py --out "$RESULTS" --resume --time-budget "$left" \
    --cases "$cases" --contenders "$who" "$@" $EXTRA 2>&1 | tee -a "$LOG"
}

STAGES=("$@")
if [ ${#STAGES[@]} -eq 0 ]; then STAGES=(1 2 3 5 6 7 8); fi
# The stages but 4 and 8 as one call: each of its processes runs the cases of every stage given
# for its (model, rank, adapters) group with its contender, for every contender any of them lists.
packed_cases="" packed_who="" packed=""
for stage in "${STAGES[@]}"; do
  case $stage in
    4 | 8) ;;
    *)
      packed="$packed $stage"
      packed_cases="${packed_cases:+$packed_cases,}${CASES[$stage]}"
      packed_who="${packed_who:+$packed_who,}${WHO[$stage]}"
      ;;
  esac
done
packed_who=$(echo "$packed_who" | tr , '\n' | awk '!seen[$0]++' | paste -sd, -)
if [ -n "$packed" ]; then run "stages$packed" "$packed_cases" "$packed_who" --parallel "$PARALLEL"; fi
for stage in "${STAGES[@]}"; do
  case $stage in
    4) run "stage 4" "${CASES[4]}" "${WHO[4]}" --parallel "$PARALLEL" ;;
    8) run "stage 8" "${CASES[8]}" "${WHO[8]}" --compile-scope block --parallel 1 ;;
  esac
done

$PYTHON benchmarks/models_table.py "$RESULTS" --out "$OUT/models.md" && cat "$OUT/models.md"
$PYTHON benchmarks/plot_models.py "$RESULTS" --out "$OUT/models" || echo "no plots (matplotlib missing?)"
