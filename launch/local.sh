#!/usr/bin/env bash
# Single host, all local devices (CPU, one GPU or a GPU node):
#   launch/local.sh train/toy runs/toy [key=value ...]
# Multi-process on one machine (e.g. to exercise the multi-host code path with fake CPU devices):
#   NUM_PROCESSES=2 DEVICES_PER_PROCESS=4 launch/local.sh train/toy runs/mp train.global_batch=8
set -euo pipefail
config=${1:?config name or path}; run_dir=${2:?run directory}; shift 2
n=${NUM_PROCESSES:-1}
if [ "$n" -eq 1 ]; then
  exec python -m frontier_jax train --config "$config" --run-dir "$run_dir" "$@"
fi
port=${COORDINATOR_PORT:-12355}
pids=()
for ((i = 0; i < n; i++)); do
  JAX_COORDINATOR_ADDRESS=127.0.0.1:$port JAX_NUM_PROCESSES=$n JAX_PROCESS_ID=$i \
  XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-1}" \
    python -m frontier_jax train --distributed --config "$config" --run-dir "$run_dir" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
