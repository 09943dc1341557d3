#!/usr/bin/env bash
# The recipe for the heads shipped with the default model (SmolLM2-135M-Instruct). Every stage resumes:
# re-run the same command after a kill or a new session and it continues where it stopped.
#
#   scripts/default_heads.sh distill     # hours on 2 CPU cores; run in the background, log to a file
#   scripts/default_heads.sh train       # Medusa-1 on the first $TRAIN_LIMIT distilled conversations
#   scripts/default_heads.sh ship        # fp16 copy of the trained heads into medusa/default_heads
#   scripts/default_heads.sh calibrate   # tree for this machine from held-out conversations, saved there
#   scripts/default_heads.sh evaluate    # tokens per step on every 10th dev prompt, default 63-node tree
#
# Run it with the project installed (the README set-up; its .venv is used if the shell has none active).
# Data lives outside the repository (MEDUSA_DATA, default ~/medusa-data); the shared prompt pool is at
# ../shared/data. Spec-Bench questions are never used for training.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${MEDUSA_DATA:-$HOME/medusa-data}
SHARED=${MEDUSA_SHARED:-../shared/data}
THREADS=${THREADS:-2}              # the shipped heads and tree: 2 (THREADS=1 to distill beside other work)
TRAIN_LIMIT=${TRAIN_LIMIT:-10000}  # conversations after these are held out for calibration
BATCH=${BATCH:-32}                 # distill slots: 32 on a 2-core CPU; a GPU wants hundreds (BATCH=256)
HEADS=${HEADS:-$DATA/heads}        # training output (a new folder for a new run; link an old features-* in to reuse it)
# bf16 on GPUs and on CPUs that multiply it natively (AVX512-BF16, AMX); fp32 elsewhere, where bf16 is the
# slow one (benchmarks/README.md, "Side-by-side runs": medusa distill)
dtype() {   # $DTYPE if set, else the machine's choice (only the stages that load the base ask for it)
  [ -n "${DTYPE:-}" ] && echo "$DTYPE" || python -c "import torch; from medusa.inference.greedy_head import native_bf16
print('bfloat16' if torch.cuda.is_available() or native_bf16() else 'float32')"
}
# no medusa on the PATH: the README set-up's .venv, so a fresh shell (a new session) need not activate it
command -v medusa >/dev/null || [ ! -x .venv/bin/medusa ] || PATH="$PWD/.venv/bin:$PATH"
command -v medusa >/dev/null || { echo "medusa is not installed: run the README's set-up (or activate its environment)" >&2; exit 2; }
mkdir -p "$DATA"
export OMP_NUM_THREADS=$THREADS

case "${1:-}" in
  distill)
    [ -f "$DATA/distill_prompts.jsonl" ] || medusa compose-prompts --input "$SHARED/train_prompts.jsonl" \
        --output "$DATA/distill_prompts.jsonl" --per-task 500
    # greedy answers in $DTYPE, 256 new tokens at most; 32 slots of continuous batching, the fastest count on
    # a 2-core CPU (benchmarks/README.md, "Side-by-side runs": medusa distill)
    medusa distill --input "$DATA/distill_prompts.jsonl" --output "$DATA/distill_smollm2.jsonl" \
        --max-new-tokens 256 --batch-size "$BATCH" --temperature 0 --dtype "$(dtype)" --threads "$THREADS" ;;
  train)
    DTYPE=$(dtype)
    MIXED=$([ "$DTYPE" = bfloat16 ] && echo bf16 || echo no)
    # shipped heads: 2 blocks, heads that see the next token and their parent's, 1 epoch, lr 2e-3: 1,242 steps
    medusa train --next-token-input --parent-token-input --num-layers 2 --data "$DATA/distill_smollm2.jsonl" \
        --output "$HEADS" --mixed-precision "$MIXED" --base-dtype "$DTYPE" --threads "$THREADS" --batch-size 8 \
        --epochs "${EPOCHS:-1}" --max-length 768 --val-examples 64 --limit "$TRAIN_LIMIT" --lr 2e-3 \
        --checkpoint-every 50 ${TRAIN_ARGS:-} ;;
  ship)
    python - "$HEADS" <<'PY'
import sys, torch
from pathlib import Path
from medusa.inference.checkpoint import build_heads, load_heads_checkpoint, save_heads
from medusa.model import DEFAULT_HEADS_DIR
cfg, state, _ = load_heads_checkpoint(Path(sys.argv[1]))
cfg.extra["training"].update(data="distill_smollm2.jsonl (self-distilled; see README.md)", output="heads")
save_heads(DEFAULT_HEADS_DIR, build_heads(cfg, state), dtype=torch.float16)
PY
    ;;
  calibrate)
    tail -n +"$((TRAIN_LIMIT + 1))" "$DATA/distill_smollm2.jsonl" > "$DATA/heldout.jsonl"
    medusa calibrate --data "$DATA/heldout.jsonl" --limit 24 --budgets 1,2,3,4,6,8,12,16 --rounds 5 --threads "$THREADS" ;;
  evaluate)
    python -c "import sys; sys.stdout.writelines(l for i, l in enumerate(open('$SHARED/dev_prompts.jsonl')) if i % 10 == 0)" \
        > "$DATA/dev20.jsonl"
    medusa evaluate --prompts "$DATA/dev20.jsonl" --limit 20 --tree mc_sim_7b_63 --threads "$THREADS" ;;
  *)
    echo "usage: $0 distill|train|ship|calibrate|evaluate" >&2; exit 2 ;;
esac
