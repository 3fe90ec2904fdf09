"""Several processes on one mesh: joining them, and host copies of arrays they share.

`initialize_distributed` joins this process to the others (`jax.distributed.initialize`):
cluster auto-detection (Cloud TPU, SLURM, ...), or JAX_COORDINATOR_ADDRESS with
JAX_NUM_PROCESSES and JAX_PROCESS_ID set by the launcher (launch/local.sh).

An array sharded over devices of other processes cannot be read directly; `fetch` all-gathers
such arrays (a collective: every process calls it at the same point, as identical inference
steps do) and reads the others as `jax.device_get` does."""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils


def initialize_distributed() -> None:
    explicit = {
        key: int(os.environ[var])
        for key, var in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID"))
        if var in os.environ
    }
    jax.distributed.initialize(**explicit)


def _to_host(x):
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return jax.device_get(x)


def fetch(tree):
    """`tree` with every device array replaced by its whole value as a numpy array."""
    return jax.tree.map(_to_host, tree)
