#!/usr/bin/env bash
# The OpenAI-compatible server over a checkpoint on one host (all local devices), or on several
# local processes: process 0 serves HTTP, the others run its engine steps on their devices.
#   launch/serve_local.sh runs/toy --port 8000 [--served-model-name NAME] [mesh.* / infer.* / serve.* ...]
#   NUM_PROCESSES=2 DEVICES_PER_PROCESS=4 launch/serve_local.sh runs/toy --port 8000 mesh.data=2 mesh.tensor=4
# SIGTERM to this script (or Ctrl-C) drains process 0, which then stops the others; the exit
# status is the first non-zero one of the processes.
set -euo pipefail
checkpoint=${1:?run directory (or checkpoints/STEP)}; shift 1
n=${NUM_PROCESSES:-1}
if [ "$n" -eq 1 ]; then
  exec python -m frontier_jax serve --checkpoint "$checkpoint" "$@"
fi
port=${COORDINATOR_PORT:-12357}
pids=()
for ((i = 0; i < n; i++)); do
  JAX_COORDINATOR_ADDRESS=127.0.0.1:$port JAX_NUM_PROCESSES=$n JAX_PROCESS_ID=$i \
  XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-1}" \
    python -m frontier_jax serve --distributed --checkpoint "$checkpoint" "$@" &
  pids+=($!)
done
trap 'kill -TERM "${pids[0]}"' TERM  # process 0 drains and stops the others
trap '' INT  # Ctrl-C reaches process 0 itself (the others ignore it)
status=0
for pid in "${pids[@]}"; do
  rc=0
  wait "$pid" || rc=$?
  while kill -0 "$pid" 2>/dev/null; do  # a trapped signal ended the wait, not the process
    rc=0
    wait "$pid" || rc=$?
  done
  [ "$rc" -eq 0 ] || [ "$status" -ne 0 ] || status=$rc
done
exit $status
