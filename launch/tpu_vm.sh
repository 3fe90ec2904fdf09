#!/usr/bin/env bash
# Cloud TPU VM slice (v5p / v6e): run the same command on every host of the slice.
#   launch/tpu_vm.sh TPU_NAME ZONE train/toy gs://bucket/runs/x mesh.fsdp=... [key=value ...]
# Needs: gcloud, the repository checked out at ~/frontier_jax on every host, and
# `pip install -e . 'jax[tpu]'` there.  jax.distributed.initialize()
# discovers the slice's hosts by itself.  For multi-slice, set mesh.dcn.* (configs/mesh/tpu-v6e-256x2.yaml).
set -euo pipefail
tpu=${1:?TPU name}; zone=${2:?zone}; config=${3:?config}; run_dir=${4:?run directory}; shift 4
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
  "cd ~/frontier_jax && python -m frontier_jax train --distributed --config $config --run-dir $run_dir $*"
