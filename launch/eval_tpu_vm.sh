#!/usr/bin/env bash
# Sharded evaluation on a Cloud TPU VM slice: the same command on every host.
#   launch/eval_tpu_vm.sh TPU_NAME ZONE gs://bucket/runs/x results/x mesh.fsdp=... [eval.* ...]
set -euo pipefail
tpu=${1:?TPU name}; zone=${2:?zone}; checkpoint=${3:?run directory}; out=${4:?results directory}; shift 4
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
  "cd ~/frontier_jax && python -m frontier_jax eval --distributed --checkpoint $checkpoint --out $out $*"
