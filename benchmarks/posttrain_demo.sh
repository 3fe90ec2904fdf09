#!/usr/bin/env bash
# The post-training demo of README "Post-training": the README's toy pre-train, SFT on chat
# arithmetic (one run per seed), one round of rejection-sampled SFT and a reward model, each
# evaluated on held-out questions per difficulty level (README, "The demo"), then GRPO from the
# same SFT run over GRPO_SEEDS (default 0 1 2) with the same number of samples as rejection
# sampling, one run with routing replay, and the rollout/trainer gap in bf16 (README, "GRPO").
#
#   bash benchmarks/posttrain_demo.sh [RUNS_DIR] [SEED ...]      # default: runs/posttrain-demo 1 0
#
# Rejection sampling, the reward model and GRPO start from the first seed's SFT run.
#
# A stage whose output exists is skipped (an interrupted training run resumes), so running the
# script again continues the demo.  One line per stage with its wall time; the logs sit in
# RUNS_DIR/logs, the evaluations in RUNS_DIR/results, the figures in RUNS_DIR/summary.md.
set -euo pipefail
RUNS=${1:-runs/posttrain-demo}
shift || true
SEEDS=("$@")
[ ${#SEEDS[@]} -gt 0 ] || SEEDS=(1 0)
RS_STEPS=${RS_STEPS:-100}      # rejection-sampled SFT steps
RM_STEPS=${RM_STEPS:-200}      # reward-model steps
SAMPLES=${SAMPLES:-8}          # samples per held-out question for pass@k
DATA=$RUNS/data
mkdir -p "$RUNS/logs" "$RUNS/results" "$DATA"

stage() {  # NAME OUTPUT COMMAND...: runs COMMAND unless OUTPUT exists, timing it
  local name=$1 output=$2 start
  shift 2
  if [ -e "$output" ]; then
    echo "[$(date -u +%H:%M:%S)] $name: $output exists, skipped"
    return
  fi
  start=$(date +%s)
  echo "[$(date -u +%H:%M:%S)] $name ..."
  "$@" >"$RUNS/logs/$name.log" 2>&1 || { echo "$name failed: see $RUNS/logs/$name.log"; exit 1; }
  echo "[$(date -u +%H:%M:%S)] $name done in $(($(date +%s) - start)) s (load $(cut -d' ' -f1-3 /proc/loadavg))"
}

ladder() {  # RUN NAME: greedy, format rate, pass@1 / pass@8 and spread per level
  stage "eval-$2" "$RUNS/results/$2/results.json" frontier-jax eval --checkpoint "$1" --devices 1 \
    --tasks "$DATA/held_out_lt10.jsonl" chat_arithmetic "$DATA/held_out_mix.jsonl" \
    --out "$RUNS/results/$2" eval.samples="$SAMPLES" eval.max_documents=1
}

# the ladder's held-out sets (chat_arithmetic is the middle level) and the training prompts
stage held-out-lt10 "$DATA/held_out_lt10.jsonl" frontier-jax data arithmetic --split held_out \
  --count 18 --max-operand 9 --max-factor 9 --out "$DATA/held_out_lt10.jsonl"
stage held-out-lt100 "$DATA/held_out_math.jsonl" frontier-jax data arithmetic --split held_out \
  --count 500 --out "$DATA/held_out_math.jsonl"
stage held-out-mix "$DATA/held_out_mix.jsonl" frontier-jax data arithmetic --split held_out \
  --count 500 --max-operations 3 --out "$DATA/held_out_mix.jsonl"
stage rs-prompts "$DATA/rs_prompts.jsonl" frontier-jax data arithmetic --split train \
  --count 2000 --seed 7 --out "$DATA/rs_prompts.jsonl"

stage toy "$RUNS/toy/checkpoints/300" frontier-jax train --config train/toy --run-dir "$RUNS/toy"
for seed in "${SEEDS[@]}"; do
  stage "sft-s$seed" "$RUNS/sft-s$seed/checkpoints/1500" frontier-jax train --config train/sft-toy \
    --run-dir "$RUNS/sft-s$seed" train.init_from="$RUNS/toy" data.seed="$seed" train.seed="$seed"
  ladder "$RUNS/sft-s$seed" "sft-s$seed"
done

# one round of rejection sampling from the first seed's SFT run, on training prompts (none held
# out), with reward-model pairs from the same samples; then pairs from held-out questions
SFT=$RUNS/sft-s${SEEDS[0]}
stage rejection-sample "$DATA/rs_sft.jsonl.summary.json" frontier-jax rejection-sample \
  --checkpoint "$SFT" --prompts "$DATA/rs_prompts.jsonl" --n 8 --rewards math \
  --out "$DATA/rs_sft.jsonl" --max-new-tokens 24 --pairs-out "$DATA/rm_pairs.jsonl" \
  --gold-response '<answer>{answer}</answer>'
stage held-out-pairs "$DATA/held_out_rs.jsonl.summary.json" frontier-jax rejection-sample \
  --checkpoint "$SFT" --prompts "$DATA/held_out_math.jsonl" --n 8 --rewards math \
  --out "$DATA/held_out_rs.jsonl" --max-new-tokens 24 --pairs-out "$DATA/held_out_rm_pairs.jsonl" \
  --gold-response '<answer>{answer}</answer>'
stage rs-sft "$RUNS/rs-sft/checkpoints/$RS_STEPS" frontier-jax train --config train/sft-toy \
  --run-dir "$RUNS/rs-sft" train.init_from="$SFT" train.steps="$RS_STEPS" \
  "data.sources=[{name: rs, kind: jsonl, path: $DATA/rs_sft.jsonl, format: prompt_response}]"
ladder "$RUNS/rs-sft" rs-sft

stage reward-model "$RUNS/rm/checkpoints/$RM_STEPS" frontier-jax train --config train/sft-toy \
  --run-dir "$RUNS/rm" train.init_from="$SFT" model.head=scalar model.mtp_depth=0 \
  train.objective=preference train.preference.data="$DATA/rm_pairs.jsonl" train.steps="$RM_STEPS"
stage eval-rm "$RUNS/results/rm/results.json" frontier-jax eval --checkpoint "$RUNS/rm" --devices 1 \
  --preferences "$DATA/held_out_rm_pairs.jsonl" --out "$RUNS/results/rm"

# GRPO (README "GRPO"): from the same SFT run, one run per GRPO seed, each drawing as many samples
# as rejection sampling did (posttrain/grpo-toy: 125 steps x 128 = 2,000 prompts x 8); one more
# seed-0 run with routing replay; then the rollout/trainer gap in bf16 without and with replay.
GRPO_SEEDS=(${GRPO_SEEDS:-0 1 2})
GAP_STEPS=${GAP_STEPS:-20}
grpo() {  # NAME STEPS OVERRIDE...: a GRPO run from the SFT run, held-out greedy accuracy every 25 steps
  local name=$1 steps=$2
  shift 2
  stage "$name" "$RUNS/$name/checkpoints/$steps" frontier-jax grpo --config posttrain/grpo-toy \
    --run-dir "$RUNS/$name" train.init_from="$SFT" train.steps="$steps" \
    grpo.held_out="$DATA/held_out_math.jsonl" grpo.held_out_count=500 "$@"
}
for seed in "${GRPO_SEEDS[@]}"; do
  grpo "grpo-s$seed" 125 train.seed="$seed"
  ladder "$RUNS/grpo-s$seed" "grpo-s$seed"
done
grpo grpo-replay-s0 125 train.seed=0 grpo.routing_replay=true
for replay in false true; do
  grpo "gap-bf16-replay-$replay" "$GAP_STEPS" precision.policy=bf16 grpo.routing_replay="$replay" eval.every=0
done

python "$(dirname "$0")/posttrain_summary.py" "$RUNS"
