#!/usr/bin/env bash
# The recipe for the heads shipped with the default model (SmolLM2-135M-Instruct). Every stage resumes:
# re-run the same command after a kill or a new session and it continues where it stopped.
#
#   scripts/default_heads.sh distill     # hours on 2 CPU cores; run in the background, log to a file
#   scripts/default_heads.sh train       # Medusa-1 on whatever has been distilled so far
#   scripts/default_heads.sh calibrate   # tree for this machine, saved beside the heads
#   scripts/default_heads.sh evaluate    # per-head accuracy + tokens per step on the dev prompts
#
# Run it with the project installed (. .venv/bin/activate after the README set-up).
# Data lives outside the repository (MEDUSA_DATA, default ~/medusa-data); the shared prompt pool is at
# ../shared/data. Spec-Bench questions are never used for training.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${MEDUSA_DATA:-$HOME/medusa-data}
SHARED=${MEDUSA_SHARED:-../shared/data}
THREADS=${THREADS:-1}
mkdir -p "$DATA"
export OMP_NUM_THREADS=$THREADS

case "${1:-}" in
  distill)
    [ -f "$DATA/distill_prompts.jsonl" ] || medusa compose-prompts --input "$SHARED/train_prompts.jsonl" \
        --output "$DATA/distill_prompts.jsonl" --per-task 500
    # greedy answers, bf16 (AMX makes it ~2x faster than fp32 on this CPU), 256 new tokens at most
    medusa distill --input "$DATA/distill_prompts.jsonl" --output "$DATA/distill_smollm2.jsonl" \
        --max-new-tokens 256 --batch-size 16 --temperature 0 --dtype bfloat16 --threads "$THREADS" ;;
  train)
    medusa train --data "$DATA/distill_smollm2.jsonl" --output "$DATA/heads" --mixed-precision bf16 \
        --base-dtype bfloat16 --threads "$THREADS" --batch-size 8 --epochs "${EPOCHS:-2}" --max-length 768 \
        --val-examples 64 ${TRAIN_ARGS:-} ;;
  calibrate)
    medusa calibrate --model "$DATA/heads" --data "$DATA/distill_smollm2.jsonl" --limit 40 --threads "$THREADS" ;;
  evaluate)
    medusa evaluate --model "$DATA/heads" --prompts "$SHARED/dev_prompts.jsonl" --limit 200 --threads "$THREADS" ;;
  *)
    echo "usage: $0 distill|train|calibrate|evaluate" >&2; exit 2 ;;
esac
