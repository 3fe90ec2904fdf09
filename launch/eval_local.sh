#!/usr/bin/env bash
# Sharded evaluation of a checkpoint on one host (all local devices), or several local processes:
#   launch/eval_local.sh runs/toy results/toy [--data held_out.jsonl] [mesh.* / eval.* ...]
#   NUM_PROCESSES=2 DEVICES_PER_PROCESS=4 launch/eval_local.sh runs/toy results/toy mesh.tensor=2
# (the figures do not depend on the process count or the mesh layout).
set -euo pipefail
checkpoint=${1:?run directory (or checkpoints/STEP)}; out=${2:?results directory}; shift 2
n=${NUM_PROCESSES:-1}
if [ "$n" -eq 1 ]; then
  exec python -m frontier_jax eval --checkpoint "$checkpoint" --out "$out" "$@"
fi
port=${COORDINATOR_PORT:-12356}
pids=()
for ((i = 0; i < n; i++)); do
  JAX_COORDINATOR_ADDRESS=127.0.0.1:$port JAX_NUM_PROCESSES=$n JAX_PROCESS_ID=$i \
  XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-1}" \
    python -m frontier_jax eval --distributed --checkpoint "$checkpoint" --out "$out" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
